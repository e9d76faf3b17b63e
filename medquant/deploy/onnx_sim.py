"""The PyTorch twin of an ONNX Runtime int8 classifier: BatchNorm folding, static activation scales, simulation.

:func:`calibrate_activations` turns a (medquant-quantized) classifier into the model that the ``onnx`` export
writes, as a PyTorch module whose forward computes what ONNX Runtime computes, so that accuracy measured in
PyTorch is the accuracy of the deployed model:

1. **BatchNorm folding.** A ``BatchNorm2d`` that reads the output of a convolution, when nothing else reads that
   output, is folded into it: with ``f_c = gamma_c / sqrt(var_c + eps)``, the weight row ``c`` becomes
   ``w_c * f_c`` and the bias ``(b_c - mean_c) * f_c + beta_c``. For a quantized convolution only the scales change
   (``s' = s * f_c`` in float32); the integer codes are kept bit for bit, except in a row of an 8-bit
   per-channel layer whose folded scale is 0 (``gamma_c = 0``): its weight is 0 whatever its codes, and it is
   stored as a zero row (codes at the zero point, the median of the layer's other positive scales), so that
   ONNX Runtime's int32 bias at scale ``s_x * s'`` does not overflow. A BatchNorm without running statistics
   (``track_running_stats=False``) is refused. The model is simulated in float32 (a float16 / bfloat16 model
   too), its floating inputs cast to float32, as ONNX Runtime computes.
2. **Weights** as medquant quantized them, in the container ONNX has for them (:func:`layer_plan`):
   ``w = (u - z) * s`` with ``u``/``z`` medquant's codes and zero points. Symmetric rows store ``q = u - 2^(b-1)``
   (``2u - 1`` for 1 bit) as int8 with zero point 0, asymmetric rows store ``u`` as uint8 with zero point ``z``.
3. **Activations** (layers with per-channel or per-tensor weights only, 8-bit or fewer bits in the int8
   container: 4-bit, and 1-3 / 5-7 bits with ``promote``): a per-tensor uint8 quantization
   of each such layer's input and output, ``q = saturate(round_half_even(x / s) + z, 0, 255)``,
   ``x^ = (q - z) * s``, exactly ONNX ``QuantizeLinear`` followed by ``DequantizeLinear``. The scale and zero
   point come from the calibration batches: ``lo = min(min x, 0)``, ``hi = max(max x, 0)`` (``method="minmax"``; or
   the mean over batches of the ``p``-th and ``(100 - p)``-th percentiles, ``method="percentile"``),
   ``s = (hi - lo) / 255`` in float32, ``z = saturate(round(-lo / s))``. Calibration observes the float model
   (no quantization while observing), as ONNX Runtime's ``quantize_static`` does.

   A ``ReLU`` module that reads a quantized layer's output (and is its only reader) is fused into the layer (relu, then the output
   quantization; the calibrated ``lo`` is then 0 and so is ``z``, which lets ONNX Runtime drop the Relu into the
   integer kernel; after a weight-only ``MatMulNBits`` or float layer the fused ReLU is a ``Relu`` node). A layer
   whose input is already the quantized output of another layer (also through a
   ``MaxPool2d``, which commutes with a monotone quantization) reuses that scale instead of requantizing. The
   layer that produces the model's output keeps a float output (logits are not quantized), also when the model
   returns a view of it (``fc(x).squeeze(1)``, ``.view(-1)``, ``[:, 0]``).
4. Layers with 4-bit group-wise weights (and every other group-wise scheme) are **weight-only**: float
   activations, weights dequantized at run time (``MatMulNBits`` for Linear, a block-wise ``DequantizeLinear``
   and a float Conv for convolutions).

The deployed integer kernels compute ``round(acc * (s_x s_w / s_y)) + z_y`` from an int32 accumulator, the
simulation ``round((sum of dequantized products + b) / s_y) + z_y`` in float32: the two agree except where the
value lies within float rounding of a rounding boundary, where a code differs by one step.
:func:`logits_tolerance` turns that into a bound on the logits. Their int32 bias ``round(b_c / (s_x s_c))`` must
fit in ``2^31 - 1``: a layer where it does not (a tiny folded weight scale, :meth:`ExportLayer.int32_bias_overflows`)
is written with its bias as a float ``Add`` after the Conv / Gemm (the same function; ONNX Runtime then runs that
convolution in float).
"""
from __future__ import annotations

import copy
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from ..quant.modules import QuantConv2d, QuantLinear
from .common import check_forward_hooks, layer_scheme, layer_weight
from .registry import ExportError

ACT_QMIN, ACT_QMAX = 0, 255
METHODS = ("minmax", "percentile")
NATIVE_BITS = (4, 8)


class CalibrationError(ValueError):
    """Calibration batches that cannot give activation scales (empty, NaN/inf, wrong type).

    The message names the batch and the input or layer.
    """


def fake_quantize_activation(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor) -> torch.Tensor:
    """``(saturate(round_half_even(x / s) + z, 0, 255) - z) * s`` in float32: ONNX QuantizeLinear (uint8) then
    DequantizeLinear."""
    z = zero_point.to(torch.float32)
    q = torch.clamp(torch.round(x / scale) + z, ACT_QMIN, ACT_QMAX)
    return (q - z) * scale


# ---------------------------------------------------------------------------------------------- ONNX functions
def _qdq(g, x, scale, zp):
    return g.op("DequantizeLinear", g.op("QuantizeLinear", x, scale, zp), scale, zp)


def _dq_weight(g, codes, scale, zp, mode, gs, k, shape):
    """Weight DequantizeLinear: per output row (``mode`` 0) or block-wise along K (``mode`` 1, opset 21), the
    block-wise one sliced back to ``k`` columns and reshaped to ``shape``."""
    if mode == 0:
        return g.op("DequantizeLinear", codes, scale, zp, axis_i=0)
    w = g.op("DequantizeLinear", codes, scale, zp, axis_i=1, block_size_i=gs)
    kp = codes.type().sizes()[1]
    if kp != k:
        w = g.op("Slice", w, g.op("Constant", value_t=torch.tensor([0])), g.op("Constant", value_t=torch.tensor([k])),
                 g.op("Constant", value_t=torch.tensor([1])))
    if len(shape) != 2:
        w = g.op("Reshape", w, g.op("Constant", value_t=torch.tensor(shape, dtype=torch.int64)))
    return w


def _weight_eager(codes, scale, zp, mode, gs, k, shape):
    if mode == 0:
        view = (-1,) + (1,) * (codes.dim() - 1)
        return (codes.to(torch.float32) - zp.to(torch.float32).view(view)) * scale.view(view)
    w = (codes.to(torch.float32) - zp.to(torch.float32).repeat_interleave(gs, 1)) * scale.repeat_interleave(gs, 1)
    return w[:, :k].reshape(shape)


def _epilogue(y: torch.Tensor, flags: int, out_s, out_z) -> torch.Tensor:
    """The fused tail of a simulated layer: ReLU when ``flags & 2``, then the output Q/DQ when ``flags & 4``."""
    if flags & 2:
        y = torch.relu(y)
    if flags & 4:
        y = fake_quantize_activation(y, out_s, out_z)
    return y


def _epilogue_onnx(g, y, flags: int, out_s, out_z):
    """:func:`_epilogue` as ONNX nodes: ``Relu``, then a QuantizeLinear / DequantizeLinear pair."""
    if flags & 2:
        y = g.op("Relu", y)
    if flags & 4:
        y = _qdq(g, y, out_s, out_z)
    return y


def _zero_row_scales(scales: torch.Tensor, zero_rows: torch.Tensor) -> torch.Tensor:
    """Per-channel weight scales with the rows whose weight is identically zero (every code at the zero point:
    pruned rows, or rows requantized from them) set to the median of the other rows' positive scales (1 if none).

    Their weight stays ``(q - z) * s = 0`` whatever ``s`` is, but ONNX Runtime's integer kernels store the bias in
    int32 at scale ``s_x * s``: a zero or near-zero ``s`` (medquant keeps the smallest positive float there)
    overflows it and the channel's bias is lost."""
    if not bool(zero_rows.any()):
        return scales
    others = scales[~zero_rows]
    others = others[others > 0]
    fill = float(others.median()) if others.numel() else 1.0
    return torch.where(zero_rows, torch.full_like(scales, fill), scales)


class _ConvFn(torch.autograd.Function):
    """``[Q DQ] -> Conv(DQ(W)) -> [Relu] -> [Q DQ]`` (flags: 1 input quant, 2 relu, 4 output quant, 8 the bias as a
    float ``Add`` after the Conv instead of its third input: the same function)."""

    @staticmethod
    def forward(ctx, x, codes, scale, zp, bias, in_s, in_z, out_s, out_z, stride, pads, dil, groups, mode, gs, k,
                shape, flags):
        if flags & 1:
            x = fake_quantize_activation(x, in_s, in_z)
        w = _weight_eager(codes, scale, zp, mode, gs, k, shape)
        pad = (pads[1], pads[3], pads[0], pads[2])
        if pads[0] == pads[2] and pads[1] == pads[3]:
            y = F.conv2d(x, w, bias, stride, (pads[0], pads[1]), dil, groups)
        else:
            y = F.conv2d(F.pad(x, pad), w, bias, stride, 0, dil, groups)
        y = _epilogue(y, flags, out_s, out_z)
        return y

    @staticmethod
    def symbolic(g, x, codes, scale, zp, bias, in_s, in_z, out_s, out_z, stride, pads, dil, groups, mode, gs, k,
                 shape, flags):
        if flags & 1:
            x = _qdq(g, x, in_s, in_z)
        w = _dq_weight(g, codes, scale, zp, mode, gs, k, shape)
        args = [x, w] if bias is None or flags & 8 else [x, w, bias]
        y = g.op("Conv", *args, strides_i=list(stride), pads_i=list(pads), dilations_i=list(dil), group_i=groups,
                 kernel_shape_i=list(shape[2:]))
        if bias is not None and flags & 8:  # the bias in float after the Conv (see ExportLayer.bias_apart)
            y = g.op("Add", y, g.op("Reshape", bias, g.op("Constant", value_t=torch.tensor([1, -1, 1, 1]))))
        y = _epilogue_onnx(g, y, flags, out_s, out_z)
        return y


class _LinearFn(torch.autograd.Function):
    """``[Q DQ] -> Gemm(x2d, DQ(W), bias, transB=1) -> [Relu] -> [Q DQ]`` on ``x`` flattened to 2-D (flags as
    :class:`_ConvFn`'s; 8: ``Add(Gemm(x2d, DQ(W)), bias)``)."""

    @staticmethod
    def forward(ctx, x, codes, scale, zp, bias, in_s, in_z, out_s, out_z, mode, gs, k, n, flags):
        if flags & 1:
            x = fake_quantize_activation(x, in_s, in_z)
        y = F.linear(x, _weight_eager(codes, scale, zp, mode, gs, k, (n, k)), bias)
        y = _epilogue(y, flags, out_s, out_z)
        return y

    @staticmethod
    def symbolic(g, x, codes, scale, zp, bias, in_s, in_z, out_s, out_z, mode, gs, k, n, flags):
        rank = x.type().dim()
        lead = None
        if rank != 2:
            shape = g.op("Shape", x)
            lead = g.op("Slice", shape, g.op("Constant", value_t=torch.tensor([0])),
                        g.op("Constant", value_t=torch.tensor([rank - 1])), g.op("Constant", value_t=torch.tensor([0])))
            x = g.op("Reshape", x, g.op("Constant", value_t=torch.tensor([-1, k], dtype=torch.int64)))
        if flags & 1:
            x = _qdq(g, x, in_s, in_z)
        w = _dq_weight(g, codes, scale, zp, mode, gs, k, (n, k))
        args = [x, w] if bias is None or flags & 8 else [x, w, bias]
        y = g.op("Gemm", *args, transB_i=1)
        if bias is not None and flags & 8:  # the bias in float after the Gemm (see ExportLayer.bias_apart)
            y = g.op("Add", y, bias)
        y = _epilogue_onnx(g, y, flags, out_s, out_z)
        if lead is not None:
            y = g.op("Reshape", y, g.op("Concat", lead, g.op("Constant", value_t=torch.tensor([n])), axis_i=0))
        return y


def unpack_nibbles(packed: torch.Tensor, k: int) -> torch.Tensor:
    """uint8 bytes ``(N, ...)`` holding two 4-bit codes each (even index in the low nibble) -> codes ``(N, k)``."""
    b = packed.reshape(packed.shape[0], -1).to(torch.int32)
    return torch.stack([b & 15, b >> 4], -1).reshape(packed.shape[0], -1)[:, :k]


class _NBitsFn(torch.autograd.Function):
    """``com.microsoft.MatMulNBits`` (4 bits, block-wise along K) then the bias."""

    @staticmethod
    def forward(ctx, x, packed, scale, zp_packed, bias, k, n, block):
        nb = packed.shape[1]
        u = unpack_nibbles(packed, nb * block).to(torch.float32)
        z = torch.full((n, nb), 8.0) if zp_packed is None else unpack_nibbles(zp_packed.reshape(n, -1), nb).float()
        w = ((u - z.repeat_interleave(block, 1)) * scale.view(n, nb).repeat_interleave(block, 1))[:, :k]
        return F.linear(x, w, bias)

    @staticmethod
    def symbolic(g, x, packed, scale, zp_packed, bias, k, n, block):
        args = [x, packed, scale] + ([] if zp_packed is None else [zp_packed])
        y = g.op("com.microsoft::MatMulNBits", *args, K_i=k, N_i=n, bits_i=4, block_size_i=block,
                 accuracy_level_i=0)
        sizes = x.type().varyingSizes()
        if sizes is not None:
            y.setType(x.type().with_sizes(list(sizes[:-1]) + [n]))
        return y if bias is None else g.op("Add", y, bias)


# ------------------------------------------------------------------------------------------- quant points
class ActQuant(nn.Module):
    """One static per-tensor uint8 activation quantization: buffers ``scale`` (float32) and ``zero_point``
    (uint8), the calibration statistics, and the mode (``"observe"`` records statistics and passes ``x``
    through, ``"quantize"`` fake-quantizes)."""

    def __init__(self, where: str, method: str, percentile: float) -> None:
        super().__init__()
        self.where, self.method, self.percentile = where, method, percentile
        self.register_buffer("scale", torch.tensor(1.0, dtype=torch.float32))
        self.register_buffer("zero_point", torch.tensor(0, dtype=torch.uint8))
        self.mode = "observe"
        self.batch = -1
        self._lo: list[float] = []
        self._hi: list[float] = []

    def observe(self, x: torch.Tensor, batch: int) -> None:
        if not torch.isfinite(x).all():
            bad = int((~torch.isfinite(x)).sum())
            raise CalibrationError(f"calibration batch {batch}: the activation at {self.where} contains {bad} "
                                   f"NaN/inf values; activation scales need finite activations")
        v = x.detach().reshape(-1).to(torch.float32)
        if self.method == "minmax":
            self._lo.append(float(v.min()))
            self._hi.append(float(v.max()))
        else:
            n = v.numel()
            lo_k = max(1, min(n, math.floor((100.0 - self.percentile) / 100.0 * n) + 1))
            hi_k = max(1, min(n, math.ceil(self.percentile / 100.0 * n)))
            self._lo.append(float(v.kthvalue(lo_k).values))
            self._hi.append(float(v.kthvalue(hi_k).values))

    def reset(self) -> None:
        self._lo, self._hi = [], []

    def finish(self) -> None:
        """``s = (hi - lo) / 255`` (float32), ``z = saturate(round(-lo / s))`` from the recorded statistics."""
        if not self._lo:
            raise CalibrationError(f"no calibration data reached {self.where} (is the layer used in forward?)")
        if self.method == "minmax":
            lo, hi = min(self._lo), max(self._hi)
        else:
            lo, hi = sum(self._lo) / len(self._lo), sum(self._hi) / len(self._hi)
        lo, hi = min(lo, 0.0), max(hi, 0.0)
        s = torch.tensor((hi - lo) / (ACT_QMAX - ACT_QMIN), dtype=torch.float32)
        if float(s) <= 0.0:
            s = torch.tensor(1.0, dtype=torch.float32)  # an all-zero activation: any scale is exact
        z = torch.clamp(torch.round(torch.tensor(-lo, dtype=torch.float32) / s), ACT_QMIN, ACT_QMAX)
        self.scale.copy_(s)
        self.zero_point.copy_(z.to(torch.uint8))
        self.mode = "quantize"

    def extra_repr(self) -> str:
        return f"{self.where}, scale={float(self.scale):.4g}, zero_point={int(self.zero_point)}, mode={self.mode}"


def _mark(t: torch.Tensor, point: ActQuant | None, relu_owner: nn.Module | None = None) -> None:
    """Tag a tensor as 'the quantized output of ``point``' (valid while its version is unchanged)."""
    try:
        t._mq_point = (point, t._version)
        t._mq_relu_owner = (relu_owner, t._version)
    except (AttributeError, RuntimeError):
        pass


def _marked(t: Any, attr: str):
    tag = getattr(t, attr, None)
    if tag is None or tag[0] is None or tag[1] != t._version:
        return None
    return tag[0]


# --------------------------------------------------------------------------------------------- the layers
@dataclass
class LayerPlan:
    """How one layer goes into ONNX: ``kind`` is ``"qdq"`` (8-bit container, per output channel, integer
    kernels with static activations), ``"nbits"`` (MatMulNBits, 4-bit blocks), ``"blocked"`` (block-wise
    DequantizeLinear, float op) or ``"float"``."""

    name: str
    scheme: str
    kind: str
    container: str
    how: str
    note: str = ""
    max_abs_error: float | None = 0.0


def _is_pow2(v: int) -> bool:
    return v >= 16 and (v & (v - 1)) == 0


class ExportLayer(nn.Module):
    """A Conv2d or Linear as it is exported (see :func:`calibrate_activations`); ``forward`` is the simulation."""

    def __init__(self, name: str, src: nn.Module, plan: LayerPlan, uw, fold: tuple[torch.Tensor, torch.Tensor]
                 | None, method: str, percentile: float) -> None:
        super().__init__()
        self.name, self.plan = name, plan
        self.is_conv = isinstance(src, (QuantConv2d, nn.Conv2d))
        if self.is_conv:
            self.stride, self.dil, self.groups = tuple(src.stride), tuple(src.dilation), src.groups
            self.shape = (src.out_channels, src.in_channels // src.groups, *src.kernel_size)
            self.pads = self._pads(src)
        n = self.shape[0] if self.is_conv else src.out_features
        k = math.prod(self.shape[1:]) if self.is_conv else src.in_features
        self.n, self.k = n, k
        bias = src.bias.detach().to(torch.float32).clone() if src.bias is not None else None
        factor = None
        if fold is not None:
            factor, shift = fold
            bias = shift if bias is None else bias * factor + shift
        self.register_buffer("bias", bias)
        self.mode, self.gs, self.block = 0, 1, 0
        if plan.kind == "float":
            w = (src.weight_4d(torch.float32) if isinstance(src, QuantConv2d) else
                 src.dequantized_weight(torch.float32) if isinstance(src, QuantLinear) else
                 src.weight.detach().to(torch.float32)).reshape(n, -1)
            if factor is not None:
                w = w * factor[:, None]
            self.register_buffer("float_weight", w.reshape(self.shape if self.is_conv else (n, k)).contiguous())
        else:
            self._store(uw, factor)
        self.input_quant: ActQuant | None = None
        self.output_quant: ActQuant | None = None
        if plan.kind == "qdq":
            self.input_quant = ActQuant(f"the input of {name}", method, percentile)
            self.output_quant = ActQuant(f"the output of {name}", method, percentile)
        self.fuse_relu = False
        self.fusable = True  # False: a ReLU reading the output stays separate (the output has other readers)
        self.shared_input: str | None = None
        self.structure = False
        # set by the export (int32_bias_overflows): the bias is written as a float Add after the Conv / Gemm
        self.bias_apart = False

    @staticmethod
    def _pads(src) -> tuple[int, int, int, int]:
        if isinstance(src.padding, str):
            if src.padding == "valid":
                return (0, 0, 0, 0)
            tot = [d * (kk - 1) for d, kk in zip(src.dilation, src.kernel_size)]
            return (tot[0] // 2, tot[1] // 2, tot[0] - tot[0] // 2, tot[1] - tot[1] // 2)
        ph, pw = src.padding
        return (ph, pw, ph, pw)

    def _store(self, uw, factor) -> None:
        """Integer codes in ONNX's container: signed ``q = u - 2^(b-1)`` (``2u - 1`` at 1 bit) with zero point 0
        for symmetric rows, unsigned ``u`` with zero point ``z`` for asymmetric ones. An 8-bit per-channel row
        whose folded scale is 0 (a BatchNorm gamma of 0) is stored with codes at its zero point (weight 0 either
        way), then given a usable scale as every zero row (:func:`_zero_row_scales`)."""
        u = uw.codes.to(torch.int32)
        if uw.symmetric:
            q = 2 * u - 1 if uw.bits == 1 else u - 2 ** (uw.bits - 1)
            zp = torch.zeros_like(uw.scales, dtype=torch.int32)
            dtype = torch.int8
        else:
            q, zp, dtype = u, uw.zeros.round().to(torch.int32), torch.uint8
        scales = uw.scales.to(torch.float32).expand(uw.n, uw.scales.shape[1]).clone()
        zp = zp.expand(uw.n, zp.shape[1]).clone()
        if factor is not None:
            before = uw.dequantize(torch.float32) * factor[:, None]
            scales = scales * factor[:, None]
            kp, g = uw.codes.shape[1], scales.shape[1]
            zeros = None if uw.zeros is None else uw.zeros.expand(uw.n, g)
            after = type(uw)(uw.codes, scales, zeros, uw.bits, uw.symmetric, "group", kp // g, uw.k).dequantize()
            self.plan.max_abs_error = max(self.plan.max_abs_error or 0.0, float((after - before).abs().max()))
        kind = self.plan.kind
        if kind == "qdq":
            if uw.scope == "tensor" or scales.shape[1] == 1:
                scales, zp = scales[:, :1].reshape(-1), zp[:, :1].reshape(-1)
            codes = q[:, :self.k]
            if scales.numel() == self.n:
                # a row whose (folded) scale is 0 (a BatchNorm gamma of 0) has weight 0 whatever its codes: stored
                # as codes at the zero point, a zero row (its weight unchanged, exactly 0)
                dead = scales == 0
                if bool(dead.any()):
                    codes = torch.where(dead[:, None], zp[:, None].to(codes.dtype), codes)
                scales = _zero_row_scales(scales, (codes == zp[:, None]).all(1))
            self.register_buffer("weight_codes", codes.reshape(self.shape if self.is_conv else (self.n, self.k))
                                 .to(dtype).contiguous())
            self.register_buffer("weight_scale", scales.contiguous())
            self.register_buffer("weight_zero_point", zp.to(dtype).contiguous())
        elif kind == "blocked":
            self.mode, self.gs = 1, uw.group_size
            self.register_buffer("weight_codes", q.to(dtype).contiguous())
            self.register_buffer("weight_scale", scales.contiguous())
            self.register_buffer("weight_zero_point", zp.to(dtype).contiguous())
        else:  # nbits: medquant's int32 words viewed as bytes are MatMulNBits' blocks (even k in the low nibble)
            self.block = uw.group_size
            nb = u.shape[1] // self.block
            packed = (u[:, 0::2] | (u[:, 1::2] << 4)).to(torch.uint8)
            self.register_buffer("weight_packed", packed.reshape(self.n, nb, self.block // 2).contiguous())
            self.register_buffer("weight_scale", scales.reshape(-1).contiguous())
            if uw.symmetric:  # implicit zero point 8 = 2^(4-1), MatMulNBits' default
                self.register_buffer("weight_zero_point", None)
            else:
                zz = zp.to(torch.int32)
                if nb % 2:
                    zz = F.pad(zz, (0, 1))
                self.register_buffer("weight_zero_point", (zz[:, 0::2] | (zz[:, 1::2] << 4)).to(torch.uint8)
                                     .reshape(-1).contiguous())

    @property
    def weight(self) -> torch.Tensor:
        """The float32 weight the layer computes with (BatchNorm folded), for code that reads ``layer.weight``."""
        shape = self.shape if self.is_conv else (self.n, self.k)
        if self.plan.kind == "float":
            return self.float_weight
        if self.plan.kind == "nbits":
            nb = self.weight_packed.shape[1]
            u = unpack_nibbles(self.weight_packed, nb * self.block).to(torch.float32)
            z = torch.full((self.n, nb), 8.0) if self.weight_zero_point is None else \
                unpack_nibbles(self.weight_zero_point.reshape(self.n, -1), nb).to(torch.float32)
            w = (u - z.repeat_interleave(self.block, 1)) * self.weight_scale.view(self.n, nb).repeat_interleave(
                self.block, 1)
            return w[:, :self.k]
        return _weight_eager(self.weight_codes, self.weight_scale, self.weight_zero_point, self.mode, self.gs,
                             self.k, shape)

    def int32_bias_overflows(self, input_scale: torch.Tensor | None) -> bool:
        """Whether ONNX Runtime's fused integer kernel cannot hold this layer's bias.

        The kernel (``QLinearConv`` / ``QGemm``) stores channel ``c``'s bias as ``round(b_c / (s_x * s_c))`` in
        int32, ``s_x`` the input's scale and ``s_c`` the channel's weight scale; a tiny ``|s_c|`` (a BatchNorm
        gamma near 0, of either sign, folded into it) makes ``|b_c / (s_x * s_c)|`` exceed ``2^31 - 1`` and the
        bias is lost.
        The export then writes the bias as a float ``Add`` after the Conv / Gemm (:attr:`bias_apart`): the same
        function, computed by a float Conv / Gemm on the dequantized input.

        Args:
            input_scale: the scale of the layer's quantized input (None: a float input, no integer kernel).

        Returns:
            True for an 8-bit per-channel layer with a bias and a quantized input where some channel overflows.
        """
        if self.plan.kind != "qdq" or self.bias is None or input_scale is None:
            return False
        bias_scale = input_scale.to(torch.float32) * self.weight_scale.to(torch.float32).expand(self.n)
        return bool((self.bias.abs() / bias_scale.abs() >= 2.0**31 - 1).any())  # a folded scale may be negative

    # ---------------------------------------------------------------- forward (simulation and export)
    def _act(self, q: ActQuant | None):
        if q is None:
            return None, None
        return q.scale, q.zero_point

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.is_conv and x.dim() != 4:
            raise ValueError(f"{self.name}: Conv2d input must be 4-D (batch, channels, H, W), got {tuple(x.shape)}")
        if self.structure:
            return self._structure_forward(x)
        observe = any(q is not None and q.mode == "observe" for q in (self.input_quant, self.output_quant))
        if observe and self.input_quant is not None:
            self.input_quant.observe(x, self.input_quant.batch)
        flags = 0
        if self.input_quant is not None and not observe:
            flags |= 1
        if self.fuse_relu:
            flags |= 2
        if self.output_quant is not None and not observe:
            flags |= 4
        if self.bias_apart:
            flags |= 8
        in_s, in_z = self._act(self.input_quant)
        out_s, out_z = self._act(self.output_quant)
        if self.plan.kind in ("nbits", "float"):  # weight-only: a fused ReLU is a separate Relu node
            if self.plan.kind == "nbits":
                y = _NBitsFn.apply(x, self.weight_packed, self.weight_scale, self.weight_zero_point, self.bias,
                                   self.k, self.n, self.block)
            else:
                y = self._float_op(x)
            if self.fuse_relu:
                y = torch.relu(y)
        elif self.is_conv:
            y = _ConvFn.apply(x, self.weight_codes, self.weight_scale, self.weight_zero_point, self.bias, in_s, in_z,
                              out_s, out_z, self.stride, self.pads, self.dil, self.groups, self.mode, self.gs, self.k,
                              self.shape, flags)
        else:
            y = _LinearFn.apply(x, self.weight_codes, self.weight_scale, self.weight_zero_point, self.bias, in_s,
                                in_z, out_s, out_z, self.mode, self.gs, self.k, self.n, flags)
        if observe and self.output_quant is not None:
            self.output_quant.observe(y, self.output_quant.batch)
        if self.output_quant is not None:
            _mark(y, self.output_quant)
        if self.fuse_relu:
            y._mq_relu_done = y._version
        return y

    def _float_op(self, x: torch.Tensor) -> torch.Tensor:
        if not self.is_conv:
            return F.linear(x, self.float_weight, self.bias)
        p = self.pads
        if p[0] == p[2] and p[1] == p[3]:
            return F.conv2d(x, self.float_weight, self.bias, self.stride, (p[0], p[1]), self.dil, self.groups)
        return F.conv2d(F.pad(x, (p[1], p[3], p[0], p[2])), self.float_weight, self.bias, self.stride, 0, self.dil,
                        self.groups)

    def _structure_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The float forward of the structure pass: input sharing and ReLU fusion are decided here."""
        if self.input_quant is not None:
            shared = _marked(x, "_mq_point")
            if shared is not None:
                self.input_quant = None
                self.shared_input = shared.where
                self.__dict__["_shared_point"] = shared  # not a submodule; its name is final after the pass
        if self.plan.kind == "nbits":
            y = _NBitsFn.apply(x, self.weight_packed, self.weight_scale, self.weight_zero_point, self.bias, self.k,
                               self.n, self.block)
        elif self.plan.kind == "float":
            y = self._float_op(x)
        elif self.is_conv:
            y = _ConvFn.apply(x, self.weight_codes, self.weight_scale, self.weight_zero_point, self.bias, None, None,
                              None, None, self.stride, self.pads, self.dil, self.groups, self.mode, self.gs, self.k,
                              self.shape, 0)
        else:
            y = _LinearFn.apply(x, self.weight_codes, self.weight_scale, self.weight_zero_point, self.bias, None,
                                None, None, None, self.mode, self.gs, self.k, self.n, 0)
        _mark(y, self.output_quant, self if self.fusable else None)
        self._last_out = y
        watch = self.__dict__.get("_watch")
        if watch is not None:  # its readers are counted (a fused ReLU must be the only one)
            watch[id(y)] = [self.name, y, 0]
        return y

    def extra_repr(self) -> str:
        return (f"{self.name}: {self.plan.scheme} -> {self.plan.kind} ({self.plan.container})"
                + (", relu fused" if self.fuse_relu else "")
                + (f", input shares {self.shared_input}" if self.shared_input else ""))


class FusableReLU(nn.Module):
    """``nn.ReLU`` for export: the identity on a tensor that a layer has already passed through its fused ReLU
    (and output quantization); elsewhere (e.g. after a residual addition) a ReLU followed by its own uint8
    quantization, so that ONNX Runtime runs the addition as ``QLinearAdd`` and the next layers read uint8."""

    def __init__(self, name: str, inplace: bool = False, method: str = "minmax", percentile: float = 99.99) -> None:
        super().__init__()
        self.name, self.inplace = name, inplace
        self.method, self.percentile = method, percentile
        self.structure = False
        self.output_quant: ActQuant | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if getattr(x, "_mq_relu_done", None) == x._version:
            return x
        if self.structure:
            owner = _marked(x, "_mq_relu_owner")
            point = _marked(x, "_mq_point")
            y = torch.relu(x)
            if owner is not None:
                owner.fuse_relu = True
                owner._last_out = y
                _mark(y, point)
            else:
                if self.output_quant is None:
                    self.output_quant = ActQuant(f"the output of ReLU {self.name}", self.method, self.percentile)
                _mark(y, self.output_quant)
                self._last_out = y
            return y
        y = torch.relu_(x) if self.inplace else torch.relu(x)
        q = self.output_quant
        if q is not None:
            if q.mode == "observe":
                q.observe(y, q.batch)
            else:
                y = _QDQFn.apply(y, q.scale, q.zero_point)
            _mark(y, q)
        return y


class QuantMaxPool2d(nn.MaxPool2d):
    """``MaxPool2d`` that keeps the quantization of a quantized input: the max of values on a uniform grid is on
    the grid, so ``fq(maxpool(fq(x))) = maxpool(fq(x))`` exactly; the explicit QuantizeLinear/DequantizeLinear
    lets ONNX Runtime run the pool (and the next convolution) on uint8."""

    structure = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = super().forward(x)
        point = _marked(x, "_mq_point")
        if point is not None:
            if point.mode == "quantize" and not self.structure:
                y = _QDQFn.apply(y, point.scale, point.zero_point)
            _mark(y, point)
        return y


class _QDQFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scale, zp):
        return fake_quantize_activation(x, scale, zp)

    @staticmethod
    def symbolic(g, x, scale, zp):
        return _qdq(g, x, scale, zp)


# ---------------------------------------------------------------------------------------------- planning
def layer_plan(name: str, layer: nn.Module, promote: bool) -> tuple[LayerPlan, Any]:
    """Decide how a layer is exported; returns the plan and medquant's weight (:class:`UniformWeight`) or None.

    * per-channel / per-tensor (8-bit; 4-bit, and 1-3 / 5-7 bits with ``promote``, their codes unchanged in the
      8-bit container) -> ``qdq`` (int8 with zero point 0 for symmetric, uint8 with medquant's zero points for
      asymmetric): integer kernels with static activations.
    * 4-bit group-wise Linear with a power-of-two group >= 16 -> ``nbits`` (``MatMulNBits``), weight-only.
    * group-wise otherwise (4-bit convolutions and other groups; 8-bit groups in int8/uint8 blocks) ->
      ``blocked``: blocks of a DequantizeLinear, weight-only, float op.
    * 1-3 and 5-7 bits (and per-row mixed layers) only with ``promote=True``: the codes go into the 4- or 8-bit
      container unchanged (``(u - z) * s`` is representable exactly); mixed rows are requantized to the layer's
      largest bit-width (:func:`medquant.deploy.common.layer_weight`).
    """
    scheme = layer_scheme(layer) if isinstance(layer, (QuantLinear, QuantConv2d)) else "float32"
    if not isinstance(layer, (QuantLinear, QuantConv2d)):
        return LayerPlan(name, scheme, "float", "float32", "float"), None
    try:
        uw = layer_weight(layer, promote=promote)
    except ExportError as e:  # its message says what, not which layer
        raise ExportError(f"{name}: {e}") from None
    if uw is None:
        return LayerPlan(name, scheme, "float", "float32", "float", note="no integer rows"), None
    note, how = uw.note, uw.how
    if uw.bits not in NATIVE_BITS:
        if not promote:
            raise ExportError(f"{name}: {scheme} has no ONNX Runtime kernel (4- and 8-bit only)")
        how = "exact re-expression" if how == "exact repack" else how
        note = (note + "; " if note else "") + f"{uw.bits}-bit codes stored in a {'4' if uw.bits < 4 else '8'}-bit " \
            "container (exact)"
    signed = "int" if uw.symmetric else "uint"
    linear = isinstance(layer, QuantLinear)
    if uw.scope in ("channel", "tensor"):
        return LayerPlan(name, scheme, "qdq", f"{signed}8 per-channel QDQ", how, note, uw.max_abs_error), uw
    if linear and uw.bits == 4 and _is_pow2(uw.group_size):
        return LayerPlan(name, scheme, "nbits", f"MatMulNBits 4-bit block {uw.group_size}", how, note,
                         uw.max_abs_error), uw
    width = 4 if uw.bits <= 4 else 8
    return LayerPlan(name, scheme, "blocked", f"{signed}{width} block {uw.group_size} DequantizeLinear (float op)",
                     how, note, uw.max_abs_error), uw


# -------------------------------------------------------------------------------------------- calibration
@dataclass
class SimulationInfo:
    """What :func:`calibrate_activations` built: the plan per layer, the folded BatchNorms, the activation
    quantization points, the calibration method and number of batches, the layer that produces the output."""

    layers: list[LayerPlan] = field(default_factory=list)
    folded: dict[str, str] = field(default_factory=dict)
    method: str = "minmax"
    percentile: float = 99.99
    batches: int = 0
    output_layer: str | None = None
    int4_tensors: list[str] = field(default_factory=list)


def as_args(batch: Any, index: int | str) -> tuple[torch.Tensor, ...]:
    """A calibration batch (a tensor, or a tuple/list of tensors) as positional arguments; checked for NaN, and
    floating tensors (float64 from numpy, float16, bfloat16) cast to float32, the type the exported model computes
    and takes (the simulation copies the model in float32).

    ``index``: the batch's number, named ``calibration batch <index>`` in the errors, or a name used as it is
    (``"example_inputs"``)."""
    what = f"calibration batch {index}" if isinstance(index, int) else index
    if isinstance(batch, torch.Tensor):
        args: tuple = (batch,)
    elif isinstance(batch, (tuple, list)) and batch and all(isinstance(t, torch.Tensor) for t in batch):
        args = tuple(batch)
    else:
        raise CalibrationError(f"{what}: expected a tensor or a tuple of tensors (the model's positional inputs), "
                               f"got {type(batch).__name__}")
    for i, t in enumerate(args):
        if t.numel() == 0:
            raise CalibrationError(f"{what}: input {i} is empty (shape {tuple(t.shape)}); accepted: non-empty "
                                   "tensors with the model's input shapes")
        if t.is_floating_point() and not torch.isfinite(t).all():
            bad = int((~torch.isfinite(t)).sum())
            raise CalibrationError(f"{what}: input {i} contains {bad} NaN/inf values")
    return tuple(t.float() if t.is_floating_point() else t for t in args)


def check_calibration_set(batches: Any) -> None:
    """Refuse a single tensor given as the calibration set: iterating it yields its samples without their batch
    axis (a ``(N, C, H, W)`` tensor would be read as N batches of ``(C, H, W)``)."""
    if isinstance(batches, torch.Tensor):
        raise CalibrationError(
            f"the calibration set is a single tensor of shape {tuple(batches.shape)}: pass an iterable of batches "
            "(tensors, or tuples of tensors for several inputs), e.g. x.split(32) or [x] for one batch")


def first_tensor(out: Any) -> torch.Tensor:
    """The output tensor of a classifier: the tensor itself, ``.logits``, a dict's ``"logits"``, or the first tensor of
    a tuple / dict."""
    if isinstance(out, torch.Tensor):
        return out
    logits = getattr(out, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    if isinstance(out, dict):
        if isinstance(out.get("logits"), torch.Tensor):  # {"aux": ..., "logits": ...}: the logits, not the first
            return out["logits"]
        out = list(out.values())
    if isinstance(out, (tuple, list)):
        for t in out:
            if isinstance(t, torch.Tensor):
                return t
    raise ExportError(f"the model returned {type(out).__name__}; the onnx export needs a tensor (or .logits)")


def _tensors(obj: Any):
    """The tensors in nested tuples / lists / dicts (the arguments of a torch call)."""
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (tuple, list)):
        for o in obj:
            yield from _tensors(o)
    elif isinstance(obj, dict):
        for o in obj.values():
            yield from _tensors(o)


class _CountUses(TorchFunctionMode):
    """Counts, per watched tensor (``{id: [name, tensor, uses]}``), the torch calls that read it and return a
    tensor (``x.dim()``, ``x.shape`` and other metadata reads are not uses)."""

    def __init__(self, watched: dict[int, list]) -> None:
        super().__init__()
        self.watched = watched

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if self.watched and next(_tensors(out), None) is not None:
            for t in {id(t): t for t in _tensors((args, kwargs or {}))}.values():
                hit = self.watched.get(id(t))
                if hit is not None and hit[1] is t:
                    hit[2] += 1
        return out


def _bn_pairs(model: nn.Module, args: tuple) -> dict[str, str]:
    """``{conv name: bn name}`` for every BatchNorm2d that can be folded: its input is a convolution's unchanged
    output, that output is read by nothing else (folding would change it for the other readers too),
    and each of the two modules is called once."""
    convs: dict[int, list] = {}
    pairs: dict[str, str] = {}
    calls: dict[str, int] = {}
    hooks = []

    def conv_hook(name):
        def hook(mod, inp, out):
            calls[name] = calls.get(name, 0) + 1
            convs[id(out)] = [name, out, 0, out._version]
        return hook

    def bn_hook(name):
        def hook(mod, inp):
            calls[name] = calls.get(name, 0) + 1
            hit = convs.get(id(inp[0]))
            if hit is not None and hit[1] is inp[0] and hit[3] == inp[0]._version:
                pairs[hit[0]] = name
        return hook

    for name, m in model.named_modules():
        if isinstance(m, (nn.Conv2d, QuantConv2d)):
            hooks.append(m.register_forward_hook(conv_hook(name)))
        elif isinstance(m, nn.BatchNorm2d):
            hooks.append(m.register_forward_pre_hook(bn_hook(name)))
    try:
        with torch.no_grad(), _CountUses(convs):
            model(*args)
    finally:
        for h in hooks:
            h.remove()
    uses = {hit[0]: hit[2] for hit in convs.values()}
    return {c: b for c, b in pairs.items() if calls.get(c) == 1 and calls.get(b) == 1 and uses.get(c) == 1}


def _float32_inputs(module: nn.Module, args: tuple) -> tuple:
    """The simulation's forward pre-hook: floating inputs (float64, float16, bfloat16) cast to float32, as
    :class:`~medquant.deploy.onnx.OnnxClassifier` casts them for the exported model."""
    return tuple(a.float() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args)


#: the module types :func:`prepare` replaces by its own layers (or folds away): their forward hooks would not run
#: in the exported model
REPLACED_TYPES = (nn.Conv2d, QuantConv2d, nn.Linear, QuantLinear, nn.ReLU, nn.MaxPool2d, nn.modules.batchnorm._BatchNorm)
#: what the ONNX export writes of a model's forward hooks, for the refusal's message
TRACES = ("traces the model into a graph, but not the hooks of the layers it replaces by its own (Conv2d / Linear / "
          "ReLU / MaxPool2d / BatchNorm), nor an AdaptiveQuantizer's bits (chosen per call)")
#: what the ONNX export accepts of forward hooks, for the refusal's message
TRACED_HOOKS = ("forward hooks on the modules the export keeps (the model itself, blocks, attention and MLP modules, "
                "normalizations) are traced into the graph, but not those on Conv2d / Linear / ReLU / MaxPool2d / "
                "BatchNorm layers, which the export replaces by its own layers: register such a hook on the module "
                "around the layer")


def kept_by_export(name: str, module: nn.Module) -> bool:
    """Whether the ONNX export keeps ``module`` (so its forward hooks are traced into the graph): every module but
    the :data:`REPLACED_TYPES`.

    Args:
        name: the module's name (unused: the type decides).
        module: the module.

    Returns:
        False for a Conv2d / Linear (float or quantized), ReLU, MaxPool2d or BatchNorm, True otherwise.
    """
    return not isinstance(module, REPLACED_TYPES)


def _set(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, new)


def prepare(model: nn.Module, example: tuple, *, method: str = "minmax", percentile: float = 99.99,
            promote: bool = False) -> nn.Module:
    """The export model before calibration: a copy with BatchNorms folded, every Conv2d / Linear replaced by an
    :class:`ExportLayer`, ReLUs and MaxPools by their quantization-aware versions, and the structure pass run.

    A ReLU is fused into the layer whose output it reads only when nothing else reads that output (``relu(c) + c``
    keeps a separate ReLU): the structure pass counts the readers, and the copy is prepared again without the
    fusions it found wrong. A model that is itself one quantized layer (QuantLinear / QuantConv2d) is refused with
    :class:`~medquant.deploy.registry.ExportError` (no parent to hold its export layer: pass
    ``nn.Sequential(layer)``)."""
    sim = _prepare(model, example, method, percentile, promote, frozenset())
    wrong = sim.__dict__.pop("_wrong_fusions")
    if wrong:  # the second pass fuses none of them, so it finds none wrong
        sim = _prepare(model, example, method, percentile, promote, wrong)
        sim.__dict__.pop("_wrong_fusions")
    return sim


def _prepare(model: nn.Module, example: tuple, method: str, percentile: float, promote: bool,
             no_fuse: frozenset[str]) -> nn.Module:
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if isinstance(percentile, bool) or not isinstance(percentile, (int, float)) or not 50.0 < percentile <= 100.0:
        raise ValueError(f"percentile must be a number in (50, 100], got {percentile!r}")
    if getattr(model, "medquant_onnx", None) is not None or any(isinstance(m, ExportLayer) for m in model.modules()):
        raise ExportError("the model is already calibrated (returned by calibrate_activations): its layers are "
                          "export layers with fixed scales; to calibrate again (another method, percentile or "
                          "batches), pass the quantized model it was made from")
    if isinstance(model, (QuantConv2d, QuantLinear)):  # no name to bind its export layer at (a float one is
        # traced as it is, which is what its float export layer computes)
        raise ExportError(f"format='onnx' replaces each quantized layer of the model by its export layer, but the "
                          f"model is itself a {type(model).__name__}, which has no parent to hold the replacement. "
                          "Accepted: the layer inside a container - pass nn.Sequential(layer) (it computes the same)")
    check_forward_hooks(model, "onnx", keeps=kept_by_export, writes=TRACES, accepted=TRACED_HOOKS,
                        input_accepted="static int8 activations are the export's own: calib=<batches> or "
                                       "calibrate_activations (8-bit per-channel / per-tensor layers)")
    stats = [n for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
             and (m.running_mean is None or m.running_var is None)]
    if stats:
        raise ExportError(f"format='onnx' cannot carry BatchNorm {', '.join(stats)}: track_running_stats=False "
                          "normalizes each batch with its own statistics (in eval mode too), which the exported "
                          "model (a dynamic batch axis) cannot compute. Accepted: BatchNorms with running statistics "
                          "(track_running_stats=True, estimated on training data), which are folded")
    # ONNX Runtime computes in float32 (a half model too); nn.Module's own float(): transformers refuses .float()
    # of a model carrying its quantizer (a quantized folder from_pretrained loads), and the copy is converted only
    sim = nn.Module.float(copy.deepcopy(model).eval())
    sim.register_forward_pre_hook(_float32_inputs)
    info = SimulationInfo(method=method, percentile=percentile)
    pairs = _bn_pairs(sim, example)
    plans, errors = {}, []
    for name, m in list(sim.named_modules()):
        if isinstance(m, (nn.Conv2d, QuantConv2d, nn.Linear, QuantLinear)):
            if isinstance(m, nn.Conv2d) and m.padding_mode != "zeros":
                errors.append(f"{name}: padding_mode={m.padding_mode!r} (zeros only)")
                continue
            try:
                plans[name] = layer_plan(name, m, promote)
            except ExportError as e:
                errors.append(str(e))
    if errors:
        raise ExportError("format='onnx' cannot carry these layers: " + "; ".join(errors)
                          + ". Pass promote=True to store 1-3/5-7-bit codes in 4/8-bit containers (exact) and "
                          "requantize per-row mixed layers to their largest bit-width (lossy), or quantize them "
                          "to 4 or 8 bits")
    for name, (plan, uw) in plans.items():
        m = sim.get_submodule(name)
        fold = None
        if name in pairs:
            bn = sim.get_submodule(pairs[name])
            f = (bn.weight.detach().float() if bn.weight is not None else torch.ones(bn.num_features)) / torch.sqrt(
                bn.running_var.float() + bn.eps)
            shift = (bn.bias.detach().float() if bn.bias is not None else torch.zeros_like(f)) - \
                bn.running_mean.float() * f
            fold = (f, shift)
            info.folded[name] = pairs[name]
            _set(sim, pairs[name], nn.Identity())
            if plan.kind != "float":
                plan.how = "near-exact" if plan.how.startswith("exact") else plan.how
                plan.note = (plan.note + "; " if plan.note else "") + \
                    f"BatchNorm {pairs[name]} folded into the scales (codes unchanged)"
            else:
                plan.note = f"BatchNorm {pairs[name]} folded"
        layer = ExportLayer(name, m, plan, uw, fold, method, percentile)
        layer.fusable = name not in no_fuse
        _set(sim, name, layer)
        info.layers.append(plan)
    has_qdq = any(p.kind == "qdq" for p in info.layers)
    for name, m in list(sim.named_modules()):
        if not has_qdq:  # weight-only or float: no activation quantization anywhere
            break
        if type(m) is nn.ReLU:
            _set(sim, name, FusableReLU(name, m.inplace, method, percentile))
        elif type(m) is nn.MaxPool2d:
            new = QuantMaxPool2d(m.kernel_size, m.stride, m.padding, m.dilation, m.return_indices, m.ceil_mode)
            _set(sim, name, new)
    for name, m in sim.named_modules():
        if isinstance(m, ExportLayer) and m.plan.kind == "blocked" and m.plan.container.split()[0][-1] == "4":
            info.int4_tensors += [f"{name}.weight_codes", f"{name}.weight_zero_point"]
    sim.__dict__["_wrong_fusions"] = _structure_pass(sim, example, info)
    sim.medquant_onnx = info
    return sim


def _is_output(t: torch.Tensor, out: torch.Tensor) -> bool:
    """``t`` is the model's output ``out``, or ``out`` is a view of it (``squeeze``, ``view``, ``flatten``,
    indexing: a view's ``_base`` is the tensor it views)."""
    return t is out or out._base is t


def _structure_pass(sim: nn.Module, example: tuple, info: SimulationInfo) -> frozenset[str]:
    """Decide input sharing and ReLU fusion on ``example``; returns the layers whose ReLU was fused although their
    output is read by something else too (to be prepared again with those ReLUs separate)."""
    mods = [m for m in sim.modules() if isinstance(m, (ExportLayer, FusableReLU, QuantMaxPool2d))]
    watched: dict[int, list] = {}
    for m in mods:
        m.structure = True
        if isinstance(m, ExportLayer):
            m.__dict__["_watch"] = watched
    try:
        with torch.no_grad(), _CountUses(watched):
            out = first_tensor(sim(*example))
    finally:
        for m in mods:
            m.structure = False
            m.__dict__.pop("_watch", None)
    wrong = frozenset(name for name, _, uses in watched.values() if uses > 1 and sim.get_submodule(name).fuse_relu)
    for m in sim.modules():
        if isinstance(m, FusableReLU) and getattr(m, "_last_out", None) is not None:
            if _is_output(m._last_out, out):
                m.output_quant = None
            del m._last_out
    for name, m in sim.named_modules():
        if isinstance(m, ExportLayer):
            last = getattr(m, "_last_out", None)
            if last is not None and _is_output(last, out):
                m.output_quant = None
                info.output_layer = name
            if hasattr(m, "_last_out"):
                del m._last_out
            if m.input_quant is not None and m.shared_input is None:
                m.input_quant.where = f"the input of {name}"
            if m.output_quant is not None:
                m.output_quant.where = f"the output of {name}" + (" (after its ReLU)" if m.fuse_relu else "")
    for m in sim.modules():  # a shared point renamed above ("... (after its ReLU)"): name it as it is now
        if isinstance(m, ExportLayer) and "_shared_point" in m.__dict__:
            m.shared_input = m.__dict__.pop("_shared_point").where
    return wrong


def act_points(sim: nn.Module) -> list[ActQuant]:
    """The activation quantization points of a prepared model, in module order (shared ones once)."""
    seen, out = set(), []
    for m in sim.modules():
        if isinstance(m, ActQuant) and id(m) not in seen:
            seen.add(id(m))
            out.append(m)
    return out


def calibrate_activations(model: nn.Module, batches: Iterable[Any], *, method: str = "minmax",
                          percentile: float = 99.99, promote: bool = False, max_batches: int | None = None,
                          check: bool = True) -> nn.Module:
    """The model that the ``onnx`` export writes, calibrated, as a PyTorch module (see the module docstring).

    Args:
        model: a float or medquant-quantized classifier (``quantize_`` with 8-bit per-channel weights gets integer
            kernels; 4-bit group-wise layers are weight-only). Not modified.
        batches: the calibration inputs: an iterable of tensors (or tuples of tensors, the model's positional
            inputs), e.g. a few hundred training images in batches.
        method: ``"minmax"`` or ``"percentile"`` (the ``percentile``-th and ``(100 - percentile)``-th values,
            averaged over batches).
        percentile: the upper percentile of ``method="percentile"``, in ``(50, 100]`` (default 99.99).
        promote: allow 1-3/5-7-bit and per-row mixed layers (see :func:`layer_plan`).
        max_batches: use at most this many batches (a positive integer, or None for all).
        check: verify that the prepared float path (BatchNorm folded, ReLUs fused) reproduces ``model`` on the
            first batch before quantizing, within ``2e-2 * max|output|`` (raises :class:`ExportError` naming the
            folded BatchNorms and fused ReLUs if not); with ``promote`` the reference computes with the promoted
            weights of requantized layers, whose lossy change is reported, not refused.

    Returns:
        A new module (the input is not changed) whose forward is the simulation of the deployed model; its
        ``medquant_onnx`` attribute is a :class:`SimulationInfo`. Pass it to ``medquant.export(..., format="onnx")``.

    Raises:
        CalibrationError: no batch, ``batches`` that is a single tensor (iterating it would drop the batch axis:
            pass ``x.split(32)``), a batch that is not tensors, NaN/inf in an input or in an activation (the
            message names the batch and the input or layer).
        ValueError: an unknown ``method``, ``percentile`` that is not a number in ``(50, 100]``, ``max_batches``
            that is not a positive integer or None.
        ExportError: a model that calibrate_activations returned (pass the model it was made from), a layer the
            export cannot carry, a module with an input quantizer (``adaround_quantize_(act_bits=...)``), an
            ``AdaptiveQuantizer``'s hooks or another forward hook on a layer the export replaces
            (:func:`~medquant.deploy.common.check_forward_hooks`), a BatchNorm without running statistics
            (``track_running_stats=False``), a prepared float path that does not reproduce ``model``, a model that
            is itself one quantized layer (pass ``nn.Sequential(layer)``).
    """
    if max_batches is not None and (isinstance(max_batches, bool) or not isinstance(max_batches, int)
                                    or max_batches < 1):
        raise ValueError(f"max_batches must be a positive integer (or None), got {max_batches!r}")
    check_calibration_set(batches)
    it = iter(batches)
    try:
        first = next(it)
    except StopIteration:
        raise CalibrationError("the calibration set is empty: pass at least one batch of inputs (a few hundred "
                               "representative training images) to compute the activation scales") from None
    args0 = as_args(first, 0)
    sim = prepare(model, args0, method=method, percentile=percentile, promote=promote)
    if check:
        _check_structure(model, sim, args0, promote)
    points = act_points(sim)
    for p in points:
        p.reset()
    n = 0
    with torch.no_grad():
        for i, batch in enumerate([first] if max_batches == 1 else _chain(first, it, max_batches)):
            args = as_args(batch, i)
            for p in points:
                p.batch = i
            sim(*args)
            n += 1
    for p in points:
        p.finish()
    sim.medquant_onnx.batches = n
    return sim


def _promoted_reference(model: nn.Module, promote: bool) -> nn.Module:
    """A copy of ``model`` that computes with the weights the export writes for promoted (requantized) layers:
    a forward hook adds ``op(x, W_promoted - W_stored)`` (no bias) to each such layer's output."""
    ref = nn.Module.float(copy.deepcopy(model).eval())  # as the export computes (inputs cast to float32)
    if not promote:
        return ref
    for m in ref.modules():
        if not isinstance(m, (QuantLinear, QuantConv2d)) or not m.mixed:
            continue
        uw = layer_weight(m, promote=True)
        if uw is None:
            continue
        delta = uw.dequantize(torch.float32) - m.dequantized_weight(torch.float32)
        if isinstance(m, QuantConv2d):
            delta = delta.reshape(m.out_channels, m.in_channels // m.groups, *m.kernel_size)

            def hook(mod, inp, out, d=delta):
                return out + F.conv2d(inp[0].float(), d, None, mod.stride, mod.padding, mod.dilation,
                                      mod.groups).to(out.dtype)
        else:
            def hook(mod, inp, out, d=delta):
                return out + F.linear(inp[0].float(), d).to(out.dtype)
        m.register_forward_hook(hook)
    return ref


def _check_structure(model: nn.Module, sim: nn.Module, args: tuple, promote: bool) -> None:
    """Compare the prepared float path (BatchNorm folded, ReLUs fused, no activation quantization yet) with
    ``model`` on one batch; the reference computes with the promoted weights of requantized layers (the reported
    lossy promotion is part of the export, not a structural error)."""
    info: SimulationInfo = sim.medquant_onnx
    with torch.no_grad():
        ref = first_tensor(_promoted_reference(model, promote)(*args)).float()
        got = first_tensor(sim(*args)).float()
    # medquant's CPU kernels may compute in bfloat16 (kernels.set_cpu_compute_dtype): a relative 2e-2
    # separates their rounding from a structural error (a ReLU applied to a tensor also used un-rectified)
    tol = 2e-2 * float(ref.abs().max()) + 1e-5
    if ref.shape == got.shape and float((ref - got).abs().max()) <= tol:
        return
    diff = f"max |difference| {float((ref - got).abs().max()):.4g} > tolerance {tol:.4g}" \
        if ref.shape == got.shape else f"output shape {tuple(got.shape)} instead of {tuple(ref.shape)}"
    fused = [m.name for m in sim.modules() if isinstance(m, ExportLayer) and m.fuse_relu]
    folded = [f"{b} into {c}" for c, b in info.folded.items()]
    changes = "; ".join(part for part in (
        f"BatchNorm folded: {', '.join(folded)}" if folded else "",
        f"ReLU fused into: {', '.join(fused)}" if fused else "") if part) or "none"
    raise ExportError(f"the prepared ONNX model does not reproduce the model in float on the first calibration "
                      f"batch ({diff}). Its structural changes: {changes}; one of them is wrong when that BatchNorm "
                      f"or ReLU reads a tensor that is also used elsewhere; check=False skips this check")


def _chain(first, it, limit):
    yield first
    for i, b in enumerate(it, start=1):
        if limit is not None and i >= limit:
            return
        yield b


def input_point(sim: nn.Module, layer: ExportLayer) -> ActQuant | None:
    """The activation quantization point of ``layer``'s input: its own, the one it shares with the layer whose
    quantized output it reads, or None (a float input).

    Args:
        sim: the module :func:`calibrate_activations` (or :func:`prepare`) returned.
        layer: one of its :class:`ExportLayer` modules.

    Returns:
        The :class:`ActQuant`, or None.
    """
    point = layer.input_quant
    if point is None and layer.shared_input is not None:
        point = next((p for p in act_points(sim) if p.where == layer.shared_input), None)
    return point


def mark_bias_apart(sim: nn.Module) -> list[str]:
    """Set :attr:`ExportLayer.bias_apart` on the layers whose bias ONNX Runtime's int32 kernels cannot hold
    (:meth:`ExportLayer.int32_bias_overflows`, with the calibrated input scale), clear it on the others.

    Args:
        sim: the module :func:`calibrate_activations` returned.

    Returns:
        The names of the layers whose bias is written as a float ``Add``.
    """
    apart = []
    for m in sim.modules():
        if isinstance(m, ExportLayer):
            point = input_point(sim, m)
            scale = point.scale if point is not None and point.mode == "quantize" else None
            m.bias_apart = m.int32_bias_overflows(scale)
            if m.bias_apart:
                apart.append(m.name)
    return apart


def logits_tolerance(sim: nn.Module) -> float | None:
    """Largest ``|ORT - simulation|`` of an output, derived from the requantization.

    The integer kernels and the simulation round the same real value, computed in two float orders; they differ
    only where that value is within float rounding of a rounding boundary, and then by one step. If every code
    of the output layer's input differs by at most one step ``s_in``, output ``j`` differs by at most
    ``s_in * sum_i |W_ji|`` (the L1 norm of its weight row). Returns the maximum over ``j`` plus a float32
    rounding term, or None if the output is not produced by a layer with a quantized input (weight-only and float
    models differ by float rounding only; for other outputs, e.g. a LayerNorm after the last layer, the export's
    check falls back to 5% of the largest output).

    Args:
        sim: the module :func:`calibrate_activations` returned.

    Returns:
        ``s_in * max_j sum_i |W_ji| + 1e-4``, or ``None`` (see above).
    """
    info: SimulationInfo = sim.medquant_onnx
    if info.output_layer is None:
        return None
    layer = sim.get_submodule(info.output_layer)
    point = input_point(sim, layer)
    if point is None or point.mode != "quantize":
        return None
    w = _weight_eager(layer.weight_codes, layer.weight_scale, layer.weight_zero_point, layer.mode, layer.gs,
                      layer.k, (layer.n, layer.k)) if layer.plan.kind in ("qdq", "blocked") else None
    if w is None:
        return None
    return float(point.scale) * float(w.reshape(layer.n, -1).abs().sum(1).max()) + 1e-4
