"""Activation-aware weight quantization: AWQ-style per-input-channel scales (seed 004, SPEC section 5).

For a group of linears ``W_1..W_m`` that read the same input ``X`` (q/k/v after the attention norm; gate/up after
the FFN norm; down after up; o after v), scaling input channel ``j`` of every ``W_i`` by ``s_j`` and dividing the
op that produces ``X`` by ``s_j`` leaves the float function unchanged:
``X W^T = (X diag(1/s)) (W diag(s))^T``. Quantizing ``W diag(s)`` instead of ``W`` protects the channels with
large activations (their weights get a finer relative grid). Scales are searched per group on calibration data:

    a_j = mean_t |X_tj|,   s(alpha) = a^alpha / sqrt(max(a^alpha) * min(a^alpha)),
    alpha* = argmin_{alpha in {0, 0.1, ..., 1}} sum_i || X W_i^T - X (Q(W_i diag(s)) diag(s)^-1)^T ||^2

``Q`` is medquant's fake quantizer with the target :class:`QuantConfig`. ``alpha = 0`` gives ``s = 1``, i.e.
plain round-to-nearest, so on the calibration inputs the chosen scales are never worse than RTN for a group.
The scales are folded *exactly* into the preceding op: RMSNorm ``w /= s`` (Gemma's ``1 + w`` form:
``w = (1 + w)/s - 1``), LayerNorm ``w /= s, b /= s``, or a preceding linear's rows (weight and bias) ``/= s``.
Where nothing can absorb the scale (post-norm BERT blocks; v -> o under grouped-query attention, where one v
row feeds several heads; fc1 -> fc2 through a non-linear activation) the group is not formed and those linears
are quantized plainly.

All groups are searched on activations collected once from the float model, then folded; the float model's
outputs are unchanged by folding (up to float rounding), which the tests check before quantization.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from .api import quantize_
from .config import QuantConfig
from .core import fake_quantize

__all__ = ["ScaleGroup", "awq_groups", "awq_quantize_", "search_and_fold"]

_ATTN_NORMS = ("input_layernorm", "layer_norm1", "layernorm_before")
_FFN_NORMS = ("pre_feedforward_layernorm", "post_attention_layernorm", "layer_norm2", "layernorm_after")


@dataclass
class ScaleGroup:
    """Linears sharing one input, and the op producing it (``prev``) that absorbs the scales."""

    prev: str
    linears: list[str]
    alpha: float | None = None
    err_rtn: float | None = None
    err_awq: float | None = None


def _norm_kind(mod: nn.Module) -> str | None:
    name = type(mod).__name__
    if isinstance(mod, nn.LayerNorm):
        return "layernorm" if mod.elementwise_affine else None
    if "RMSNorm" in name and isinstance(getattr(mod, "weight", None), nn.Parameter):
        return "gemma_rmsnorm" if name.startswith("Gemma") else "rmsnorm"
    return None


def awq_groups(model: nn.Module, scope: str | list[str] | None = None) -> list[ScaleGroup]:
    """Scale groups of the pre-norm transformer blocks in scope (see the module docstring)."""
    from ..prune.arch import find_blocks

    groups: list[ScaleGroup] = []
    for b in find_blocks(model, scope):
        blk = model.get_submodule(b.name)
        kids = dict(blk.named_children())
        attn_norm = next((n for n in _ATTN_NORMS if n in kids and _norm_kind(kids[n])), None)
        ffn_norm = next((n for n in _FFN_NORMS if n in kids and _norm_kind(kids[n])), None)
        if b.attention is not None and attn_norm and attn_norm != ffn_norm:
            a = b.attention
            groups.append(ScaleGroup(f"{b.name}.{attn_norm}", [a.q, a.k, a.v]))
            if a.n_kv == a.n_heads:
                groups.append(ScaleGroup(a.v, [a.o]))
        if b.ffn is not None and ffn_norm:
            f = b.ffn
            groups.append(ScaleGroup(f"{b.name}.{ffn_norm}", list(f.inputs)))
            if len(f.inputs) == 2:  # gated: act(gate(x)) * up(x) is linear in up's output
                groups.append(ScaleGroup(f.inputs[1], [f.output]))
    return groups


def _run(model: nn.Module, batch: Any) -> None:
    if isinstance(batch, dict):
        model(**batch)
    elif isinstance(batch, (tuple, list)):
        model(*batch)
    else:
        model(batch)


@torch.no_grad()
def _collect(model: nn.Module, groups: list[ScaleGroup], calib: Iterable[Any], max_rows: int,
             progress: bool) -> dict[str, torch.Tensor]:
    xs: dict[str, list[torch.Tensor]] = {g.linears[0]: [] for g in groups}
    handles = []

    def make(name: str):
        def hook(mod, args):
            x = args[0].detach().float()
            xs[name].append(x.reshape(-1, x.shape[-1]))
        return hook

    for name in xs:
        handles.append(model.get_submodule(name).register_forward_pre_hook(make(name)))
    try:
        n = 0
        for batch in tqdm(calib, desc="AWQ calibration", disable=not progress, leave=False):
            _run(model, batch)
            n += 1
    finally:
        for h in handles:
            h.remove()
    if n == 0:
        raise ValueError("AWQ needs calibration data: the calibration iterable is empty")
    out = {}
    gen = torch.Generator().manual_seed(0)
    for name, parts in xs.items():
        x = torch.cat(parts)
        if x.shape[0] > max_rows:
            x = x[torch.randperm(x.shape[0], generator=gen)[:max_rows]]
        out[name] = x
    return out


def _group_error(x: torch.Tensor, weights: Sequence[torch.Tensor], s: torch.Tensor, config: QuantConfig) -> float:
    err = 0.0
    for w in weights:
        wq = fake_quantize(w * s, config) / s
        err += float((x @ (w - wq).T).pow(2).sum())
    return err


@torch.no_grad()
def _fold(model: nn.Module, g: ScaleGroup, s: torch.Tensor) -> None:
    prev = model.get_submodule(g.prev)
    if isinstance(prev, nn.Linear):
        prev.weight.div_(s.to(prev.weight.dtype)[:, None])
        if prev.bias is not None:
            prev.bias.div_(s.to(prev.bias.dtype))
    else:
        kind = _norm_kind(prev)
        if kind == "gemma_rmsnorm":
            prev.weight.copy_((1.0 + prev.weight.float()) / s - 1.0)
        elif kind in ("rmsnorm", "layernorm"):
            prev.weight.div_(s.to(prev.weight.dtype))
            if kind == "layernorm" and prev.bias is not None:
                prev.bias.div_(s.to(prev.bias.dtype))
        else:
            raise ValueError(f"{g.prev}: cannot fold scales into a {type(prev).__name__}")
    for name in g.linears:
        lin = model.get_submodule(name)
        lin.weight.mul_(s.to(lin.weight.dtype)[None, :])


@torch.no_grad()
def search_and_fold(model: nn.Module, config: QuantConfig, calib: Iterable[Any], *,
                    scope: str | list[str] | None = None, grid: int = 10, max_rows: int = 2048,
                    progress: bool = True) -> list[ScaleGroup]:
    """Search per-group scales for ``config`` and fold them into the float model (outputs unchanged).

    Returns the groups with the chosen ``alpha`` and the calibration output errors of RTN and of the scaled
    weights (``err_rtn`` / ``err_awq``, summed squared errors of the group's linear outputs).
    """
    if not isinstance(config, QuantConfig):
        raise TypeError(f"config must be a QuantConfig, got {type(config).__name__}")
    groups = awq_groups(model, scope)
    if not groups:
        raise ValueError(f"{type(model).__name__}: no foldable (norm/linear -> linears) groups found for AWQ")
    was = model.training
    model.eval()
    try:
        xs = _collect(model, groups, calib, max_rows, progress)
    finally:
        model.train(was)
    chosen: list[torch.Tensor] = []
    for g in tqdm(groups, desc="AWQ scale search", disable=not progress, leave=False):
        x = xs[g.linears[0]]
        ws = [model.get_submodule(n).weight.float() for n in g.linears]
        a = x.abs().mean(0).clamp_min(1e-8)
        best = (float("inf"), 0.0, torch.ones_like(a))
        rtn = None
        for i in range(grid + 1):
            alpha = i / grid
            s = a.pow(alpha)
            s = s / (s.max() * s.min()).sqrt()
            if alpha == 0:
                s = torch.ones_like(a)
            err = _group_error(x, ws, s, config)
            if alpha == 0:
                rtn = err
            if err < best[0]:
                best = (err, alpha, s)
        g.alpha, g.err_rtn, g.err_awq = best[1], rtn, best[0]
        chosen.append(best[2])
    for g, s in zip(groups, chosen):
        _fold(model, g, s)
    return groups


def awq_quantize_(model: nn.Module, config: QuantConfig, calib: Iterable[Any], *,
                  scope: str | list[str] | None = None, skip: Iterable[str] | None = ("@head",),
                  grid: int = 10, max_rows: int = 2048, progress: bool = True) -> list[ScaleGroup]:
    """:func:`search_and_fold` then :func:`medquant.quantize_` every Linear (except ``skip``) with ``config``."""
    calib = list(calib)
    groups = search_and_fold(model, config, calib, scope=scope, grid=grid, max_rows=max_rows, progress=progress)
    quantize_(model, config, skip=list(skip) if skip else None)
    return groups
