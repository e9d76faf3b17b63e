"""A float16 input on a native row group with a bfloat16 compute dtype: the kernel's float32 output is cast once
to float16, as the module docstring of ``medquant.kernels.cpu`` says ("neither its scales nor its output are
rounded to cd") and as a compiled bound layer does. The eager call had the kernel write bfloat16 (the dtype of the
input it was handed, ``x`` rounded to bfloat16) and cast that to float16: the output rounded to bfloat16 first,
errors of up to ``2^-9`` relative where float16 holds ``2^-11``."""
from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from medquant.kernels import cpu_path, set_cpu_compute_dtype, set_cpu_int4_kernel
from medquant.kernels.native import native_status
from medquant.quant import QuantConfig, QuantLinear

pytestmark = pytest.mark.skipif(not native_status()["gemv4"], reason="needs the native weight-only kernel")


@pytest.fixture(autouse=True)
def _restore_settings(cpu_settings):
    set_cpu_int4_kernel("auto")


@pytest.mark.parametrize("bits", [4, 8, 3])
@pytest.mark.parametrize("rows", [1, 5])
def test_float16_input_output_rounded_once(bits, rows):
    set_cpu_compute_dtype("bfloat16")
    g = torch.Generator().manual_seed(0)
    lin = nn.Linear(256, 128, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(128, 256, generator=g) * 0.05)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        layer = QuantLinear.from_float(lin, QuantConfig(bits, group_size=64))
    x = torch.randn(rows, 256, generator=g).half()
    assert cpu_path(x, layer.packed_weight(bits)).startswith("native")
    with torch.no_grad():
        y = layer(x)
    assert y.dtype == torch.float16
    # the kernel takes x rounded to the compute dtype (bfloat16): exact products, float32 sums, one rounding to
    # float16 (half an ulp, 2^-11 relative) -- never a rounding to bfloat16 (2^-8 relative) in between
    ref = x.to(torch.bfloat16).double() @ layer.dequantized_weight(torch.float64).t()
    bound = 2.0 ** -11 * ref.abs() + 1e-5 * float(ref.abs().max()) + 2.0 ** -24
    excess = (y.double() - ref).abs() - bound
    assert float(excess.max()) <= 0, f"max error beyond one float16 rounding: {float(excess.max()):.3g}"
