"""quantize_ / quantize_module on a Linear with more than 4096 rows (an LM head) take its row-chunked path, which
built a QuantLinear from the buffers of plain ``nn.Linear`` chunks: a subclass with its own ``forward`` was
quantized (its forward silently dropped; ``QuantLinear.from_float`` refuses it, and does for the same layer with
fewer rows), and a subclass computing as ``nn.Linear`` came back from ``dequantize_`` as a plain ``nn.Linear``.

References: the same layer with 4096 rows or fewer (the one-shot path: ``QuantLinear.from_float``), and the
class of the float module itself.
"""
from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from medquant.quant import QuantConfig, QuantLinear
from medquant.quant.api import dequantize_, quantize_, quantize_module

CFG = QuantConfig(bits=8, group_size=32)
ROWS = 4100  # above the chunk size: the row-chunked path


class Doubled(nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) * 2


class Tagged(nn.Linear):
    """Computes as nn.Linear (quantize_ takes it); carries a plain attribute."""


@pytest.mark.parametrize("rows", [64, ROWS])
def test_a_subclass_with_its_own_forward_is_refused_whatever_its_rows(rows):
    torch.manual_seed(0)
    with pytest.raises(TypeError, match="own forward"):
        QuantLinear.from_float(Doubled(32, 64), CFG)  # the reference: what from_float says of the class
    with pytest.raises(TypeError, match="layer: .*Doubled.*own forward"):
        quantize_module(Doubled(32, rows), CFG, name="layer")


@pytest.mark.parametrize("rows", [64, ROWS])
def test_a_plain_subclass_comes_back_as_its_class_whatever_its_rows(rows):
    torch.manual_seed(0)
    layer = Tagged(32, rows)
    layer.note = "kept"
    w = layer.weight.detach().clone()
    m = nn.Sequential(layer)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantize_(m, CFG)
    assert isinstance(m[0], QuantLinear)
    # bit for bit the one-shot path's codes
    ref_lin = nn.Linear(32, rows)
    with torch.no_grad():
        ref_lin.weight.copy_(w)
        ref_lin.bias.copy_(layer.bias)
    ref = QuantLinear.from_float(ref_lin, CFG)
    assert all(torch.equal(a, b) for a, b in zip(m[0].state_dict().values(), ref.state_dict().values()))
    dequantize_(m)
    assert type(m[0]) is Tagged and m[0].note == "kept"
