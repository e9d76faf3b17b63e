"""Activation-aware weight quantization: AWQ-style per-input-channel scales.

For a group of linears ``W_1..W_m`` that read the same input ``X`` (q/k/v, or a fused ``qkv`` projection as in
Qwen2-VL's vision blocks, after the attention norm; gate/up after
the FFN norm; down after up; o after v; the norms are the block's ``input_layernorm`` / ``layer_norm1`` /
``layernorm_before`` / ``norm1`` (DINOv2) / ``operator_norm`` (LFM2) / ``rms_norm1`` (AIMv2) /
``self_attn_layer_norm`` (BART family, Whisper) and
``pre_feedforward_layernorm`` / ``post_attention_layernorm`` / ``layer_norm2`` / ``layernorm_after`` / ``norm2`` /
``ffn_norm`` (LFM2) / ``rms_norm2`` (AIMv2) / ``final_layer_norm`` (BART family, Whisper), or the ``layer_norm`` of
the sublayer holding the attention / FFN (T5's ``layer.i.layer_norm``); in an encoder-decoder's decoder block the
cross-attention's norm (``encoder_attn_layer_norm``, T5's ``layer.1.layer_norm``) feeds its query projection only -
its k / v read the encoder output - and its v feeds its o; the norms are kept only where the calibration forward
shows they feed exactly their group, below: post-norm BART's come after their sublayers and are refused), scaling
input channel ``j`` of every ``W_i`` by ``s_j`` and dividing the op that produces ``X`` by ``s_j`` leaves the float
function unchanged: ``X W^T = (X diag(1/s)) (W diag(s))^T``. Quantizing ``W diag(s)`` instead of ``W`` protects the
channels with large activations (their weights get a finer relative grid). Scales are searched per group on
calibration data:

    a_j = mean_t |X_tj|,   s(alpha) = a^alpha / sqrt(max(a^alpha) * min(a^alpha)),
    alpha* = argmin_{alpha in {0, 0.1, ..., 1}} sum_i || X W_i^T - X (Q(W_i diag(s)) diag(s)^-1)^T ||^2

The rows ``t`` of ``X`` are the group's input rows on the calibration batches (flattened over all leading dims),
without the padding positions: in a dict batch with a 2-D ``attention_mask``, the rows whose mask is 0 are left out
of both ``a`` (the mean is over the real tokens only) and the loss, for every group whose input is
``(batch, tokens, K)`` with the mask's shape - as GPTQ leaves them out of its Hessians, with the same exception: the
groups in the vision tower or the projector (image patches, never padding, even when their count equals the number
of tokens); ``max_rows`` subsamples the rows that remain. A
right-padded batch of a causal language model thus gives the statistics, alphas and codes of its sequences run
unpadded (up to float rounding). In an encoder-decoder the mask follows the side of the group's input
(:class:`~medquant.calibrate._forward.MaskSides`): the ``attention_mask`` for the encoder's groups and for an input
that is the encoder's output (cross-attention ``k`` / ``v``), the ``decoder_attention_mask`` (none: every row) for the
decoder's other groups.

``Q`` is medquant's fake quantizer with the target :class:`QuantConfig`. ``alpha = 0`` gives ``s = 1``, i.e.
plain round-to-nearest, so on the calibration inputs the chosen scales are never worse than RTN for a group.
The scales are folded *exactly* into the preceding op: a norm computing ``x_hat * w (+ b)`` (LayerNorm, most
RMSNorms) gets ``w /= s, b /= s``; one computing ``x_hat * (1 + w) (+ b)`` (Gemma 1-3, Qwen3.5 / Qwen3-Next
RMSNorms, Nemotron's LayerNorm1P) gets ``w' = (1 + w)/s - 1`` (in bfloat16 / float16 the gain ``1 + w'`` then
keeps only an absolute step of 2^-8 / 2^-11, so ``b`` and the linears' columns use the factor actually stored,
``s' = (1 + w)/(1 + w')``, instead of ``s``: ``b /= s'``, ``W diag(s')``; a gain that would round to 0 keeps the
dtype's closest value of its sign); a preceding linear's rows (weight and bias) ``/= s``. The norm's form is
found by running a copy of it with chosen weights (a random gain ``r`` must give ``r`` times the output of gain 1,
a bias must add), never from its class name (Gemma3n's RMSNorm is ``x_hat * w``); a norm of neither form, or
without a weight, is not folded.
Where nothing can absorb the scale (post-norm BERT blocks; v -> o under grouped-query attention, where one v
row feeds several heads, or through a per-head value norm as Gemma 4's ``v_norm``; fc1 -> fc2 through a non-linear
activation) the group is not formed and those linears are quantized plainly. Projections inside a clamp wrapper
(Gemma 4's ``Gemma4ClippableLinear``: ``clamp(linear(clamp(x, in_min, in_max)), out_min, out_max)``) are grouped
through the wrapper where its bounds are infinite (the released configs' default); a finite input bound on a
group's linear, or a finite bound between v and o (up and down), would make the fold inexact
(``clamp(x / s) != clamp(x) / s``), so that group is refused with a warning. Groups are also refused, with a ``UserWarning`` naming them (their linears are quantized
plainly), where a fold would change the float model:

* a norm of an unknown parametrization (above);
* a ``prev`` or linear whose module or weight is used in another place of the model (a module shared across
  blocks or reused inside one, tied weights): one fold per group reading it would change the other use;
* on the calibration forward, a norm whose output does not feed every linear of its group (OLMo-2/3 and EXAONE-4
  name the norm of the attention *output* ``post_attention_layernorm``: it does not feed the MLP), or also feeds
  another linear of the block (parallel attention and MLP reading one ``input_layernorm``, as in StableLM with
  ``use_parallel_residual``).

:func:`awq_quantize_` searches all groups on activations collected once from the float model, then folds; the
float model's outputs are unchanged by folding (up to float rounding), which the tests check before quantization.
:func:`awq_quantize_sequential` does the same block by block through
:func:`medquant.calibrate.quantize_sequential` (for models that do not fit on the compute device): each block is searched on the activations of the already
quantized previous blocks (GPTQ/AWQ convention), folded, quantized and offloaded. Both paths share the per-group
search (:func:`_search_group`) and the fold. A module shared across blocks (no group folds into or out of it, see
above) is quantized plainly once and bound under every name in both paths, as :func:`medquant.quantize_` binds it.
Both :func:`awq_quantize_` and :func:`awq_quantize_sequential` are all or nothing: an error part way (a later
block's or layer's, an interrupt, any ``BaseException``) leaves the model exactly as before the call - the same
module and tensor objects under every name, with their values, train / eval modes and hooks - then propagates.
:func:`awq_quantize_sequential`'s blocks fold copies of the model's tensors (the originals are kept until the call
returns); :func:`awq_quantize_` folds in place, so just before its first fold it copies the values of the tensors
the folds change (the norms' weights and biases, the folded linears' weights: about the float size of the blocks'
linear weights, held in CPU memory until the call returns) and writes them back when it fails.
"""
from __future__ import annotations

import copy
import os
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ..models.blocks import AttentionUnit, Block, block_stacks, transformer_blocks
from ..models.runner import eval_mode, run_model
from ..quant.api import as_config_map, quantize_, quantized_modules
from ..quant.config import QuantConfig
from ..quant.core import fake_quantize
from ._forward import (
    BatchMasks,
    MaskSides,
    _integer,
    batch_masks,
    calibration_batches,
    call_encoder_states,
    row_mask,
    unmasked_layers,
)
from .sequential import BlockInputs, _Undo, quantize_sequential

__all__ = ["ScaleGroup", "awq_groups", "awq_quantize_", "awq_quantize_sequential", "search_and_fold",
           "search_and_fold_block"]

_ATTN_NORMS = ("input_layernorm", "layer_norm1", "layernorm_before", "norm1", "operator_norm", "rms_norm1",
               "self_attn_layer_norm")
_FFN_NORMS = ("pre_feedforward_layernorm", "post_attention_layernorm", "layer_norm2", "layernorm_after", "norm2",
              "ffn_norm", "rms_norm2", "final_layer_norm")
_CROSS_NAMES = ("encoder_attn", "EncDecAttention")  # cross-attention of BART / mBART / Whisper, T5


@dataclass
class ScaleGroup:
    """Linears sharing one input, and the op producing it (``prev``) that absorbs the scales."""

    prev: str
    linears: list[str]
    alpha: float | None = None
    err_rtn: float | None = None
    err_awq: float | None = None


def _check_search_args(grid: int, max_rows: int | None) -> tuple[int, int | None]:
    """``grid`` an integer >= 1 and ``max_rows`` None or an integer >= 1, of any integer type (NumPy's too;
    ``bool`` refused), checked before any work and returned as Python ints (the groups record them)."""
    if (_integer(grid) or 0) < 1:
        raise ValueError(f"grid must be an integer >= 1 (alpha is searched over 0, 1/grid, ..., 1), got {grid!r}")
    if max_rows is not None and (_integer(max_rows) or 0) < 1:
        raise ValueError(f"max_rows must be None (keep every input row) or an integer >= 1, got {max_rows!r}")
    return int(grid), None if max_rows is None else int(max_rows)


def _calib_batches(calib: Any) -> Iterable[Any]:
    """``calib`` as an iterable of calibration batches: one dict of keyword inputs is one batch (iterating it would
    give its keys); another iterable is returned as it is (a generator stays lazy).

    Raises:
        ValueError: ``calib`` is ``None``.
        TypeError: ``calib`` is a string or not iterable.
    """
    if calib is None or isinstance(calib, (Mapping, str, bytes)) or not isinstance(calib, Iterable):
        return calibration_batches(calib, "AWQ")
    return calib


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
    """How a norm applies its per-channel gain ``w`` (what :func:`_fold` divides by ``s``): ``"w"``
    (``x_hat * w + b``: ``nn.LayerNorm``, Llama's RMSNorm, Gemma3n's RMSNorm...) or ``"1+w"``
    (``x_hat * (1 + w) + b``: Gemma 1-3, Qwen3.5, Qwen3-Next RMSNorms, Nemotron's ``LayerNorm1P``), the bias ``b``
    optional; ``None`` when the scales cannot be folded (not a LayerNorm / RMSNorm, no weight, another
    parametrization). The form is found by running the norm (:func:`_norm_gain_form`), not from its class name."""
    if isinstance(mod, nn.LayerNorm) and not mod.elementwise_affine:
        return None
    w = getattr(mod, "weight", None)
    name = type(mod).__name__
    if ("RMSNorm" in name or "LayerNorm" in name) and isinstance(w, nn.Parameter) and w.dim() == 1:
        return _norm_gain_form(mod)
    return None


def _weight(mod: nn.Module) -> torch.Tensor:
    """``mod.weight`` (a tensor; typed for mypy)."""
    w = mod.weight
    if not isinstance(w, torch.Tensor):
        raise TypeError(f"{type(mod).__name__}.weight is not a tensor")
    return w


@torch.no_grad()
def _norm_gain_form(mod: nn.Module) -> str | None:
    """Probe a float32 CPU copy of the norm ``mod`` (its values set here, so meta skeletons work too; the class's
    ``forward``, bypassing hooks) on random rows ``x``, bias (if any) 0: ``"w"`` if ``f(x; w=r) = r * f(x; w=1)``
    for a random gain ``r``, ``"1+w"`` if ``f(x; w=r-1) = r * f(x; w=0)``; with a bias, also
    ``f(x; b=c) = f(x; b=0) + c``. ``None`` (not foldable) otherwise."""
    try:
        probe = copy.deepcopy(mod).to_empty(device="cpu").float()
        weight = _weight(probe)
        k = int(weight.shape[0])
        bias = getattr(probe, "bias", None)
        bias = bias if isinstance(bias, nn.Parameter) and tuple(bias.shape) == (k,) else None
        if bias is None and getattr(probe, "bias", None) is not None:
            return None  # a bias of another shape: not a per-channel affine norm
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(3, k, generator=gen)
        r = torch.rand(k, generator=gen) + 0.5
        c = torch.randn(k, generator=gen)

        def run(w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
            weight.copy_(w)
            if bias is not None:
                bias.copy_(torch.zeros(k) if b is None else b)
            return type(probe).forward(probe, x).float().cpu()

        for kind, base in (("w", 0.0), ("1+w", -1.0)):
            y1, yr = run(torch.full((k,), base + 1.0)), run(r + base)
            if bool(torch.isfinite(y1).all()) and float(y1.abs().max()) > 0 and \
                    torch.allclose(yr, y1 * r, rtol=1e-4, atol=1e-6):
                if bias is not None and not torch.allclose(run(r + base, c), yr + c, rtol=1e-4, atol=1e-6):
                    return None
                return kind
    except Exception:  # noqa: BLE001  (any failure of the norm's own code: not foldable, quantized plainly)
        return None
    return None


def _sublayer_norm(model: nn.Module, block: str, container: str) -> str | None:
    """The ``layer_norm`` beside a unit that sits in a sublayer wrapper of its block, relative to the block: T5's
    ``layer.0.layer_norm`` for ``layer.0.SelfAttention`` (``layer.1.layer_norm`` for the FFN ``layer.1.DenseReluDense``,
    the decoder's ``layer.1.layer_norm`` for its ``layer.1.EncDecAttention``); None for a unit that is a direct
    child of its block, or a wrapper without a ``layer_norm``."""
    parent = container.rpartition(".")[0]
    if not parent.startswith(block + "."):
        return None
    return f"{parent[len(block) + 1:]}.layer_norm" if isinstance(
        getattr(model.get_submodule(parent), "layer_norm", None), nn.Module) else None


def _cross_attention(model: nn.Module, b: Block) -> tuple[str, list[str], str | None] | None:
    """``(container, [q, k, v, o] full names, norm relative to the block)`` of the cross-attention of an
    encoder-decoder block (BART / mBART / Whisper ``encoder_attn``, read after ``encoder_attn_layer_norm``; T5's
    ``layer.1.EncDecAttention``, after ``layer.1.layer_norm``), its projections float ``nn.Linear``; None when the
    block has none or its attention unit is that module (a block whose only attention is the cross-attention)."""
    blk = model.get_submodule(b.name)
    for rel, mod in blk.named_modules():
        leaf = rel.rpartition(".")[2]
        if leaf not in _CROSS_NAMES or (b.attention is not None and b.attention.name == f"{b.name}.{rel}"):
            continue
        for pattern in (("q_proj", "k_proj", "v_proj", "out_proj"), ("q_proj", "k_proj", "v_proj", "o_proj"),
                        ("q", "k", "v", "o")):
            lins = [getattr(mod, p, None) for p in pattern]
            if all(isinstance(m, nn.Linear) for m in lins):
                full = f"{b.name}.{rel}"
                kids = dict(blk.named_children())
                norm = f"{leaf}_layer_norm" if f"{leaf}_layer_norm" in kids else _sublayer_norm(model, b.name, full)
                return full, [f"{full}.{p}" for p in pattern], norm
    return None


def _norm_before_o(model: nn.Module, a: AttentionUnit) -> str | None:
    """A norm inside the attention over the whole input width of ``o`` (Kosmos-2's ``inner_attn_ln``, applied to the
    heads' concatenated output before ``out_proj``): ``o``'s input is then not linear in ``v``'s rows, so no scale
    folds from ``o``'s columns into ``v``. Its full name, or None. Per-head ``q_norm`` / ``k_norm`` are not it."""
    width = model.get_submodule(a.o).in_features
    own = {a.q, a.k, a.v, a.o, a.q_norm, a.k_norm}
    for name, mod in model.get_submodule(a.name).named_modules():
        full = f"{a.name}.{name}" if name else a.name
        w = getattr(mod, "weight", None)
        if (name and full not in own and name.rpartition(".")[2] not in ("q_norm", "k_norm")
                and "norm" in type(mod).__name__.lower() and isinstance(w, torch.Tensor) and w.dim() == 1
                and w.numel() == width):
            return full
    return None


def _groups_by_block(model: nn.Module, scope: str | list[str] | None = None) -> dict[str, list[ScaleGroup]]:
    """Block name -> its scale groups (full module names), blocks in order; blocks without a group left out.

    The attention's norm is the first block child named in ``_ATTN_NORMS``, else the ``layer_norm`` of the sublayer
    wrapping the attention (T5); the FFN's likewise (``_FFN_NORMS``). An encoder-decoder block's cross-attention
    (:func:`_cross_attention`) gives ``its norm -> [q]`` only (its k / v read the encoder output, not that norm) and
    ``v -> o`` where each v row feeds one head."""
    out: dict[str, list[ScaleGroup]] = {}
    shared = _shared_params(model)
    refused: list[str] = []
    for b in transformer_blocks(model, scope, clamp_wrappers=True):
        blk = model.get_submodule(b.name)
        kids = dict(blk.named_children())
        cross = _cross_attention(model, b)
        attn_norm = next((n for n in _ATTN_NORMS if n in kids and _norm_kind(kids[n])), None)
        ffn_norm = next((n for n in _FFN_NORMS if n in kids and _norm_kind(kids[n])), None)
        candidates = [n for n in (*_ATTN_NORMS, *_FFN_NORMS) if n in kids]
        if attn_norm is None and b.attention is not None:
            attn_norm = _sublayer_norm(model, b.name, b.attention.name)
            candidates += [attn_norm] if attn_norm else []
        if ffn_norm is None and b.ffn is not None:
            ffn_norm = _sublayer_norm(model, b.name, b.ffn.name)
            candidates += [ffn_norm] if ffn_norm else []
        cross_norm = cross[2] if cross is not None else None
        candidates += [cross_norm] if cross_norm else []
        foldable = {n for n in candidates if _norm_kind(blk.get_submodule(n))}
        refused += [f"{b.name}.{n} (a {type(blk.get_submodule(n)).__name__}: no weight, or not of the form "
                    "x_hat * w (+ b) nor x_hat * (1 + w) (+ b))"
                    for n in dict.fromkeys(candidates) if n not in foldable]
        attn_norm = attn_norm if attn_norm in foldable else None
        ffn_norm = ffn_norm if ffn_norm in foldable else None
        groups: list[ScaleGroup] = []
        if b.attention is not None and attn_norm and attn_norm != ffn_norm:
            a = b.attention
            _add_norm_group(groups, refused, f"{b.name}.{attn_norm}", [a.q, a.k, a.v], a.clamped)
            # v -> o: o's input is v's output per head, unless a per-head norm (v_norm) or a finite clamp sits between
            # (or a norm over all heads before o: Kosmos-2's inner_attn_ln)
            mixed = _norm_before_o(model, a)
            if mixed:
                refused.append(f"{a.v} ({mixed} normalises the heads' output before {a.o})")
            elif a.n_kv == a.n_heads and a.v_norm is None and _unclamped_between(a.clamped, a.v, a.o):
                groups.append(ScaleGroup(a.v, [a.o]))
        elif b.fused_attention is not None and attn_norm and attn_norm != ffn_norm:  # one qkv projection
            groups.append(ScaleGroup(f"{b.name}.{attn_norm}", [f"{b.fused_attention}.qkv"]))
        if cross is not None:
            q, _, v, o = (model.get_submodule(n) for n in cross[1])
            if cross_norm in foldable and cross_norm not in (attn_norm, ffn_norm):
                groups.append(ScaleGroup(f"{b.name}.{cross_norm}", [cross[1][0]]))
            if v.out_features == o.in_features == q.out_features:  # every v row feeds one head (no GQA)
                groups.append(ScaleGroup(cross[1][2], [cross[1][3]]))
        if b.ffn is not None and ffn_norm:
            f = b.ffn
            _add_norm_group(groups, refused, f"{b.name}.{ffn_norm}", list(f.inputs), f.clamped)
            # gated: act(gate(x)) * up(x) is linear in up's output (unless a finite clamp sits between up and down)
            if len(f.inputs) == 2 and _unclamped_between(f.clamped, f.inputs[1], f.output):
                groups.append(ScaleGroup(f.inputs[1], [f.output]))
        groups = [g for g in groups if _unshared(model, g, shared, refused)]
        if groups:
            out[b.name] = groups
    if refused:
        warnings.warn("AWQ: scales not folded into " + "; ".join(refused) + "; the linears reading them are "
                      "quantized without AWQ scales", stacklevel=3)
    return out


def _add_norm_group(groups: list[ScaleGroup], refused: list[str], norm: str, linears: list[str],
                    clamped: Mapping[str, tuple[bool, bool]]) -> None:
    """``norm -> linears`` into ``groups``, or into ``refused`` when one of the linears clamps its input to a finite
    range (``clamped``: the unit's :attr:`~medquant.models.blocks.AttentionUnit.clamped`; ``clamp(x / s)`` is not
    ``clamp(x) / s``)."""
    clamped_in = [n for n in linears if clamped.get(n, (False, False))[0]]
    if clamped_in:
        refused.append(f"{norm} ({', '.join(clamped_in)} clamp their input to a finite range)")
    else:
        groups.append(ScaleGroup(norm, linears))


def _unclamped_between(clamped: Mapping[str, tuple[bool, bool]], first: str, second: str) -> bool:
    """Whether no finite clamp sits between ``first``'s output and ``second``'s input (a ``first -> second`` fold
    is exact)."""
    return not clamped.get(first, (False, False))[1] and not clamped.get(second, (False, False))[0]


def _shared_params(model: nn.Module) -> set[int]:
    """``id`` of the parameters reachable under more than one name (shared modules, tied weights)."""
    seen: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        seen[id(p)] = seen.get(id(p), 0) + 1
    return {i for i, c in seen.items() if c > 1}


def _unshared(model: nn.Module, g: ScaleGroup, shared: set[int], refused: list[str]) -> bool:
    """Whether no module of ``g`` (``prev`` and its linears) holds a shared parameter; else its name joins
    ``refused``."""
    for name in [g.prev, *g.linears]:
        if any(id(p) in shared for p in model.get_submodule(name).parameters()):
            refused.append(f"{g.prev} ({name} is shared with another part of the model: a fold would change "
                           "that other use)")
            return False
    return True


def awq_groups(model: nn.Module, scope: str | list[str] | None = None) -> list[ScaleGroup]:
    """Scale groups of the pre-norm transformer blocks in scope (see the module docstring).

    Args:
        model: the float model.
        scope: which blocks: ``None`` (the language model, or the vision tower of an encoder), ``"language"``,
            ``"vision"``, ``"all"``, or a list of roles.

    Returns:
        The :class:`ScaleGroup` list (full module names; ``alpha`` and errors not yet set); empty when nothing
        can absorb the scales (e.g. post-norm blocks). Groups on unfoldable norms or shared modules are left out
        (a ``UserWarning`` names them); the calibration-time check of the norms' consumers (module docstring) may
        still refuse some of these groups in :func:`search_and_fold`.
    """
    return [g for gs in _groups_by_block(model, scope).values() for g in gs]


class _Dataflow:
    """Checks, on the calibration forward, that each group folded into a norm really reads that norm: every linear
    of the group gets the norm's output (equal values) as its input, and no other linear of the norm's block
    does. This refuses a norm that is a post-norm of the attention output (OLMo-2/3, EXAONE-4: their
    ``post_attention_layernorm`` does not feed the MLP) and a norm shared by parallel attention and MLP
    (StableLM / GPT-J style ``use_parallel_residual``): folding into them would change the float model.
    ``bad`` maps such a group's ``prev`` to the linear that shows it and whether that linear is in the group; names
    are relative to ``root``."""

    def __init__(self, root: nn.Module, groups: Sequence[ScaleGroup]) -> None:
        self.bad: dict[str, tuple[str, bool]] = {}
        self.out: dict[str, torch.Tensor] = {}
        self.handles: list[Any] = []
        linears = {n: m for n, m in root.named_modules() if isinstance(m, nn.Linear)}
        for g in groups:
            if isinstance(root.get_submodule(g.prev), nn.Linear):
                continue
            block = g.prev.rpartition(".")[0]
            start = f"{block}." if block else ""
            self.handles.append(root.get_submodule(g.prev).register_forward_hook(self._record(g.prev)))
            for name, lin in linears.items():
                if name.startswith(start):
                    self.handles.append(lin.register_forward_pre_hook(self._check(g.prev, name, name in g.linears)))

    def _record(self, prev: str):
        def hook(mod, args, out):
            self.out[prev] = (out[0] if isinstance(out, (tuple, list)) else out).detach()
        return hook

    def _check(self, prev: str, name: str, member: bool):
        def hook(mod, args):
            o, x = self.out.get(prev), args[0] if args else None
            same = o is not None and isinstance(x, torch.Tensor) and o.shape == x.shape and \
                bool(torch.equal(o.to(x.dtype), x))
            if member and not same:
                self.bad.setdefault(prev, (name, True))
            elif not member and same:
                self.bad.setdefault(prev, (name, False))
        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()

    def keep(self, groups: Sequence[ScaleGroup], where: str = "") -> list[ScaleGroup]:
        """The groups whose fold is exact; a warning names the others (their linears are quantized plainly), each
        module named ``where + its name relative to root`` (``where``: ``root``'s name and a dot, or empty)."""
        if self.bad:
            why = {p: f"{where}{n} does not read the output of {where}{p}" if member else
                   f"{where}{n}, outside the group, also reads the output of {where}{p}"
                   for p, (n, member) in self.bad.items()}
            warnings.warn("AWQ: scales not folded into " + "; ".join(f"{where}{p} ({w})" for p, w in why.items())
                          + "; those linears are quantized without AWQ scales", stacklevel=3)
        return [g for g in groups if g.prev not in self.bad]


@torch.no_grad()
def _collect(model: nn.Module, groups: list[ScaleGroup], calib: Iterable[Any], max_rows: int | None,
             progress: bool) -> dict[str, torch.Tensor]:
    """Each group's input rows on the calibration batches (padding positions left out, see the module docstring),
    subsampled to ``max_rows``."""
    xs: dict[str, list[torch.Tensor]] = {g.linears[0]: [] for g in groups}
    unmasked = unmasked_layers(model, xs)
    sides = MaskSides(model)
    handles = []
    n = 0
    mask: list[BatchMasks] = [BatchMasks()]
    states: list[torch.Tensor] = []
    warned = False

    def make(name: str):
        def hook(mod, args):
            m = None if name in unmasked else sides.mask(name, args[0], mask[0], states)
            x = _rows(args[0].detach().float(), m)
            _check_finite(x, name, n)
            xs[name].append(x)
        return hook

    for name in xs:
        handles.append(model.get_submodule(name).register_forward_pre_hook(make(name)))
    try:
        for batch in tqdm(calib, desc="AWQ calibration", disable=not progress, leave=False):
            mask[0] = batch_masks(batch)
            if not warned:
                warned = sides.warn_unsided([batch])
            with sides.tracking(model) as states:
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
    ws = [_weight(root.get_submodule(n)).float() for n in g.linears]
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


def _folded_tensors(model: nn.Module, g: ScaleGroup) -> list[torch.Tensor]:
    """The tensors :func:`_fold` changes in place for ``g``: ``prev``'s weight and bias (when it has one) and the
    weight of every linear of the group."""
    prev = model.get_submodule(g.prev)
    bias = getattr(prev, "bias", None)
    return [_weight(prev), *([bias] if isinstance(bias, torch.Tensor) else []),
            *(_weight(model.get_submodule(n)) for n in g.linears)]


@torch.no_grad()
def _fold_offset_gain(w: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """Divide the gain ``1 + w`` of an ``x_hat * (1 + w)`` norm by ``s`` in place (``w' = (1 + w) / s - 1``) and
    return the factor the gain was actually divided by, ``(1 + w) / (1 + w')`` per channel (``s`` where ``1 + w``
    is 0), which the norm's bias and the group's linears then use, so the fold stays exact in the weight's dtype:
    near -1, bfloat16 / float16 keep an absolute step (2^-8 / 2^-11) of the gain ``(1 + w) / s``, a large relative
    error where that gain is small. A gain rounded to 0 or past it is stored as the dtype's closest value of its
    sign (the channel is kept)."""
    s = s.to(device=w.device, dtype=torch.float32)
    old = 1.0 + w.float()
    w.copy_(old / s - 1.0)
    new = 1.0 + w.float()
    lost = (old != 0) & (new * old.sign() <= 0)
    if bool(lost.any()):
        one = torch.full_like(w, -1.0)
        toward = torch.where(old > 0, torch.zeros_like(w), torch.full_like(w, -2.0))
        w.copy_(torch.where(lost, torch.nextafter(one, toward), w))
        new = 1.0 + w.float()
    return torch.where(old != 0, old / new, s)


@torch.no_grad()
def _fold(model: nn.Module, g: ScaleGroup, s: torch.Tensor) -> None:
    """Fold the scales ``s`` of ``g`` into the model, in place (module docstring); the tensors it changes are
    those of :func:`_folded_tensors`."""
    prev = model.get_submodule(g.prev)
    kind = None if isinstance(prev, nn.Linear) else _norm_kind(prev)
    if kind is None and not isinstance(prev, nn.Linear):
        raise ValueError(f"{g.prev}: cannot fold scales into a {type(prev).__name__}")
    w = _weight(prev)
    if isinstance(prev, nn.Linear):
        w.div_(s.to(w.dtype)[:, None])
        if prev.bias is not None:
            prev.bias.div_(s.to(prev.bias.dtype))
    else:
        if kind == "1+w":
            s = _fold_offset_gain(w, s)
        else:
            w.div_(s.to(w.dtype))
        bias = getattr(prev, "bias", None)
        if isinstance(bias, torch.Tensor):
            bias.div_(s.to(bias.dtype))
    for name in g.linears:
        lw = _weight(model.get_submodule(name))
        lw.mul_(s.to(lw.dtype)[None, :])


@torch.no_grad()
def search_and_fold(model: nn.Module, config: QuantConfig, calib: Iterable[Any], *,
                    scope: str | list[str] | None = None, grid: int = 10, max_rows: int | None = 2048,
                    progress: bool = True) -> list[ScaleGroup]:
    """Search per-group scales for ``config`` and fold them into the float model (outputs unchanged).

    Args:
        model: the float model, changed in place (scales folded; its float outputs stay the same).
        config: the target :class:`QuantConfig` the scales are searched for.
        calib: calibration batches, run as :func:`medquant.models.run_model` runs them (a single dict is one
            batch); the padding positions of dict batches (``attention_mask`` 0) are left out of the search (see
            the module docstring).
        scope: which blocks: ``None`` (the language model, or the vision tower of an encoder), ``"language"``,
            ``"vision"``, ``"all"``, or a list of roles.
        grid: ``alpha`` is searched over ``{0, 1/grid, ..., 1}`` (an integer >= 1).
        max_rows: input rows (padding positions excluded) per group kept for the search (a seeded subsample
            beyond it; an integer >= 1, or ``None`` to keep every row).
        progress: tqdm bars.

    Returns:
        The groups folded, with the chosen ``alpha`` and the calibration output errors of RTN and of the scaled
        weights (``err_rtn`` / ``err_awq``, summed squared errors of the group's linear outputs); the groups
        refused on the calibration forward (a norm that does not feed exactly its group's linears, see the module
        docstring) are left out, with a ``UserWarning``.

    Raises:
        TypeError: ``config`` is not a ``QuantConfig``; ``calib`` is a string or not iterable.
        ValueError: bad ``grid`` / ``max_rows``; no foldable group in scope; no or empty calibration data; a
            group's layer that the calibration batches do not reach; NaN or inf in a group's calibration input.
    """
    return _search_and_fold(model, config, calib, scope=scope, grid=grid, max_rows=max_rows, progress=progress)


@torch.no_grad()
def _search_and_fold(model: nn.Module, config: QuantConfig, calib: Iterable[Any], *,
                     scope: str | list[str] | None, grid: int, max_rows: int | None, progress: bool,
                     undo: _Undo | None = None) -> list[ScaleGroup]:
    """The body of :func:`search_and_fold`; with ``undo``, the tensors the folds change in place
    (:func:`_folded_tensors`) are handed to ``undo.keep_values`` before the first fold."""
    if not isinstance(config, QuantConfig):
        raise TypeError(f"config must be a QuantConfig, got {type(config).__name__}")
    grid, max_rows = _check_search_args(grid, max_rows)
    calib = _calib_batches(calib)
    groups = awq_groups(model, scope)
    if not groups:
        raise ValueError(f"{type(model).__name__}: no foldable (norm/linear -> linears) groups found for AWQ")
    flow = _Dataflow(model, groups)
    try:
        with eval_mode(model):
            xs = _collect(model, groups, calib, max_rows, progress)
    finally:
        flow.remove()
    groups = flow.keep(groups)
    chosen = [_search_group(model, g, xs[g.linears[0]], config, grid)
              for g in tqdm(groups, desc="AWQ scale search", disable=not progress, leave=False)]
    if undo is not None:
        undo.keep_values(t for g in groups for t in _folded_tensors(model, g))
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
        calib: calibration batches, run as :func:`medquant.models.run_model` runs them (a single dict is one
            batch); the padding positions of dict batches (``attention_mask`` 0) are left out of the search (see
            the module docstring).
        scope: which blocks: ``None`` (the language model, or the vision tower of an encoder), ``"language"``,
            ``"vision"``, ``"all"``, or a list of roles.
        skip: patterns left in float (default the LM head).
        grid: ``alpha`` grid size (see :func:`search_and_fold`).
        max_rows: input rows per group kept for the search (see :func:`search_and_fold`).
        progress: tqdm bars.

    Returns:
        The scale groups with their ``alpha`` and errors (see :func:`search_and_fold`).

    Raises:
        TypeError / ValueError: those of :func:`search_and_fold` (raised before the model is changed), and those of
            :func:`medquant.quantize_`.

    All or nothing: any exception raised once the scales begin to be folded (an error while a later layer is
    quantized, a ``KeyboardInterrupt`` during the fold or the swaps) leaves the model exactly as it was before the
    call - the same module and tensor objects under every name, the folded norm / linear tensors with their
    values of before (copied to CPU memory before the first fold, written back in place), no quantized layer, train /
    eval modes and hooks as before - then propagates. The cost: a CPU copy of the folded tensors, and the float
    layers are kept until the call returns. (:func:`search_and_fold` alone is not guarded: it changes the model in
    place.)
    """
    if not isinstance(config, QuantConfig):
        raise TypeError(f"config must be a QuantConfig, got {type(config).__name__}")
    grid, max_rows = _check_search_args(grid, max_rows)
    skip = list(skip) if skip else None
    as_config_map(config, skip=skip).resolve(model)  # a bad skip pattern is refused before the scales are folded
    calib = list(_calib_batches(calib))
    undo = _Undo(model)
    try:
        groups = _search_and_fold(model, config, calib, scope=scope, grid=grid, max_rows=max_rows,
                                  progress=progress, undo=undo)
        quantize_(model, config, skip=skip)
    except BaseException:
        undo.restore()  # all or nothing: unscaled weights, float layers, modes as before the call
        raise
    _warn_unsearched(model, scope)
    return groups


def _warn_unsearched(model: nn.Module, scope: str | list[str] | None) -> None:
    """Warn once when quantized linears sit in blocks outside ``scope`` (a VLM's vision tower under the default
    scope): they were rounded to nearest, without a scale search."""
    searched = {b.name for b in transformer_blocks(model, scope)}
    quantized = list(quantized_modules(model))
    outside = [b.name for b in transformer_blocks(model, "all") if b.name not in searched
               and any(n.startswith(b.name + ".") for n in quantized)]
    if outside:
        warnings.warn(f"AWQ: {len(outside)} block(s) outside scope={scope!r} ({outside[0]}"
                      f"{', ...' if len(outside) > 1 else ''}) are quantized by round-to-nearest without a scale "
                      "search; pass scope='all' with calibration batches that run them (images for a vision "
                      "tower; medquant quantize --calib-images), or skip them (skip=['@head', '@vision']) to keep "
                      "them in floating point",
                      UserWarning, stacklevel=3)


# ---------------------------------------------------------------------------------------------- block by block
@torch.no_grad()
def search_and_fold_block(block: nn.Module, config: QuantConfig, inputs: BlockInputs, groups: Sequence[ScaleGroup], *,
                          grid: int = 10, max_rows: int | None = 2048,
                          masks: Sequence[torch.Tensor | None] | None = None,
                          encoder_masks: Sequence[torch.Tensor | None] | None = None) -> list[ScaleGroup]:
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
            padded. For a decoder block of an encoder-decoder, the decoder's masks (``decoder_attention_mask``).
        encoder_masks: for a decoder block of an encoder-decoder: one entry per recorded call, the encoder's
            ``(batch, encoder tokens)`` mask (its ``attention_mask``), applied instead of ``masks`` to a group input
            that is the call's ``encoder_hidden_states`` argument (the same tensor object, given by keyword or by
            position: a cross-attention ``k`` / ``v``). ``None`` (default): ``masks`` apply to every input.

    Returns:
        The groups of ``groups`` folded (as a list), updated; those refused on the recorded calls (a norm that
        does not feed exactly its group's linears, see the module docstring) are left out, with a ``UserWarning``,
        and left unchanged.

    Raises:
        TypeError: ``config`` is not a ``QuantConfig``.
        ValueError: bad ``grid`` / ``max_rows``; ``inputs`` holds no recorded call; ``masks`` or ``encoder_masks``
            not one per call; a
            group's ``prev`` that cannot absorb scales (checked before the block changes); a group's layer not called, or called with 0 rows; NaN or inf in a group's calibration input.

    The inputs of every group are collected in one pass over the calls (before any folding; folding leaves the
    block's float function unchanged), then each group's scales are searched and folded, as in the whole-model
    path. Rows beyond ``max_rows`` are subsampled with a generator seeded 0 per block.
    """
    if not isinstance(config, QuantConfig):
        raise TypeError(f"config must be a QuantConfig, got {type(config).__name__}")
    grid, max_rows = _check_search_args(grid, max_rows)
    args, kwargs = list(inputs.args), list(inputs.kwargs)
    if not args or len(args) != len(kwargs):
        raise ValueError("AWQ needs calibration data: the block has no recorded calls (inputs.args is empty)")
    masks = [None] * len(args) if masks is None else [None if m is None else torch.as_tensor(m) != 0 for m in masks]
    if len(masks) != len(args):
        raise ValueError(f"masks must hold one entry per recorded call: {len(masks)} masks for {len(args)} calls")
    cross = None if encoder_masks is None else [None if m is None else torch.as_tensor(m) != 0
                                                 for m in encoder_masks]
    if cross is not None and len(cross) != len(args):
        raise ValueError(f"encoder_masks must hold one entry per recorded call: {len(cross)} masks for {len(args)} "
                         "calls")
    prefix = f"{inputs.name}." if inputs.name else ""
    for g in groups:  # before any work: a fold failing after others would leave the block half changed
        prev = block.get_submodule(g.prev)
        if not isinstance(prev, nn.Linear) and _norm_kind(prev) is None:
            raise ValueError(f"{prefix}{g.prev}: cannot fold scales into a {type(prev).__name__} (a Linear, or a "
                             "norm of the form x_hat * w (+ b) or x_hat * (1 + w) (+ b), can absorb them)")
    xs: dict[str, list[torch.Tensor]] = {g.linears[0]: [] for g in groups}
    handles = []
    call = [0]
    states: list[torch.Tensor] = []  # the encoder_hidden_states of the current call

    def make(name: str):
        def hook(mod, a):
            i = call[0]
            m = cross[i] if cross is not None and any(a[0] is s for s in states) else masks[i]
            x = _rows(a[0].detach().float(), m)
            _check_finite(x, prefix + name, i)
            xs[name].append(x)
        return hook

    for name in xs:
        handles.append(block.get_submodule(name).register_forward_pre_hook(make(name)))
    flow = _Dataflow(block, groups)
    was = block.training
    block.eval()
    try:
        for i, (a, k) in enumerate(zip(args, kwargs)):
            call[0] = i
            states[:] = call_encoder_states(block, a, k) if cross is not None else []
            block(*a, **k)
    finally:
        states.clear()
        block.train(was)
        flow.remove()
        for h in handles:
            h.remove()
    x_by = _subsample(xs, max_rows, prefix)
    groups = flow.keep(groups, prefix)
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
        The groups folded (full names) with ``alpha`` and errors (refused groups left out, as
        :func:`search_and_fold_block`).

    Raises:
        TypeError: ``config`` is not a ``QuantConfig``, or ``calib_inputs`` holds something other than dicts.
        ValueError: bad ``grid`` / ``max_rows``, no or empty calibration data, no foldable group, groups in
            blocks the sequential pass does not visit (all checked before the model is changed); the errors of
            :func:`search_and_fold_block`.

    A module shared across blocks is in no folded group (a ``UserWarning`` names the groups left out): it is
    quantized plainly once, where its first name is reached, and bound under every name (as :func:`awq_quantize_`).
    All or nothing: any exception raised part way (a later block's error, a ``KeyboardInterrupt``) leaves the model
    exactly as it was before the call - no scale folded, no layer quantized, hooks and train / eval modes as before
    - then propagates (see :func:`medquant.calibrate.quantize_sequential` for the memory this keeps until the call
    returns).
    """
    if not isinstance(config, QuantConfig):
        raise TypeError(f"config must be a QuantConfig, got {type(config).__name__}")
    grid, max_rows = _check_search_args(grid, max_rows)
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
    masks = [batch_masks(b) for b in batches]  # one per calibration batch, i.e. per recorded call of a block
    padded = any(m.padded for m in masks)
    image_blocks = unmasked_layers(model, per_block) if padded else set()
    sides = MaskSides(model)
    sides.warn_unsided(batches)

    def per_block_fn(block: nn.Module, inputs: BlockInputs) -> None:
        groups = per_block.get(inputs.name)
        if not groups:
            return
        n = len(inputs.name) + 1
        rel = [ScaleGroup(g.prev[n:], [x[n:] for x in g.linears]) for g in groups]
        # the block's rows take its side's masks; a decoder block's encoder_hidden_states input, the encoder's
        own, cross = (None, None) if not padded or inputs.name in image_blocks else sides.block_masks(inputs.name,
                                                                                                        masks)
        kept = search_and_fold_block(block, config, inputs, rel, grid=grid, max_rows=max_rows, masks=own,
                                     encoder_masks=cross)
        for g, r in zip(groups, rel):
            if any(r is k for k in kept):
                g.alpha, g.err_rtn, g.err_awq = r.alpha, r.err_rtn, r.err_awq
                done.append(g)

    with eval_mode(model):
        quantize_sequential(model, config, batches, skip=list(skip) if skip else None, device=device,
                            offload_device=offload_device, checkpoint=checkpoint, per_block_fn=per_block_fn,
                            progress=progress)
    _warn_unsearched(model, scope)
    return done
