"""The one dispatch point between quantized modules and matmul backends.

``packed_linear`` computes ``y = x @ dequant(W_q)^T`` for one row group of a quantized layer, reading the
packed layout of :mod:`medquant.quant.packing` directly. It calls the custom op ``torch.ops.medquant.packed_linear``
(registered in :mod:`medquant.kernels.ops`), whose body runs the Triton kernels for CUDA tensors and the
plain-torch reference below (also the test oracle) elsewhere. Because the op is opaque to ``torch.compile`` and has
a fake (meta) implementation, a model of QuantLinear layers compiles with ``fullgraph=True``. Modules never know
which backend ran.
"""
from __future__ import annotations

import torch

from .. import kernels as _kernels  # noqa: F401  (registers the torch.ops.medquant custom ops)
from ..kernels.layout import unpack
from .core import dequantize_codes


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
    return torch.ops.medquant.packed_linear(x, qweight, scales, zeros, bits, symmetric, scope, group_elems, k)
