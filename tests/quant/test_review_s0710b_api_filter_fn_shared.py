"""filter_fn on a module bound under several names (``nn.ModuleList([block] * n)``): it was asked with the first
name only, so a filter leaving out ``layers.1`` quantized the shared block anyway (under both names), while
``skip=["layers.1"]`` keeps it float under all of them. filter_fn is now asked for every name, and a module it
refuses under any of them stays as it is, as skip does.

Reference: the same model with ``skip=["layers.1"]`` (the documented shared-module rule), and the module names
read by hand.
"""
from __future__ import annotations

import warnings

import torch
from torch import nn

import medquant as mq
from medquant.quant import QuantLinear


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        block = nn.Linear(8, 8)
        self.layers = nn.ModuleList([block, block])  # one module under layers.0 and layers.1
        self.out = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return self.out(x)


def _classes(m: nn.Module) -> dict[str, type]:
    return {n: type(s) for n, s in m.named_modules(remove_duplicate=False) if n}


def test_a_filter_refusing_any_name_of_a_shared_module_keeps_it_as_it_is():
    by_skip, by_filter = Net(), Net()
    seen: list[str] = []

    def keep(module: nn.Module, name: str) -> bool:
        seen.append(name)
        return not name.startswith("layers.1")

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mq.quantize_(by_skip, mq.QuantConfig(8), skip=["layers.1"])
        mq.quantize_(by_filter, mq.QuantConfig(8), filter_fn=keep)
    assert _classes(by_filter) == _classes(by_skip) == {"layers": nn.ModuleList, "layers.0": nn.Linear,
                                                        "layers.1": nn.Linear, "out": QuantLinear}
    assert by_filter.layers[0] is by_filter.layers[1]
    assert {"layers.0", "layers.1", "out"} <= set(seen)
    x = torch.randn(2, 8)
    assert torch.equal(by_filter(x), by_skip(x))


def test_a_filter_keeping_every_name_quantizes_the_shared_module_once():
    m = Net()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mq.quantize_(m, mq.QuantConfig(8), filter_fn=lambda module, name: True)
    assert isinstance(m.layers[0], QuantLinear) and m.layers[1] is m.layers[0]
