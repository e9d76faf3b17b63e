"""Review s0710: a 16-bit row of a mixed layer is stored in float16; a weight past float16's range became inf
silently (and the layer's output inf), where a quantized row refuses weights its float16 scales cannot hold."""
import pytest
import torch
from torch import nn

from medquant.quant import QuantConfig
from medquant.quant.modules import QuantLinear


def test_a_16_bit_row_beyond_float16_range_is_refused():
    lin = nn.Linear(4, 2)
    with torch.no_grad():
        lin.weight[0, 0] = 2 * torch.finfo(torch.float16).max
    with pytest.raises(ValueError, match="float16"):
        QuantLinear.from_float(lin, QuantConfig(channel_bits=(16, 4)))
    # the same row at 32 bits is stored exactly
    q = QuantLinear.from_float(lin, QuantConfig(channel_bits=(32, 4)))
    assert torch.equal(q.dequantized_weight()[0], lin.weight[0].detach())


def test_a_16_bit_row_within_range_is_float16_of_the_weight():
    lin = nn.Linear(4, 2)
    with torch.no_grad():
        lin.weight[0, 0] = 6.0e4
    q = QuantLinear.from_float(lin, QuantConfig(channel_bits=(16, 4)))
    assert torch.equal(q.dequantized_weight()[0], lin.weight[0].detach().half().float())
