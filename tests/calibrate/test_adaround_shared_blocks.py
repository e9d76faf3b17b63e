"""Learned rounding with ``blocks``: one layer bound in a block and outside every block, or in two different blocks,
would be reconstructed only in the unit its planned name falls under (missing its other uses), so it is refused
before the model changes, naming the layer and all its names; a layer shared within one block stays allowed (its
block is calibrated on every call) and ends up quantized under every name.

Independent references: the model's float state_dict, compared tensor by tensor after the refusal; the shared
block's output recomputed in plain torch from the quantized layer's dequantized weight."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from medquant import QuantConfig
from medquant.calibrate.adaround import adaround_quantize_
from medquant.quant.modules import QuantLinear


class _Block(nn.Module):
    def __init__(self, lin: nn.Linear):
        super().__init__()
        self.lin = lin

    def forward(self, x):
        return torch.relu(self.lin(x))


class _InBlockAndOutside(nn.Module):
    """``shared`` is ``blk.lin`` (in the block) and ``head`` (outside every block)."""

    def __init__(self):
        super().__init__()
        lin = nn.Linear(8, 8)
        self.blk = _Block(lin)
        self.head = lin

    def forward(self, x):
        return self.head(self.blk(x))


class _InTwoBlocks(nn.Module):
    """``blk1.lin`` is ``blk2.lin``."""

    def __init__(self):
        super().__init__()
        lin = nn.Linear(8, 8)
        self.blk1 = _Block(lin)
        self.blk2 = _Block(lin)

    def forward(self, x):
        return self.blk2(self.blk1(x))


class _Chain(nn.Module):
    """``a`` is ``b``, called twice."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(8, 8)
        self.b = self.a

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


class _InOneBlock(nn.Module):
    """``blk.a`` is ``blk.b``: shared within one block."""

    def __init__(self):
        super().__init__()
        self.blk = _Chain()

    def forward(self, x):
        return self.blk(x)


def _calib():
    g = torch.Generator().manual_seed(0)
    return [torch.randn(4, 8, generator=g) for _ in range(2)]


@pytest.mark.parametrize("make, blocks, names", [
    (_InBlockAndOutside, ["blk"], ("blk.lin", "head")),
    (_InTwoBlocks, ["blk1", "blk2"], ("blk1.lin", "blk2.lin")),
])
def test_layer_shared_across_units_is_refused_before_any_change(make, blocks, names):
    torch.manual_seed(0)
    model = make().eval()
    snap = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match="several") as err:
        adaround_quantize_(model, QuantConfig(bits=4), _calib(), blocks=blocks, iters=2, progress=False)
    for n in names:
        assert n in str(err.value)
    for n in names:
        assert type(model.get_submodule(n)) is nn.Linear  # nothing swapped
    assert model.state_dict().keys() == snap.keys()
    for k, v in model.state_dict().items():
        assert torch.equal(v, snap[k])


def test_layer_shared_across_units_is_allowed_when_skipped():
    torch.manual_seed(0)
    model = _InTwoBlocks().eval()
    out = adaround_quantize_(model, QuantConfig(bits=4), _calib(), blocks=["blk1", "blk2"], skip=["blk1.lin"],
                             iters=2, progress=False)
    assert out == {}
    assert type(model.blk1.lin) is nn.Linear


def test_layer_shared_within_one_block_is_allowed():
    torch.manual_seed(0)
    model = _InOneBlock().eval()
    records = adaround_quantize_(model, QuantConfig(bits=4), _calib(), blocks=["blk"], iters=3, progress=False)
    assert len(records) == 1
    assert isinstance(model.blk.a, QuantLinear) and model.blk.b is model.blk.a
    x = torch.randn(3, 8)
    wq = model.blk.a.dequantized_weight()
    ref = F.linear(torch.relu(F.linear(x, wq, model.blk.a.bias)), wq, model.blk.a.bias)
    torch.testing.assert_close(model(x), ref, atol=1e-4, rtol=1e-4)
