"""A 0-d input to QuantLinear is refused with the layer's own message in every mode: after an eager inference call
prepared the decode lane it raised ``IndexError: tuple index out of range`` from inside the CPU kernel.

Oracle: plain ``nn.Linear`` refuses a 0-d input as well; the layer's documented ``ValueError`` names it.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

from medquant.quant.config import QuantConfig
from medquant.quant.modules import QuantLinear


@pytest.mark.parametrize("cfg", [QuantConfig(bits=4, group_size=32), QuantConfig(bits=8, scope="channel"),
                                 QuantConfig(bits=3, group_size=32)])
@pytest.mark.parametrize("prepared", [False, True])
def test_zero_dim_input_gets_the_layers_error_after_the_decode_lane_is_prepared(cfg, prepared):
    torch.manual_seed(0)
    lin = nn.Linear(64, 33)
    q = QuantLinear.from_float(lin, cfg)
    x = torch.tensor(1.0)
    with pytest.raises(RuntimeError):  # the float reference refuses it too
        lin(x)
    with torch.inference_mode():
        if prepared:
            y = q(torch.randn(1, 64))  # prepares the decode lane
            assert y.shape == (1, 33)
        with pytest.raises(ValueError, match="0-d tensor"):
            q(x)
        v = torch.randn(64)  # a 1-D input (no batch) still goes through and equals F.linear on the weight
        torch.testing.assert_close(q(v), torch.nn.functional.linear(v, q.dequantized_weight(), q.bias),
                                   atol=1e-4, rtol=1e-4)
