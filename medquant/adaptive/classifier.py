"""The classification set-up of the report "Complexity-Based Quantization of Gemma 3 on MIMIC-CXR-JPG": a VLM
turned into a multi-label classifier, and compact image-only classifiers (CNN, ViT) with the same head, for the
adaptive-quantization experiments.

``VLMClassifier``::

    f_img  = mean over the image tokens of the vision-tower output     (the input of the VLM's projector)
    f_txt  = masked mean over the text tokens of hidden_states[text_layer] of the language model
    e      = concat(W_i f_img, W_t f_txt)                               (the fused embedding, 2 * fuse_dim)
    logits = head(e),  head = Linear(2 d, hidden) -> GELU -> Dropout -> Linear(hidden, n_labels)

trained with ``BCEWithLogitsLoss`` (one logit per label). The vision tower, projector and language model are
found with :func:`medquant.models.model_roles`; image features come from the model's own
``get_image_features`` (so every architecture's pixel conventions are respected) captured at the projector's
input by a forward pre-hook. The backbone is frozen by default (a feature extractor, as in that report).

Every sample gets its own row, independent of its batch-mates:

* 5-D ``pixel_values`` ``(B, N, C, H, W)`` (Idefics3 / SmolVLM, several sub-images per sample after image
  splitting): ``f_img(i) = sum_{s, t} v[s, t] h[s, t] / sum_{s, t} v[s, t]`` over the real sub-images ``s`` of
  sample ``i`` (an all-zero sub-image is batch padding, dropped as the model drops it) and their patch tokens
  ``t``, with ``v[s, t] = 1`` when patch ``t`` holds a pixel marked valid in ``pixel_attention_mask`` (zero
  padding of a smaller image is left out);
* Gemma 3 with pan-and-scan (``do_pan_and_scan=True``): each image gives ``1 + num_crops[i]`` rows of 4-D
  ``pixel_values`` (the whole image, then its crops), stacked over the batch; with ``num_crops`` (one count per
  image, one image per sample; ``Gemma3ImageProcessor`` gives it, ``Gemma3Processor`` drops it from its output, so
  take it from ``processor.image_processor``) ``f_img(i)`` is the mean over the tokens of all rows of image
  ``i``, the whole image included. Without ``num_crops`` every row is one sample; when that does not match the
  text rows the classifier raises a ``ValueError`` instead of mixing samples (image-only use cannot tell);
* PaliGemma's language model attends bidirectionally over its prefix: the text goes through the model's own
  prefix path (``token_type_ids = 0``), so padding in the batch does not make it causal.

The features are cast to the dtype of the projections (float32 by default, also over a bfloat16 VLM;
that of the cast after ``clf.to(torch.bfloat16)``).
``pixel_values`` must be floating point (the processor's normalized values; float64 is cast by the
backbone); integer pixels (raw ``uint8``) raise ``TypeError``.

``CompactCNN`` / ``SmallViT``: image-only classifiers with ``blocks`` (an ``nn.ModuleList``), a pooled
embedding and the same ``head``; ``default_adaptive_sites: ClassVar[tuple[str, ...]] = ("head",)`` (the fused-embedding site).
"""
from __future__ import annotations

import inspect
import itertools
from typing import Any, ClassVar

import torch
from torch import nn

from ..models import model_roles


def _mlp_head(in_dim: int, hidden: int, n_labels: int, dropout: float) -> nn.Sequential:
    return nn.Sequential(nn.Linear(in_dim, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, n_labels))


def _compute_dtype(module: nn.Module) -> torch.dtype:
    """The dtype ``module`` computes in: that of its first floating-point parameter (float32 without one)."""
    return next((p.dtype for p in module.parameters() if p.is_floating_point()), torch.float32)


def _check_n_labels(n_labels) -> int:
    if isinstance(n_labels, bool) or not isinstance(n_labels, int) or n_labels < 1:
        raise ValueError(f"n_labels must be a positive int, got {n_labels!r}")
    return n_labels


class VLMClassifier(nn.Module):
    """Multi-label classifier on top of a Hugging Face vision-language model (the set-up in the module docstring).

    ``forward(pixel_values, input_ids=None, attention_mask=None, **image_kwargs)``: ``image_kwargs`` are passed
    to ``get_image_features`` (``image_grid_thw`` for Qwen2-VL, ``pixel_attention_mask`` for Idefics3), except
    ``num_crops`` (Gemma 3 pan-and-scan), which groups the rows of ``pixel_values`` per sample and reaches
    ``get_image_features`` only when it names that parameter. Without ``input_ids`` the text half of the fused
    embedding is zero (image-only use).

    Args:
        vlm: a VLM supported by :func:`medquant.models.model_roles` (Gemma 3, LLaVA, Qwen2-VL / 2.5-VL,
            PaliGemma, Idefics3 / SmolVLM).
        n_labels: number of labels (one logit each).
        text_layer: which hidden state of the language model gives the text features: ``k`` = after ``k``
            decoder layers (0 = token embeddings), negative counts from the end (default -1 = last).
        fuse_dim: size of each projected modality feature; the fused embedding has ``2 * fuse_dim``.
        hidden: width of the MLP head.
        dropout: head dropout.
        freeze_backbone: freeze the VLM's parameters (default True). A frozen VLM also stays in eval mode when
            the classifier is put in training mode (``clf.train()``): its dropout is off, so the features the
            projections and head learn from are the ones they see at inference. With ``False`` the VLM follows
            the classifier's mode (fine-tuning it, e.g. with LoRA layers whose dropout should run).
        image_dim: the vision feature size when it cannot be read from the config.
        text_dim: the text feature size when it cannot be read from the config.

    Raises:
        ValueError: the model is no VLM medquant knows, has no ``get_image_features``, its feature sizes cannot be
            read (and were not given), ``text_layer`` is out of range, or ``n_labels`` is not positive.
        TypeError: ``text_layer`` is not an int.
    """

    default_adaptive_sites: ClassVar[tuple[str, ...]] = ("head",)

    def __init__(self, vlm: nn.Module, n_labels: int, text_layer: int = -1, fuse_dim: int = 128,
                 hidden: int = 128, dropout: float = 0.1, freeze_backbone: bool = True,
                 image_dim: int | None = None, text_dim: int | None = None):
        super().__init__()
        n_labels = _check_n_labels(n_labels)
        roles = model_roles(vlm)
        missing = [r for r in ("vision", "projector", "language") if not roles.get(r)]
        if missing:
            raise ValueError(f"{type(vlm).__name__} is not a vision-language model medquant knows (no "
                             f"{', '.join(missing)} role); supported: Gemma 3, LLaVA, Qwen2-VL, Qwen2.5-VL, "
                             "PaliGemma, Idefics3")
        self.vlm = vlm
        self._projector_name = roles["projector"][0]
        self._language_name = roles["language"][0]
        owner = vlm.model if hasattr(vlm, "model") and hasattr(vlm.model, "get_image_features") else vlm
        if not hasattr(owner, "get_image_features"):
            raise ValueError(f"{type(vlm).__name__} has no get_image_features(); cannot extract image features")
        self._owner_is_inner = owner is not vlm
        image_fn: Any = owner.get_image_features
        try:  # num_crops reaches get_image_features only when it names it (Gemma 3's does not)
            image_params = set(inspect.signature(image_fn).parameters)
        except (TypeError, ValueError):
            image_params = set()
        self._image_fn_takes_num_crops = "num_crops" in image_params
        # inputs get_image_features cannot do without (Qwen2-VL's flattened patches need their grid)
        self._image_fn_needs = tuple(k for k in ("image_grid_thw",) if k in image_params)
        cfg: Any = vlm.config
        # PaliGemma's text is a bidirectional prefix; its language model alone builds a causal mask whenever the
        # batch has padding (and none without), so text goes through the model's prefix path instead
        self._prefix_lm = getattr(cfg, "model_type", None) == "paligemma"
        vc = getattr(cfg, "vision_config", None)
        tc = cfg.get_text_config() if hasattr(cfg, "get_text_config") else getattr(cfg, "text_config", cfg)
        if image_dim is None:
            image_dim = getattr(vc, "embed_dim", None) or getattr(vc, "hidden_size", None)
            layers = getattr(cfg, "vision_feature_layer", None)
            if isinstance(layers, (list, tuple)) and image_dim:
                image_dim = image_dim * len(layers)
        if text_dim is None:
            text_dim = getattr(tc, "hidden_size", None)
        if not image_dim or not text_dim:
            raise ValueError("cannot read the vision / text hidden sizes from the config: pass image_dim= and "
                             "text_dim=")
        n_layers = getattr(tc, "num_hidden_layers", None)
        if isinstance(text_layer, bool) or not isinstance(text_layer, int):
            raise TypeError(f"text_layer must be an int, got {text_layer!r}")
        if n_layers is not None and not -(n_layers + 1) <= text_layer <= n_layers:
            raise ValueError(f"text_layer={text_layer} out of range for a language model with {n_layers} layers "
                             f"(accepted {-(n_layers + 1)}..{n_layers})")
        self.text_layer = text_layer
        self.image_dim, self.text_dim = int(image_dim), int(text_dim)
        self._patch_size = getattr(vc, "patch_size", None)
        self.image_proj = nn.Linear(self.image_dim, fuse_dim)
        self.text_proj = nn.Linear(self.text_dim, fuse_dim)
        self.head = _mlp_head(2 * fuse_dim, hidden, n_labels, dropout)
        self.n_labels = n_labels
        self.freeze_backbone = bool(freeze_backbone)
        if freeze_backbone:
            for p in vlm.parameters():
                p.requires_grad_(False)
            vlm.eval()

    def train(self, mode: bool = True) -> VLMClassifier:
        """Set training mode; a frozen backbone (``freeze_backbone=True``) stays in eval mode (class docstring)."""
        super().train(mode)
        if self.freeze_backbone:
            self.vlm.eval()
        return self

    # ------------------------------------------------------------------ features
    def image_features(self, pixel_values: torch.Tensor, **image_kwargs) -> torch.Tensor:
        """Pooled vision-tower features: the projector's input, mean over image tokens.

        5-D ``pixel_values`` ``(B, N, C, H, W)`` (Idefics3 / SmolVLM sub-images): one row per sample, the mean
        over the valid patch tokens of its real sub-images (module docstring). 4-D ``pixel_values`` with
        ``num_crops`` (Gemma 3 pan-and-scan): one row per image, the mean over the tokens of its
        ``1 + num_crops[i]`` consecutive rows (the whole image and its crops); without ``num_crops`` one row per
        row of ``pixel_values``.

        Args:
            pixel_values: the processor's pixel values.
            **image_kwargs: passed to ``get_image_features`` (e.g. ``image_grid_thw``, ``pixel_attention_mask``);
                ``num_crops`` (``Gemma3ImageProcessor``'s crop count per image, a 1-D int tensor or list) is used
                for pooling and passed on only when ``get_image_features`` names it.

        Returns:
            A tensor ``(B, image_dim)``.

        Raises:
            TypeError: ``pixel_values`` is a tensor of other than a floating-point dtype (raw ``uint8`` pixels:
                the backbones would cast them to float and use them as normalized values); float64 is accepted
                (cast by the backbone).
            RuntimeError: the projector did not run.
            ValueError: ``image_grid_thw`` missing for a model whose ``get_image_features`` takes it (Qwen2-VL),
                features of an unexpected shape or size, a sample whose sub-images are all padding, or a
                ``num_crops`` that is not 1-D non-negative ints, whose ``sum(1 + num_crops)`` is not the number of
                rows of ``pixel_values``, or that is given with other than 4-D ``pixel_values``.
            TypeError: ``num_crops`` is neither a tensor nor a list / tuple.
        """
        if isinstance(pixel_values, torch.Tensor) and not pixel_values.is_floating_point():
            # every processor gives rescaled, normalized floats; the backbones cast raw 0..255 ints silently
            raise TypeError(f"pixel_values must be floating point (the processor's rescaled, normalized "
                            f"values), got {pixel_values.dtype}: pass the images through the model's processor")
        missing = [k for k in self._image_fn_needs if image_kwargs.get(k) is None]
        if missing:
            raise ValueError(f"{type(self.vlm).__name__}.get_image_features needs {', '.join(missing)} (its "
                             f"processor gives it with pixel_values): pass it as a keyword, e.g. "
                             f"clf(pixel_values, input_ids=..., {missing[0]}=inputs[{missing[0]!r}])")
        num_crops = image_kwargs.pop("num_crops", None)
        crop_rows = None if num_crops is None else self._rows_per_image(num_crops, pixel_values)
        if num_crops is not None and self._image_fn_takes_num_crops:
            image_kwargs["num_crops"] = num_crops
        captured = {}

        def grab(module, args):
            captured["x"] = args[0]

        projector = dict(self.vlm.named_modules())[self._projector_name]
        h = projector.register_forward_pre_hook(grab)
        try:
            owner: Any = self.vlm.model if self._owner_is_inner else self.vlm
            owner.get_image_features(pixel_values=pixel_values, **image_kwargs)
        finally:
            h.remove()
        feats = captured.get("x")
        if feats is None:
            raise RuntimeError("the projector did not run: no image features captured")
        grid = image_kwargs.get("image_grid_thw")
        if crop_rows is not None:
            if feats.dim() != 3 or feats.shape[0] != sum(crop_rows):
                raise ValueError(f"num_crops gives {sum(crop_rows)} rows but the projector got image features "
                                 f"{tuple(feats.shape)}: num_crops needs one (tokens, dim) row per pixel_values row")
            pooled = torch.stack([c.mean(dim=(0, 1)) for c in torch.split(feats, crop_rows, dim=0)])
        elif feats.dim() == 3 and isinstance(pixel_values, torch.Tensor) and pixel_values.dim() == 5:
            pooled = self._pool_sub_images(feats, pixel_values, image_kwargs.get("pixel_attention_mask"))
        elif feats.dim() == 3:
            pooled = feats.mean(dim=1)
        elif feats.dim() == 2 and grid is not None:  # Qwen2-VL: all patches of all images, flattened
            sizes = [int(t) * int(h_) * int(w) for t, h_, w in grid.tolist()]
            pooled = torch.stack([c.mean(dim=0) for c in torch.split(feats, sizes, dim=0)])
        else:
            raise ValueError(f"unexpected image feature shape {tuple(feats.shape)} at the projector input")
        if pooled.shape[-1] != self.image_dim:
            raise ValueError(f"image features have {pooled.shape[-1]} dims, expected image_dim={self.image_dim}")
        return pooled

    @staticmethod
    def _rows_per_image(num_crops, pixel_values) -> list[int]:
        """``1 + num_crops[i]`` per image, checked against the rows of 4-D ``pixel_values`` (module docstring)."""
        if isinstance(num_crops, torch.Tensor):
            if num_crops.dim() != 1 or num_crops.is_floating_point() or num_crops.is_complex():
                raise ValueError(f"num_crops must be a 1-D int tensor or list (crops per image), got a "
                                 f"{num_crops.dtype} tensor of shape {tuple(num_crops.shape)}")
            counts = num_crops.tolist()
        elif isinstance(num_crops, (list, tuple)):
            counts = list(num_crops)
        else:
            raise TypeError(f"num_crops must be a 1-D int tensor or list (crops per image), got {num_crops!r}")
        if any(isinstance(c, bool) or not isinstance(c, int) or c < 0 for c in counts):
            raise ValueError(f"num_crops must hold non-negative ints (crops per image), got {counts}")
        if not isinstance(pixel_values, torch.Tensor) or pixel_values.dim() != 4:
            shape = tuple(pixel_values.shape) if isinstance(pixel_values, torch.Tensor) else type(pixel_values)
            raise ValueError(f"num_crops (Gemma 3 pan-and-scan) needs 4-D pixel_values (rows, C, H, W), got {shape}")
        rows = [1 + c for c in counts]
        if sum(rows) != pixel_values.shape[0]:
            raise ValueError(f"num_crops {counts} gives sum(1 + num_crops) = {sum(rows)} rows (the whole image and "
                             f"its crops per image) but pixel_values has {pixel_values.shape[0]}")
        return rows

    def _pool_sub_images(self, feats: torch.Tensor, pixel_values: torch.Tensor,
                         pixel_attention_mask: torch.Tensor | None) -> torch.Tensor:
        """Per-sample mean over the valid patch tokens of the real sub-images (module docstring)."""
        b, n = pixel_values.shape[:2]
        real = (pixel_values.reshape(b * n, -1) != 0).any(dim=1)  # the model drops all-zero (padding) images
        if feats.shape[0] != int(real.sum()):
            raise ValueError(f"{feats.shape[0]} sub-images reached the projector but pixel_values {tuple(pixel_values.shape)} "
                             f"has {int(real.sum())} that are not all zero: cannot tell which sample each belongs to")
        tokens = feats.shape[1]
        if pixel_attention_mask is None:
            valid = torch.ones(feats.shape[:2], dtype=torch.bool, device=feats.device)
        else:
            if self._patch_size is None:
                raise ValueError("pixel_attention_mask given but the vision config has no patch_size")
            p = int(self._patch_size)
            pam = pixel_attention_mask.reshape(b * n, *pixel_attention_mask.shape[2:])[real.to(pixel_attention_mask.device)]
            # a patch is valid when it holds a valid pixel (the vision model's own patch attention mask)
            valid = (pam.unfold(1, p, p).unfold(2, p, p).sum(dim=(-1, -2)) > 0).flatten(1).to(feats.device)
            if valid.shape[1] != tokens:
                raise ValueError(f"pixel_attention_mask gives {valid.shape[1]} patches per sub-image but the vision "
                                 f"model gave {tokens} tokens")
        w = valid.to(torch.float32)
        sums = (feats.float() * w.unsqueeze(-1)).sum(dim=1)  # (R, d)
        owner = torch.arange(b, device=feats.device).repeat_interleave(n)[real.to(feats.device)]
        total = torch.zeros(b, feats.shape[-1], device=feats.device).index_add_(0, owner, sums)
        count = torch.zeros(b, device=feats.device).index_add_(0, owner, w.sum(dim=1))
        empty = (count == 0).nonzero().flatten().tolist()
        if empty:
            raise ValueError(f"sample(s) {empty} have no image: all their sub-images are all zero (padding)")
        return (total / count.unsqueeze(-1)).to(feats.dtype)

    def text_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Masked mean of the language model's ``hidden_states[text_layer]`` over the text tokens.

        PaliGemma: the language model run through the model's prefix path (bidirectional, module docstring).

        Args:
            input_ids: token ids ``(B, T)``.
            attention_mask: 1 for the tokens to average (default: all).

        Returns:
            A tensor ``(B, text_dim)``.
        """
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if self._prefix_lm:  # PaliGemma: the whole text is the bidirectional prefix (module docstring)
            owner: Any = self.vlm.model if self._owner_is_inner else self.vlm  # PaliGemmaModel: no logits
            out = owner(input_ids=input_ids, attention_mask=attention_mask,
                        token_type_ids=torch.zeros_like(input_ids), output_hidden_states=True)
        else:
            lm = dict(self.vlm.named_modules())[self._language_name]
            out = lm(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True)
        hs = out.hidden_states[self.text_layer]
        m = attention_mask.to(hs.dtype).unsqueeze(-1)
        return (hs * m).sum(dim=1) / m.sum(dim=1).clamp_min(1.0)

    def fused_embedding(self, pixel_values, input_ids=None, attention_mask=None, **image_kwargs) -> torch.Tensor:
        """Projected image features concatenated with projected text features (zeros without ``input_ids``).

        Args:
            pixel_values: the processor's pixel values.
            input_ids: token ids, or None for image-only use.
            attention_mask: the tokens' mask.
            **image_kwargs: passed to ``get_image_features`` (``num_crops``: see :meth:`image_features`).

        Returns:
            A tensor ``(B, 2 * fuse_dim)`` in the dtype of the projections.

        Raises:
            ValueError: a different number of pooled image rows and text rows (checked before the language
                model runs), e.g. Gemma 3 pan-and-scan crops without ``num_crops``, or several images per sample.
        """
        # the features meet the projections in their dtype: float32 by default, bfloat16 after clf.to(bfloat16)
        with_counts = image_kwargs.get("num_crops") is not None
        fi = self.image_proj(self.image_features(pixel_values, **image_kwargs).to(_compute_dtype(self.image_proj)))
        if input_ids is None:
            return torch.cat([fi, torch.zeros_like(fi)], dim=-1)
        if input_ids.shape[0] != fi.shape[0]:
            hint = ("num_crops has one count per image and one image per sample is accepted" if with_counts else
                    "pixel_values rows are one image per sample unless num_crops is given (Gemma 3 "
                    "pan-and-scan: the whole image and its crops, sum(1 + num_crops) rows)")
            raise ValueError(f"{fi.shape[0]} pooled image rows but {input_ids.shape[0]} samples in input_ids: {hint}")
        ft = self.text_proj(self.text_features(input_ids, attention_mask).to(_compute_dtype(self.text_proj)))
        return torch.cat([fi, ft], dim=-1)

    def forward(self, pixel_values, input_ids=None, attention_mask=None, **image_kwargs) -> torch.Tensor:
        """Logits ``(N, n_labels)`` from the fused embedding (see :meth:`fused_embedding`).

        Args:
            pixel_values: the processor's pixel values.
            input_ids: token ids, or None for image-only use.
            attention_mask: the tokens' mask.
            **image_kwargs: passed to ``get_image_features`` (``num_crops``: see :meth:`image_features`).

        Returns:
            Logits ``(N, n_labels)``.

        Raises:
            ValueError: see :meth:`fused_embedding` and :meth:`image_features`.
        """
        return self.head(self.fused_embedding(pixel_values, input_ids, attention_mask, **image_kwargs))


class _Block(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(cout)
        self.act = nn.ReLU()
        self.pool = nn.MaxPool2d(2)

    def forward(self, x):
        return self.pool(self.act(self.bn(self.conv(x))))


class CompactCNN(nn.Module):
    """Image-only classifier: conv blocks, global average pool and the MLP head of :class:`VLMClassifier`.

    ``blocks`` (conv3x3-BN-ReLU-maxpool per width), global average pool, the MLP ``head``
    (``default_adaptive_sites = ("head",)``: its input is the embedding).

    Args:
        n_labels: number of labels (one logit each).
        in_channels: image channels.
        widths: the output channels of the conv blocks.
        hidden: width of the MLP head.
        dropout: head dropout.
    """

    default_adaptive_sites: ClassVar[tuple[str, ...]] = ("head",)

    def __init__(self, n_labels: int, in_channels: int = 1, widths=(16, 32, 64, 64), hidden: int = 64,
                 dropout: float = 0.1):
        super().__init__()
        n_labels = _check_n_labels(n_labels)
        chans = [in_channels, *widths]
        self.blocks = nn.ModuleList(_Block(a, b) for a, b in itertools.pairwise(chans))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = _mlp_head(widths[-1], hidden, n_labels, dropout)
        self.n_labels = n_labels

    def embed(self, x):
        """The pooled feature vector of images ``x``.

        Args:
            x: images ``(N, in_channels, H, W)``.

        Returns:
            A tensor ``(N, widths[-1])``.
        """
        for b in self.blocks:
            x = b(x)
        return self.pool(x).flatten(1)

    def forward(self, x):
        """Logits ``(N, n_labels)`` of images ``x``.

        Args:
            x: images ``(N, in_channels, H, W)``.

        Returns:
            Logits ``(N, n_labels)``.
        """
        return self.head(self.embed(x))


class _ViTBlock(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: int = 2):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.o = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_ratio * dim), nn.GELU(), nn.Linear(mlp_ratio * dim, dim))
        self.heads = heads

    def forward(self, x):
        b, t, d = x.shape
        h = self.norm1(x)
        q, k, v = (f(h).view(b, t, self.heads, d // self.heads).transpose(1, 2) for f in (self.q, self.k, self.v))
        a = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        x = x + self.o(a.transpose(1, 2).reshape(b, t, d))
        return x + self.mlp(self.norm2(x))


class SmallViT(nn.Module):
    """Image-only ViT with the MLP head of :class:`VLMClassifier`.

    Conv patch embedding, learned positions, ``blocks`` of pre-norm attention + MLP (plain ``nn.Linear``
    projections, so ``quantize_`` reaches all of them), mean-pooled tokens, the MLP ``head``.

    Args:
        n_labels: number of labels (one logit each).
        image_size: the (square) image side the model takes.
        patch: the patch side.
        in_channels: image channels.
        dim: the token width.
        depth: the number of blocks.
        heads: attention heads per block.
        hidden: width of the MLP head.
        dropout: head dropout.

    Raises:
        ValueError: ``image_size`` is not a multiple of ``patch``, or ``dim`` of ``heads``.
    """

    default_adaptive_sites: ClassVar[tuple[str, ...]] = ("head",)

    def __init__(self, n_labels: int, image_size: int = 64, patch: int = 8, in_channels: int = 1, dim: int = 64,
                 depth: int = 4, heads: int = 4, hidden: int = 64, dropout: float = 0.1):
        super().__init__()
        n_labels = _check_n_labels(n_labels)
        if image_size % patch or dim % heads:
            raise ValueError(f"image_size ({image_size}) must be a multiple of patch ({patch}) and dim ({dim}) "
                             f"of heads ({heads})")
        self.patch = nn.Conv2d(in_channels, dim, patch, stride=patch)
        self.pos = nn.Parameter(torch.randn(1, (image_size // patch) ** 2, dim) * 0.02)
        self.blocks = nn.ModuleList(_ViTBlock(dim, heads) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.head = _mlp_head(dim, hidden, n_labels, dropout)
        self.image_size = image_size
        self.n_labels = n_labels

    def embed(self, x):
        """The mean of the final token features of images ``x``.

        Args:
            x: images ``(N, in_channels, image_size, image_size)``.

        Returns:
            A tensor ``(N, dim)``.

        Raises:
            ValueError: images of another size than the model was built for.
        """
        if x.shape[-1] != self.image_size or x.shape[-2] != self.image_size:
            raise ValueError(f"SmallViT was built for {self.image_size}x{self.image_size} images, got "
                             f"{tuple(x.shape[-2:])}")
        x = self.patch(x).flatten(2).transpose(1, 2) + self.pos
        for b in self.blocks:
            x = b(x)
        return self.norm(x).mean(dim=1)

    def forward(self, x):
        """Logits ``(N, n_labels)`` of images ``x``.

        Args:
            x: images ``(N, in_channels, image_size, image_size)``.

        Returns:
            Logits ``(N, n_labels)``.
        """
        return self.head(self.embed(x))
