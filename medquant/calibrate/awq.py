"""Activation-aware weight quantization: AWQ-style per-input-channel scales.

For a group of linears ``W_1..W_m`` that read the same input ``X`` (q/k/v after the attention norm; gate/up after
the FFN norm; down after up; o after v), scaling input channel ``j`` of every ``W_i`` by ``s_j`` and dividing the
op that produces ``X`` by ``s_j`` leaves the float function unchanged:
``X W^T = (X diag(1/s)) (W diag(s))^T``. Quantizing ``W diag(s)`` instead of ``W`` protects the channels with
large activations (their weights get a finer relative grid). Scales are searched per group on calibration data:

    a_j = mean_t |X_tj|,   s(alpha) = a^alpha / sqrt(max(a^alpha) * min(a^alpha)),
    alpha* = argmin_{alpha in {0, 0.1, ..., 1}} sum_i || X W_i^T - X (Q(W_i diag(s)) diag(s)^-1)^T ||^2

The rows ``t`` of ``X`` are the group's input rows on the calibration batches (flattened over all leading dims),
without the padding positions: in a dict batch with a 2-D ``attention_mask``, the rows whose mask is 0 are left out
of both ``a`` (the mean is over the real tokens only) and the loss, for every group whose input is
``(batch, tokens, K)`` with the mask's shape - as GPTQ leaves them out of its Hessians, with the same exception: the
groups in the vision tower or the projector (image patches, never padding, even when their count equals the number
of tokens); ``max_rows`` subsamples the rows that remain. A
right-padded batch of a causal language model thus gives the statistics, alphas and codes of its sequences run
unpadded (up to float rounding).

``Q`` is medquant's fake quantizer with the target :class:`QuantConfig`. ``alpha = 0`` gives ``s = 1``, i.e.
plain round-to-nearest, so on the calibration inputs the chosen scales are never worse than RTN for a group.
The scales are folded *exactly* into the preceding op: RMSNorm ``w /= s`` (Gemma's ``1 + w`` form:
``w = (1 + w)/s - 1``), LayerNorm ``w /= s, b /= s``, or a preceding linear's rows (weight and bias) ``/= s``.
Where nothing can absorb the scale (post-norm BERT blocks; v -> o under grouped-query attention, where one v
row feeds several heads; fc1 -> fc2 through a non-linear activation) the group is not formed and those linears
are quantized plainly.

:func:`awq_quantize_` searches all groups on activations collected once from the float model, then folds; the
float model's outputs are unchanged by folding (up to float rounding), which the tests check before quantization.
:func:`awq_quantize_sequential` does the same block by block through
:func:`medquant.calibrate.quantize_sequential` (for models that do not fit on the compute device): each block is searched on the activations of the already
quantized previous blocks (GPTQ/AWQ convention), folded, quantized and offloaded. Both paths share the per-group
search (:func:`_search_group`) and the fold.
"""
from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ..models.blocks import block_stacks, transformer_blocks
from ..models.runner import eval_mode, run_model
from ..quant.api import as_config_map, quantize_
from ..quant.config import QuantConfig
from ..quant.core import fake_quantize
from ._forward import row_mask, token_mask, unmasked_layers
from .sequential import BlockInputs, quantize_sequential

__all__ = ["ScaleGroup", "awq_groups", "awq_quantize_", "awq_quantize_sequential", "search_and_fold",
           "search_and_fold_block"]

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


def _check_search_args(grid: int, max_rows: int | None) -> None:
    """``grid`` an int >= 1 and ``max_rows`` None or an int >= 1 (``bool`` refused), checked before any work."""
    if isinstance(grid, bool) or not isinstance(grid, int) or grid < 1:
        raise ValueError(f"grid must be an integer >= 1 (alpha is searched over 0, 1/grid, ..., 1), got {grid!r}")
    if max_rows is not None and (isinstance(max_rows, bool) or not isinstance(max_rows, int) or max_rows < 1):
        raise ValueError(f"max_rows must be None (keep every input row) or an integer >= 1, got {max_rows!r}")


def _rows(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """The calibration rows of a group's input ``x``: ``x`` flattened to ``(rows, K)``, without the padding
    positions where ``mask`` (the batch's :func:`~medquant.calibrate._forward.token_mask`) marks ``x``'s rows
    (:func:`~medquant.calibrate._forward.row_mask`); all rows otherwise."""
    m = row_mask(x, mask)
    return x.reshape(-1, x.shape[-1]) if m is None else x[m.to(x.device)]


def _check_finite(x: torch.Tensor, layer: str, batch: int) -> None:
    """``x`` (a group's input on one calibration batch) holds no NaN / inf (the error names the layer and batch)."""
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"layer {layer}: calibration input holds {int((~torch.isfinite(x)).sum())} NaN/inf values "
                         f"(calibration batch {batch}); the AWQ scale search needs finite activations")


def _norm_kind(mod: nn.Module) -> str | None:
    name = type(mod).__name__
    if isinstance(mod, nn.LayerNorm):
        return "layernorm" if mod.elementwise_affine else None
    if "RMSNorm" in name and isinstance(getattr(mod, "weight", None), nn.Parameter):
        return "gemma_rmsnorm" if name.startswith("Gemma") else "rmsnorm"
    return None


def _groups_by_block(model: nn.Module, scope: str | list[str] | None = None) -> dict[str, list[ScaleGroup]]:
    """Block name -> its scale groups (full module names), blocks in order; blocks without a group left out."""
    out: dict[str, list[ScaleGroup]] = {}
    for b in transformer_blocks(model, scope):
        blk = model.get_submodule(b.name)
        kids = dict(blk.named_children())
        attn_norm = next((n for n in _ATTN_NORMS if n in kids and _norm_kind(kids[n])), None)
        ffn_norm = next((n for n in _FFN_NORMS if n in kids and _norm_kind(kids[n])), None)
        groups: list[ScaleGroup] = []
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
        if groups:
            out[b.name] = groups
    return out


def awq_groups(model: nn.Module, scope: str | list[str] | None = None) -> list[ScaleGroup]:
    """Scale groups of the pre-norm transformer blocks in scope (see the module docstring).

    Args:
        model: the float model.
        scope: which blocks: ``None`` (the language model, or the vision tower of an encoder), ``"language"``,
            ``"vision"``, ``"all"``, or a list of roles.

    Returns:
        The :class:`ScaleGroup` list (full module names; ``alpha`` and errors not yet set); empty when nothing
        can absorb the scales (e.g. post-norm blocks).
    """
    return [g for gs in _groups_by_block(model, scope).values() for g in gs]


@torch.no_grad()
def _collect(model: nn.Module, groups: list[ScaleGroup], calib: Iterable[Any], max_rows: int | None,
             progress: bool) -> dict[str, torch.Tensor]:
    """Each group's input rows on the calibration batches (padding positions left out, see the module docstring),
    subsampled to ``max_rows``."""
    xs: dict[str, list[torch.Tensor]] = {g.linears[0]: [] for g in groups}
    unmasked = unmasked_layers(model, xs)
    handles = []
    n = 0
    mask: list[torch.Tensor | None] = [None]

    def make(name: str):
        def hook(mod, args):
            x = _rows(args[0].detach().float(), None if name in unmasked else mask[0])
            _check_finite(x, name, n)
            xs[name].append(x)
        return hook

    for name in xs:
        handles.append(model.get_submodule(name).register_forward_pre_hook(make(name)))
    try:
        for batch in tqdm(calib, desc="AWQ calibration", disable=not progress, leave=False):
            mask[0] = token_mask(batch)
            run_model(model, batch)
            n += 1
    finally:
        for h in handles:
            h.remove()
    if n == 0:
        raise ValueError("AWQ needs calibration data: the calibration iterable is empty")
    return _subsample(xs, max_rows)


def _subsample(xs: dict[str, list[torch.Tensor]], max_rows: int | None, prefix: str = "") -> dict[str, torch.Tensor]:
    """Concatenate each group's input rows; keep ``max_rows`` random rows (one seeded generator, groups in
    order) where there are more (``None``: keep all). ``prefix`` completes the layer names in error messages."""
    out = {}
    gen = torch.Generator().manual_seed(0)
    for name, parts in xs.items():
        if not parts:
            raise ValueError(f"layer {prefix}{name} received no calibration inputs: the forward did not call it on "
                             "the calibration batches (narrow the AWQ scope, or give batches that reach it)")
        x = torch.cat(parts)
        if x.shape[0] == 0:
            raise ValueError(f"layer {prefix}{name} was called {len(parts)} time(s) but received 0 input rows: the "
                             "calibration batches are empty (no samples, no tokens, or only padding positions); give "
                             "batches with at least one sample and one real token")
        if max_rows is not None and x.shape[0] > max_rows:
            x = x[torch.randperm(x.shape[0], generator=gen)[:max_rows].to(x.device)]
        out[name] = x
    return out


def _group_error(x: torch.Tensor, weights: Sequence[torch.Tensor], s: torch.Tensor, config: QuantConfig) -> float:
    err = 0.0
    for w in weights:
        wq = fake_quantize(w * s, config) / s
        err += float((x @ (w - wq).T).pow(2).sum())
    return err


@torch.no_grad()
def _search_group(root: nn.Module, g: ScaleGroup, x: torch.Tensor, config: QuantConfig, grid: int) -> torch.Tensor:
    """Grid search of ``alpha`` for one group (module docstring formula) on its input rows ``x``; sets
    ``g.alpha``, ``g.err_rtn``, ``g.err_awq`` and returns the chosen scales ``s`` (``g``'s names are relative to
    ``root``)."""
    ws = [root.get_submodule(n).weight.float() for n in g.linears]
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
    return best[2]


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
                    scope: str | list[str] | None = None, grid: int = 10, max_rows: int | None = 2048,
                    progress: bool = True) -> list[ScaleGroup]:
    """Search per-group scales for ``config`` and fold them into the float model (outputs unchanged).

    Args:
        model: the float model, changed in place (scales folded; its float outputs stay the same).
        config: the target :class:`QuantConfig` the scales are searched for.
        calib: calibration batches, run as :func:`medquant.models.run_model` runs them; the padding positions
            of dict batches (``attention_mask`` 0) are left out of the search (see the module docstring).
        scope: which blocks: ``None`` (the language model, or the vision tower of an encoder), ``"language"``,
            ``"vision"``, ``"all"``, or a list of roles.
        grid: ``alpha`` is searched over ``{0, 1/grid, ..., 1}`` (an integer >= 1).
        max_rows: input rows (padding positions excluded) per group kept for the search (a seeded subsample
            beyond it; an integer >= 1, or ``None`` to keep every row).
        progress: tqdm bars.

    Returns:
        The groups with the chosen ``alpha`` and the calibration output errors of RTN and of the scaled
        weights (``err_rtn`` / ``err_awq``, summed squared errors of the group's linear outputs).

    Raises:
        TypeError: ``config`` is not a ``QuantConfig``.
        ValueError: bad ``grid`` / ``max_rows``; no foldable group in scope; no or empty calibration data; a
            group's layer that the calibration batches do not reach; NaN or inf in a group's calibration input.
    """
    if not isinstance(config, QuantConfig):
        raise TypeError(f"config must be a QuantConfig, got {type(config).__name__}")
    _check_search_args(grid, max_rows)
    groups = awq_groups(model, scope)
    if not groups:
        raise ValueError(f"{type(model).__name__}: no foldable (norm/linear -> linears) groups found for AWQ")
    with eval_mode(model):
        xs = _collect(model, groups, calib, max_rows, progress)
    chosen = [_search_group(model, g, xs[g.linears[0]], config, grid)
              for g in tqdm(groups, desc="AWQ scale search", disable=not progress, leave=False)]
    for g, s in zip(groups, chosen):
        _fold(model, g, s)
    return groups


def awq_quantize_(model: nn.Module, config: QuantConfig, calib: Iterable[Any], *,
                  scope: str | list[str] | None = None, skip: Iterable[str] | None = ("@head",),
                  grid: int = 10, max_rows: int | None = 2048, progress: bool = True) -> list[ScaleGroup]:
    """:func:`search_and_fold` then :func:`medquant.quantize_` every Linear (except ``skip``) with ``config``.

    Args:
        model: the float model, quantized in place.
        config: the quantization of every Linear.
        calib: calibration batches, run as :func:`medquant.models.run_model` runs them; the padding positions
            of dict batches (``attention_mask`` 0) are left out of the search (see the module docstring).
        scope: which blocks: ``None`` (the language model, or the vision tower of an encoder), ``"language"``,
            ``"vision"``, ``"all"``, or a list of roles.
        skip: patterns left in float (default the LM head).
        grid: ``alpha`` grid size (see :func:`search_and_fold`).
        max_rows: input rows per group kept for the search (see :func:`search_and_fold`).
        progress: tqdm bars.

    Returns:
        The scale groups with their ``alpha`` and errors (see :func:`search_and_fold`).

    Raises:
        TypeError / ValueError: those of :func:`search_and_fold` (raised before the model is changed).
    """
    if not isinstance(config, QuantConfig):
        raise TypeError(f"config must be a QuantConfig, got {type(config).__name__}")
    _check_search_args(grid, max_rows)
    skip = list(skip) if skip else None
    as_config_map(config, skip=skip).resolve(model)  # a bad skip pattern is refused before the scales are folded
    calib = list(calib)
    groups = search_and_fold(model, config, calib, scope=scope, grid=grid, max_rows=max_rows, progress=progress)
    quantize_(model, config, skip=skip)
    return groups


# ---------------------------------------------------------------------------------------------- block by block
@torch.no_grad()
def search_and_fold_block(block: nn.Module, config: QuantConfig, inputs: BlockInputs, groups: Sequence[ScaleGroup], *,
                          grid: int = 10, max_rows: int | None = 2048,
                          masks: Sequence[torch.Tensor | None] | None = None) -> list[ScaleGroup]:
    """:func:`search_and_fold` for one block on its recorded calls.

    Args:
        block: the float block (on any device).
        config: the target :class:`QuantConfig` of the search.
        inputs: the block's calls, ``block(*inputs.args[i], **inputs.kwargs[i])`` per calibration batch (a
            :class:`medquant.calibrate.BlockInputs`).
        groups: scale groups with names relative to ``block``; they receive ``alpha``, ``err_rtn``, ``err_awq``.
        grid: ``alpha`` grid size (see :func:`search_and_fold`).
        max_rows: input rows per group kept for the search (see :func:`search_and_fold`).
        masks: one entry per recorded call: the ``(batch, tokens)`` mask of its calibration batch (an
            ``attention_mask``: nonzero / ``True`` a real token, 0 padding), or ``None`` (every row is data); the
            padding rows are left out of the inputs of the groups whose input is ``(batch, tokens, K)`` with the
            mask's shape (the caller leaves out the masks of vision-tower blocks). ``None`` (default): no call is
            padded.

    Returns:
        ``groups`` (as a list), updated.

    Raises:
        TypeError: ``config`` is not a ``QuantConfig``.
        ValueError: bad ``grid`` / ``max_rows``; ``inputs`` holds no recorded call; ``masks`` not one per call; a
            group's layer not called, or called with 0 rows; NaN or inf in a group's calibration input.

    The inputs of every group are collected in one pass over the calls (before any folding; folding leaves the
    block's float function unchanged), then each group's scales are searched and folded, as in the whole-model
    path. Rows beyond ``max_rows`` are subsampled with a generator seeded 0 per block.
    """
    if not isinstance(config, QuantConfig):
        raise TypeError(f"config must be a QuantConfig, got {type(config).__name__}")
    _check_search_args(grid, max_rows)
    args, kwargs = list(inputs.args), list(inputs.kwargs)
    if not args or len(args) != len(kwargs):
        raise ValueError("AWQ needs calibration data: the block has no recorded calls (inputs.args is empty)")
    masks = [None] * len(args) if masks is None else [None if m is None else torch.as_tensor(m) != 0 for m in masks]
    if len(masks) != len(args):
        raise ValueError(f"masks must hold one entry per recorded call: {len(masks)} masks for {len(args)} calls")
    xs: dict[str, list[torch.Tensor]] = {g.linears[0]: [] for g in groups}
    handles = []
    prefix = f"{inputs.name}." if inputs.name else ""
    call = [0]

    def make(name: str):
        def hook(mod, a):
            x = _rows(a[0].detach().float(), masks[call[0]])
            _check_finite(x, prefix + name, call[0])
            xs[name].append(x)
        return hook

    for name in xs:
        handles.append(block.get_submodule(name).register_forward_pre_hook(make(name)))
    was = block.training
    block.eval()
    try:
        for i, (a, k) in enumerate(zip(args, kwargs)):
            call[0] = i
            block(*a, **k)
    finally:
        block.train(was)
        for h in handles:
            h.remove()
    x_by = _subsample(xs, max_rows, prefix)
    chosen = [_search_group(block, g, x_by[g.linears[0]], config, grid) for g in groups]
    for g, s in zip(groups, chosen):
        _fold(block, g, s)
    return list(groups)


def awq_quantize_sequential(
    model: nn.Module,
    config: QuantConfig,
    calib_inputs: Mapping[str, Any] | Sequence[Mapping[str, Any]],
    *,
    scope: str | list[str] | None = None,
    skip: Iterable[str] | None = ("@head",),
    grid: int = 10,
    max_rows: int | None = 2048,
    device: str | torch.device | None = None,
    offload_device: str | torch.device | None = "cpu",
    checkpoint: str | os.PathLike | Any | None = None,
    progress: bool = True,
) -> list[ScaleGroup]:
    """AWQ block by block through :func:`medquant.calibrate.quantize_sequential`; the model is quantized in place.

    For each decoder / vision block in forward order: the float block is brought to ``device`` (moved, or read from
    ``checkpoint`` for a model built under ``accelerate.init_empty_weights()``), the scales of its groups (those of
    :func:`awq_groups` with this ``scope``) are searched on the block's own calibration inputs and folded
    (:func:`search_and_fold_block`), its layers are quantized with ``config`` (all Linear layers of the model except
    ``skip``, as :func:`awq_quantize_`), and it moves to ``offload_device``. Peak device memory: one float block
    plus its activations.

    Difference from :func:`awq_quantize_`: a block's inputs are the outputs of the already *quantized* previous
    blocks (GPTQ/AWQ convention: each block is calibrated on what the quantized model feeds it), not of the float
    model, so the chosen ``alpha`` of later blocks may differ.

    Args:
        model: the float model (or a meta skeleton with ``checkpoint``), quantized in place.
        config: the quantization of every Linear.
        calib_inputs: keyword dicts for ``model(**batch)`` (one dict or a list); padding positions
            (``attention_mask`` 0) are left out of the search as in :func:`awq_quantize_`.
        scope: which blocks: ``None`` (the language model, or the vision tower of an encoder), ``"language"``,
            ``"vision"``, ``"all"``, or a list of roles.
        skip: patterns left in float (default the LM head).
        grid: ``alpha`` grid size (see :func:`search_and_fold`).
        max_rows: input rows per group kept for the search (see :func:`search_and_fold`).
        device: compute device of one block (default CUDA when available, else CPU).
        offload_device: where processed blocks go (``None`` keeps them on ``device``).
        checkpoint: safetensors source of the float weights of a meta-device model.
        progress: tqdm bar over blocks.

    Returns:
        The groups (full names) with ``alpha`` and errors.

    Raises:
        TypeError: ``config`` is not a ``QuantConfig``, or ``calib_inputs`` holds something other than dicts.
        ValueError: bad ``grid`` / ``max_rows``, no or empty calibration data, no foldable group, groups in
            blocks the sequential pass does not visit (all checked before the model is changed); the errors of
            :func:`search_and_fold_block`.
    """
    if not isinstance(config, QuantConfig):
        raise TypeError(f"config must be a QuantConfig, got {type(config).__name__}")
    _check_search_args(grid, max_rows)
    if calib_inputs is None:
        raise ValueError("AWQ needs calibration data: pass calib_inputs (a dict of model(**batch) keyword "
                         "arguments, or a list of such dicts)")
    batches = [calib_inputs] if isinstance(calib_inputs, Mapping) else list(calib_inputs)
    if not batches:
        raise ValueError("AWQ needs calibration data: calib_inputs is empty")
    if not all(isinstance(b, Mapping) for b in batches):
        raise TypeError("calib_inputs must be a dict of model(**batch) keyword arguments or a list of such dicts, "
                        f"got a list holding {type(next(b for b in batches if not isinstance(b, Mapping))).__name__}")
    per_block = _groups_by_block(model, scope)
    if not per_block:
        raise ValueError(f"{type(model).__name__}: no foldable (norm/linear -> linears) groups found for AWQ")
    visited = {n for g in block_stacks(model) for n in g}
    missing = [b for b in per_block if b not in visited]
    if missing:
        raise ValueError(f"AWQ blocks {missing[:3]} are not among the blocks quantize_sequential visits "
                         "(vision_layers then language_model_layers); use awq_quantize_ for this model")
    done: list[ScaleGroup] = []
    masks = [token_mask(b) for b in batches]  # one per calibration batch, i.e. per recorded call of a block
    padded = any(m is not None for m in masks)
    image_blocks = unmasked_layers(model, per_block) if padded else set()

    def per_block_fn(block: nn.Module, inputs: BlockInputs) -> None:
        groups = per_block.get(inputs.name)
        if not groups:
            return
        n = len(inputs.name) + 1
        rel = [ScaleGroup(g.prev[n:], [x[n:] for x in g.linears]) for g in groups]
        search_and_fold_block(block, config, inputs, rel, grid=grid, max_rows=max_rows,
                              masks=masks if padded and inputs.name not in image_blocks else None)
        for g, r in zip(groups, rel):
            g.alpha, g.err_rtn, g.err_awq = r.alpha, r.err_rtn, r.err_awq
        done.extend(groups)

    with eval_mode(model):
        quantize_sequential(model, config, batches, skip=list(skip) if skip else None, device=device,
                            offload_device=offload_device, checkpoint=checkpoint, per_block_fn=per_block_fn,
                            progress=progress)
    return done
