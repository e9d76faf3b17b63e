"""The one dispatch point between quantized modules and matmul backends.

``packed_linear`` computes ``y = x @ dequant(W_q)^T`` for one row group of a quantized layer, reading the
packed layout of :mod:`medquant.quant.packing` directly. On CUDA with Triton available it calls the Triton
kernels in :mod:`medquant.kernels`; everywhere else it runs the plain-torch reference below (which is also the
test oracle). Modules never know which backend ran.
"""
from __future__ import annotations

import torch

from .core import dequantize_codes
from .packing import unpack


def packed_linear_reference(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    bits: int,
    symmetric: bool,
    scope: str,
    group_elems: int,
    k: int,
) -> torch.Tensor:
    """Plain torch: unpack, dequantize to ``x.dtype`` and matmul. ``x`` is ``(M, k)``; returns ``(M, n_rows)``."""
    codes = unpack(qweight, bits)
    w = dequantize_codes(codes, scales, zeros, bits, symmetric, scope, group_elems, k, dtype=x.dtype)
    return x @ w.t()


def _kernel_backend():
    try:
        from .. import kernels  # noqa: F401  (optional: written by the kernels issue)
    except ImportError:
        return None
    return getattr(kernels, "packed_linear", None)


def packed_linear(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    bits: int,
    symmetric: bool,
    scope: str,
    group_elems: int,
    k: int,
) -> torch.Tensor:
    """``x (M, k) @ dequant(qweight)^T`` -> ``(M, n_rows)`` in ``x.dtype``. See module docstring."""
    if x.is_cuda:
        fn = _kernel_backend()
        if fn is not None:
            return fn(x, qweight, scales, zeros, bits, symmetric, scope, group_elems, k)
    return packed_linear_reference(x, qweight, scales, zeros, bits, symmetric, scope, group_elems, k)
