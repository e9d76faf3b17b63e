"""Low-bit kernels: the packed layout, the packed-weight bundle, torch references, custom ops, Triton, dispatch.

The bottom layer of medquant: it imports only torch (Triton lazily, when a kernel first runs), never
``medquant.quant`` or anything above it.

* :mod:`medquant.kernels.layout` — the packed weight layout (format v2: v1's containers plus the dense 3/5/6/7-bit
  bit stream): ``pack``, ``unpack``, ``padded_k``, ``container_bits``, ``storage_bits``, ``dequantize_codes``.
* :class:`PackedWeight` — one packed row group (codes, scales, zeros, bits, symmetric, scope, group size, k).
* :func:`packed_linear` — ``y = x @ dequant(W)^T`` reading the packed layout directly; Triton on CUDA
  (GEMV / split-K / tiled GEMM chosen by M, see :mod:`medquant.kernels.packed`); on CPU torch's weight-only
  int4 / int8 kernels or a dense GEMM (:mod:`medquant.kernels.cpu`), the torch reference where neither fits.
* :func:`fake_quantize_rows` — per-row (per-sample) dynamic fake quantization, each row its own bit-width;
  straight-through backward.
* :func:`fake_quantize_static` — fake quantization with given per-tensor / per-channel / per-group scales
  (and zero points); straight-through backward.
* :mod:`medquant.kernels.dispatch` — which backend runs (:func:`force_backend`, :func:`triton_available`,
  :func:`register_backend`, :func:`register_kernel`).

Each public function goes through a ``torch.library`` custom op, so ``torch.compile(fullgraph=True)`` sees one
opaque node, and autograd works. ``backend="auto"`` (default) lets the dispatch registry choose: Triton for CUDA
tensors; for ``packed_linear`` on CPU tensors the CPU backend (:mod:`medquant.kernels.cpu`, computing in its
compute dtype: bfloat16 by default on a CPU with native bf16 arithmetic, else float32) wherever it takes the row
group; the torch reference otherwise. ``"triton"`` forces the kernels (on CPU tensors this needs
``TRITON_INTERPRET=1`` set before Triton is imported — that is how the tests run them), ``"cpu"`` the CPU backend,
``"torch"`` the reference. A forced backend is for eager code (tests, benchmarks).
"""
from __future__ import annotations

import math

import torch

from . import fakequant as _fakequant  # noqa: F401  (registers the Triton fake-quant kernels)
from . import ops  # noqa: F401  (registers the medquant:: custom ops)
from .bundle import PackedWeight
from .cpu import (  # importing registers the CPU backend
    clear_cpu_cache,
    cpu_cache_bytes,
    cpu_features,
    cpu_path,
    forget_cpu_plans,
    get_cpu_compute_dtype,
    get_cpu_int4_kernel,
    get_cpu_native4_activations,
    get_cpu_prefill_kernel,
    set_cpu_compute_dtype,
    set_cpu_dense_min_m,
    set_cpu_int4_kernel,
    set_cpu_native4_activations,
    set_cpu_prefill_kernel,
    set_layer_compute_dtype,
    tensor_version,
)
from .dispatch import (
    _end_builtin_registration,
    backend_names,
    force_backend,
    interpreting,
    register_backend,
    register_kernel,
    select_kernel,
    triton_available,
    unregister_backend,
)
from .dispatch import generation as dispatch_generation
from .dispatch import prepare as dispatch_prepare
from .dispatch import run as dispatch_run
from .layout import FORMAT_VERSION
from .packed import GEMV_MAX_M, SPLITK_MAX_M, select_regime
from .reference import (
    DEFAULT_ROW_EPS,
    PASSTHROUGH_BITS,
    ROW_DTYPES,
    DeviceMismatchError,
    as_bits_tensor,
    check_float,
    check_packed_input,
    device_mismatch,
    fake_quantize_rows_reference,
    fake_quantize_static_reference,
    group_size_arg,
    int_arg,
    packed_linear_reference,
    row_eps_arg,
    rows_view,
)

_end_builtin_registration()  # kernels registered from here on are the user's (input-dependent predicates)


def _call(backend: str, fn, *args):
    if backend == "auto":
        return fn(*args)
    with force_backend(backend):
        return fn(*args)


def eager_inference(x: torch.Tensor) -> bool:
    """Whether a call on ``x`` may skip the custom op and run its body directly (same kernel choice and result).

    That is the case for a plain CPU tensor that needs no gradient and is not traced by ``torch.compile`` /
    export.

    Args:
        x: the activations of the call.

    Returns:
        True for eager CPU inference.
    """
    return (type(x) is torch.Tensor and x.device.type == "cpu"
            and not (x.requires_grad and torch.is_grad_enabled()) and not torch.compiler.is_compiling())


def packed_linear(x: torch.Tensor, weight: PackedWeight, *, backend: str = "auto") -> torch.Tensor:
    """``x (..., k) @ dequant(weight)^T -> (..., n)`` in ``x.dtype``, reading the packed layout as stored.

    ``dequant(W)[n, j] = (u[n, j] - z) * s[n, j // group_elems]`` with ``z = 2^(b-1)`` for symmetric rows
    (1-bit symmetric: ``(2u - 1) * s``); see :class:`PackedWeight` for the shapes. Backward:
    ``dL/dx = dL/dy @ dequant(W)``. The bundle is spelled out into the positional arguments of
    ``torch.ops.medquant.packed_linear`` here and only here.

    Eager CPU inference (:func:`eager_inference`) calls the op's body (:func:`medquant.kernels.dispatch.run`)
    directly: the same kernel choice and result, without the custom op's per-call Python overhead (tens of
    microseconds, comparable to a decode step's matmul).

    Args:
        x: activations ``(..., k)``, a float tensor on the weight's device.
        weight: the packed row group.
        backend: ``"auto"`` (the dispatch registry chooses), or a backend name to force (tests, benchmarks).

    Returns:
        ``(..., n)`` in ``x.dtype``.

    Raises:
        TypeError: ``weight`` is not a :class:`PackedWeight`, or ``x`` is not a float tensor.
        ValueError: ``x`` is 0-d or its last dimension is not ``k``.
        DeviceMismatchError: ``x`` is on another device than the weight (a meta ``x`` included), checked before
            any kernel runs; a ``RuntimeError`` (as torch's) and a ``ValueError``.
    """
    check_float(x, "x")
    if not isinstance(weight, PackedWeight):
        raise TypeError(f"weight must be a medquant.kernels.PackedWeight, got {type(weight).__name__}")
    if x.device != weight.qweight.device:  # before the custom op: its meta kernel would answer a meta x
        raise device_mismatch("packed_linear", x.device, weight.qweight.device)
    if x.dim() == 2:
        x2 = x
    elif x.dim() == 0:
        raise ValueError("x must have at least one dimension (..., k), got a 0-d tensor")
    else:  # the row count spelled out: (2, 3, 0) -> (6, 0), where -1 would be ambiguous
        x2 = x.reshape(math.prod(x.shape[:-1]), x.shape[-1])
    lead = x.shape[:-1]
    if backend == "auto" and eager_inference(x2):
        y = dispatch_run("packed_linear", x2, weight)
        return y if x.dim() == 2 else y.reshape(*lead, y.shape[-1])
    y = _call(backend, torch.ops.medquant.packed_linear, x2, weight.qweight, weight.scales, weight.zeros,
              weight.bits, weight.symmetric, weight.scope, weight.group_elems, weight.k, weight.dense)
    return y if x.dim() == 2 else y.reshape(*lead, y.shape[-1])


def prepare_packed_linear(x: torch.Tensor, weight: PackedWeight):
    """A callable ``fn(x2d)`` equal to ``packed_linear(x2d, weight)`` for eager inference on 2-D inputs like ``x``.

    The kernel choice, the weight's repacked form, the compute dtype and the checks are bound once; where a
    registered kernel's ``accepts`` predicate may read the input (its dtype, its rows), the kernel is chosen again
    at each call (:func:`medquant.kernels.dispatch.prepare`), so ``fn`` follows the same choice as ``"auto"``.

    Valid while :func:`medquant.kernels.dispatch.generation` is unchanged and ``weight``'s tensors are not
    modified (the quantized modules keep one per row group and rebuild it when either changes).

    Args:
        x: an example input ``(M, k)`` (its device and kind decide the kernel, like a real call).
        weight: the packed row group.

    Returns:
        ``fn(x2d) -> (M, n)`` in ``x2d.dtype``.

    Raises:
        TypeError: ``weight`` is not a :class:`PackedWeight`, or ``x`` is not a float tensor.
        ValueError: ``x`` is not ``(M, k)``.
        DeviceMismatchError: ``x`` and the weight are on two devices (a ``RuntimeError`` and a ``ValueError``).
    """
    check_float(x, "x")
    if not isinstance(weight, PackedWeight):
        raise TypeError(f"weight must be a medquant.kernels.PackedWeight, got {type(weight).__name__}")
    check_packed_input(x, weight)
    return dispatch_prepare("packed_linear", x, weight)


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
    2..8 symmetric, or >= 16). ``eps`` defaults to the smallest normal float32. The arithmetic is float32 for every
    input dtype (float64 included; the Triton kernels take float16/bfloat16/float32, so float64 runs the torch
    reference), the result has ``x``'s dtype. Backward: straight-through (``mask_outside=True``: zero where the code
    was clamped). This is simulated quantization: it changes the values, not the speed.

    Args:
        x: float16 / bfloat16 / float32 / float64 tensor; rows are ``x.shape[0]`` (samples or tokens).
        bits_per_row: one bit-width per row (int tensor or sequence), or one int for all rows.
        symmetric: symmetric grid (zero point 0) instead of the asymmetric one.
        mask_outside: zero the gradient where the code was clamped.
        eps: lower bound of the scale, a positive finite float32 number (``0 < eps <= 3.4e38``).
        backend: ``"auto"`` or a backend name to force (:func:`backend_names`).

    Returns:
        The fake-quantized tensor, shape and dtype of ``x``.

    Raises:
        TypeError: ``x`` is not a supported float tensor, ``bits_per_row`` not integers, or ``eps`` not a real
            number.
        ValueError: a bit-width out of range, a ``bits_per_row`` of the wrong length, an ``eps`` that is NaN,
            infinite, not positive or past float32's range, or an unknown backend.
    """
    check_float(x, "x", ROW_DTYPES)
    eps = row_eps_arg(eps)  # not float(): True and "1e-8" are refused, NaN / 0 / inf named
    x2 = rows_view(x)
    bits = as_bits_tensor(bits_per_row, x.device, x2.shape[0])
    out, _ = _call(backend, torch.ops.medquant.fake_quantize_rows, x2.contiguous(), bits, bool(symmetric),
                   eps, bool(mask_outside))
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
    the quantizer (``medquant.quant.core.compute_qparams``) this equals its ``fake_quantize`` bit for bit.
    Backward: straight-through (``mask_outside=True``: zero where the code was clamped).

    Args:
        x: float tensor viewed as ``(N, K)`` (rows = output channels).
        scales: positive scales of shape ``(1, 1)``, ``(N, 1)`` or ``(N, G)``.
        zeros: zero points of the same shape (asymmetric), or None (symmetric).
        bits: code width, 1..8.
        symmetric: the scheme.
        group_size: elements per group along K for ``(N, G)`` scales; None otherwise.
        mask_outside: zero the gradient where the code was clamped.
        backend: ``"auto"`` or a backend name to force.

    Returns:
        The fake-quantized tensor, shape and dtype of ``x``.

    Raises:
        TypeError: ``x`` is not a float tensor, or ``bits`` is not an integer (``4.7`` is refused, not truncated).
        ValueError: parameter shapes that do not match ``x`` / ``group_size``, ``bits`` out of range, a
            ``group_size`` that is not a positive int, or an unknown backend.
    """
    check_float(x, "x")
    bits = int_arg(bits, "bits")  # not int(): 4.7 is an error, not 4 bits
    group_size = group_size_arg(group_size)  # 0 stands for None in the op: refuse it (and -1) here
    x2 = rows_view(x)
    out, _ = _call(backend, torch.ops.medquant.fake_quantize_static, x2.contiguous(), scales, zeros, bits,
                   bool(symmetric), group_size or 0, bool(mask_outside))
    return out.reshape(x.shape)


__all__ = [
    "DEFAULT_ROW_EPS",
    "FORMAT_VERSION",
    "GEMV_MAX_M",
    "PASSTHROUGH_BITS",
    "SPLITK_MAX_M",
    "DeviceMismatchError",
    "PackedWeight",
    "backend_names",
    "clear_cpu_cache",
    "cpu_cache_bytes",
    "cpu_features",
    "cpu_path",
    "dispatch_generation",
    "eager_inference",
    "fake_quantize_rows",
    "fake_quantize_rows_reference",
    "fake_quantize_static",
    "fake_quantize_static_reference",
    "force_backend",
    "forget_cpu_plans",
    "get_cpu_compute_dtype",
    "get_cpu_int4_kernel",
    "get_cpu_native4_activations",
    "get_cpu_prefill_kernel",
    "interpreting",
    "packed_linear",
    "packed_linear_reference",
    "prepare_packed_linear",
    "register_backend",
    "register_kernel",
    "select_kernel",
    "select_regime",
    "set_cpu_compute_dtype",
    "set_cpu_dense_min_m",
    "set_cpu_int4_kernel",
    "set_cpu_native4_activations",
    "set_cpu_prefill_kernel",
    "set_layer_compute_dtype",
    "tensor_version",
    "triton_available",
    "unregister_backend",
]
