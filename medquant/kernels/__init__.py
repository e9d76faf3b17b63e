"""Triton kernels (with plain-torch references) for low-bit fake quantization and packed weight-only matmuls.

Public functions (each goes through a ``torch.library`` custom op, so ``torch.compile(fullgraph=True)`` sees one
opaque node, and autograd works):

* :func:`packed_linear` — ``y = x @ dequant(W_q)^T`` reading the packed layout (format v1) directly; Triton on
  CUDA (GEMV / split-K / tiled GEMM chosen by M, see :mod:`medquant.kernels.packed`), torch reference on CPU.
* :func:`fake_quantize_rows` — per-row (per-sample) dynamic fake quantization, each row its own bit-width;
  straight-through backward.
* :func:`fake_quantize_static` — fake quantization with given per-tensor / per-channel / per-group scales
  (and zero points); straight-through backward.
* :func:`triton_available`, :func:`force_backend`.

``backend="auto"`` (default) runs Triton for CUDA tensors and the torch reference elsewhere; ``"triton"`` forces
the kernels (on CPU tensors this needs ``TRITON_INTERPRET=1`` set before Triton is imported — that is how the
tests run them), ``"torch"`` forces the reference. A forced backend is for eager code (tests, benchmarks).

Triton itself is imported only when a kernel first runs, never by ``import medquant``.
"""
from __future__ import annotations

import torch

from . import ops  # noqa: F401  (registers the medquant:: custom ops)
from ._runtime import force_backend, interpreting, triton_available
from .packed import GEMV_MAX_M, SPLITK_MAX_M, select_regime
from .reference import (
    DEFAULT_ROW_EPS,
    as_bits_tensor,
    check_float,
    fake_quantize_rows_reference,
    fake_quantize_static_reference,
    packed_linear_reference,
    rows_view,
)


def _call(backend: str, fn, *args):
    if backend == "auto":
        return fn(*args)
    with force_backend(backend):
        return fn(*args)


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
    *,
    backend: str = "auto",
) -> torch.Tensor:
    """``x (..., k) @ dequant(qweight)^T -> (..., N)`` in ``x.dtype``, reading the packed layout as stored.

    ``dequant(W)[n, j] = (u[n, j] - z) * s[n, j // group_elems]`` with ``z = 2^(b-1)`` for symmetric rows (1-bit
    symmetric: ``(2u - 1) * s``); ``scales``/``zeros`` are ``(N, K_pad / group_elems)`` (group scope),
    ``(N, 1)`` (channel) or ``(1, 1)`` (tensor). Same positional signature as
    :func:`medquant.quant.matmul.packed_linear`.
    """
    check_float(x, "x")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1]) if x.dim() != 2 else x
    y = _call(backend, torch.ops.medquant.packed_linear, x2, qweight, scales, zeros, int(bits), bool(symmetric),
              scope, int(group_elems), int(k))
    return y if x.dim() == 2 else y.reshape(*lead, y.shape[-1])


def fake_quantize_rows(
    x: torch.Tensor,
    bits_per_row,
    symmetric: bool = False,
    *,
    mask_outside: bool = False,
    eps: float = DEFAULT_ROW_EPS,
    backend: str = "auto",
) -> torch.Tensor:
    """Per-row dynamic fake quantization: row ``r`` of ``x`` (viewed as ``(shape[0], -1)``) uses ``b_r`` bits.

    Asymmetric: ``lo = min(min_r, 0)``, ``hi = max(max_r, 0)``, ``s = max((hi - lo) / (2^b - 1), eps)``,
    ``z = clamp(round(-lo / s), 0, 2^b - 1)``, ``out = (clamp(round(x / s) + z, 0, 2^b - 1) - z) * s``.
    Symmetric: ``s = max(absmax_r / (2^(b-1) - 1), eps)``, ``out = clamp(round(x / s), -q_max, q_max) * s``.
    Rows with ``b >= 16`` are returned unchanged. ``bits_per_row``: int tensor or sequence (1..8 asymmetric,
    2..8 symmetric, or >= 16). Backward: straight-through (``mask_outside=True``: zero where the code was clamped).
    This is simulated quantization: it changes the values, not the speed.
    """
    check_float(x, "x")
    x2 = rows_view(x)
    bits = as_bits_tensor(bits_per_row, x.device)
    out, _ = _call(backend, torch.ops.medquant.fake_quantize_rows, x2.contiguous(), bits, bool(symmetric),
                   float(eps), bool(mask_outside))
    return out.reshape(x.shape)


def fake_quantize_static(
    x: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    bits: int,
    symmetric: bool,
    group_size: int | None = None,
    *,
    mask_outside: bool = False,
    backend: str = "auto",
) -> torch.Tensor:
    """Fake quantization of ``x`` (viewed as ``(N, K)``) with given scales / zero points.

    ``scales`` (and ``zeros``, asymmetric only) are ``(1, 1)`` per tensor, ``(N, 1)`` per channel, or
    ``(N, G)`` per group with ``group_size`` (element ``k`` uses group ``k // group_size``).
    Symmetric: ``out = clamp(round(x / s), -q_max, q_max) * s`` (1-bit: ``sign(x) * s``, ``x = 0 -> +s``);
    asymmetric: ``out = (clamp(round(x / s) + z, 0, 2^b - 1) - z) * s``. With the parameters of
    :func:`medquant.quant.core.compute_qparams` this equals :func:`medquant.quant.core.fake_quantize` bit for bit.
    Backward: straight-through (``mask_outside=True``: zero where the code was clamped).
    """
    check_float(x, "x")
    x2 = rows_view(x)
    out, _ = _call(backend, torch.ops.medquant.fake_quantize_static, x2.contiguous(), scales, zeros, int(bits),
                   bool(symmetric), int(group_size or 0), bool(mask_outside))
    return out.reshape(x.shape)


__all__ = [
    "GEMV_MAX_M",
    "SPLITK_MAX_M",
    "fake_quantize_rows",
    "fake_quantize_rows_reference",
    "fake_quantize_static",
    "fake_quantize_static_reference",
    "force_backend",
    "interpreting",
    "packed_linear",
    "packed_linear_reference",
    "select_regime",
    "triton_available",
]
