"""``torch.library`` custom ops: one opaque node per kernel for ``torch.compile``, with fake (meta) kernels.

=================================  ======================================================================
``medquant::packed_linear``        ``(x, qweight, scales, zeros?, bits, symmetric, scope, group_elems, k, dense)``
                                   -> ``y (M, N)``; backward: ``dL/dx = dL/dy @ dequant(W)``
``medquant::fake_quantize_rows``   ``(x, bits, symmetric, eps, want_mask)`` -> ``(out, mask)``; STE backward
``medquant::fake_quantize_static`` ``(x, scales, zeros?, bits, symmetric, group_size, want_mask)``
                                   -> ``(out, mask)``; STE backward
=================================  ======================================================================

Each body asks :func:`medquant.kernels.dispatch.run` which backend runs when it runs (the Triton kernels for CUDA
tensors, the CPU backend for ``packed_linear`` on CPU tensors, the torch references otherwise, a registered fast
path where its predicate accepts the call, or whatever :func:`force_backend` says). ``torch.compile`` only sees
the op and its fake implementation (shapes and dtypes), so QuantLinear layers trace without graph breaks whatever
runs inside. The packed-matmul op takes the fields of a
:class:`~medquant.kernels.bundle.PackedWeight` as positional arguments (the op schema needs tensors and scalars)
and bundles them again at once. ``want_mask=False`` returns an empty mask (shape ``(0,)``) and the backward passes
the gradient straight through; with ``want_mask=True`` the gradient is zeroed where the clamp cut the value off.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .bundle import PackedWeight
from .dispatch import run


# ------------------------------------------------------------------------------------------- packed_linear
@torch.library.custom_op("medquant::packed_linear", mutates_args=())
def packed_linear_op(
    x: Tensor, qweight: Tensor, scales: Tensor, zeros: Tensor | None, bits: int, symmetric: bool, scope: str,
    group_elems: int, k: int, dense: bool = False,
) -> Tensor:
    """``x (M, k) @ dequant(W)^T -> (M, N)`` in ``x.dtype`` for the packed row group ``W`` (``dense``: the
    version-2 dense layout of 3/5/6/7-bit codes, else the version-1 containers)."""
    weight = PackedWeight(qweight, scales, zeros, bits, symmetric, scope, group_elems, k, dense)
    return run("packed_linear", x, weight)


@packed_linear_op.register_fake
def _packed_linear_fake(x, qweight, scales, zeros, bits, symmetric, scope, group_elems, k, dense=False):
    torch._check(x.dim() == 2, lambda: f"x must be 2-D (M, K), got {x.dim()}-D")
    torch._check(qweight.dim() == 2 and qweight.dtype == torch.int32, lambda: "qweight must be 2-D int32")
    torch._check(x.shape[1] == k, lambda: f"x has {x.shape[1]} features, the packed weight K={k}")
    return x.new_empty(x.shape[0], qweight.shape[0])


def _packed_linear_setup(ctx, inputs, output):
    _x, qweight, scales, zeros, bits, symmetric, scope, group_elems, k, dense = inputs
    ctx.save_for_backward(qweight, scales, zeros)
    ctx.meta = (bits, symmetric, scope, group_elems, k, dense)


def _packed_linear_backward(ctx, grad):
    qweight, scales, zeros = ctx.saved_tensors
    gx = None
    if ctx.needs_input_grad[0]:
        gx = grad @ PackedWeight(qweight, scales, zeros, *ctx.meta).dequantize(grad.dtype)
    return gx, None, None, None, None, None, None, None, None, None


packed_linear_op.register_autograd(_packed_linear_backward, setup_context=_packed_linear_setup)


# ------------------------------------------------------------------------------------------- fake-quant
def _empty_mask(x: Tensor) -> Tensor:
    return torch.empty(0, dtype=torch.bool, device=x.device)


@torch.library.custom_op("medquant::fake_quantize_rows", mutates_args=())
def fake_quantize_rows_op(x: Tensor, bits: Tensor, symmetric: bool, eps: float, want_mask: bool
                          ) -> tuple[Tensor, Tensor]:
    """Per-row dynamic fake quantization of a 2-D ``x``; ``bits`` has one entry per row."""
    out, mask = run("fake_quantize_rows", x, bits, symmetric, eps, want_mask)
    return out, (mask if mask is not None else _empty_mask(x))


@fake_quantize_rows_op.register_fake
def _fake_quantize_rows_fake(x, bits, symmetric, eps, want_mask):
    torch._check(x.dim() == 2, lambda: "fake_quantize_rows op expects a 2-D (rows, -1) view")
    mask = x.new_empty(x.shape, dtype=torch.bool) if want_mask else x.new_empty(0, dtype=torch.bool)
    return torch.empty_like(x), mask


@torch.library.custom_op("medquant::fake_quantize_static", mutates_args=())
def fake_quantize_static_op(x: Tensor, scales: Tensor, zeros: Tensor | None, bits: int, symmetric: bool,
                            group_size: int, want_mask: bool) -> tuple[Tensor, Tensor]:
    """Fake quantization of a 2-D ``x`` with given scales / zeros (``group_size`` 0 = tensor/channel scope)."""
    gs = group_size if group_size > 0 else None
    out, mask = run("fake_quantize_static", x, scales, zeros, bits, symmetric, gs, want_mask)
    return out, (mask if mask is not None else _empty_mask(x))


@fake_quantize_static_op.register_fake
def _fake_quantize_static_fake(x, scales, zeros, bits, symmetric, group_size, want_mask):
    torch._check(x.dim() == 2, lambda: "fake_quantize_static op expects a 2-D (rows, -1) view")
    mask = x.new_empty(x.shape, dtype=torch.bool) if want_mask else x.new_empty(0, dtype=torch.bool)
    return torch.empty_like(x), mask


def _fq_setup(ctx, inputs, output):
    want_mask = inputs[-1]
    ctx.want_mask = want_mask
    ctx.n_inputs = len(inputs)
    if want_mask:
        ctx.save_for_backward(output[1])


def _fq_backward(ctx, grad_out, grad_mask):
    gx = grad_out
    if ctx.want_mask:
        (mask,) = ctx.saved_tensors
        gx = grad_out * mask.to(grad_out.dtype)
    return (gx,) + (None,) * (ctx.n_inputs - 1)


fake_quantize_rows_op.register_autograd(_fq_backward, setup_context=_fq_setup)
fake_quantize_static_op.register_autograd(_fq_backward, setup_context=_fq_setup)
