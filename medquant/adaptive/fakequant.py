"""Per-sample dynamic fake quantization of activations.

Each sample ``i`` of a batch (row ``i`` of ``x`` viewed as ``(B, -1)``) is quantized with its own bit-width
``b_i``, asymmetric, with the range taken from that sample's own values and widened to include zero (the
quantizer's asymmetric convention, so an exact zero stays exact)::

    lo_i = min(min_j x_ij, 0),   hi_i = max(max_j x_ij, 0)
    L_i  = 2^b_i - 1
    s_i  = max((hi_i - lo_i) / L_i, eps)                 (eps = smallest normal float32: all-zero rows stay exact)
    z_i  = clamp(round(-lo_i / s_i), 0, L_i)
    q_ij = clamp(round(x_ij / s_i) + z_i, 0, L_i)
    out_ij = (q_ij - z_i) * s_i

Rows with ``b_i >= 16`` pass through unchanged (16/32 = "keep floating point"). Arithmetic is float32 (the
input is converted, float64 included; the result is cast back to ``x.dtype``); ``torch.round`` rounds half to
even. So a sample whose range ``hi_i - lo_i`` exceeds float32's largest value (about 3.4e38; float64 values
beyond it become inf on conversion) comes out as NaN: such activations are beyond what a float32 model carries,
and the op adds no pass over ``x`` to look for them. Likewise a NaN anywhere in a sample makes that sample's
``lo_i`` / ``hi_i`` NaN and so *every* value of the sample NaN (the next linear layer would spread it over the
sample's outputs anyway); other samples are unaffected. Backward is the straight-through estimator:
``d out / d x = 1`` (quantization in the training loop).

This is *simulated* quantization: it changes the values the next layer sees (and therefore accuracy), not the
speed or the memory of the computation.

The computation is the kernel layer's per-row op, :func:`medquant.kernels.fake_quantize_rows` (asymmetric, no
clamp mask): the Triton kernel for CUDA float16/bfloat16/float32 tensors, the torch reference everywhere else.
"""
from __future__ import annotations

import torch

from ..kernels import DEFAULT_ROW_EPS, PASSTHROUGH_BITS, fake_quantize_rows
from ..kernels.reference import check_row_bits

ROW_EPS = DEFAULT_ROW_EPS
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

__all__ = ["FLOAT_DTYPES", "PASSTHROUGH_BITS", "ROW_EPS", "check_bits", "fake_quantize_per_sample"]


def _as_bits(bits, n_rows: int | None = None) -> torch.Tensor:
    """``bits`` as a tensor: a tensor as it is, a sequence through ``torch.as_tensor`` (an empty one as int64, not
    torch's float32 default); a bare number or string is a ``TypeError`` (``n_rows``: how many the message asks)."""
    if not isinstance(bits, torch.Tensor):
        if isinstance(bits, (str, bytes)) or not hasattr(bits, "__iter__"):
            many = f"{n_rows} integers" if n_rows is not None else "integers"
            raise TypeError(f"bits must hold one bit-width per sample (a sequence or 1-D tensor of {many}), got "
                            f"{type(bits).__name__} {bits!r}; for one width for all: [b] * len(x)")
        seq = list(bits)
        bits = torch.as_tensor(seq) if seq else torch.zeros(0, dtype=torch.int64)
    if bits.is_complex():
        raise TypeError(f"bits must be an integer tensor, got {bits.dtype}")
    return bits


def check_bits(bits: torch.Tensor, n_rows: int) -> torch.Tensor:
    """Validate a per-row bit tensor: integers, one per row, each in 1..8 or >= 16.

    The rule is the kernels' per-row check for asymmetric rows (:func:`medquant.kernels.reference.check_row_bits`):
    activations are quantized per sample with their own min/max, so 1 bit is allowed.

    Args:
        bits: a tensor (or anything ``torch.as_tensor`` takes) of per-row bit-widths.
        n_rows: how many rows (samples) the bits are for.

    Returns:
        ``bits`` as an int64 tensor.

    Raises:
        TypeError: ``bits`` is not an integer tensor (floating point, complex or bool).
        ValueError: ``bits`` is not 1-D with ``n_rows`` entries, or an entry is outside 1..8 and below 16.
    """
    bits = _as_bits(bits, n_rows)
    check_row_bits(bits, n_rows, symmetric=False)
    return bits.to(torch.int64)


def fake_quantize_per_sample(x: torch.Tensor, bits, *, backend: str = "auto") -> torch.Tensor:
    """Fake-quantize each sample of ``x`` (dim 0 = batch) with its own bit-width; straight-through gradient.

    The bits are checked once: by the kernel op (:func:`medquant.kernels.fake_quantize_rows`, which runs
    :func:`medquant.kernels.reference.check_row_bits`), or here by :func:`check_bits` when the op is skipped
    (an empty ``x``, or every sample passing through); the errors are the same either way.

    Args:
        x: float tensor ``(B, ...)``; every sample is flattened to one vector for its min/max.
        bits: ``B`` integers (a 1-D tensor or a sequence), each 1..8 or >= 16 (passthrough); a 0-d tensor is
            refused like any other shape that is not ``(B,)``.
        backend: ``"auto"`` (the kernel layer's choice: Triton for CUDA tensors when available, torch otherwise)
            or ``"torch"`` (the torch reference).

    Returns:
        A tensor of ``x``'s shape and dtype (``x`` itself when every sample passes through). Formula: module
        docstring.

    Raises:
        TypeError: ``x`` is not a floating-point tensor, or ``bits`` is not an integer tensor / sequence.
        ValueError: ``x`` has no batch dimension, ``backend`` is unknown, or ``bits`` does not hold one entry
            per sample, each 1..8 or >= 16.
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"x must be a floating-point tensor, got {x.dtype}")
    if x.dim() == 0:
        raise ValueError("x must have a batch dimension (dim 0)")
    if backend not in ("auto", "torch"):
        raise ValueError(f"backend must be 'auto' or 'torch', got {backend!r}")
    b = _as_bits(bits, x.shape[0]).to(x.device)
    # the op would broadcast a 0-d tensor to every row; one entry per sample is the contract: check_bits refuses it
    if b.dim() != 1 or x.numel() == 0 or bool((b >= PASSTHROUGH_BITS).all()):  # the op does not run: check here
        check_bits(b, x.shape[0])  # raises for every shape but (B,)
        return x
    return fake_quantize_rows(x, b, False, eps=ROW_EPS, backend=backend)  # the op checks the bits
