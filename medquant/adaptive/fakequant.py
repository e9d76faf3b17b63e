"""Per-sample dynamic fake quantization of activations (SPEC section 3, seed 000).

Each sample ``i`` of a batch (row ``i`` of ``x`` viewed as ``(B, -1)``) is quantized with its own bit-width
``b_i``, asymmetric, with the range taken from that sample's own values and widened to include zero (the
asymmetric convention of SPEC section 1, so an exact zero stays exact)::

    lo_i = min(min_j x_ij, 0),   hi_i = max(max_j x_ij, 0)
    L_i  = 2^b_i - 1
    s_i  = max((hi_i - lo_i) / L_i, eps)                 (eps = smallest normal float32: all-zero rows stay exact)
    z_i  = clamp(round(-lo_i / s_i), 0, L_i)
    q_ij = clamp(round(x_ij / s_i) + z_i, 0, L_i)
    out_ij = (q_ij - z_i) * s_i

Rows with ``b_i >= 16`` pass through unchanged (16/32 = "keep floating point"). Arithmetic is float32 (the
input is upcast; the result is cast back to ``x.dtype``); ``torch.round`` rounds half to even. Backward is the
straight-through estimator: ``d out / d x = 1`` (quantization in the training loop).

This is *simulated* quantization: it changes the values the next layer sees (and therefore accuracy), not the
speed or the memory of the computation.

On CUDA, when the Triton kernel ``medquant.kernels.fake_quantize_rows`` is importable it is used (same formula);
everywhere else the torch code below runs. The torch code is also the reference the tests compare against.
"""
from __future__ import annotations

import torch

PASSTHROUGH_BITS = 16
ROW_EPS = float(torch.finfo(torch.float32).tiny)
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

_KERNEL = None  # cached: False = not available, else the function


def _kernel():
    global _KERNEL
    if _KERNEL is None:
        try:
            from ..kernels import fake_quantize_rows as fn  # lazy: optional

            _KERNEL = fn
        except Exception:  # noqa: BLE001 - kernels missing or broken: the torch path is always correct
            _KERNEL = False
    return _KERNEL or None


def check_bits(bits: torch.Tensor, n_rows: int) -> torch.Tensor:
    """Validate a per-row bit tensor: integers, one per row, each in 1..8 or >= 16. Returns it as int64."""
    if not isinstance(bits, torch.Tensor):
        bits = torch.as_tensor(bits)
    if bits.dtype.is_floating_point or bits.dtype == torch.bool or bits.is_complex():
        raise TypeError(f"bits must be an integer tensor, got {bits.dtype}")
    if bits.dim() != 1 or bits.numel() != n_rows:
        raise ValueError(f"bits must hold one entry per sample ({n_rows}), got shape {tuple(bits.shape)}")
    b = bits.to(torch.int64)
    bad = ((b < 1) | (b > 8)) & (b < PASSTHROUGH_BITS)
    if bool(bad.any()):
        raise ValueError(f"bit-widths {sorted(set(b[bad].tolist()))} are not accepted: use 1..8 (quantized) "
                         f"or >= {PASSTHROUGH_BITS} (left in floating point)")
    return b


def _fq_rows_torch(x2: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    passthrough = b >= PASSTHROUGH_BITS
    bq = torch.where(passthrough, torch.full_like(b, 8), b)
    qmax = (torch.pow(2.0, bq.float()) - 1.0)[:, None]
    xf = x2.float()
    lo, hi = torch.aminmax(xf, dim=1, keepdim=True)
    lo, hi = lo.clamp_max(0.0), hi.clamp_min(0.0)
    s = ((hi - lo) / qmax).clamp_min(ROW_EPS)
    zero = torch.zeros_like(qmax)
    z = torch.clamp(torch.round(-lo / s), min=zero, max=qmax)
    # in place on a fresh tensor: round(x / s) + z, clamped to [0, 2^b - 1], minus z, times s
    q = torch.div(xf, s).round_().add_(z)
    q = torch.clamp(q, min=zero, max=qmax, out=q).sub_(z).mul_(s)
    out = q if q.dtype == x2.dtype else q.to(x2.dtype)
    if bool(passthrough.any()):
        out = torch.where(passthrough[:, None], x2, out)
    return out


def fake_quantize_per_sample(x: torch.Tensor, bits, *, backend: str = "auto") -> torch.Tensor:
    """Fake-quantize each sample of ``x`` (dim 0 = batch) with its own bit-width; straight-through gradient.

    Args:
        x: float tensor ``(B, ...)``; every sample is flattened to one vector for its min/max.
        bits: ``B`` integers (tensor or sequence), each 1..8 or >= 16 (passthrough).
        backend: ``"auto"`` (Triton kernel for CUDA tensors when available, torch otherwise) or ``"torch"``.

    Returns a tensor of ``x``'s shape and dtype. Formula: module docstring (SPEC section 3).
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"x must be a floating-point tensor, got {x.dtype}")
    if x.dim() == 0:
        raise ValueError("x must have a batch dimension (dim 0)")
    if backend not in ("auto", "torch"):
        raise ValueError(f"backend must be 'auto' or 'torch', got {backend!r}")
    b = check_bits(bits if isinstance(bits, torch.Tensor) else torch.as_tensor(list(bits)), x.shape[0])
    b = b.to(x.device)
    if x.numel() == 0 or bool((b >= PASSTHROUGH_BITS).all()):
        return x
    x2 = x.reshape(x.shape[0], -1)
    fn = _kernel() if (backend == "auto" and x.is_cuda and x.dtype != torch.float64) else None
    if fn is not None:  # pragma: no cover - GPU only
        return fn(x, b.to(torch.int32), False).reshape(x.shape)
    return _STE.apply(x2, b).reshape(x.shape)


class _STE(torch.autograd.Function):
    """Forward: per-row fake quantization; backward: identity (straight-through estimator)."""

    @staticmethod
    def forward(ctx, x2, b):
        return _fq_rows_torch(x2, b)

    @staticmethod
    def backward(ctx, grad):
        return grad, None
