"""Host side of the packed weight-only matmul: argument checks, regime dispatch on M and kernel launch.

Dispatch thresholds (``M`` = rows of ``x``, i.e. tokens in the batch):

==================  =========================  ===================================================
``M == 1``          ``gemv``                   FMA GEMV, split-K, fp32 atomics (decode step)
``2 <= M <= 64``    ``splitk``                 ``tl.dot`` tiles, split-K, fp32 atomics
``M > 64``          ``gemm``                   ``tl.dot`` tiles, grouped order, direct store
==================  =========================  ===================================================

``SPLITK_MAX_M`` is the switch between the two tensor-core regimes: below it the output has too few tiles to fill
the GPU, so K is split across programs as well. The values are starting points for the GPU tuning issue.
"""
from __future__ import annotations

import torch

from .bundle import PackedWeight
from .dispatch import interpreting, need_triton, on_cuda_triton_dtype, register_kernel
from .layout import container_bits
from .reference import check_packed_input

GEMV_MAX_M = 1
SPLITK_MAX_M = 64
REGIMES = ("gemv", "splitk", "gemm")


def select_regime(m: int) -> str:
    """Kernel regime for ``m`` activation rows (see the module table).

    Args:
        m: rows of the activation (batch x tokens).

    Returns:
        ``"gemv"`` for ``m <= GEMV_MAX_M`` (one row per program, decode), ``"splitk"`` for
        ``m <= SPLITK_MAX_M`` (K split over programs, small batches), else ``"gemm"`` (tiled matmul).
    """
    if m <= GEMV_MAX_M:
        return "gemv"
    if m <= SPLITK_MAX_M:
        return "splitk"
    return "gemm"


def _m_bucket(m: int) -> int:
    """Autotune key for M: the next power of two (capped), so a new sequence length does not re-tune."""
    return min(1 << max(m - 1, 0).bit_length(), 4096)


def packed_linear_triton(
    x: torch.Tensor,
    weight: PackedWeight,
    *,
    regime: str | None = None,
    config: dict | None = None,
) -> torch.Tensor:
    """``x (M, k) @ dequant(weight)^T -> (M, N)`` in ``x.dtype`` with the Triton kernels.

    Reads the packed layout as stored (no repacking); an ``x`` whose columns are not adjacent (``x.stride(1) != 1``)
    is copied contiguous first, and the kernels compute row offsets of ``x`` and ``y`` in int64 (past 2^31
    elements an int32 offset wraps). ``regime`` overrides :func:`select_regime` and
    ``config`` the block sizes (both for tests / benchmarks; under the interpreter the configuration is fixed
    to ``INTERPRET_CONFIGS`` unless overridden, on a GPU the kernels are autotuned unless ``config`` is given).
    """
    check_packed_input(x, weight)
    qweight, scales, zeros = weight.qweight, weight.scales, weight.zeros
    bits, symmetric, scope, group_elems, k = weight.bits, weight.symmetric, weight.scope, weight.group_elems, weight.k
    need_triton(x.device)
    m = x.shape[0]
    regime = regime or select_regime(m)
    if regime not in REGIMES:
        raise ValueError(f"regime={regime!r}; accepted: {', '.join(REGIMES)}")
    if regime == "gemv" and m > 1:
        raise ValueError(f"the gemv regime needs M = 1 (or an empty input), got M = {m}")
    from ._packed_triton import (  # imports Triton: only when a kernel runs
        INTERPRET_CONFIGS,
        _packed_gemv_kernel,
        _packed_mm_kernel,
        gemm_tuned,
        gemv_tuned,
        splitk_tuned,
    )

    if weight.is_dense and qweight.shape[0] and qweight.shape[1]:
        qweight = dense_to_container_triton(weight)

    n = qweight.shape[0]
    if m == 0 or n == 0 or k == 0:
        return x.new_zeros(m, n)
    if x.stride(1) != 1:  # a column-strided view (x.t() of a (k, M) tensor): k * stride would pass the kernels'
        x = x.contiguous()  # int32 offsets (an address before x); row offsets are int64 in the kernels
    cb = container_bits(bits)
    channel = scope in ("tensor", "channel")
    if scope == "tensor":
        scales = scales.expand(n, 1)
        zeros = zeros.expand(n, 1) if zeros is not None else None
    group = 0 if channel else int(group_elems)
    zt = zeros if zeros is not None else scales  # dummy pointer when symmetric (never read)
    consts = {"BITS": bits, "CB": cb, "ZSYM": (1 << (bits - 1)) if bits > 1 else 0, "SYMMETRIC": bool(symmetric),
                  "CHANNEL": channel, "GROUP": group}
    interp = interpreting()
    fixed = config if config is not None else (INTERPRET_CONFIGS[regime] if interp else None)

    if regime == "gemv":
        y32 = torch.zeros(n, device=x.device, dtype=torch.float32)
        args = (x, qweight, scales, zt, y32, n, k, x.stride(1), qweight.stride(0), qweight.stride(1),
                scales.stride(0), scales.stride(1), zt.stride(0), zt.stride(1))
        if fixed is None:
            kern = gemv_tuned
            grid = lambda meta: (triton_cdiv(n, meta["BLOCK_N"]), meta["SPLIT_K"])
            kern[grid](*args, **consts)
        else:
            grid = (triton_cdiv(n, fixed["BLOCK_N"]), fixed["SPLIT_K"])
            _packed_gemv_kernel[grid](*args, **consts, **fixed)
        return y32.view(1, n).to(x.dtype)

    atomic = regime == "splitk"
    # fp32 accumulation buffer for split-K atomics; also for bf16 under the interpreter, whose fp32 -> bf16
    # cast truncates instead of rounding to nearest even (torch does the final cast there)
    if atomic or (interpreting() and x.dtype == torch.bfloat16):
        y = torch.zeros(m, n, device=x.device, dtype=torch.float32)
    else:
        y = torch.empty(m, n, device=x.device, dtype=x.dtype)
    consts["DOT_F32"] = interp or x.dtype == torch.float32
    consts["ATOMIC"] = atomic
    args = (x, qweight, scales, zt, y, m, n, k, _m_bucket(m), x.stride(0), x.stride(1), qweight.stride(0),
            qweight.stride(1), scales.stride(0), scales.stride(1), zt.stride(0), zt.stride(1), y.stride(0),
            y.stride(1))
    if fixed is None:
        kern = splitk_tuned if atomic else gemm_tuned
        grid = lambda meta: (
            triton_cdiv(m, meta["BLOCK_M"]) * triton_cdiv(n, meta["BLOCK_N"]), meta["SPLIT_K"])
        kern[grid](*args, **consts)
    else:
        if not atomic and fixed.get("SPLIT_K", 1) != 1:
            raise ValueError("the gemm regime stores directly and needs SPLIT_K = 1")
        grid = (triton_cdiv(m, fixed["BLOCK_M"]) * triton_cdiv(n, fixed["BLOCK_N"]), fixed["SPLIT_K"])
        _packed_mm_kernel[grid](*args, **consts, **fixed)
    return y.to(x.dtype)


def dense_to_container_triton(weight: PackedWeight) -> torch.Tensor:
    """The codes of a version-2 dense row group re-packed into version-1 containers (a temporary), on the
    weight's device with the Triton kernel ``_dense_to_container_kernel``: ``(n, K_pad / values_per_word)``."""
    from ._packed_triton import _dense_to_container_kernel

    n, k_pad, cb = weight.n, weight.k_pad, container_bits(weight.bits)
    w_dst = k_pad * cb // 32
    out = torch.empty(n, w_dst, dtype=torch.int32, device=weight.device)
    src = weight.qweight.contiguous()
    block_w = 64
    _dense_to_container_kernel[(n, triton_cdiv(w_dst, block_w))](
        src, out, src.shape[1], w_dst, k_pad, src.stride(0), out.stride(0), BITS=weight.bits, CB=cb, BLOCK_W=block_w)
    return out


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _packed_linear_kernel(x: torch.Tensor, weight: PackedWeight) -> torch.Tensor:
    return packed_linear_triton(x, weight)


register_kernel("packed_linear", "triton", _packed_linear_kernel, on_cuda_triton_dtype)
