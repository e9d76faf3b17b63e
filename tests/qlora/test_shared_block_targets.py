"""A LoRA target inside a block bound under several names (``nn.ModuleList([block, block])``) is one ``nn.Linear``
under one attribute of one parent: PEFT replaces it there, so every use of the block runs the adapter. Only a
Linear bound under several attributes (``m.a = m.b``) leaves a use unadapted; the first was refused too ("bound
under 2 names"). Reference: the adapted forward written out in plain torch."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from medquant.qlora import QLoRAAdapter


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x):
        return self.fc(x)


class _Twice(nn.Module):
    def __init__(self):
        super().__init__()
        block = _Block()
        self.layers = nn.ModuleList([block, block])

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


def test_a_target_in_a_block_bound_twice_is_adapted_in_both_uses():
    torch.manual_seed(0)
    model = _Twice()
    w, b = model.layers[0].fc.weight.detach().clone(), model.layers[0].fc.bias.detach().clone()
    adapter = QLoRAAdapter(model, r=2, lora_alpha=4.0, lora_dropout=0.0, use_rslora=False,
                           target_modules=["re:.*fc"], target_roles=(), quantize=False)
    fc = model.layers[0].fc
    assert model.layers[1].fc is fc and adapter.targets == ["layers.0.fc"]
    with torch.no_grad():
        fc.lora_B["default"].weight.normal_()
    a, bb = fc.lora_A["default"].weight.detach(), fc.lora_B["default"].weight.detach()
    x = torch.randn(3, 8)
    ref = x
    for _ in range(2):  # both uses: W h + b + (alpha / r) B A h
        ref = ref @ w.T + b + 2.0 * (ref @ a.T @ bb.T)
    adapter.model.eval()
    with torch.no_grad():
        assert torch.allclose(adapter.model(x), ref, atol=1e-5)
        merged = adapter.merge()
        assert merged.layers[1].fc is merged.layers[0].fc and type(merged.layers[0].fc) is nn.Linear
        assert torch.allclose(merged(x), ref, atol=1e-5)


def test_a_linear_bound_under_two_attributes_is_still_refused():
    model = _Twice()
    model.layers[1] = _Block()
    model.layers[1].fc = model.layers[0].fc
    with pytest.raises(ValueError, match="bound under 2 names"):
        QLoRAAdapter(model, r=2, target_modules=["re:.*fc"], target_roles=(), quantize=False)
    assert type(model.layers[0].fc) is nn.Linear and model.layers[1].fc is model.layers[0].fc
