"""``PackedWeight.dequantize`` / ``layout.dequantize_codes`` refuse a non-floating ``dtype``.

``PackedWeight.dequantize(torch.int32)`` returned the weights truncated towards zero (mostly 0), ``torch.bool``
all True, silently; the quantized modules refuse the same request (``dequantized_weight(torch.int64)``).
"""
from __future__ import annotations

import pytest
import torch

from medquant.kernels import PackedWeight
from medquant.kernels.layout import dequantize_codes, pack


def _weight():
    torch.manual_seed(0)
    codes = torch.randint(0, 16, (3, 32))
    scales = torch.rand(3, 1) * 0.1 + 0.01
    return codes, scales, PackedWeight(pack(codes, 4), scales, None, 4, True, "channel", 32, 30)


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64, torch.uint8, torch.bool, torch.complex64])
def test_non_floating_dtype_is_refused(dtype):
    codes, scales, w = _weight()
    with pytest.raises(TypeError, match="floating"):
        w.dequantize(dtype)
    with pytest.raises(TypeError, match="floating"):
        dequantize_codes(codes, scales, None, 4, True, "channel", 32, 30, dtype=dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_floating_dtypes_still_dequantize(dtype):
    codes, scales, w = _weight()
    want = ((codes.float() - 8) * scales)[:, :30].to(dtype)  # plain torch: (u - 2^(b-1)) * s
    assert torch.equal(w.dequantize(dtype), want)
