"""Plain-torch references of every kernel: the CPU path of the custom ops and the oracle of the tests.

Rounding is ``torch.round`` (half to even) on float32 values, exactly as in the quantizer
(:mod:`medquant.quant.core`); the Triton kernels reproduce it bit for bit with a floor-based formulation.

* :func:`fake_quantize_rows_reference` — per-row (per-sample) dynamic fake quantization, each row its own bits.
* :func:`fake_quantize_static_reference` — fake quantization with given scales / zero points.
* :func:`packed_linear_reference` — ``x @ W^T`` with ``W = weight.dequantize(x.dtype)`` (unpack, ``(u - z) * s``,
  matmul).

Argument checks shared by the references and the kernels live here too, so both backends reject the same
inputs with the same messages. Importing this module registers the references as the ``"torch"`` backend of the
three ops in :mod:`medquant.kernels.dispatch`, at the lowest priority: they accept every input and are the answer
whenever no faster kernel does.
"""
from __future__ import annotations

import math
import numbers
import operator

import torch

from .bundle import PackedWeight
from .dispatch import register_kernel

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
#: dtypes :func:`fake_quantize_rows_reference` takes (float64 is quantized in float32 arithmetic as well)
ROW_DTYPES = FLOAT_DTYPES + (torch.float64,)
#: rows with at least this many bits are passed through unchanged by :func:`fake_quantize_rows_reference`
PASSTHROUGH_BITS = 16
DEFAULT_ROW_EPS = float(torch.finfo(torch.float32).tiny)
_FLOAT32_MAX = float(torch.finfo(torch.float32).max)
#: priority of the reference kernels in the dispatch registry: below every other kernel
REFERENCE_PRIORITY = -1000


# ---------------------------------------------------------------------------------------------- checks
class DeviceMismatchError(RuntimeError, ValueError):
    """An input on another device than the tensors it is multiplied with (a quantized layer's packed weights).

    A ``RuntimeError``, the class torch raises for tensors on two devices (``nn.Linear(4, 4)(x.to("meta"))``), and
    a ``ValueError``, the class :func:`check_packed_input` raised for it before.
    """


def device_mismatch(owner: str, x_device: torch.device, weight_device: torch.device) -> DeviceMismatchError:
    """The error for an input on ``x_device`` given to ``owner`` (a layer class name) whose tensors are on
    ``weight_device``: it names both devices, what is accepted, and the ``.to()`` call that fixes it."""
    return DeviceMismatchError(
        f"{owner} got an input on device {x_device}, but its packed weights are on device {weight_device}; it "
        f"takes inputs on {weight_device} only: move the input with x.to({str(weight_device)!r}) or the layer "
        f"with layer.to({str(x_device)!r})")


def check_float(x: torch.Tensor, what: str, dtypes: tuple[torch.dtype, ...] = FLOAT_DTYPES) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{what} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in dtypes:
        names = [str(d).removeprefix("torch.") for d in dtypes]
        raise TypeError(f"{what} must be {', '.join(names[:-1])} or {names[-1]}, got {x.dtype}")


def check_bits_value(bits: int, symmetric: bool, what: str = "bits") -> None:
    if isinstance(bits, bool) or not isinstance(bits, int):
        raise TypeError(f"{what} must be an int, got {bits!r}")
    if not 1 <= bits <= 8:
        raise ValueError(f"{what}={bits} out of range: the kernels quantize to 1..8 bits")


def int_arg(value, what: str) -> int:
    """``value`` as an ``int``: any integer type (``int``, numpy ints, 0-d integer tensors), never a bool or a
    float (a fractional bit-width is an error, not truncated).

    Raises:
        TypeError: ``value`` is not an integer.
    """
    if isinstance(value, bool) or not hasattr(value, "__index__"):
        raise TypeError(f"{what} must be an int, got {value!r}")
    return operator.index(value)


def group_size_arg(group_size) -> int | None:
    """``None`` (tensor / channel scales) or a positive ``int`` (any integer type).

    Raises:
        ValueError: anything else (0, a negative number, a float, a bool).
    """
    if group_size is None:
        return None
    if isinstance(group_size, bool) or not hasattr(group_size, "__index__") or operator.index(group_size) <= 0:
        raise ValueError(f"group_size must be a positive int, got {group_size!r}")
    return operator.index(group_size)


def check_packed_input(x: torch.Tensor, weight: PackedWeight) -> None:
    """Validate the activations of ``packed_linear`` against a (validated) :class:`PackedWeight`.

    Raises:
        TypeError: ``x`` is not a float16 / bfloat16 / float32 tensor, or ``weight`` not a ``PackedWeight``.
        ValueError: ``x`` is not 2-D, or its last dimension is not ``weight.k``.
        DeviceMismatchError: ``x`` and the weight are on two devices (a ``RuntimeError`` and a ``ValueError``).
    """
    check_float(x, "x")
    if x.dim() != 2:
        raise ValueError(f"x must be 2-D (M, K), got shape {tuple(x.shape)}")
    if not isinstance(weight, PackedWeight):
        raise TypeError(f"weight must be a medquant.kernels.PackedWeight, got {type(weight).__name__}")
    if x.shape[1] != weight.k:
        raise ValueError(f"x has {x.shape[1]} input features but the packed weight holds K={weight.k}")
    if x.device != weight.device:
        raise device_mismatch("packed_linear", x.device, weight.device)


def rows_view(x: torch.Tensor) -> torch.Tensor:
    """``x`` as ``(shape[0], prod(shape[1:]))``: rows are samples (dynamic) or output channels (static).

    The column count is spelled out (not ``-1``), so inputs without rows, e.g. ``(0, T, C)``, view as ``(0, T*C)``.
    """
    if x.dim() == 0:
        raise ValueError("expected at least a 1-D tensor")
    return x.reshape(x.shape[0], math.prod(x.shape[1:])) if x.dim() != 2 else x


def row_eps_arg(eps) -> float:
    """``eps`` of :func:`fake_quantize_rows_reference` as a Python float: a real number (not a bool; a 0-d real
    tensor too) with ``0 < eps <= float32 max`` (the scales are float32).

    Raises:
        TypeError: ``eps`` is not a real number (a bool, a string, None...).
        ValueError: ``eps`` is NaN, infinite, zero, negative or past float32's range (each gave NaN rows, or
            backends that disagree, or torch's overflow error).
    """
    real_tensor = (isinstance(eps, torch.Tensor) and eps.dim() == 0 and eps.dtype != torch.bool
                   and not eps.is_complex())
    if isinstance(eps, bool) or not (isinstance(eps, numbers.Real) or real_tensor):
        raise TypeError(f"eps must be a positive finite float (the smallest scale of a row), got {eps!r}")
    v = float(eps)
    if not (math.isfinite(v) and 0.0 < v <= _FLOAT32_MAX):
        raise ValueError(f"eps must be a positive finite float32 number (the smallest scale of a row, "
                         f"0 < eps <= {_FLOAT32_MAX!r}), got {eps!r}; the default is {DEFAULT_ROW_EPS!r}, the "
                         f"smallest normal float32")
    return v


def check_row_bits(bits_per_row: torch.Tensor, n_rows: int, symmetric: bool) -> None:
    if bits_per_row.dim() != 1 or bits_per_row.numel() != n_rows:
        raise ValueError(f"bits_per_row must hold one entry per row ({n_rows}), got shape "
                         f"{tuple(bits_per_row.shape)}")
    if bits_per_row.dtype.is_floating_point or bits_per_row.dtype == torch.bool:
        raise TypeError(f"bits_per_row must be an integer tensor, got {bits_per_row.dtype}")
    if n_rows == 0:
        return
    b = bits_per_row.to(torch.int64)
    low = 2 if symmetric else 1
    bad = ((b < low) | (b > 8)) & (b < PASSTHROUGH_BITS)
    if bool(bad.any()):
        raise ValueError(
            f"bits_per_row has values {sorted(set(b[bad].tolist()))}; accepted: {low}..8 "
            f"({'symmetric' if symmetric else 'asymmetric'}) or >= {PASSTHROUGH_BITS} (left in floating point)"
        )


_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1


def _bit_width(value, what: str) -> int:
    """One bit-width as a Python int, clamped to int64 (every width >= 16 means the same, and below the range
    stays below it); bools, floats and other non-integers raise a TypeError."""
    if isinstance(value, bool) or (isinstance(value, torch.Tensor) and value.dtype == torch.bool) \
            or not hasattr(value, "__index__"):
        raise TypeError(f"bits_per_row must be an int, an integer tensor or a sequence of ints, got {what}")
    try:
        b = operator.index(value)
    except TypeError:  # a float 0-d tensor or numpy float has __index__ but refuses it
        raise TypeError(f"bits_per_row must be an int, an integer tensor or a sequence of ints, got {what}") from None
    return min(max(b, _INT64_MIN), _INT64_MAX)


def as_bits_tensor(bits_per_row, device: torch.device, n_rows: int | None = None) -> torch.Tensor:
    """``bits_per_row`` as a tensor on ``device``: a tensor as given, a sequence of ints (Python or numpy ints,
    0-d integer tensors) as an int64 vector, one int (a Python or numpy int, or a 0-d tensor) repeated for each of
    the ``n_rows`` rows (when ``n_rows`` is given).

    Python ints beyond int64 are clamped to it (any width ``>= 16`` is a float row, any below the range stays
    below it), so a list takes every width its int64 tensor takes, however far past int32.

    Raises:
        TypeError: a bool, a float or another non-integer given as the one bit-width or inside the sequence.
    """
    if isinstance(bits_per_row, torch.Tensor):
        bits = bits_per_row.to(device=device)
        if bits.dim() == 0 and n_rows is not None:
            return bits.reshape(1).repeat(n_rows)
        return bits
    if n_rows is not None and not hasattr(bits_per_row, "__len__"):  # one bit-width for every row
        return torch.full((n_rows,), _bit_width(bits_per_row, repr(bits_per_row)), dtype=torch.int64, device=device)
    values = [_bit_width(v, f"{v!r} (entry {i} of the {type(bits_per_row).__name__})")
              for i, v in enumerate(bits_per_row)]
    return torch.tensor(values, dtype=torch.int64, device=device)


# ---------------------------------------------------------------------------------------------- fake-quant
def fake_quantize_rows_reference(
    x: torch.Tensor,
    bits_per_row: torch.Tensor,
    symmetric: bool,
    eps: float = DEFAULT_ROW_EPS,
    return_mask: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Per-row dynamic fake quantization; row ``r`` of ``x`` (viewed as ``(R, C)``) uses ``b_r`` bits.

    All arithmetic in float32 (``x`` is converted, also from float64), result cast back to ``x.dtype``:

    * asymmetric: ``lo = min(min_r, 0)``, ``hi = max(max_r, 0)``, ``s = max((hi - lo) / (2^b - 1), eps)``,
      ``z = clamp(round(-lo / s), 0, 2^b - 1)``, ``q = clamp(round(x / s) + z, 0, 2^b - 1)``,
      ``out = (q - z) * s``;
    * symmetric (``b >= 2``): ``q_max = 2^(b-1) - 1``, ``s = max(absmax_r / q_max, eps)``,
      ``q = clamp(round(x / s), -q_max, q_max)``, ``out = q * s``;
    * ``b >= 16``: ``out = x`` (left in floating point).

    ``eps`` (default: the smallest normal float32) keeps an all-zero row at ``s = eps`` and exact, never NaN;
    it is the same clamp-after-divide rule as :func:`medquant.quant.core.compute_qparams` with float32 scales.
    With ``return_mask`` also returns the straight-through mask: True where the unclamped code
    (``round(x/s) + z``, or ``round(x/s)`` when symmetric) lies inside the clamp range.

    Args:
        x: float16 / bfloat16 / float32 / float64 tensor, viewed as ``(R, C)`` with ``R = x.shape[0]``
            (activations: one row per sample or token).
        bits_per_row: ``(R,)`` integer bit-widths (or one int for every row): 1..8 asymmetric, 2..8 symmetric,
            ``>= 16`` leaves the row unchanged.
        symmetric: zero point 0 and codes in ``[-q_max, q_max]`` (else an affine grid over ``[lo, hi]``).
        eps: lower bound of the scale, ``0 < eps <= float32 max``; the default is the smallest normal float32.
        return_mask: also return the straight-through mask.

    Returns:
        The fake-quantized tensor (shape and dtype of ``x``), or ``(out, mask)`` with a boolean mask of the
        same shape when ``return_mask``.

    Raises:
        ValueError: a bit-width outside the accepted range, a ``bits_per_row`` of the wrong length, or an ``eps``
            that is not a positive finite float32 number.
        TypeError: ``x`` is not a supported floating dtype, or ``eps`` not a real number.
    """
    check_float(x, "x", ROW_DTYPES)
    eps = row_eps_arg(eps)
    x2 = rows_view(x)
    bits_per_row = as_bits_tensor(bits_per_row, x.device, x2.shape[0])
    check_row_bits(bits_per_row, x2.shape[0], symmetric)
    if x2.numel() == 0:  # no rows or no columns: nothing to reduce (amin / amax refuse an empty row)
        out = x.clone()
        return (out, torch.ones_like(out, dtype=torch.bool)) if return_mask else out
    xf = x2.float()
    b = bits_per_row.to(device=x.device, dtype=torch.int64)
    passthrough = (b >= PASSTHROUGH_BITS)[:, None]
    bq = torch.where(b >= PASSTHROUGH_BITS, torch.full_like(b, 8), b)
    if symmetric:
        qmax = (2 ** (bq - 1) - 1).float()[:, None]
        s = (xf.abs().amax(1, keepdim=True) / qmax).clamp_min(eps)
        r = torch.round(xf / s)
        lo, hi = -qmax, qmax
        out = (torch.minimum(torch.maximum(r, lo), hi) + 0.0) * s  # + 0.0: code -0 -> +0, as stored codes
    else:
        qmax = (2**bq - 1).float()[:, None]
        mn = xf.amin(1, keepdim=True).clamp_max(0)
        mx = xf.amax(1, keepdim=True).clamp_min(0)
        s = ((mx - mn) / qmax).clamp_min(eps)
        z = torch.minimum(torch.maximum(torch.round(-mn / s), torch.zeros_like(qmax)), qmax)
        r = torch.round(xf / s) + z
        lo, hi = torch.zeros_like(qmax), qmax
        out = (torch.minimum(torch.maximum(r, lo), hi) - z) * s
    out = torch.where(passthrough, x2, out.to(x.dtype)).reshape(x.shape)
    if not return_mask:
        return out
    inside = ((r >= lo) & (r <= hi)) | passthrough
    return out, inside.reshape(x.shape)


def check_static_args(x2, scales, zeros, bits, symmetric, group_size) -> None:
    check_float(x2, "x")
    check_bits_value(bits, symmetric)
    n, k = x2.shape
    if not isinstance(scales, torch.Tensor) or scales.dtype not in FLOAT_DTYPES:
        raise TypeError("scales must be a float16/bfloat16/float32 tensor")
    if scales.dim() != 2:
        raise ValueError(f"scales must be 2-D, got shape {tuple(scales.shape)}")
    if group_size is None:
        if tuple(scales.shape) not in ((1, 1), (n, 1)):
            raise ValueError(f"scales of shape {tuple(scales.shape)} fit neither tensor scope (1, 1) nor channel "
                             f"scope ({n}, 1); pass group_size for group scales")
    else:
        group_size_arg(group_size)
        need = -(-k // group_size)
        if scales.shape[0] != n or scales.shape[1] < need:
            raise ValueError(f"group scales for ({n}, {k}) with group_size {group_size} need shape ({n}, >= {need}), "
                             f"got {tuple(scales.shape)}")
    if symmetric:
        if zeros is not None:
            raise ValueError("symmetric quantization has no zero points: pass zeros=None")
    else:
        if zeros is None:
            raise ValueError("asymmetric quantization needs zero points (zeros is None)")
        if not isinstance(zeros, torch.Tensor) or zeros.shape != scales.shape:
            raise ValueError(f"zeros must have the shape of scales {tuple(scales.shape)}")
    if scales.device != x2.device or (zeros is not None and zeros.device != x2.device):
        raise ValueError("x, scales and zeros must be on one device")


def fake_quantize_static_reference(
    x: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    bits: int,
    symmetric: bool,
    group_size: int | None = None,
    return_mask: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Fake quantization of ``x`` (viewed as ``(N, K)``, rows = output channels) with given parameters.

    ``scales`` (and ``zeros``) are ``(1, 1)`` (tensor), ``(N, 1)`` (channel) or ``(N, G)`` with ``group_size``
    (element ``k`` uses group ``k // group_size``). In float32, result cast to ``x.dtype``:

    * symmetric ``b >= 2``: ``out = clamp(round(x / s), -q_max, q_max) * s``;  1-bit: ``out = s`` if ``x >= 0``
      else ``-s`` (codes ``u = [x >= 0]``, ``(2u - 1) * s``);
    * asymmetric: ``out = (clamp(round(x / s) + z, 0, 2^b - 1) - z) * s``.

    Given the parameters of :func:`medquant.quant.core.compute_qparams` this is bit-identical to
    :func:`medquant.quant.core.fake_quantize`. The mask (``return_mask``) is True where the unclamped code lies
    inside the clamp range.

    Args:
        x: float tensor viewed as ``(N, K)`` (rows = output channels; a conv weight is flattened per channel).
        scales: ``(1, 1)``, ``(N, 1)`` or ``(N, ceil(K / group_size))`` positive scales.
        zeros: zero points of the same shape (codes, in ``[0, 2^bits - 1]``); ``None`` when ``symmetric``.
        bits: code width, 1..8.
        symmetric: codes in ``[-q_max, q_max]`` with ``q_max = 2^(bits-1) - 1`` (1 bit: the sign), no zero point.
        group_size: elements per group along K for group scales; ``None`` for tensor / channel scales.
        return_mask: also return the straight-through mask.

    Returns:
        The fake-quantized tensor (shape and dtype of ``x``), or ``(out, mask)`` when ``return_mask``.

    Raises:
        ValueError: parameter shapes that do not match ``x`` and ``group_size``, ``zeros`` missing for an
            asymmetric grid, or ``bits`` out of range.
    """
    x2 = rows_view(x)
    check_static_args(x2, scales, zeros, bits, symmetric, group_size)
    n, k = x2.shape
    xf = x2.float()

    def expand(p: torch.Tensor) -> torch.Tensor:
        p = p.float()
        if group_size is not None:
            p = p.repeat_interleave(group_size, dim=1)[:, :k]
        return p.expand(n, k)

    s = expand(scales)
    r = torch.round(xf / s)
    if symmetric:
        if bits == 1:
            out = torch.where(xf >= 0, s, -s)
            lo, hi = -1.0, 1.0
        else:
            qmax = float(2 ** (bits - 1) - 1)
            lo, hi = -qmax, qmax
            out = (r.clamp(lo, hi) + 0.0) * s  # + 0.0: code -0 -> +0, as stored codes
    else:
        z = expand(zeros)
        r = r + z
        lo, hi = 0.0, float(2**bits - 1)
        out = (r.clamp(lo, hi) - z) * s
    out = out.to(x.dtype).reshape(x.shape)
    if not return_mask:
        return out
    return out, ((r >= lo) & (r <= hi)).reshape(x.shape)


def packed_linear_reference(x: torch.Tensor, weight: PackedWeight) -> torch.Tensor:
    """``x (M, k) @ W^T -> (M, n)`` with ``W = weight.dequantize(x.dtype)``: unpack, ``(u - z) * s``, matmul.

    The reference every packed-linear backend is tested against.

    Args:
        x: ``(M, k)`` float input (``k = weight.k``, the unpadded in-features).
        weight: the packed weight (``n`` rows of ``k`` codes, its scales and zero points).

    Returns:
        ``(M, n)`` output in ``x.dtype`` (no bias: the caller adds it).

    Raises:
        ValueError: ``x`` is not 2-D or its last dimension is not ``weight.k``.
    """
    check_packed_input(x, weight)
    return x @ weight.dequantize(x.dtype).t()


# ---------------------------------------------------------------------------------------------- registration
def _rows_kernel(x2, bits, symmetric, eps, want_mask):
    res = fake_quantize_rows_reference(x2, bits, symmetric, eps, return_mask=want_mask)
    return res if want_mask else (res, None)


def _static_kernel(x2, scales, zeros, bits, symmetric, group_size, want_mask):
    res = fake_quantize_static_reference(x2, scales, zeros, bits, symmetric, group_size, return_mask=want_mask)
    return res if want_mask else (res, None)


register_kernel("packed_linear", "torch", packed_linear_reference, priority=REFERENCE_PRIORITY)
register_kernel("fake_quantize_rows", "torch", _rows_kernel, priority=REFERENCE_PRIORITY)
register_kernel("fake_quantize_static", "torch", _static_kernel, priority=REFERENCE_PRIORITY)
