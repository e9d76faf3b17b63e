"""A layer whose weight is loaded but whose bias is still on the meta device (a partly loaded model: a checkpoint
without that key, loaded into an empty-weights model) is refused with a ValueError naming the layer and the bias,
as a meta weight is; it failed inside from_float with torch's bare "NotImplementedError: Cannot copy out of meta
tensor; no data!", which named neither.

Reference: the layer's own parameters (the test puts the bias on the meta device) and the model before the call.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

import medquant as mq


@pytest.mark.parametrize("make", [lambda: nn.Linear(8, 4), lambda: nn.Linear(8, 4100), lambda: nn.Conv2d(3, 4, 3)],
                         ids=["linear", "linear-chunked", "conv"])
def test_a_bias_on_the_meta_device_is_named(make):
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(8, 8), make())
    layer = m[1]
    layer.bias = nn.Parameter(torch.empty(layer.bias.shape, device="meta"))
    first = m[0]
    with pytest.raises(ValueError, match=r"^1: its bias is on the meta device"):
        mq.quantize_(m, mq.QuantConfig(8))
    assert m[0] is first and m[1] is layer  # nothing changed
