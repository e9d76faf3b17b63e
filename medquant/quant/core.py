"""Quantize / dequantize / fake-quantize: scales, zero points and codes of a weight matrix.

All functions work on a 2-D view ``(N, K)`` of a weight (rows = output channels), padded with zeros to ``K_pad``
(:func:`medquant.kernels.layout.padded_k`). For bit-width ``b``, per scale group ``G`` (the whole matrix for
tensor scope, a row for channel scope, ``group_size`` consecutive elements of a row for group scope)::

    asymmetric:           lo = min(min_G w, 0),  hi = max(max_G w, 0)
                          s = max((hi - lo) / (2^b - 1), eps),   z = clamp(round(-lo / s), 0, 2^b - 1)
                          u = clamp(round(w / s) + z, 0, 2^b - 1)
    symmetric, b >= 2:    s = max(max_G |w| / (2^(b-1) - 1), eps)
                          u = clamp(round(w / s), -(2^(b-1) - 1), 2^(b-1) - 1) + 2^(b-1)
    symmetric, b == 1:    s = max(mean_G |w|, eps)  (mean over the real, unpadded elements),  u = [w >= 0]

Codes are unsigned and follow the layout in :mod:`medquant.kernels.layout`: ``w^ = (u - z) * s`` with
``z = 2^(b-1)`` for symmetric rows (1-bit symmetric: ``w^ = (2u - 1) * s``). ``round`` is ``torch.round``
(half to even).

Scales are computed in float32, rounded to their storage dtype (float16 by default), and the codes are
computed with the *stored* scale, so ``dequantize(quantize(w))`` is exactly what a saved model computes.
``eps`` is the smallest positive value of the storage dtype, so an all-zero row gets ``s = eps`` and is
reconstructed exactly, never NaN.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..kernels.layout import dequantize_codes, expand_params, padded_k
from .config import SCALE_DTYPES, QuantConfig, _check_bits


def scale_eps(dtype: torch.dtype) -> float:
    """Smallest positive value representable in ``dtype`` (subnormals included for float16)."""
    if dtype == torch.float16:
        return 2.0**-24
    return float(torch.finfo(dtype).tiny)


def qrange(bits: int, symmetric: bool) -> tuple[int, int]:
    """(lowest, highest) signed value for symmetric, code range for asymmetric."""
    if symmetric:
        if bits == 1:
            return -1, 1
        qmax = 2 ** (bits - 1) - 1
        return -qmax, qmax
    return 0, 2**bits - 1


@dataclass
class QTensor:
    """Unpacked quantized rows: codes ``(N, K_pad)`` uint8 plus their quantization parameters.

    Dequantized, element ``(n, j)`` is ``(codes[n, j] - z) * s`` with the scale / zero point of group
    ``j // group_size`` (symmetric: ``z = 2^(bits-1)``; 1-bit symmetric: ``(2u - 1) * s``).

    Attributes:
        codes: ``(N, K_pad)`` uint8 unsigned codes in ``[0, 2^bits - 1]``; padding columns (``>= k``) are 0.
        scales: ``(N, K_pad / group_size)`` for group scope, ``(N, 1)`` for channel, ``(1, 1)`` for tensor scope,
            in the config's scale dtype.
        zeros: zero points (integer codes stored in the scale dtype) of the scales' shape; ``None`` when symmetric.
        bits: code width, 1..8.
        symmetric: the scheme the codes were made with.
        scope: ``"tensor"``, ``"channel"`` or ``"group"``.
        group_size: elements per scale along K (``K_pad`` for channel and tensor scope).
        k: real in-features (columns past ``k`` are padding).
    """

    codes: torch.Tensor
    scales: torch.Tensor  # (N, n_groups) or (1, 1) for tensor scope
    zeros: torch.Tensor | None  # same shape as scales; None when symmetric
    bits: int
    symmetric: bool
    scope: str
    group_size: int  # elements per scale along K (K_pad for channel scope)
    k: int  # real K (without padding)

    @property
    def k_pad(self) -> int:
        """Padded K: columns of ``codes`` (a multiple of the group size and of the codes per packed block)."""
        return self.codes.shape[1]


def _check_weight(w: torch.Tensor) -> None:
    if not isinstance(w, torch.Tensor):
        raise TypeError(f"expected a torch.Tensor, got {type(w).__name__}")
    if not w.dtype.is_floating_point:
        raise TypeError(f"expected a floating-point tensor to quantize, got {w.dtype}")
    if w.dim() != 2:
        raise ValueError(f"expected a 2-D (rows, K) weight, got shape {tuple(w.shape)}")
    if w.numel() == 0:
        raise ValueError("cannot quantize an empty tensor")
    if w.device.type == "meta":
        raise ValueError("cannot quantize a weight on the meta device (not loaded): load or materialise it first")
    if not torch.isfinite(w).all():
        bad = int((~torch.isfinite(w)).sum())
        raise ValueError(f"weights contain {bad} NaN/inf values; quantization needs finite weights")


def _group_view(wp: torch.Tensor, scope: str, group_size: int) -> torch.Tensor:
    """(N, K_pad) -> (N or 1, n_groups, elements) for per-scope reductions."""
    n, kp = wp.shape
    if scope == "group":
        return wp.view(n, kp // group_size, group_size)
    if scope == "channel":
        return wp.view(n, 1, kp)
    return wp.reshape(1, 1, n * kp)


def compute_qparams(
    w: torch.Tensor, bits: int, symmetric: bool, scope: str, group_size: int, scale_dtype: torch.dtype,
    dense: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None, int]:
    """Scales (and zero points) of ``w`` ``(N, K)``. Returns ``(scales, zeros, group_elems)``.

    ``group_elems`` is the number of K elements sharing one scale (``K_pad`` for channel scope). ``dense``: K is
    padded for the version-2 dense layout (3/5/6/7 bits: a multiple of 32 and of the group size).
    """
    _check_weight(w)
    n, k = w.shape
    gs = group_size if scope == "group" else None
    kp = padded_k(k, bits, gs, dense)
    wf = torch.nn.functional.pad(w.float(), (0, kp - k))
    v = _group_view(wf, scope, group_size)
    eps = scale_eps(scale_dtype)
    if symmetric:
        if bits == 1:
            # mean |w| over real (unpadded) elements only
            real = torch.nn.functional.pad(torch.ones(n, k, device=w.device), (0, kp - k))
            cnt = _group_view(real, scope, group_size).sum(-1).clamp_min(1)
            s = v.abs().sum(-1) / cnt
        else:
            s = v.abs().amax(-1) / (2 ** (bits - 1) - 1)
        zeros = None
    else:
        lo = v.amin(-1).clamp_max(0)
        hi = v.amax(-1).clamp_min(0)
        s = (hi - lo) / (2**bits - 1)
    s = s.clamp_min(eps).to(scale_dtype)
    if not torch.isfinite(s).all():
        hint = ("use scale_dtype='float32' or 'bfloat16'" if scale_dtype == torch.float16 else
                "their range (max - min) overflows float32: rescale the weights")
        raise ValueError(f"weights too large for {scale_dtype} scales (max |w| = {float(w.abs().max()):.3g}); {hint}")
    if not symmetric:
        zeros = torch.clamp(torch.round(-lo / s.float()), 0, 2**bits - 1).to(scale_dtype)
    elems = group_size if scope == "group" else kp
    return s, zeros, elems


def quantize(w: torch.Tensor, config: QuantConfig, bits: int | None = None, dense: bool = False) -> QTensor:
    """Quantize a 2-D weight to codes, scales and zero points with ``config``.

    Symmetric (``q_max = 2^(b-1) - 1``): ``s = max(absmax / q_max, eps)``, code ``clamp(round(w/s), -q_max, q_max)
    + 2^(b-1)`` (1-bit: ``s = max(mean|w|, eps)``, code ``[w >= 0]``). Asymmetric: ``s = max((max' - min') /
    (2^b - 1), eps)`` over the range widened to include 0,
    ``z = clamp(round(-min'/s), 0, 2^b - 1)``, code ``clamp(round(w/s) + z, 0, 2^b - 1)``. Statistics are taken
    per tensor, output row or group of ``group_size`` inputs (``config.scope``); K is zero-padded first.

    Args:
        w: ``(N, K)`` float weight (rows = output channels).
        config: scheme, scope, group size and scale dtype (``config.channel_bits`` is not read here: the caller
            quantizes each row group separately).
        bits: bit-width for this call, 1..8; ``None`` uses ``config.bits`` (a row group of a mixed layer passes
            its own).
        dense: pad K for the version-2 dense layout (:func:`medquant.kernels.layout.padded_k`).

    Returns:
        The :class:`QTensor` (codes ``(N, K_pad)`` and their parameters).

    Raises:
        TypeError: ``bits`` is not an integer (a bool included, as :class:`QuantConfig` refuses it).
        ValueError: the bit-width is not 1..8 (16 / 32 stay float and 0 is pruned: nothing to quantize).
    """
    b = config.bits if bits is None else _check_bits(bits, "bits")
    if not 1 <= b <= 8:
        raise ValueError(f"quantize needs 1..8 bits, got {b} (16/32 stay in float, 0 is pruned)")
    sym = config.is_symmetric(b)
    s, z, elems = compute_qparams(w, b, sym, config.scope, config.group_size, config.torch_scale_dtype, dense)
    n, k = w.shape
    kp = padded_k(k, b, config.group_size if config.scope == "group" else None, dense)
    wf = torch.nn.functional.pad(w.float(), (0, kp - k))
    sf = expand_params(s.float(), config.scope, elems, n, kp)
    if sym:
        if b == 1:
            codes = (wf >= 0).to(torch.uint8)
        else:
            qmax = 2 ** (b - 1) - 1
            codes = (torch.clamp(torch.round(wf / sf), -qmax, qmax) + 2 ** (b - 1)).to(torch.uint8)
    else:
        zf = expand_params(z.float(), config.scope, elems, n, kp)
        codes = torch.clamp(torch.round(wf / sf) + zf, 0, 2**b - 1).to(torch.uint8)
    if kp > k:
        codes[:, k:] = 0  # padding codes are 0 by definition of the layout
    return QTensor(codes, s, z, b, sym, config.scope, elems, k)


def dequantize(q: QTensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Float weight back from a quantized tensor: ``w^ = (u - z) * s`` per element, padding dropped.

    Args:
        q: the quantized rows (from :func:`quantize`).
        dtype: floating dtype of the result (float32 arithmetic).

    Returns:
        ``(N, q.k)`` weight.
    """
    return dequantize_codes(q.codes, q.scales, q.zeros, q.bits, q.symmetric, q.scope, q.group_size, q.k, dtype)


class _FakeQuantSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, w, config, bits, mask_outside):
        w2 = w.reshape(w.shape[0], -1) if w.dim() != 2 else w
        q = quantize(w2.detach(), config, bits)
        out = dequantize(q, w.dtype).reshape(w.shape)
        if mask_outside:
            # elements whose unclamped code would fall outside the range get no gradient
            n, kp = q.codes.shape
            sf = expand_params(q.scales.float(), q.scope, q.group_size, n, kp)[:, : q.k]
            lo, hi = qrange(q.bits, q.symmetric)
            r = w2.detach().float() / sf
            if not q.symmetric:
                r = torch.round(r) + expand_params(q.zeros.float(), q.scope, q.group_size, n, kp)[:, : q.k]
            else:
                r = torch.round(r)
            inside = ((r >= lo) & (r <= hi)).reshape(w.shape)
            ctx.save_for_backward(inside)
        ctx.mask_outside = mask_outside
        return out

    @staticmethod
    def backward(ctx, grad):
        if ctx.mask_outside:
            (inside,) = ctx.saved_tensors
            grad = grad * inside.to(grad.dtype)
        return grad, None, None, None


def fake_quantize(
    w: torch.Tensor, config: QuantConfig, bits: int | None = None, mask_outside: bool = False
) -> torch.Tensor:
    """Quantize-dequantize ``w`` (2-D, or N-D viewed as ``(shape[0], -1)``) with a straight-through gradient.

    Forward returns exactly ``dequantize(quantize(w))``. Backward passes the gradient through unchanged, or,
    with ``mask_outside=True``, zeroes it for elements that the clamp cut off.

    Args:
        w: weight (2-D, or a conv weight ``(O, I, kh, kw)`` quantized per output channel as ``(O, I*kh*kw)``).
        config: scheme, scope, group size and scale dtype.
        bits: bit-width, ``None`` = ``config.bits``; 16 / 32 return ``w`` unchanged and 0 returns zeros
            (pruned, also where ``w`` holds NaN / inf), keeping the graph (zero gradient).
        mask_outside: straight-through estimator that zeroes the gradient of clamped elements (the code
            ``round(w/s) (+ z)`` outside ``[q_min, q_max]``).

    Returns:
        The fake-quantized weight, shape and dtype of ``w``.

    Raises:
        TypeError: ``bits`` is not an integer (a bool included).
        ValueError: ``bits`` is not one of 0, 1..8, 16, 32, or ``w`` holds NaN / inf (1..8 bits).
    """
    b = config.bits if bits is None else _check_bits(bits, "bits")
    if b in (16, 32):
        return w
    if b == 0:
        return torch.nan_to_num(w, nan=0.0, posinf=0.0, neginf=0.0) * 0  # w * 0 is NaN at inf / NaN weights
    return _FakeQuantSTE.apply(w, config, b, mask_outside)


__all__ = [
    "SCALE_DTYPES",
    "QTensor",
    "compute_qparams",
    "dequantize",
    "dequantize_codes",
    "fake_quantize",
    "qrange",
    "quantize",
    "scale_eps",
]
