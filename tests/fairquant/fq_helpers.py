"""Shared tiny models and calibration data for the FairQuant tests."""
from __future__ import annotations

import torch
from torch import nn


class TinyMLP(nn.Module):
    def __init__(self, d_in: int = 6, hidden: int = 8, n_classes: int = 3) -> None:
        super().__init__()
        self.fc1 = nn.Linear(d_in, hidden)
        self.act = nn.Tanh()
        self.fc2 = nn.Linear(hidden, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


def tiny_mlp(seed: int = 0) -> TinyMLP:
    torch.manual_seed(seed)
    return TinyMLP().eval()


def grouped_batches(n_batches: int = 3, batch: int = 10, d_in: int = 6, n_classes: int = 3, n_groups: int = 2,
                    seed: int = 0, image: tuple[int, ...] | None = None) -> list[tuple]:
    """(x, y, groups) batches; every batch contains every group."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n_batches):
        shape = (batch, *image) if image else (batch, d_in)
        x = torch.randn(*shape, generator=g)
        y = torch.randint(0, n_classes, (batch,), generator=g)
        grp = torch.arange(batch) % n_groups
        out.append((x, y, grp[torch.randperm(batch, generator=g)]))
    return out
