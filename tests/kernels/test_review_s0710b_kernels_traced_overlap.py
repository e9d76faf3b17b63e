"""A layer bound to its CPU kernels (``QuantLinear.bind_cpu_kernels``) and run under ``torch.compile`` on an input
whose rows overlap in memory (row stride below k: ``x.expand(m, k)``, a broadcast row) gives the result of its
contiguous copy, as the eager call does; the compiled call's native kernel declined such rows and the compiled
forward raised ``RuntimeError: medquant native 4-bit matmul declined the call``."""
from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from medquant.kernels import set_cpu_compute_dtype, set_cpu_int4_kernel
from medquant.kernels.native import native_status
from medquant.quant import QuantConfig, QuantLinear

pytestmark = pytest.mark.skipif(not native_status()["gemv4"], reason="needs the native weight-only kernel")


@pytest.fixture(autouse=True)
def _restore_settings(cpu_settings):
    set_cpu_int4_kernel("auto")
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("rows", [4, 40])  # below the native switch (weight-only form) and above it (gemm / dense)
def test_compiled_bound_layer_on_overlapping_rows(dtype, rows):
    set_cpu_compute_dtype("bfloat16")
    g = torch.Generator().manual_seed(0)
    lin = nn.Linear(256, 64)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(64, 256, generator=g))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        layer = QuantLinear.from_float(lin, QuantConfig(4, group_size=64))
    assert layer.bind_cpu_kernels()
    one = torch.randn(1, 256, generator=g).to(dtype)
    base = torch.randn(rows * 128 + 128, generator=g).to(dtype)

    def f(v: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # a broadcast row (row stride 0) and rows overlapping by half (row stride k / 2)
        return layer(v.expand(rows, 256)), layer(b.as_strided((rows, 256), (128, 1)))

    torch._dynamo.reset()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        y_exp, y_half = torch.compile(f, backend="aot_eager", fullgraph=True)(one, base)
        want_exp = layer(one.expand(rows, 256).contiguous())
        want_half = layer(base.as_strided((rows, 256), (128, 1)).contiguous())
    torch.testing.assert_close(y_exp, want_exp, rtol=0, atol=0)
    torch.testing.assert_close(y_half, want_half, rtol=0, atol=0)
    # the eager call's reference: float64 product with the dequantized weight
    w = layer.dequantized_weight(torch.float64)
    ref = one.double().expand(rows, 256) @ w.t() + lin.bias.double()
    assert float((y_exp.double() - ref).abs().max()) <= 1e-2 * float(ref.abs().max())
