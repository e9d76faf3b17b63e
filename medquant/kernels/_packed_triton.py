"""Triton kernels for ``y = x @ dequant(W_q)^T`` reading the packed layout (format v1) directly.

Row groups in the version-2 dense layout (3/5/6/7 bits) are first converted to version-1 containers by
:func:`_dense_to_container_kernel` (one pass over the codes per call, into a temporary), then multiplied as v1.

Imported lazily (it imports Triton). Layout reminder (:mod:`medquant.kernels.layout`): row ``n`` of the packed
weight holds ``K_pad / VPW`` int32 words; code ``k`` sits in word ``k // VPW`` at bit ``(k % VPW) * CB``
(``CB`` = container bits, ``VPW = 32 / CB``); dequantisation is ``w = (u - z) * s`` with ``z = 2^(b-1)`` for
symmetric rows (1-bit symmetric: ``w = (2u - 1) * s``), ``s``/``z`` taken from group ``k // GROUP`` of the row.

Unpacking without a reshape
---------------------------
A K tile is ``BLOCK_KW`` consecutive words = ``BLOCK_K = BLOCK_KW * VPW`` consecutive codes. The words are loaded
once, as a ``(BLOCK_KW, BLOCK_N)`` block; for each sub-position ``j < VPW`` (a compile-time loop)
``u_j = (words >> j*CB) & (2^CB - 1)`` is the ``(BLOCK_KW, BLOCK_N)`` tile of codes ``k = (kw0 + i) * VPW + j``, and
the matching activations are the strided columns ``x[:, (kw0 + i) * VPW + j]``. A dot product over K does not care
about the order of K, so ``sum_j x_j @ w_j`` is the whole tile's contribution: every word and every activation is
read exactly once and nothing is reshaped or shuffled between threads.

Scale modes (compile time)
--------------------------
* ``TILE`` — the scale is constant over the K tile (channel / tensor scope, or ``GROUP % BLOCK_K == 0``):
  the tile is multiplied as integers ``(u - z)`` (exact in fp16/bf16 for b <= 8) and the fp32 partial sum is
  scaled once: ``acc += s * sum_j x_j @ (u_j - z)``.
* ``WORD`` — ``GROUP % VPW == 0``: the scale is constant within a word; a ``(BLOCK_KW, BLOCK_N)`` tile of scales is
  gathered once per K tile and each sub-tile is dequantised to the activation dtype ``((u - z) * s)`` before the dot.
* ``ELEM`` — any other group size: the scales are gathered per element. The last word of real codes may reach
  into groups that hold only padding (``K_pad`` is a multiple of ``VPW`` and of ``GROUP``): those loads are masked
  with ``k < K`` (0 instead), so a padding code contributes exactly 0 whatever its group's scale / zero point holds
  (inf or NaN included), as in every other reader. In ``TILE`` / ``WORD`` mode a group starts on a word boundary,
  so every group read holds a real code.

Regimes
-------
* :func:`_packed_gemv_kernel` (M = 1): each program owns ``BLOCK_N`` rows and a slice of K (``SPLIT_K``); FMA in
  fp32 registers (no tensor cores), sum over K at the end, atomic add into an fp32 output.
* :func:`_packed_mm_kernel` with ``SPLIT_K > 1`` (small M): ``tl.dot`` tiles, K split across programs, fp32 atomics.
* :func:`_packed_mm_kernel` with ``SPLIT_K = 1`` (large M): classic tiled GEMM with grouped program order,
  stores straight into the output dtype.

``DOT_F32`` upcasts the dot operands to fp32 with IEEE precision: always for fp32 activations (Triton would
otherwise use TF32), and for every dtype under the interpreter, where a bf16 ``tl.dot`` is silently wrong.
"""
from __future__ import annotations

import triton
import triton.language as tl

from .dispatch import interpreting

MODE_TILE, MODE_WORD, MODE_ELEM = 0, 1, 2


@triton.jit
def _packed_mm_kernel(
    x_ptr, qw_ptr, s_ptr, z_ptr, y_ptr,
    M, N, K, M_BUCKET,
    stride_xm, stride_xk, stride_qn, stride_qk,
    stride_sn, stride_sg, stride_zn, stride_zg, stride_ym, stride_yn,
    BITS: tl.constexpr, CB: tl.constexpr, ZSYM: tl.constexpr, SYMMETRIC: tl.constexpr,
    CHANNEL: tl.constexpr, GROUP: tl.constexpr, DOT_F32: tl.constexpr, ATOMIC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_KW: tl.constexpr, SPLIT_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """Tiled (split-K when ``SPLIT_K > 1``) ``y[M, N] (+)= x[M, K] @ dequant(W)[N, K]^T``."""
    VPW: tl.constexpr = 32 // CB
    MASK: tl.constexpr = (1 << CB) - 1
    BLOCK_K: tl.constexpr = BLOCK_KW * VPW
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    # grouped ordering: GROUP_M row-blocks of x share the weight tiles they read while these are in L2
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = tl.minimum(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
    pid_n = (pid % num_pid_in_group) // group_size_m

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = offs_m < M
    # row offsets of x and y in int64: m * stride_xm (or m * N) passes 2^31 for a large M (an LM head over a long
    # prefill), and an int32 product wraps to an address before the tensor
    x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm
    n_mask = offs_n < N
    offs_i = tl.arange(0, BLOCK_KW)

    kw_total = tl.cdiv(K, VPW)  # words holding real (unpadded) codes
    kw_per_split = tl.cdiv(tl.cdiv(kw_total, SPLIT_K), BLOCK_KW) * BLOCK_KW
    kw_start = pid_k * kw_per_split
    kw_end = tl.minimum(kw_start + kw_per_split, kw_total)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    z_c = 0.0  # per-row zero point (channel scope); unused when symmetric
    if CHANNEL:
        s_n = tl.load(s_ptr + offs_n * stride_sn, mask=n_mask, other=0.0).to(tl.float32)
        if not SYMMETRIC:
            z_c = tl.load(z_ptr + offs_n * stride_zn, mask=n_mask, other=0.0).to(tl.float32)[None, :]

    for kw0 in range(kw_start, kw_end, BLOCK_KW):
        offs_kw = kw0 + offs_i
        kw_mask = offs_kw < kw_end
        wmask = kw_mask[:, None] & n_mask[None, :]
        words = tl.load(qw_ptr + offs_n[None, :] * stride_qn + offs_kw[:, None] * stride_qk, mask=wmask, other=0)
        if CHANNEL or (GROUP % BLOCK_K == 0):
            # ---- TILE mode: integer tile, one scale per row for the whole K tile
            if CHANNEL:
                z_l = z_c
            else:
                g = (kw0 * VPW) // GROUP
                s_l = tl.load(s_ptr + offs_n * stride_sn + g * stride_sg, mask=n_mask, other=0.0).to(tl.float32)
                z_l = 0.0
                if not SYMMETRIC:
                    z_l = tl.load(z_ptr + offs_n * stride_zn + g * stride_zg, mask=n_mask,
                                  other=0.0).to(tl.float32)[None, :]
            part = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for j in tl.static_range(VPW):
                u = (words >> (j * CB)) & MASK
                uf = u.to(tl.float32)
                if SYMMETRIC:
                    if BITS == 1:
                        v = uf * 2.0 - 1.0
                    else:
                        v = uf - ZSYM
                else:
                    v = uf - z_l
                wq = v
                offs_k = offs_kw * VPW + j
                xj = tl.load(x_rows + offs_k[None, :] * stride_xk,
                             mask=m_mask[:, None] & (offs_k < K)[None, :], other=0.0)
                if DOT_F32:
                    part += tl.dot(xj.to(tl.float32), wq, input_precision="ieee")
                else:
                    part += tl.dot(xj, wq.to(xj.dtype))
            if CHANNEL:
                acc += part
            else:
                acc += part * s_l[None, :]
        else:
            # ---- WORD / ELEM modes: dequantise the tile to the activation dtype, then dot
            z_t = 0.0
            if GROUP % VPW == 0:
                g_t = (offs_kw * VPW) // GROUP
                s_t = tl.load(s_ptr + offs_n[None, :] * stride_sn + g_t[:, None] * stride_sg, mask=wmask,
                              other=0.0).to(tl.float32)
                if not SYMMETRIC:
                    z_t = tl.load(z_ptr + offs_n[None, :] * stride_zn + g_t[:, None] * stride_zg, mask=wmask,
                                  other=0.0).to(tl.float32)
            for j in tl.static_range(VPW):
                u = (words >> (j * CB)) & MASK
                offs_k = offs_kw * VPW + j
                if GROUP % VPW != 0:
                    # padding codes of the last word may sit in groups that hold only padding: their scales and
                    # zero points are never read (0 instead), so padding adds exactly 0 whatever they hold
                    g_e = offs_k // GROUP
                    emask = wmask & (offs_k < K)[:, None]
                    s_t = tl.load(s_ptr + offs_n[None, :] * stride_sn + g_e[:, None] * stride_sg, mask=emask,
                                  other=0.0).to(tl.float32)
                    if not SYMMETRIC:
                        z_t = tl.load(z_ptr + offs_n[None, :] * stride_zn + g_e[:, None] * stride_zg, mask=emask,
                                      other=0.0).to(tl.float32)
                uf = u.to(tl.float32)
                if SYMMETRIC:
                    if BITS == 1:
                        v = uf * 2.0 - 1.0
                    else:
                        v = uf - ZSYM
                else:
                    v = uf - z_t
                w = v * s_t
                xj = tl.load(x_rows + offs_k[None, :] * stride_xk,
                             mask=m_mask[:, None] & (offs_k < K)[None, :], other=0.0)
                if DOT_F32:
                    acc += tl.dot(xj.to(tl.float32), w, input_precision="ieee")
                else:
                    acc += tl.dot(xj, w.to(xj.dtype))
    if CHANNEL:
        acc = acc * s_n[None, :]
    y_ptrs = y_ptr + offs_m.to(tl.int64)[:, None] * stride_ym + offs_n[None, :] * stride_yn
    ymask = m_mask[:, None] & n_mask[None, :]
    if ATOMIC:
        tl.atomic_add(y_ptrs, acc, mask=ymask)
    else:
        tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=ymask)


@triton.jit
def _packed_gemv_kernel(
    x_ptr, qw_ptr, s_ptr, z_ptr, y_ptr,
    N, K,
    stride_xk, stride_qn, stride_qk, stride_sn, stride_sg, stride_zn, stride_zg,
    BITS: tl.constexpr, CB: tl.constexpr, ZSYM: tl.constexpr, SYMMETRIC: tl.constexpr,
    CHANNEL: tl.constexpr, GROUP: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_KW: tl.constexpr, SPLIT_K: tl.constexpr,
):
    """M = 1: ``y[N] += sum_k x[k] * dequant(W)[N, k]`` with fp32 FMA; y is fp32 and zeroed by the caller."""
    VPW: tl.constexpr = 32 // CB
    MASK: tl.constexpr = (1 << CB) - 1
    BLOCK_K: tl.constexpr = BLOCK_KW * VPW
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    offs_i = tl.arange(0, BLOCK_KW)
    kw_total = tl.cdiv(K, VPW)
    kw_per_split = tl.cdiv(tl.cdiv(kw_total, SPLIT_K), BLOCK_KW) * BLOCK_KW
    kw_start = pid_k * kw_per_split
    kw_end = tl.minimum(kw_start + kw_per_split, kw_total)

    acc = tl.zeros((BLOCK_N, BLOCK_KW), dtype=tl.float32)
    z_c = 0.0  # per-row zero point (channel scope); unused when symmetric
    if CHANNEL:
        s_n = tl.load(s_ptr + offs_n * stride_sn, mask=n_mask, other=0.0).to(tl.float32)
        if not SYMMETRIC:
            z_c = tl.load(z_ptr + offs_n * stride_zn, mask=n_mask, other=0.0).to(tl.float32)[:, None]

    for kw0 in range(kw_start, kw_end, BLOCK_KW):
        offs_kw = kw0 + offs_i
        kw_mask = offs_kw < kw_end
        wmask = n_mask[:, None] & kw_mask[None, :]
        words = tl.load(qw_ptr + offs_n[:, None] * stride_qn + offs_kw[None, :] * stride_qk, mask=wmask, other=0)
        if GROUP % VPW == 0 or CHANNEL:
            # TILE / WORD modes: s and z constant within a word -> one (BLOCK_N, 1 or BLOCK_KW) tile per K tile
            z_t = z_c
            if not CHANNEL:
                if GROUP % BLOCK_K == 0:
                    g = (kw0 * VPW) // GROUP
                    s_t = tl.load(s_ptr + offs_n * stride_sn + g * stride_sg, mask=n_mask,
                                  other=0.0).to(tl.float32)[:, None]
                    if not SYMMETRIC:
                        z_t = tl.load(z_ptr + offs_n * stride_zn + g * stride_zg, mask=n_mask,
                                      other=0.0).to(tl.float32)[:, None]
                else:
                    g_t = (offs_kw * VPW) // GROUP
                    s_t = tl.load(s_ptr + offs_n[:, None] * stride_sn + g_t[None, :] * stride_sg, mask=wmask,
                                  other=0.0).to(tl.float32)
                    if not SYMMETRIC:
                        z_t = tl.load(z_ptr + offs_n[:, None] * stride_zn + g_t[None, :] * stride_zg, mask=wmask,
                                      other=0.0).to(tl.float32)
            part = tl.zeros((BLOCK_N, BLOCK_KW), dtype=tl.float32)
            for j in tl.static_range(VPW):
                u = (words >> (j * CB)) & MASK
                offs_k = offs_kw * VPW + j
                xj = tl.load(x_ptr + offs_k * stride_xk, mask=offs_k < K, other=0.0).to(tl.float32)
                uf = u.to(tl.float32)
                if SYMMETRIC:
                    if BITS == 1:
                        v = uf * 2.0 - 1.0
                    else:
                        v = uf - ZSYM
                else:
                    v = uf - z_t
                part += v * xj[None, :]
            if CHANNEL:
                acc += part
            else:
                acc += part * s_t
        else:
            # ELEM mode: group boundaries inside words
            z_t = 0.0
            for j in tl.static_range(VPW):
                u = (words >> (j * CB)) & MASK
                offs_k = offs_kw * VPW + j
                g_e = offs_k // GROUP
                emask = wmask & (offs_k < K)[None, :]  # not the groups of padding only (as in the mm kernel)
                s_e = tl.load(s_ptr + offs_n[:, None] * stride_sn + g_e[None, :] * stride_sg, mask=emask,
                              other=0.0).to(tl.float32)
                if not SYMMETRIC:
                    z_t = tl.load(z_ptr + offs_n[:, None] * stride_zn + g_e[None, :] * stride_zg, mask=emask,
                                  other=0.0).to(tl.float32)
                xj = tl.load(x_ptr + offs_k * stride_xk, mask=offs_k < K, other=0.0).to(tl.float32)
                uf = u.to(tl.float32)
                if SYMMETRIC:
                    if BITS == 1:
                        v = uf * 2.0 - 1.0
                    else:
                        v = uf - ZSYM
                else:
                    v = uf - z_t
                acc += v * s_e * xj[None, :]
    y = tl.sum(acc, axis=1)
    if CHANNEL:
        y = y * s_n
    if SPLIT_K > 1:
        tl.atomic_add(y_ptr + offs_n, y, mask=n_mask)
    else:
        tl.store(y_ptr + offs_n, y, mask=n_mask)


@triton.jit
def _dense_to_container_kernel(
    src_ptr, dst_ptr, W_SRC, W_DST, K_PAD, stride_sn, stride_dn,
    BITS: tl.constexpr, CB: tl.constexpr, BLOCK_W: tl.constexpr,
):
    """Version-2 dense ``BITS``-bit codes -> version-1 ``CB``-bit containers, one row per program along axis 0.

    Code ``k`` sits at stream bit ``p = k * BITS``: ``u = ((word[p // 32] | word[p // 32 + 1] << 32) >> p % 32)
    & (2^BITS - 1)`` (words read as unsigned, in int64), then ``VPW = 32 / CB`` codes are shifted into each
    container word, the lowest K index in the lowest bits.
    """
    VPW: tl.constexpr = 32 // CB
    row = tl.program_id(0)
    offs_w = tl.program_id(1) * BLOCK_W + tl.arange(0, BLOCK_W)
    offs_j = tl.arange(0, VPW)
    k = offs_w[:, None] * VPW + offs_j[None, :]
    kmask = k < K_PAD
    p = k * BITS
    w = p // 32
    o = (p % 32).to(tl.int64)
    base = src_ptr + row * stride_sn
    lo = tl.load(base + w, mask=kmask, other=0).to(tl.int64) & 0xFFFFFFFF
    hi = tl.load(base + w + 1, mask=kmask & (w + 1 < W_SRC), other=0).to(tl.int64) & 0xFFFFFFFF
    u = ((lo | (hi << 32)) >> o) & ((1 << BITS) - 1)
    word = tl.sum(u << (offs_j[None, :] * CB).to(tl.int64), axis=1)
    word = tl.where(word >= 2147483648, word - 4294967296, word).to(tl.int32)
    tl.store(dst_ptr + row * stride_dn + offs_w, word, mask=offs_w < W_DST)


# ------------------------------------------------------------------------------------------------ configs
#: fixed configurations under the interpreter: its cost is per operation and per program, not per element, so
#: few, large blocks are fastest (tests override them to exercise multi-tile loops)
INTERPRET_CONFIGS = {
    "gemv": {"BLOCK_N": 64, "BLOCK_KW": 16, "SPLIT_K": 2},
    "splitk": {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_KW": 16, "SPLIT_K": 2, "GROUP_M": 1},
    "gemm": {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_KW": 16, "SPLIT_K": 1, "GROUP_M": 2},
}


def _cfg(num_warps=4, num_stages=3, **kw):
    return triton.Config(kw, num_warps=num_warps, num_stages=num_stages)


GEMV_CONFIGS = [
    _cfg(BLOCK_N=bn, BLOCK_KW=bkw, SPLIT_K=sk, num_warps=nw, num_stages=ns)
    for bn, bkw, sk, nw, ns in [
        (16, 32, 1, 4, 3), (32, 16, 1, 4, 3), (32, 32, 1, 4, 3), (64, 16, 1, 4, 3), (128, 8, 1, 4, 3),
        (32, 16, 2, 4, 3), (64, 16, 2, 4, 3), (32, 32, 4, 4, 3), (64, 16, 4, 4, 4), (16, 64, 4, 4, 3),
        (64, 32, 8, 8, 3), (128, 16, 8, 8, 3),
    ]
]
SPLITK_CONFIGS = [
    _cfg(BLOCK_M=bm, BLOCK_N=bn, BLOCK_KW=bkw, SPLIT_K=sk, GROUP_M=1, num_warps=nw, num_stages=ns)
    for bm, bn, bkw, sk, nw, ns in [
        (16, 64, 16, 2, 4, 3), (16, 64, 16, 4, 4, 3), (16, 128, 16, 4, 4, 3), (16, 64, 32, 8, 4, 3),
        (32, 64, 16, 4, 4, 3), (32, 128, 16, 2, 4, 4), (64, 64, 16, 2, 4, 3), (64, 128, 16, 4, 8, 3),
        (16, 32, 32, 8, 4, 4), (32, 64, 32, 4, 4, 3),
    ]
]
GEMM_CONFIGS = [
    _cfg(BLOCK_M=bm, BLOCK_N=bn, BLOCK_KW=bkw, SPLIT_K=1, GROUP_M=8, num_warps=nw, num_stages=ns)
    for bm, bn, bkw, nw, ns in [
        (64, 64, 16, 4, 3), (64, 128, 16, 4, 4), (128, 64, 16, 4, 4), (128, 128, 16, 8, 3),
        (128, 256, 16, 8, 3), (64, 256, 16, 8, 3), (128, 128, 32, 8, 3), (64, 128, 32, 4, 3),
    ]
]

if interpreting():
    # @triton.autotune needs a GPU (do_bench): the interpreter runs one fixed configuration
    gemv_tuned = splitk_tuned = gemm_tuned = None
else:  # pragma: no cover - needs a GPU
    _KEY_MM = ["M_BUCKET", "N", "K", "GROUP", "BITS"]
    gemv_tuned = triton.autotune(GEMV_CONFIGS, key=["N", "K", "GROUP", "BITS"], reset_to_zero=["y_ptr"])(
        _packed_gemv_kernel)
    splitk_tuned = triton.autotune(SPLITK_CONFIGS, key=_KEY_MM, reset_to_zero=["y_ptr"])(_packed_mm_kernel)
    gemm_tuned = triton.autotune(GEMM_CONFIGS, key=_KEY_MM)(_packed_mm_kernel)
