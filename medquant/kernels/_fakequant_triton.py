"""Triton kernels for fused quantize-dequantize (fake quantization). Imported lazily (imports Triton).

Both kernels work in float32 and match the torch references in :mod:`medquant.kernels.reference` bit for bit:
the divisions are IEEE round-to-nearest (``tl.div_rn``: Triton's ``/`` on fp32 is PTX ``div.full.f32`` on NVIDIA
GPUs, up to 2 ulp off, which would move values at a rounding tie and change a row's scale), and ``round`` is
half-to-even written with ``floor`` because ``libdevice.rint`` is not available under the interpreter::

    r = floor(v); d = v - r                       # exact in fp32
    odd = r - 2 * floor(r / 2) != 0
    round(v) = r + (d > 0.5) + (d == 0.5 and odd)
    (a zero result takes the sign of v, as torch.round(-0.3) = -0.0)

* :func:`_fq_rows_kernel` — one program per row: pass 1 reduces min/max (or absmax) over the row in
  ``BLOCK_C`` chunks, pass 2 quantizes; each row reads its own bit-width (>= 16: copy through).
* :func:`_fq_static_kernel` — 2-D tiles, scales / zero points gathered at ``(row, col // GROUP)`` through strides
  (stride 0 broadcasts tensor- and channel-scope parameters).

Both optionally write the straight-through mask (1 where the unclamped code is inside the clamp range).
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _round_half_even(v):
    r = tl.floor(v)
    d = v - r
    odd = (r - 2.0 * tl.floor(r * 0.5)) != 0.0
    res = r + (d > 0.5).to(tl.float32) + ((d == 0.5) & odd).to(tl.float32)
    return tl.where(res == 0.0, v * 0.0, res)


@triton.jit
def _clamp(v, lo, hi):
    """``min(max(v, lo), hi)`` keeping a NaN ``v``, as ``torch.clamp`` does (Triton's min / max drop a NaN operand
    by default: a NaN input became a clamp bound)."""
    return tl.minimum(tl.maximum(v, lo, propagate_nan=tl.PropagateNan.ALL), hi, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _fq_rows_kernel(
    x_ptr, bits_ptr, y_ptr, mask_ptr,
    C, stride_xr, stride_yr, eps,
    SYMMETRIC: tl.constexpr, WRITE_MASK: tl.constexpr, PASS_BITS: tl.constexpr, BLOCK_C: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)  # int64: row * stride passes 2^31 once R * C does (int32 would wrap)
    b = tl.load(bits_ptr + row).to(tl.int32)
    passthrough = b >= PASS_BITS
    bq = tl.where(passthrough, 8, b)
    offs = tl.arange(0, BLOCK_C)
    x_row = x_ptr + row * stride_xr
    # ---- pass 1: range of the row
    if SYMMETRIC:
        amax = tl.zeros((BLOCK_C,), dtype=tl.float32)
        nan = tl.zeros((BLOCK_C,), dtype=tl.int32)
        for c0 in range(0, C, BLOCK_C):
            xv = tl.load(x_row + c0 + offs, mask=c0 + offs < C, other=0.0).to(tl.float32)
            amax = tl.maximum(amax, tl.abs(xv))
            nan = nan | (xv != xv).to(tl.int32)  # noqa: PLR0124 (x != x: a NaN)
        qmax = ((1 << (bq - 1)) - 1).to(tl.float32)
        s = tl.maximum(tl.div_rn(tl.max(amax, axis=0), qmax), eps)
        s = tl.where(tl.max(nan, axis=0) > 0, float("nan"), s)  # a NaN in the row: its range (and row) is NaN
        lo = -qmax
    else:
        mn = tl.zeros((BLOCK_C,), dtype=tl.float32)  # starting at 0 widens the range to include zero
        mx = tl.zeros((BLOCK_C,), dtype=tl.float32)
        nan = tl.zeros((BLOCK_C,), dtype=tl.int32)
        for c0 in range(0, C, BLOCK_C):
            xv = tl.load(x_row + c0 + offs, mask=c0 + offs < C, other=0.0).to(tl.float32)
            mn = tl.minimum(mn, xv)
            mx = tl.maximum(mx, xv)
            nan = nan | (xv != xv).to(tl.int32)  # noqa: PLR0124 (x != x: a NaN)
        qmax = ((1 << bq) - 1).to(tl.float32)
        lo_v = tl.min(mn, axis=0)
        s = tl.maximum(tl.div_rn(tl.max(mx, axis=0) - lo_v, qmax), eps)
        s = tl.where(tl.max(nan, axis=0) > 0, float("nan"), s)  # a NaN in the row: its range (and row) is NaN
        z = _clamp(_round_half_even(tl.div_rn(-lo_v, s)), 0.0, qmax)
        lo = 0.0
    # ---- pass 2: quantize-dequantize
    for c0 in range(0, C, BLOCK_C):
        cm = c0 + offs < C
        xin = tl.load(x_row + c0 + offs, mask=cm, other=0.0)
        xv = xin.to(tl.float32)
        if SYMMETRIC:
            r = _round_half_even(tl.div_rn(xv, s))
            out = (_clamp(r, lo, qmax) + 0.0) * s  # + 0.0: a -0 code dequantizes to +0
        else:
            r = _round_half_even(tl.div_rn(xv, s)) + z
            out = (_clamp(r, lo, qmax) - z) * s
        out = out.to(y_ptr.dtype.element_ty)
        out = tl.where(passthrough, xin, out)
        tl.store(y_ptr + row * stride_yr + c0 + offs, out, mask=cm)
        if WRITE_MASK:
            inside = ((r >= lo) & (r <= qmax)) | passthrough
            tl.store(mask_ptr + row * stride_yr + c0 + offs, inside.to(tl.int8), mask=cm)


@triton.jit
def _fq_static_kernel(
    x_ptr, s_ptr, z_ptr, y_ptr, mask_ptr,
    N, K, stride_xn, stride_xk, stride_sn, stride_sg, stride_zn, stride_zg, stride_yn,
    BITS: tl.constexpr, SYMMETRIC: tl.constexpr, GROUP: tl.constexpr, WRITE_MASK: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    m = (offs_n < N)[:, None] & (offs_k < K)[None, :]
    rows = offs_n.to(tl.int64)[:, None]  # int64: n * stride passes 2^31 once N * K does (int32 would wrap)
    if GROUP > 0:
        g = offs_k // GROUP
    else:
        g = offs_k * 0
    xv = tl.load(x_ptr + rows * stride_xn + offs_k[None, :] * stride_xk, mask=m, other=0.0)
    xv = xv.to(tl.float32)
    s = tl.load(s_ptr + offs_n[:, None] * stride_sn + g[None, :] * stride_sg, mask=m, other=1.0).to(tl.float32)
    r = _round_half_even(tl.div_rn(xv, s))
    if SYMMETRIC:
        if BITS == 1:
            out = tl.where(xv >= 0, s, -s)
            lo = -1.0
            hi = 1.0
        else:
            hi = (1 << (BITS - 1)) - 1.0
            lo = -hi
            out = (_clamp(r, lo, hi) + 0.0) * s  # + 0.0: a -0 code dequantizes to +0
    else:
        z = tl.load(z_ptr + offs_n[:, None] * stride_zn + g[None, :] * stride_zg, mask=m, other=0.0)
        z = z.to(tl.float32)
        r = r + z
        lo = 0.0
        hi = (1 << BITS) - 1.0
        out = (_clamp(r, lo, hi) - z) * s
    y_off = rows * stride_yn + offs_k[None, :]
    tl.store(y_ptr + y_off, out.to(y_ptr.dtype.element_ty), mask=m)
    if WRITE_MASK:
        tl.store(mask_ptr + y_off, ((r >= lo) & (r <= hi)).to(tl.int8), mask=m)
