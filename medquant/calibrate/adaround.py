"""Learned rounding (AdaRound-style): choose, per weight, whether to round down or up so that a block's output is
reconstructed on calibration data.

AdaRound (Nagel, Amjad, van Baalen, Louizos, Blankevoort: "Up or Down? Adaptive Rounding for Post-Training
Quantization", 2020), here with block-wise reconstruction (as BRECQ, Li et al. 2021: a block - one layer, or a
group of layers such as a residual block - is optimised at a time). For a weight ``w`` with scale ``s`` (and zero
point ``z``) from the layer's quantizer (the formulas of :func:`medquant.quant.core.compute_qparams`, so the packed
layout is unchanged), the soft-quantized weight is

    h(V) = clamp(sigmoid(V) (zeta - gamma) + gamma, 0, 1),        zeta = 1.1, gamma = -0.1
    w~   = s * (clamp(floor(w / s) + h(V), -q_max, q_max))                 symmetric (q_max = 2^(b-1) - 1)
    w~   = s * (clamp(floor(w / s) + h(V) + z, 0, 2^b - 1) - z)            asymmetric

with ``V`` initialised so that ``h(V) = w/s - floor(w/s)`` (``w~ = w`` inside the range). ``V`` of every layer of
the block is optimised with Adam on

    L = mean (block(x~; W~) - block(x; W))^2  +  lambda * sum_layers sum_i (1 - |2 h(V_i) - 1|^beta)

where ``x~`` is the block's input in the model with the earlier blocks already quantized and ``block(x; W)`` is
the *float model's* output of the block on the float model's own input (``target="float"``, the asymmetric
reconstruction of AdaRound / BRECQ: the rounding of a block also compensates the error its quantized input
carries). ``target="input"`` uses the float block on the quantized input instead, ``block(x~; W)``, which only
asks each block not to add error of its own; measured on a small trained CNN, errors then pile up from block to
block and learned rounding ended up worse than RTN, so it is not the default. The regulariser is off for the first
``warmup`` fraction of the iterations and ``beta`` then decays linearly from 20 to 2, pushing ``h`` to 0 or 1. The
final codes round up where ``h(V) >= 0.5``: ``u = clamp(floor(w/s) + [h >= 0.5] (+ z), ...)``, so each code is
the floor or the ceiling of ``w/s``, never further from it than RTN's code by more than one step. If the hard
rounding reconstructs a block's target worse than round-to-nearest on the calibration data (possible with very few
iterations), the block keeps round-to-nearest and its record says so (``"fallback": "rtn"``). Both reconstruction
errors are means over every output element of every calibration call,

    mse = sum_calls sum (block(x~; W^) - target)^2 / (number of output elements of all calls)

so calibration batches of different sizes count in proportion to their size.

A layer or block that the forward calls several times per batch (one module applied to several tensors, or bound
under several names that are all used) is calibrated on every call, as GPTQ's Hessian collects every use: each
call's input and target (the float model's output of that call) is one calibration call, exactly as if its input
had been a calibration batch of its own (same seed: the same rounding), so the Adam steps draw from, and the errors
above and the activation range cover, the calls of every use. A call keeps its own inputs and output only (per
batch, a single call's worth times the number of calls). The number of calls may differ from batch to batch
(data-dependent control flow, e.g. a module reused only for some inputs): every call of every batch is calibration
data all the same. Whether a batch's forward can stop at the unit's call is decided on *every* calibration batch,
before the model changes, by one float forward pass of each batch that counts the calls of every unit: a unit called
exactly once by each batch is captured from its first call of each batch (the rest of the model is not run); any
other unit (called twice or more, or not at all, by some batch) from every call of each batch's whole forward.
With ``target="float"`` the calls of the model being quantized are paired in order with those of the float copy,
batch by batch; a batch that calls the unit a different number of times in the two (control flow that depends on
the already quantized earlier units) is refused with a ``ValueError`` naming the unit and the batch, since its
calls have no well-defined float target (``target="input"``, which pairs each call with the float unit on the
same input, takes it).

Padding: in a dict calibration batch with a 2-D ``attention_mask``, the padding positions (mask 0) are not
calibration data. Where a block's output is ``(batch, tokens, features)`` with the mask's ``(batch, tokens)``, their
rows are left out of the reconstruction loss (the mean over the real rows), of both errors above (and so of the
fallback decision), and, where the block's input has that shape too, of the activation range (``act_bits``); blocks
of the vision tower or the projector are exempt (their rows are image patches, even when their count equals the
number of tokens), as for GPTQ and AWQ. A right-padded batch of a causal language model thus gives the errors of its
sequences run unpadded, and the padding's token ids change nothing. In an encoder-decoder the mask is the one of the
unit's side (:class:`~medquant.calibrate._forward.MaskSides`): the ``attention_mask`` for the encoder's units and
for a unit whose input is the encoder's output (a cross-attention ``k`` / ``v`` projection as a unit of its own),
the ``decoder_attention_mask`` (none: every row) for the decoder's other units. A KV cache passed to a block (an
HF decoder layer's ``past_key_values``) is not recorded with its inputs: re-running the block would append to it. A
calibration set whose every ``attention_mask`` is all zeros has no real token: it is refused before the model
changes (unless only vision-tower / projector layers are planned; in an encoder-decoder, unless only decoder units
are, which are refused where every ``decoder_attention_mask`` is all zeros).

:func:`fold_batchnorm_` first folds each BatchNorm2d into the Conv2d that feeds it (``w' = w gamma / sigma``,
``b' = (b - mu) gamma / sigma + beta``), so the rounding is learned on the weights that will actually be used.
With ``act_bits`` each block's input is also fake-quantized (static per-tensor, :class:`InputQuantizer`) during the
reconstruction and afterwards (W4A8 and the like).

The quantized layers replace the float ones as :func:`medquant.quantize_`'s do: in the layer's previous train / eval
mode (the reconstruction itself runs in eval mode), bound under every name of a shared layer (it stays one module),
with the float layer's forward / pre / backward hooks. Conv2d layers must pad with zeros (``padding_mode="zeros"``,
what :class:`~medquant.QuantConv2d` computes). All or nothing: an error once the model begins to change (a later
block's reconstruction failing, an interrupt, any ``BaseException``) leaves the model exactly as before the call -
the same module and tensor objects under every name (BatchNorms not folded, MoE experts modules not unfolded, no
quantized layer), train / eval modes, hooks and input quantizers as before - then propagates; the float layers
are kept until the call returns.
"""
from __future__ import annotations

import contextlib
import copy
import itertools
import math
import numbers
from collections.abc import Collection, Iterable, Mapping, Sequence
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_weights
from tqdm.auto import tqdm

from ..kernels.layout import FORMAT_VERSION, expand_params, pack, padded_k
from ..models.runner import eval_mode
from ..quant.activations import InputQuantizer
from ..quant.api import names_by_module, resolve_configs, swap_module, swap_under_all_names
from ..quant.config import QuantConfig
from ..quant.core import compute_qparams
from ..quant.modules import QuantConv2d, QuantLinear
from ._experts import ExpertRows, rtn_unrouted, unfold_experts, warn_unrouted
from ._forward import (
    BatchMasks,
    MaskSides,
    _integer,
    batch_masks,
    calibration_batches,
    check_seed,
    count_calls,
    row_mask,
    run_calibration_batch,
    short_names,
    unmasked_layers,
)
from .sequential import _Undo

__all__ = ["InputQuantizer", "adaround_quantize_", "attach_input_quantizers", "fold_batchnorm_"]

_ZETA, _GAMMA = 1.1, -0.1


# ---------------------------------------------------------------------------------------------- BN folding
def _conv_bn_pairs(model: nn.Module) -> list[tuple[str, str]]:
    """(conv, bn) names where a BatchNorm2d reads only the output of a Conv2d that nothing else reads, the conv
    module and the BatchNorm module each called at that one place only (a module called elsewhere too would see
    the folded weights, or the Identity, there). Where ``torch.fx`` cannot trace the model: adjacent Conv2d /
    BatchNorm2d entries of an ``nn.Sequential`` whose two modules are bound under no other name."""
    try:
        gm = torch.fx.symbolic_trace(model)
    except Exception:  # noqa: BLE001  (any tracing failure: fall back to adjacent entries of nn.Sequential)
        names: dict[int, int] = {}
        for _, mod in model.named_modules(remove_duplicate=False):
            names[id(mod)] = names.get(id(mod), 0) + 1
        pairs = []
        for name, mod in model.named_modules():
            if isinstance(mod, nn.Sequential):
                kids = list(mod.named_children())
                for (a, ma), (b, mb) in itertools.pairwise(kids):
                    if (isinstance(ma, nn.Conv2d) and isinstance(mb, nn.BatchNorm2d) and names[id(ma)] == 1
                            and names[id(mb)] == 1):
                        pre = f"{name}." if name else ""
                        pairs.append((pre + a, pre + b))
        return pairs
    mods = dict(gm.named_modules())
    calls: dict[str, int] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    pairs = []
    for node in gm.graph.nodes:
        if node.op != "call_module" or not isinstance(mods.get(node.target), nn.BatchNorm2d):
            continue
        src = node.args[0] if node.args else None
        if (isinstance(src, torch.fx.Node) and src.op == "call_module" and isinstance(mods.get(src.target), nn.Conv2d)
                and len(src.users) == 1 and calls[src.target] == 1 and calls[node.target] == 1):
            pairs.append((src.target, node.target))
    return pairs


@torch.no_grad()
def fold_batchnorm_(model: nn.Module) -> list[tuple[str, str]]:
    """Fold every BatchNorm2d that directly follows a Conv2d into it (in place; the BN becomes ``nn.Identity``).

    Uses the running statistics (eval-mode BN): ``w' = w * gamma / sqrt(var + eps)``, ``b' = (b - mean) * gamma /
    sqrt(var + eps) + beta``; the eval-mode outputs are unchanged. A pair is left alone where the conv's output is
    read by anything else too, or where the conv or the BatchNorm module is also called at another place of the
    forward (that call would see the folded weights, or the Identity).

    Args:
        model: the model, changed in place (traced with ``torch.fx``; if tracing fails, adjacent Conv2d /
            BatchNorm2d entries of ``nn.Sequential`` containers are folded, unless one of the two modules is also
            bound under another name).

    Returns:
        The folded ``(conv name, bn name)`` pairs.

    Raises:
        ValueError: a BatchNorm2d to fold has no running statistics (checked before anything is folded).
    """
    pairs = _conv_bn_pairs(model)
    for _, bn_name in pairs:  # all checked before the first fold: an error leaves the model unchanged
        bn = model.get_submodule(bn_name)
        if bn.running_mean is None or bn.running_var is None:
            raise ValueError(f"{bn_name}: cannot fold a BatchNorm2d without running statistics")
    for conv_name, bn_name in pairs:
        conv, bn = model.get_submodule(conv_name), model.get_submodule(bn_name)
        w, b = fuse_conv_bn_weights(conv.weight, conv.bias, bn.running_mean, bn.running_var, bn.eps, bn.weight,
                                    bn.bias)
        conv.weight = nn.Parameter(w.detach(), requires_grad=conv.weight.requires_grad)
        conv.bias = nn.Parameter(b.detach(), requires_grad=False)
        swap_module(model, bn_name, nn.Identity())
    return pairs


# ---------------------------------------------------------------------------------------------- one layer
def _check_config(config: QuantConfig, name: str) -> None:
    """The layer's config is one learned rounding handles: one bit-width in 2..8, no per-row bit-widths."""
    if config.channel_bits is not None:
        raise ValueError(f"layer {name}: learned rounding does not support per-row bit-widths (channel_bits); "
                         "use gptq_quantize_ or quantize_ for mixed-precision layers")
    if not 2 <= config.bits <= 8:
        raise ValueError(f"layer {name}: learned rounding needs 2..8 bits, got {config.bits}")


class _Rounding:
    """The rounding variables of one layer and its fixed quantization grid."""

    def __init__(self, module: nn.Module, config: QuantConfig, name: str) -> None:
        _check_config(config, name)
        b = config.bits
        self.module, self.config, self.name, self.bits = module, config, name, b
        self.sym = config.is_symmetric(b)
        w = module.weight.detach().reshape(module.weight.shape[0], -1).float()
        n, k = w.shape
        s, z, elems = compute_qparams(w, b, self.sym, config.scope, config.group_size, config.torch_scale_dtype)
        self.scales, self.zeros, self.elems = s, z, elems
        kp = padded_k(k, b, config.group_size if config.scope == "group" else None)
        self.s = expand_params(s.float(), config.scope, elems, n, kp)[:, :k]
        self.z = expand_params(z.float(), config.scope, elems, n, kp)[:, :k] if z is not None else None
        if self.sym:
            self.lo, self.hi = -(2 ** (b - 1) - 1), 2 ** (b - 1) - 1
        else:
            self.lo, self.hi = 0, 2**b - 1
        self.floor = torch.floor(w / self.s)
        rest = (w / self.s - self.floor).clamp(1e-4, 1 - 1e-4)
        self.v = nn.Parameter(-torch.log((_ZETA - _GAMMA) / (rest - _GAMMA) - 1))  # h(v) = rest
        self.shape = module.weight.shape

    def h(self) -> torch.Tensor:
        return torch.clamp(torch.sigmoid(self.v) * (_ZETA - _GAMMA) + _GAMMA, 0, 1)

    def weight(self, hard: bool = False) -> torch.Tensor:
        h = (self.h() >= 0.5).float() if hard else self.h()
        q = self.floor + h
        if self.sym:
            w = torch.clamp(q, self.lo, self.hi) * self.s
        else:
            w = (torch.clamp(q + self.z, self.lo, self.hi) - self.z) * self.s
        return w.reshape(self.shape).to(self.module.weight.dtype)

    def regulariser(self, beta: float) -> torch.Tensor:
        return (1 - (2 * self.h() - 1).abs().pow(beta)).sum()

    @torch.no_grad()
    def quantized_module(self) -> nn.Module:
        m, cfg, b = self.module, self.config, self.bits
        n = m.weight.shape[0]
        k = self.floor.shape[1]
        up = (self.h() >= 0.5).float()
        if self.sym:
            codes = torch.clamp(self.floor + up, self.lo, self.hi) + 2 ** (b - 1)
        else:
            codes = torch.clamp(self.floor + up + self.z, self.lo, self.hi)
        kp = padded_k(k, b, cfg.group_size if cfg.scope == "group" else None)
        codes = F.pad(codes.to(torch.uint8), (0, kp - k))
        w = m.weight
        if isinstance(m, nn.Conv2d):
            q = QuantConv2d(m.in_channels, m.out_channels, m.kernel_size, m.stride, m.padding, m.dilation, m.groups,
                            m.bias is not None, cfg, w.device, w.dtype)
        else:
            q = QuantLinear(m.in_features, n, m.bias is not None, cfg, w.device, w.dtype)
        q.get_buffer(f"qweight_{b}").copy_(pack(codes, b))
        q.get_buffer(f"scales_{b}").copy_(self.scales)
        if not self.sym:
            q.get_buffer(f"zeros_{b}").copy_(self.zeros)
        if m.bias is not None:
            q.bias.copy_(m.bias.detach())
        q.to_layout(FORMAT_VERSION)  # packed as version 1 above: 3/5/6/7-bit rows dense, as from_float stores them
        q.train(m.training)
        return q


# ---------------------------------------------------------------------------------------------- activations
def attach_input_quantizers(model: nn.Module, records: Mapping[str, Mapping[str, Any]]) -> dict[str, InputQuantizer]:
    """Re-attach the activation quantizers recorded by :func:`adaround_quantize_` (``act_bits``).

    For each record with an ``"act"`` entry, an :class:`InputQuantizer` with its parameters is attached to the
    module ``record["block"]`` (once per unit).

    Args:
        model: the loaded model.
        records: the calibration records (``medquant.load_extras(path)["calibration"]``).

    Returns:
        ``{unit name: quantizer}``.
    """
    out: dict[str, InputQuantizer] = {}
    for rec in records.values():
        act = rec.get("act")
        if not act or rec["block"] in out:
            continue
        aq = InputQuantizer(int(act["bits"]), bool(act["symmetric"]), float(act["scale"]), int(act["zero"]))
        aq.attach(model.get_submodule(rec["block"]))
        out[rec["block"]] = aq
    return out


# ---------------------------------------------------------------------------------------------- capture
class _StopForward(Exception):
    pass


def _first_tensor(out: Any) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise TypeError(f"a block's output must be a tensor or a tuple starting with one, got {type(out).__name__}")


def _run_batch(model: nn.Module, batch: Any, i: int, what: str) -> None:
    run_calibration_batch(model, batch, i, what, passthrough=(_StopForward,))


_Call = tuple[tuple, dict, torch.Tensor, "torch.Tensor | None"]


def _no_cache(kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """The keyword inputs of a block call, a KV cache (``past_key_values``, ``past_key_value``, ``cache`` or any
    object with ``get_seq_length``) replaced by ``None``: every re-run of the block would append to it again."""
    return {k: None if k in ("past_key_values", "past_key_value", "cache") or hasattr(v, "get_seq_length") else v
            for k, v in kwargs.items()}


@torch.no_grad()
def _capture_block(model: nn.Module, block_name: str, batches: Sequence[Any], every_call: bool = False,
                   per_batch: list[int] | None = None, experts: ExpertRows | None = None,
                   sides: MaskSides | None = None) -> list[_Call]:
    """(args, kwargs without a KV cache, float output, the batch's token mask) of every call of the block on the
    calibration batches, in call order (batch by batch, the calls of a batch in the order the forward makes them).
    The token mask is the one :class:`~medquant.calibrate._forward.MaskSides` gives the block's input (the first
    positional argument, or ``hidden_states=``): in an encoder-decoder, the ``decoder_attention_mask`` for a unit
    of the decoder side, the ``attention_mask`` for one of the encoder side or one whose input is the encoder's
    output (a cross-attention ``k`` / ``v`` projection as a unit of its own); else the ``attention_mask``.

    ``every_call=False``: each batch's forward is stopped at the block's first call (for a block called once per
    batch: the rest of the model is not run). ``every_call=True``: each batch's forward runs through and every call
    of the block is kept (a shared layer or block), one entry per call, each holding that call's tensors only.
    ``per_batch``, when given, receives the number of calls kept from each batch (in batch order). An MoE expert
    layer (in ``experts``) gets the mask entries of the tokens routed to it (a ``(rows,)`` mask)."""
    block = model.get_submodule(block_name)
    calls: list[_Call] = []
    mask: list[BatchMasks] = [BatchMasks()]  # the token masks of the batch being run
    states: list[torch.Tensor] = []
    sides = MaskSides(model) if sides is None else sides
    routed = experts is not None and block_name in experts

    def hook(mod, args, kwargs, out):
        first = args[0] if args else kwargs.get("hidden_states")
        m = sides.mask(block_name, first, mask[0], states)
        m = cast(ExpertRows, experts).map(block_name, None, m)[1] if routed else m
        calls.append((tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args), _no_cache(kwargs),
                      _first_tensor(out).detach(), m))
        if not every_call:
            raise _StopForward

    h = block.register_forward_hook(hook, with_kwargs=True)
    try:
        for i, batch in enumerate(batches):
            mask[0] = batch_masks(batch)
            before = len(calls)
            try:
                with experts.tracking() if routed and experts is not None else contextlib.nullcontext(), \
                        sides.tracking(model) as states:
                    _run_batch(model, batch, i, f"block {block_name}")
            except _StopForward:
                pass
            if per_batch is not None:
                per_batch.append(len(calls) - before)
    finally:
        h.remove()
    if not calls:
        raise ValueError(f"block {block_name} received no calibration inputs: the model's forward did not call it")
    for args, _, _, _ in calls:
        for a in args:
            if isinstance(a, torch.Tensor) and a.dtype.is_floating_point and not torch.isfinite(a).all():
                raise ValueError(f"block {block_name}: calibration input holds NaN/inf values")
    return calls


def _rec_loss(out: torch.Tensor, target: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
    """Squared error summed over the channel / feature dim (dim 1 of a conv output, the last dim otherwise),
    averaged over the rest (so the loss does not shrink with the layer's width); with ``rows`` (a ``(batch,
    tokens)`` mask of a ``(batch, tokens, features)`` output) over the marked rows only (none marked: 0). Computed
    in float32 (a float16 / bfloat16 block's squared errors and their sums would overflow or lose precision)."""
    d = (out.float() - target.float()).pow(2)
    if d.dim() == 4:
        return d.sum(1).mean()
    per_row = d.sum(-1)
    if rows is None:
        return per_row.mean()
    return per_row[rows].sum() / max(int(rows.sum()), 1)


def _check_real_tokens(batches: Sequence[Any], units: Sequence[str], sides: MaskSides | None = None) -> None:
    """Refuse a calibration set whose every batch has an all-zero ``attention_mask`` when ``units`` (those that read
    token positions, not the vision tower / projector) is not empty: no position is calibration data for them, and
    their errors would be 0 / 0. In an encoder-decoder (``sides``) the units of the decoder side are checked against
    the ``decoder_attention_mask`` instead (a decoder unit reading the encoder's output, known only on the forward,
    is checked as a decoder unit)."""
    if not units:
        return
    masks = [batch_masks(b) for b in batches]
    for key in ("attention_mask", "decoder_attention_mask"):
        decoder = key == "decoder_attention_mask"
        side = [u for u in units if sides is not None and sides.seq2seq and not sides.encoder_side(u)] if decoder \
            else [u for u in units if sides is None or not sides.seq2seq or sides.encoder_side(u)]
        side_masks = [m.decoder if decoder else m.encoder for m in masks]
        if side and all(m is not None and not bool(m.any()) for m in side_masks):
            raise ValueError(
                f"learned rounding: the calibration set has no real token: the {key} of every calibration batch "
                f"is all zeros (every position is padding), so {', '.join(side[:3])}"
                f"{'...' if len(side) > 3 else ''} would have no calibration data; give batches whose {key} "
                f"marks at least one real token (nonzero / True)")


# ---------------------------------------------------------------------------------------------- entry point
def _is_number(v: Any) -> bool:
    """A finite real number (Python or NumPy; bool excluded)."""
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)


def _check_args(iters: int, warmup: float, act_bits: int | None, target: str, lr: float = 1e-2, reg: float = 0.01,
                blocks: Any = None) -> tuple[int, float, int | None, float, float]:
    """Check the arguments; return ``(iters, warmup, act_bits, lr, reg)`` as Python numbers (a NumPy scalar as the
    ``int`` / ``float`` it holds), the values the records hold (JSON)."""
    if not (_integer(iters) or 0) >= 1:
        raise ValueError(f"iters must be a positive integer, got {iters!r}")
    if not _is_number(warmup) or not 0 <= warmup < 1:
        raise ValueError(f"warmup must be a number in [0, 1), got {warmup!r}")
    if not _is_number(lr) or not lr > 0:
        raise ValueError(f"lr must be a finite number > 0, got {lr!r}")
    if not _is_number(reg) or not reg >= 0:
        raise ValueError(f"reg must be a finite number >= 0, got {reg!r}")
    if blocks is not None and (isinstance(blocks, (str, bytes)) or not isinstance(blocks, Sequence)
                               or not all(isinstance(b, str) for b in blocks)):
        raise ValueError(f"blocks must be a list of module names (e.g. ['layer1.0', 'layer1.1']), got {blocks!r}")
    if act_bits is not None and not 2 <= (_integer(act_bits) or 0) <= 16:
        raise ValueError(f"act_bits must be None or an integer in 2..16, got {act_bits!r}")
    if target not in ("float", "input"):
        raise ValueError(f"target must be 'float' (the float model's block outputs) or 'input' (the float block "
                         f"on the quantized input), got {target!r}")
    def real(v: Any) -> float:  # a Python number as given, another real type (NumPy's) as float
        return v if isinstance(v, (int, float)) else float(v)

    return int(iters), real(warmup), None if act_bits is None else int(act_bits), real(lr), real(reg)


def _check_blocks(model: nn.Module, blocks: Sequence[str] | None) -> list[str]:
    """``blocks`` as a list of distinct module names, checked: each names a module, and none lies inside another."""
    out = list(dict.fromkeys(blocks or []))
    for b in out:
        model.get_submodule(b)
    for outer, inner in itertools.permutations(out, 2):
        if outer == "" or inner.startswith(outer + "."):
            raise ValueError(f"blocks {outer!r} and {inner!r} nest ({inner!r} is inside {outer!r}); blocks must not "
                             "nest: give the outer block alone (its layers are reconstructed jointly) or only the "
                             "inner ones")
    return out


def _refuse_shared_across_units(model: nn.Module, plan: Iterable[str], blocks: Sequence[str]) -> None:
    """Refuse a planned layer (one module object) bound inside one of ``blocks`` and outside every block, or inside
    two different blocks: it is reconstructed only in the unit its planned name falls under, so its calibration
    would miss its other uses (as :func:`medquant.calibrate.gptq_quantize_sequential` refuses it). A layer bound
    under several names within one block (or only outside the blocks) stays allowed: its unit is calibrated on
    every call."""
    if not blocks:
        return
    aliases = names_by_module(model)

    def owner(name: str) -> str | None:
        return next((b for b in blocks if name.startswith(b + ".")), None)

    for n in plan:
        names = aliases.get(id(model.get_submodule(n)), [n])
        if len({owner(a) for a in names}) > 1:
            where = ", ".join(f"{a} ({'block ' + repr(o) if (o := owner(a)) is not None else 'outside the blocks'})"
                              for a in names)
            raise ValueError(f"layer {n} is one module bound in several blocks or in a block and outside the blocks "
                             f"({where}): learned rounding would reconstruct it in one of them only, its other uses "
                             f"missing from its calibration. Leave it in float (skip=[{n!r}]), give each use its own "
                             "copy of the layer, or choose blocks that hold all its names")


def _forward_order(model: nn.Module, units: Iterable[str], batches: Sequence[Any], optional: Collection[str] = (),
                   first_tensor: bool = False) -> tuple[list[str], dict[str, list[int]]]:
    """The units in the order of their first call on the first batch (units it does not call after them, in the
    order of their first call on the later batches), and how many times each batch's forward calls each unit, one
    count per batch (0: not called by that batch; > 1: a shared layer or block, or one reused by that batch). Every
    batch is run once, whole: a unit called exactly once by the first batch may be called twice by another
    (data-dependent control flow), so the decision to stop a capture at a unit's first call needs every batch.
    With ``first_tensor`` (activation quantization), every call of every unit must pass a tensor as its first
    positional argument (what :class:`InputQuantizer` quantizes).

    Raises:
        ValueError: a unit that no calibration batch calls (checked here, before the model changes), unless it is
            ``optional`` (an MoE expert layer no calibration token is routed to: it is left out of the order);
            with ``first_tensor``, a unit called without a tensor as its first positional argument (e.g. with
            ``hidden_states=`` by keyword).
    """
    units = list(units)
    keyword: list[str] = []  # units called without a positional input tensor

    def check(name: str, args: tuple, kwargs: dict, batch: int, calls: int) -> None:
        if not (args and isinstance(args[0], torch.Tensor)) and name not in keyword:
            keyword.append(name)

    with torch.no_grad():
        order, counts = count_calls(model, units, batches, on_call=check if first_tensor else None)
    missing = [u for u in units if u not in order and u not in optional]
    if missing:
        raise ValueError(f"block {missing[0]} received no calibration inputs: the model's forward did not call it on "
                         f"any calibration batch ({len(missing)} unit(s) never called: {', '.join(missing[:3])}"
                         f"{', ...' if len(missing) > 3 else ''}); skip it or give batches that reach it")
    if keyword:
        raise ValueError(f"block {keyword[0]}: activation quantization (act_bits) needs the block's input tensor as "
                         "its first positional argument, but the model's forward calls it without one (its input "
                         f"passed by keyword, e.g. hidden_states=; units: {short_names(keyword)}); leave it out of "
                         "blocks= (its layers are then reconstructed one by one, each called with its input first) "
                         "or leave act_bits unset")
    return order, counts


def _rtn_(layers: Mapping[str, _Rounding]) -> None:
    """Set every rounding variable to round-to-nearest (``h`` exactly 0 or 1)."""
    with torch.no_grad():
        for r in layers.values():
            rest = r.module.weight.detach().reshape(r.floor.shape).float() / r.s - r.floor
            r.v.copy_(torch.where(rest >= 0.5, 10.0, -10.0))


def adaround_quantize_(
    model: nn.Module,
    config_or_map: QuantConfig | int | Mapping[str, QuantConfig | int | None],
    calib: Iterable[Any],
    *,
    skip: Iterable[str] | None = None,
    blocks: Sequence[str] | None = None,
    iters: int = 1000,
    lr: float = 1e-2,
    reg: float = 0.01,
    warmup: float = 0.2,
    fold_bn: bool = True,
    seed: int = 0,
    act_bits: int | None = None,
    act_symmetric: bool = False,
    target: str = "float",
    progress: bool = True,
) -> dict[str, dict[str, Any]]:
    """Quantize ``model``'s Linear / Conv2d layers in place with learned rounding (see the module docstring).

    The plan is :func:`medquant.quantize_`'s: MoE experts with 3-D weights are unfolded into one Linear per expert
    and projection, each reconstructed on the tokens routed to it (alone: against its float output on that input,
    ``target="input"`` in its record; inside a block: jointly with the block), an expert no calibration token
    reaches is rounded to nearest (record ``method: "rtn"``, one warning); MoE routers stay in floating point.

    Args:
        model: a float model, run in eval mode (its previous mode is restored at the end).
        config_or_map: which layers get which :class:`~medquant.QuantConfig`, as :func:`medquant.quantize_`
            (2..8 bits, no per-row bit-widths).
        calib: calibration batches as :func:`medquant.models.run_model` takes them; a single dict is one batch.
            The padding positions of a dict batch's ``attention_mask`` are left out (see the module docstring).
        skip: layer names or role patterns left in float, as :func:`medquant.quantize_`.
        blocks: names of modules reconstructed as a whole (e.g. a ResNet's ``"layer1.0"``); their planned layers
            are optimised jointly. Planned layers outside every block are reconstructed one by one (AdaRound).
            Blocks must not nest (``["layer1", "layer1.0"]`` is refused), and a planned layer must not be one module
            bound inside a block and outside the blocks, or inside two blocks (refused before any change).
        iters: Adam steps per block, one calibration batch each, in a seeded random order.
        lr: Adam's learning rate (> 0).
        reg: ``lambda``, the weight of the rounding regulariser (>= 0).
        warmup: the fraction of the steps before the regulariser starts (reconstruction only).
        fold_bn: fold BatchNorm2d layers into their convolutions first (:func:`fold_batchnorm_`), once the
            arguments, the plan, the blocks and a forward on every calibration batch have been checked; not
            when nothing is planned.
        seed: seed of the batch order (an integer); the result is deterministic for a seed (on the same device).
        act_bits: quantize each unit's input activations too (e.g. ``8`` for W4A8): a static per-tensor
            :class:`InputQuantizer` per unit (asymmetric unless ``act_symmetric``), fixed from the unit's
            calibration inputs, used in the reconstruction and left attached to the unit as a forward pre-hook.
            ``None`` (default): float activations.
        act_symmetric: symmetric activation quantizers (with ``act_bits``).
        target: ``"float"`` (default): each block reconstructs the float model's output of that block (a float
            copy of the model is kept during the call); ``"input"``: the float block's output on the same,
            quantized input (see the module docstring).
        progress: show a tqdm progress bar over the blocks.

    Returns:
        Name -> ``{"method": "adaround", "block", "iters", "lr", "reg", "warmup", "target", "samples", "seed",
        "mse_rtn", "mse", "mse_learned", "fallback"}``: ``mse_learned`` is the block's calibration reconstruction
        error (squared difference to the target, summed over every output element of every calibration batch and
        divided by their number; the padding positions left out) with the learned hard rounding, ``mse_rtn`` with
        round-to-nearest, ``mse`` that of the rounding kept (``fallback`` is ``"rtn"`` when round-to-nearest was
        kept because it was better, else ``None``); with ``act_bits`` also ``"act": {"bits", "symmetric", "scale",
        "zero"}`` of the unit's input quantizer. Each quantized layer also carries its record as its
        ``calibration`` attribute. Empty, with the model left unchanged, when no layer is planned.

    Raises:
        TypeError: ``model`` is not an ``nn.Module``; a block's output is neither a tensor nor a tuple starting
            with one.
        ValueError: bad ``iters`` / ``warmup`` / ``lr`` / ``reg`` / ``seed`` / ``act_bits`` / ``target``, ``blocks``
            that is not a list of names; no or an empty calibration set; a layer
            with per-row bit-widths or bits outside 2..8; a Conv2d layer with a ``padding_mode`` other than
            ``"zeros"``; nested ``blocks``; a planned layer (one module) bound inside a block and outside every
            block, or inside two different blocks (a layer shared within one block is allowed); a calibration batch that fails in the
            model's forward (the message names the batch; the model's error is chained); a calibration set whose
            every ``attention_mask`` is all zeros (no real token) while a layer outside the vision tower /
            projector is planned (in an encoder-decoder: an encoder layer; a decoder layer where every
            ``decoder_attention_mask`` is all zeros); a block that the
            calibration batches never reach; with ``act_bits``, a unit that the model's forward calls without its
            input tensor as the first positional argument (e.g. ``hidden_states=`` by keyword); NaN or inf in a
            block's calibration input; a reconstruction that diverged; with ``target="float"``, a block that a
            calibration batch calls a different number of times in the model being quantized and in the float model
            (module docstring). The errors up to the float forward
            of every batch (which counts the calls of each block per batch; a block that no batch reaches, or with
            ``act_bits`` one called without a positional input, is refused there) are raised before the model is
            changed; any later one (a block's error, a ``KeyboardInterrupt``) leaves the model as it was before the
            call (module docstring), then propagates.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"adaround_quantize_ expects an nn.Module, got {type(model).__name__}")
    iters, warmup, act_bits, lr, reg = _check_args(iters, warmup, act_bits, target, lr, reg, blocks)
    seed = check_seed(seed)
    batches = calibration_batches(calib, "learned rounding")
    # everything that can fail cheaply is checked before the model changes (BatchNorm folding is the first change);
    # folding keeps the names and the types of the planned Linear / Conv2d layers, so the plan is made before it
    plan = resolve_configs(model, config_or_map, skip=skip, experts=True)
    if not plan:
        return {}
    if not batches:
        raise ValueError(f"learned rounding needs calibration data: the calibration set is empty (layers to "
                         f"quantize: {', '.join(list(plan)[:3])})")
    for n, cfg in plan.items():
        _check_config(cfg, n)
        layer = model.get_submodule(n)
        if isinstance(layer, nn.Conv2d) and layer.padding_mode != "zeros":  # QuantConv2d pads with zeros only
            raise ValueError(f"layer {n}: learned rounding supports Conv2d padding_mode='zeros' only, got "
                             f"{layer.padding_mode!r}; skip the layer")
    blocks = _check_blocks(model, blocks)
    _refuse_shared_across_units(model, plan, blocks)
    undo, hooks = _Undo(model), _hook_state(model)  # all or nothing: the model as it is now, put back on failure
    # MoE experts with 3-D weights: one float Linear per expert and matrix (put back if a check below fails)
    unfolded: list[tuple[str, nn.Module]] = []
    before = names_by_module(model)

    def unfold(name: str, new: nn.Module) -> None:
        unfolded.extend(swap_under_all_names(model, name, new, before))

    plan = unfold_experts(model, plan, unfold)
    try:
        experts = ExpertRows(model, list(plan))
        units: dict[str, list[str]] = {}
        for n in plan:
            owner = next((b for b in blocks if n.startswith(b + ".")), n)
            units.setdefault(owner, []).append(n)
        unmasked = unmasked_layers(model, units)  # vision tower / projector units: every position is calibration data
        _check_real_tokens(batches, [u for u in units if u not in unmasked], MaskSides(model))
        # one forward per batch: a batch that does not fit the model fails here; the expert layers' calls counted as
        # they will be captured (on the tokens routed to them: a dense expert no token reaches is not called)
        with eval_mode(model), experts.tracking():
            ordered, counts = _forward_order(model, units, batches, optional=[u for u in units if u in experts],
                                             first_tensor=act_bits is not None)
    except BaseException:
        for alias, old in reversed(unfolded):
            swap_module(model, alias, old)
        raise
    records: dict[str, dict[str, Any]] = {}
    unrouted = [u for u in units if u not in ordered]  # expert layers no calibration token reaches
    try:
        if fold_bn:
            fold_batchnorm_(model)
        aliases = names_by_module(model)  # every name of every layer, before any swap: a shared layer stays one
        modes = {n: model.get_submodule(n).training for n in plan}  # the swapped layers get these back
        try:
            for u in unrouted:
                _round_unrouted(model, u, plan[u], len(batches), records)
            _run_units(model, ordered, units, unmasked, plan, batches, records, aliases, iters=iters, lr=lr,
                       reg=reg, warmup=warmup, seed=seed, act_bits=act_bits, act_symmetric=act_symmetric,
                       target=target, progress=progress,
                       every_call={u for u, c in counts.items() if any(n != 1 for n in c)}, experts=experts,
                       unrouted=unrouted)
        finally:
            for n in records:
                model.get_submodule(n).train(modes[n])
    except BaseException:
        undo.restore()  # float layers, BatchNorms and experts modules bound again, modes as before the call
        _restore_hook_state(hooks)  # input quantizers attached to the units (act_bits) removed
        raise
    warn_unrouted(unrouted, 2)
    return records


_HOOK_TABLES = ("_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_forward_hooks", "_forward_hooks_with_kwargs",
                "_forward_hooks_always_called", "_backward_pre_hooks", "_backward_hooks")
_QUANTIZER_ATTRS = ("input_quantizer", "input_quantizer_handle")


def _hook_state(model: nn.Module) -> list[tuple[nn.Module, list[tuple[str, Any, list]], dict[str, Any]]]:
    """Every module of ``model`` with the contents of its hook tables (the table objects, which a swapped-in layer
    may share, and their entries) and its input-quantizer attributes, for :func:`_restore_hook_state`."""
    out = []
    for m in model.modules():
        tables = [(t, d, list(d.items())) for t in _HOOK_TABLES if isinstance(d := getattr(m, t, None), dict)]
        out.append((m, tables, {a: m.__dict__[a] for a in _QUANTIZER_ATTRS if a in m.__dict__}))
    return out


def _restore_hook_state(state: list[tuple[nn.Module, list[tuple[str, Any, list]], dict[str, Any]]]) -> None:
    """Put back the hook tables and input-quantizer attributes recorded by :func:`_hook_state` (a hook registered
    since, e.g. an :class:`InputQuantizer` attached to a unit, is dropped)."""
    for m, tables, attrs in state:
        for t, d, items in tables:
            d.clear()
            d.update(items)
            setattr(m, t, d)
        for a in _QUANTIZER_ATTRS:
            if a in attrs:
                setattr(m, a, attrs[a])
            else:
                m.__dict__.pop(a, None)


def _round_unrouted(model: nn.Module, name: str, cfg: QuantConfig, samples: int,
                    records: dict[str, dict[str, Any]]) -> None:
    """Round the expert layer ``name``, which no calibration row reaches, to nearest (:func:`rtn_unrouted`), swap
    it in (with the float layer's hooks, as every swap of a quantized module) and record it."""
    q = rtn_unrouted(model.get_submodule(name), cfg, samples)
    records[name] = dict(q.calibration)
    swap_module(model, name, q)


def _run_units(model: nn.Module, ordered: Sequence[str], units: Mapping[str, list[str]], unmasked: Any,
               plan: Mapping[str, QuantConfig], batches: Sequence[Any], records: dict[str, dict[str, Any]],
               aliases: Mapping[int, list[str]], *, iters: int, lr: float, reg: float, warmup: float, seed: int,
               act_bits: int | None, act_symmetric: bool, target: str, progress: bool,
               every_call: Collection[str] = (), experts: ExpertRows | None = None,
               unrouted: list[str] | None = None) -> None:
    """Reconstruct the units in order (in eval mode), adding each layer's record to ``records`` as it is swapped.
    The units of ``every_call`` (not called exactly once by every batch) are captured on every call of each
    batch; the others' forwards stop at their first call. With ``target="float"``, a unit that some batch calls a
    different number of times in the model being quantized and in the float copy is refused (``ValueError``). An
    MoE expert layer reconstructed on its own (in ``experts``) always targets its float output on its own input
    (``"input"``): the float model may route other tokens to that expert, so its rows cannot be paired; one that
    only padding positions are routed to (no calibration row) is rounded to nearest, as an expert no token reaches,
    and added to ``unrouted``."""
    sides = MaskSides(model)
    sides.warn_unsided(batches)
    with eval_mode(model):
        reference = copy.deepcopy(model) if target == "float" else None
        gen = torch.Generator().manual_seed(seed)
        for unit in tqdm(ordered, desc="learned rounding", disable=not progress, leave=False):
            every = unit in every_call
            per_batch: list[int] = []
            calls = _capture_block(model, unit, batches, every, per_batch, experts, sides)
            routed = experts is not None and unit in experts
            if routed and unit not in unmasked and all(c[3] is not None and not bool(c[3].any()) for c in calls):
                _round_unrouted(model, unit, plan[unit], len(batches), records)
                if unrouted is not None:
                    unrouted.append(unit)
                continue
            if reference is not None and not routed:  # the float model's outputs of this block (float inputs)
                ref_per_batch: list[int] = []
                ref_calls = _capture_block(reference, unit, batches, every, ref_per_batch, sides=sides)
                if per_batch != ref_per_batch:  # calls are paired in order within a batch: counts must agree
                    i = next(j for j, (a, b) in enumerate(zip(per_batch, ref_per_batch)) if a != b)
                    raise ValueError(
                        f"block {unit}: calibration batch {i} calls it {per_batch[i]} time(s) in the model being "
                        f"quantized but {ref_per_batch[i]} time(s) in the float model (control flow that depends on "
                        "the already quantized earlier layers): its calls cannot be paired with the float model's "
                        "outputs; use target='input', put the layers that decide the control flow in one block with "
                        "it (blocks=), or skip it")
                calls = [(a, kw, r[2], m) for (a, kw, _, m), r in zip(calls, ref_calls)]
            if unit in unmasked:
                calls = [(a, kw, t, None) for a, kw, t, _ in calls]
            records.update(_reconstruct(model, unit, units[unit], plan, calls, len(batches), gen, iters=iters,
                                        lr=lr, reg=reg, warmup=warmup, seed=seed, act_bits=act_bits,
                                        act_symmetric=act_symmetric, target="input" if routed else target,
                                        aliases=aliases))


def _reconstruct(model: nn.Module, unit: str, names: Sequence[str], plan: Mapping[str, QuantConfig],
                 calls: list[_Call], samples: int, gen: torch.Generator, *, iters: int,
                 lr: float, reg: float, warmup: float, seed: int, act_bits: int | None, act_symmetric: bool,
                 target: str, aliases: Mapping[int, list[str]] | None = None) -> dict[str, dict[str, Any]]:
    """Learn the rounding of one unit's layers on ``calls`` ((args, kwargs, target output, token mask or
    ``None``)), swap in the quantized layers and return their records. The token mask leaves the padding positions
    out of the loss, the errors and the activation range wherever it fits the tensor (:func:`row_mask`). Each
    quantized layer is bound under every name of its float layer (``aliases``: ``id(module) -> names``, a shared
    layer stays one module) and takes over its hooks, as :func:`medquant.quantize_` does."""
    block = model.get_submodule(unit)
    aq = None
    if act_bits is not None:
        firsts = [c[0][0] for c in calls if c[0] and isinstance(c[0][0], torch.Tensor)]
        if len(firsts) != len(calls):
            raise ValueError(f"block {unit}: activation quantization needs the block's input tensor as its first "
                             "positional argument")
        kept = [x if (m := row_mask(x, c[3])) is None else x[m.to(x.device)] for x, c in zip(firsts, calls)]
        aq = InputQuantizer.calibrate([x for x in kept if x.numel()] or firsts, act_bits, act_symmetric,
                                      f"block {unit}")
        calls = [((aq(c[0][0]), *c[0][1:]), c[1], c[2], c[3]) for c in calls]
    rows = [None if (m := row_mask(c[2], c[3])) is None else m.to(c[2].device)  # per call: the output rows that
            for c in calls]                                                  # are calibration data (None: all)
    prefix = "" if unit in plan else unit + "."
    layers = {n: _Rounding(model.get_submodule(n), plan[n], n) for n in names}
    rel = {n: (n[len(prefix):] if prefix else "") for n in layers}
    opt = torch.optim.Adam([r.v for r in layers.values()], lr=lr)

    def run(hard: bool, call: tuple) -> torch.Tensor:
        weights = {(rel[n] + "." if rel[n] else "") + "weight": r.weight(hard) for n, r in layers.items()}
        return _first_tensor(torch.func.functional_call(block, weights, call[0], call[1]))

    def mse() -> float:
        """``sum_calls sum (block(x~; W^) - target)^2 / (number of output elements of all calls)``: the mean over
        every element (of the real tokens), so a call counts in proportion to its size (not the average of per-call
        means), in float64 (the squares of a float16 block's errors above 256 are not float16 numbers)."""
        sse, count = 0.0, 0
        with torch.no_grad():
            for c, m in zip(calls, rows):
                d = run(True, c).double() - c[2].double()
                if m is not None:
                    d = d[m]
                sse += float(d.pow(2).sum(dtype=torch.float64))
                count += d.numel()
        return sse / count if count else float("nan")

    learned = {n: r.v.detach().clone() for n, r in layers.items()}
    _rtn_(layers)
    mse_rtn = mse()
    with torch.no_grad():
        for n, r in layers.items():
            r.v.copy_(learned[n])
    start = int(warmup * iters)
    for it in range(iters):
        j = int(torch.randint(len(calls), (1,), generator=gen))
        call = calls[j]
        with torch.enable_grad():
            loss = _rec_loss(run(False, call), call[2], rows[j])
            if it >= start:
                beta = 20 + (2 - 20) * (it - start) / max(1, iters - start)
                loss = loss + reg * sum(r.regulariser(beta) for r in layers.values())
            opt.zero_grad(set_to_none=True)
            loss.backward()
        opt.step()
    mse_learned = mse()
    if not math.isfinite(mse_learned):
        raise ValueError(f"block {unit}: learned rounding diverged (reconstruction error {mse_learned})")
    fallback = None
    if mse_learned > mse_rtn:
        _rtn_(layers)
        fallback = "rtn"
    rec = {"method": "adaround", "block": unit, "iters": iters, "lr": lr, "reg": reg, "warmup": warmup,
           "target": target, "samples": samples, "seed": seed, "mse_rtn": mse_rtn,
           "mse": mse_rtn if fallback else mse_learned, "mse_learned": mse_learned, "fallback": fallback}
    if aq is not None:
        rec["act"] = aq.as_dict()
    records: dict[str, dict[str, Any]] = {}
    built = []
    for n, r in layers.items():
        q = r.quantized_module()
        q.calibration = dict(rec)
        records[n] = dict(rec)
        built.append((n, q))
    for n, q in built:
        swap_under_all_names(model, n, q, aliases or {})
    if aq is not None:  # on the module now in the model (a single-layer unit was just swapped)
        aq.attach(model.get_submodule(unit))
    return records
