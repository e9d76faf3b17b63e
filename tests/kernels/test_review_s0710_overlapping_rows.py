"""Inputs whose rows overlap in memory (row stride below k: ``x.expand(m, k)``, a broadcast row) give the result of
their contiguous copy on every CPU path: the native kernels read rows ``k`` apart, so such an input is copied
first (it went to the dense fallback, whose float32 result was ~100x less accurate than the kernel's)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from medquant.kernels import set_cpu_compute_dtype, set_cpu_int4_kernel
from medquant.quant import QuantConfig, QuantLinear


@pytest.fixture(autouse=True)
def _restore_settings(cpu_settings):
    set_cpu_int4_kernel("auto")


@pytest.mark.filterwarnings("ignore:medquant CPU kernels:RuntimeWarning")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("rows", [4, 96])  # decode-sized (gemv) and prefill-sized (gemm) inputs
def test_overlapping_rows_equal_their_contiguous_copy(dtype, rows):
    set_cpu_compute_dtype(dtype)
    g = torch.Generator().manual_seed(0)
    lin = nn.Linear(256, 64)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(64, 256, generator=g))
    layer = QuantLinear.from_float(lin, QuantConfig(4, group_size=64))
    one = torch.randn(1, 256, generator=g).to(dtype)
    x = one.expand(rows, 256)  # row stride 0
    assert x.stride(0) == 0
    with torch.no_grad():
        torch.testing.assert_close(layer(x), layer(x.contiguous()), rtol=0, atol=0)
    # a row stride between 0 and k (rows overlapping by half)
    base = torch.randn(rows * 128 + 128, generator=g).to(dtype)
    xo = base.as_strided((rows, 256), (128, 1))
    with torch.no_grad():
        torch.testing.assert_close(layer(xo), layer(xo.contiguous()), rtol=0, atol=0)
