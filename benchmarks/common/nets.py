"""Small CPU-trainable classifiers and a training loop for the FairQuant benchmarks
(``python -m benchmarks.fairquant``, ``benchmarks.fairquant_allocate``, ``benchmarks.fairquant_baq``).

* :class:`SmallCNN` - three Conv-BN-ReLU-MaxPool blocks (32/64/128 channels), global average pool, Linear head.
* :class:`CLSTokenViT` - patch-embedding Conv2d (patch 8), CLS token, learned positions, pre-norm blocks whose
  attention and MLP are plain ``nn.Linear`` (so ``quantize_`` reaches every projection), Linear head on the CLS
  token. (Not :class:`medquant.adaptive.SmallViT`, which mean-pools its tokens into an MLP head.)
* :func:`train_classifier` - AdamW, cross-entropy with inverse-square-root class-frequency weights (the sets
  are imbalanced), optional flips as augmentation, tqdm progress.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .resnet import ResNet18


class SmallCNN(nn.Module):
    def __init__(self, in_channels: int = 1, num_classes: int = 2, width: int = 32) -> None:
        super().__init__()
        layers, c = [], in_channels
        for w in (width, 2 * width, 4 * width):
            layers += [nn.Conv2d(c, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU(), nn.MaxPool2d(2)]
            c = w
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(c, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).mean((2, 3)))


class _Block(nn.Module):
    def __init__(self, dim: int, heads: int, mlp: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, mlp)
        self.fc2 = nn.Linear(mlp, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, t, d)
        x = x + self.proj(a)
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class CLSTokenViT(nn.Module):
    def __init__(self, in_channels: int = 1, num_classes: int = 2, image: int = 64, patch: int = 8, dim: int = 96,
                 depth: int = 4, heads: int = 4, mlp: int = 192) -> None:
        super().__init__()
        self.patch_embed = nn.Conv2d(in_channels, dim, patch, stride=patch)
        n = (image // patch) ** 2
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos = nn.Parameter(torch.randn(1, n + 1, dim) * 0.02)
        self.blocks = nn.Sequential(*[_Block(dim, heads, mlp) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.patch_embed(x).flatten(2).transpose(1, 2)
        t = torch.cat([self.cls.expand(t.shape[0], -1, -1), t], 1) + self.pos
        return self.head(self.norm(self.blocks(t))[:, 0])


ARCHS = {"cnn": SmallCNN, "vit": CLSTokenViT, "resnet18": ResNet18}


def build(arch: str, in_channels: int, num_classes: int, image: int = 64) -> nn.Module:
    """A fresh ``arch`` network (``"cnn"``, ``"vit"`` or ``"resnet18"``); ``image`` is the ViT's input size."""
    if arch not in ARCHS:
        raise ValueError(f"unknown architecture {arch!r}; accepted: {', '.join(ARCHS)}")
    if arch == "vit":
        return CLSTokenViT(in_channels, num_classes, image=image)
    return ARCHS[arch](in_channels, num_classes)


def class_weights(y: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Inverse square root of the class frequencies, normalised to mean 1."""
    cnt = torch.bincount(y, minlength=num_classes).float().clamp_min(1)
    w = cnt.rsqrt()
    return w * num_classes / w.sum()


def _augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    flip_h = torch.rand(x.shape[0], generator=gen) < 0.5
    x = torch.where(flip_h[:, None, None, None], x.flip(3), x)
    return x


def train_classifier(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, epochs: int = 5, lr: float = 2e-3,
                     batch_size: int = 64, weight_decay: float = 0.01, seed: int = 0, augment: bool = True,
                     num_classes: int | None = None, progress: bool = True, desc: str = "train") -> nn.Module:
    """Train ``model`` in place (AdamW with cosine decay, weighted CE); returns it in eval mode."""
    gen = torch.Generator().manual_seed(seed)
    nc = num_classes or int(y.max()) + 1
    cw = class_weights(y, nc)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    steps = epochs * math.ceil(len(x) / batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=max(1, steps), pct_start=0.15)
    it = range(epochs)
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(it, desc=desc, unit="epoch", leave=False)
    model.train()
    for _ in it:
        perm = torch.randperm(len(x), generator=gen)
        for i in range(0, len(x), batch_size):
            idx = perm[i:i + batch_size]
            xb = _augment(x[idx], gen) if augment else x[idx]
            loss = F.cross_entropy(model(xb), y[idx], weight=cw)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
    return model.eval()


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    model.eval()
    return torch.cat([model(x[i:i + batch_size]).argmax(1) for i in range(0, len(x), batch_size)])


def batches(x: torch.Tensor, y: torch.Tensor, g: torch.Tensor, batch_size: int, seed: int | None = None,
            augment: bool = False) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """``(x, y, groups)`` mini-batches in a seeded random order (a list, so it can be re-iterated)."""
    gen = torch.Generator().manual_seed(seed if seed is not None else 0)
    perm = torch.randperm(len(x), generator=gen) if seed is not None else torch.arange(len(x))
    out = []
    for i in range(0, len(x), batch_size):
        idx = perm[i:i + batch_size]
        xb = _augment(x[idx], gen) if augment else x[idx]
        out.append((xb, y[idx], g[idx]))
    return out
