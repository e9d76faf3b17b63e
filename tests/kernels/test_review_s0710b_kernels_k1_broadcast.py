"""A layer of one input feature (k = 1) on a broadcast input (``x.expand(m, 1)``: row stride 0) gives the result of
its contiguous copy: the native kernel reads rows k apart, and the check that copies overlapping rows first was
skipped for k = 1, so the kernel declined the call and the dense fallback ran it (bfloat16 compute: weights and
outputs rounded to bfloat16, about 1e-3 away from the contiguous input's result)."""
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


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("rows", [5, 40])  # below the native switch and above it (the blocked matmul)
def test_one_feature_layer_on_a_broadcast_input(bits, rows):
    set_cpu_compute_dtype("bfloat16")
    g = torch.Generator().manual_seed(0)
    lin = nn.Linear(1, 32)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(32, 1, generator=g))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        layer = QuantLinear.from_float(lin, QuantConfig(bits, scope="channel"))
    x = torch.randn(1, 1, generator=g).expand(rows, 1)
    assert x.stride(0) == 0
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        y = layer(x)
        want = layer(x.contiguous())
    torch.testing.assert_close(y, want, rtol=0, atol=0)
    ref = x.double() @ layer.dequantized_weight(torch.float64).t() + lin.bias.double()
    assert float((y.double() - ref).abs().max()) <= 1e-4 * float(ref.abs().max())
