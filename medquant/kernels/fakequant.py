"""Host side of the fake-quant kernels: checks, block sizes and launches (Triton imported on first call)."""
from __future__ import annotations

import torch

from .dispatch import interpreting, need_triton, on_cuda_triton_dtype, register_kernel
from .reference import PASSTHROUGH_BITS, check_float, check_row_bits, check_static_args, row_eps_arg


def _np2(v: int) -> int:
    return 1 << max(int(v) - 1, 0).bit_length()


def _out_buffer(x2: torch.Tensor) -> torch.Tensor:
    """Output buffer: ``x``'s dtype, except bf16 under the interpreter, whose fp32 -> bf16 cast truncates
    (a GPU rounds to nearest even); there the kernel writes fp32 and torch rounds."""
    if x2.dtype == torch.bfloat16 and interpreting():
        return torch.empty(x2.shape, dtype=torch.float32, device=x2.device)
    return torch.empty_like(x2)


def _need_kernel_device(x: torch.Tensor) -> None:
    need_triton(x.device)


def fake_quantize_rows_triton(
    x2: torch.Tensor, bits: torch.Tensor, symmetric: bool, eps: float, want_mask: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Kernel launch for a 2-D ``(R, C)`` input; see :func:`medquant.kernels.fake_quantize_rows`."""
    check_float(x2, "x")
    check_row_bits(bits, x2.shape[0], symmetric)
    eps = row_eps_arg(eps)
    _need_kernel_device(x2)
    from ._fakequant_triton import _fq_rows_kernel

    x2 = x2.contiguous()
    r, c = x2.shape
    y = _out_buffer(x2)
    mask = torch.empty(r, c, dtype=torch.int8, device=x2.device) if want_mask else None
    if r == 0 or c == 0:  # .to: x's dtype also where the buffer is float32 (bf16 under the interpreter)
        return y.to(x2.dtype), (mask.view(torch.bool) if mask is not None else None)
    # every width >= PASSTHROUGH_BITS means "keep the row": clamped before the int32 cast (2**32 + 4 would wrap to 4)
    bits32 = bits.to(x2.device).clamp(max=PASSTHROUGH_BITS).to(torch.int32).contiguous()
    if interpreting():
        block, warps = min(_np2(c), 8192), 4
    else:  # pragma: no cover - GPU
        block = min(_np2(c), 4096)
        warps = 8 if block >= 2048 else 4
    _fq_rows_kernel[(r,)](
        x2, bits32, y, mask if mask is not None else y, c, x2.stride(0), y.stride(0), float(eps),
        SYMMETRIC=bool(symmetric), WRITE_MASK=want_mask, PASS_BITS=PASSTHROUGH_BITS, BLOCK_C=block,
        num_warps=warps,
    )
    return y.to(x2.dtype), (mask.view(torch.bool) if mask is not None else None)


def fake_quantize_static_triton(
    x2: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, bits: int, symmetric: bool,
    group_size: int | None, want_mask: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Kernel launch for a 2-D ``(N, K)`` input; see :func:`medquant.kernels.fake_quantize_static`."""
    check_static_args(x2, scales, zeros, bits, symmetric, group_size)
    _need_kernel_device(x2)
    from ._fakequant_triton import _fq_static_kernel

    x2 = x2.contiguous()
    n, k = x2.shape
    y = _out_buffer(x2)
    mask = torch.empty(n, k, dtype=torch.int8, device=x2.device) if want_mask else None
    if n == 0 or k == 0:  # .to: x's dtype also where the buffer is float32 (bf16 under the interpreter)
        return y.to(x2.dtype), (mask.view(torch.bool) if mask is not None else None)
    if scales.shape[0] == 1 and n != 1:  # tensor scope: broadcast with stride 0
        scales = scales.expand(n, scales.shape[1])
        zeros = zeros.expand(n, zeros.shape[1]) if zeros is not None else None
    zt = zeros if zeros is not None else scales
    if interpreting():
        bn, bk = min(_np2(n), 64), min(_np2(k), 512)
    else:  # pragma: no cover - GPU
        bn, bk = min(_np2(n), 16), min(_np2(k), 256)
    grid = (-(-n // bn), -(-k // bk))
    _fq_static_kernel[grid](
        x2, scales, zt, y, mask if mask is not None else y,
        n, k, x2.stride(0), x2.stride(1), scales.stride(0), scales.stride(1), zt.stride(0), zt.stride(1),
        y.stride(0),
        BITS=bits, SYMMETRIC=bool(symmetric), GROUP=int(group_size or 0), WRITE_MASK=want_mask,
        BLOCK_N=bn, BLOCK_K=bk,
    )
    return y.to(x2.dtype), (mask.view(torch.bool) if mask is not None else None)


register_kernel("fake_quantize_rows", "triton", fake_quantize_rows_triton, on_cuda_triton_dtype)
register_kernel("fake_quantize_static", "triton", fake_quantize_static_triton, on_cuda_triton_dtype)
