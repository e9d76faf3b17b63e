"""QuantConv2d refuses integer / bool inputs as nn.Conv2d does (it computed them with a weight truncated to ints).

Oracle: plain ``nn.Conv2d`` (which refuses such inputs) and ``F.conv2d`` on the dequantized weight for float ones.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from medquant.quant.config import QuantConfig
from medquant.quant.modules import QuantConv2d


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.uint8, torch.bool])
def test_integer_input_is_refused_like_nn_conv2d_not_computed_with_a_truncated_weight(dtype):
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 12, 3)
    q = QuantConv2d.from_float(conv, QuantConfig(bits=4, group_size=32))
    x = torch.randint(0, 2, (1, 8, 5, 5)).to(dtype)
    with pytest.raises(RuntimeError):  # the float reference refuses it
        conv(x)
    with pytest.raises(TypeError, match=str(dtype)):
        q(x)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_floating_inputs_still_compute_as_f_conv2d_on_the_dequantized_weight(dtype):
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 12, 3, padding=1, groups=2)
    q = QuantConv2d.from_float(conv, QuantConfig(bits=4, group_size=32))
    x = torch.randn(2, 8, 6, 6).to(dtype)
    w = q.dequantized_weight(torch.float64).reshape(12, 4, 3, 3)
    want = F.conv2d(x.double(), w, conv.bias.detach().double(), 1, 1, 1, 2)
    tol = 1e-5 if dtype != torch.bfloat16 else 0.1
    assert q(x).dtype == dtype
    torch.testing.assert_close(q(x).double(), want, atol=tol, rtol=tol)
