"""Edge cases of quantize_ / quantize_embeddings_ / dequantize_: lazy modules, hooks on embeddings, frozen
parameters.

References: plain torch (``QuantLinear.from_float`` of an ``nn.Linear`` holding the same weights, the float
modules' own ``requires_grad`` / ``training`` flags read before quantizing, hook call records).
"""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

from medquant import QuantConfig
from medquant.quant import QuantLinear
from medquant.quant.api import dequantize_, quantize_
from medquant.quant.embeddings import quantize_embeddings_
from medquant.quant.modules import QuantEmbedding

CFG = QuantConfig(bits=4, group_size=16)


def _quiet(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


# ------------------------------------------------------------------------------------------------ 1. lazy modules
def test_a_lazy_linear_is_refused_naming_it_and_saying_to_run_a_forward():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.LazyLinear(16))
    before = copy.deepcopy(m[0].state_dict())
    with pytest.raises(ValueError, match=r"2.*(uninitiali[sz]ed|lazy).*forward"):
        quantize_(m, CFG)
    # nothing changed: the other layer is still the float one with its weights
    assert type(m[0]) is nn.Linear and torch.equal(m[0].weight, before["weight"])
    assert isinstance(m[2], nn.LazyLinear)


def test_a_skipped_lazy_linear_does_not_stop_the_rest_from_being_quantized():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.LazyLinear(16))
    _quiet(quantize_, m, CFG, skip=["2"])
    assert isinstance(m[0], QuantLinear) and isinstance(m[2], nn.LazyLinear)


def test_a_materialized_lazy_linear_quantizes_like_a_plain_linear():
    torch.manual_seed(0)
    lazy = nn.Sequential(nn.LazyLinear(24), nn.ReLU(), nn.Linear(24, 8))
    x = torch.randn(5, 16)
    lazy(x)  # materializes: the LazyLinear becomes an nn.Linear
    plain = nn.Sequential(nn.Linear(16, 24), nn.ReLU(), nn.Linear(24, 8))
    plain.load_state_dict(lazy.state_dict())
    ref0 = QuantLinear.from_float(plain[0], CFG)
    _quiet(quantize_, lazy, CFG)
    assert isinstance(lazy[0], QuantLinear)
    for k, v in ref0.state_dict().items():
        assert torch.equal(lazy[0].state_dict()[k], v), k
    _quiet(quantize_, plain, CFG)
    assert torch.equal(lazy(x), plain(x))


# ------------------------------------------------------------------------------------------------ 2. embedding hooks
class _TinyLM(nn.Module):
    def __init__(self, tied: bool = False) -> None:
        super().__init__()
        self.embed = nn.Embedding(32, 16)
        self.body = nn.Linear(16, 16)
        self.head = nn.Linear(16, 32, bias=False)
        if tied:
            self.head.weight = self.embed.weight

    def get_input_embeddings(self) -> nn.Module:
        return self.embed

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(self.embed(ids)))


def test_hooks_on_an_embedding_still_fire_after_quantize_embeddings():
    torch.manual_seed(0)
    m = _TinyLM()
    calls: list[str] = []
    seen: list[torch.Tensor] = []
    m.embed.register_forward_pre_hook(lambda mod, args: calls.append("pre"))
    handle = m.embed.register_forward_hook(lambda mod, args, out: (calls.append("post"), seen.append(out))[0])
    quantize_embeddings_(m, QuantConfig(bits=8, scope="channel"))
    assert isinstance(m.embed, QuantEmbedding)
    ids = torch.tensor([[1, 5, 7]])
    m(ids)
    assert calls == ["pre", "post"]
    # the hook saw the quantized table's lookup: rows of the dequantized table (plain torch indexing)
    assert torch.equal(seen[0], m.embed.to_float().weight[ids])
    handle.remove()  # the handle the user holds still removes it
    m(ids)
    assert calls == ["pre", "post", "pre"]


def test_hooks_on_a_tied_head_still_fire_after_quantize_embeddings():
    torch.manual_seed(0)
    m = _TinyLM(tied=True)
    calls: list[tuple] = []
    m.head.register_forward_hook(lambda mod, args, out: calls.append(tuple(out.shape)))
    done = quantize_embeddings_(m, QuantConfig(bits=8, scope="channel"))
    assert done["tied_heads"] == ["head"] and isinstance(m.head, QuantLinear)
    m(torch.tensor([[1, 2]]))
    assert calls == [(1, 2, 32)]


# ------------------------------------------------------------------------------------------------ 3. frozen params
def _flags(model: nn.Module) -> dict[str, bool]:
    return {n: p.requires_grad for n, p in model.named_parameters()}


def test_dequantize_keeps_frozen_parameters_frozen_and_the_mode():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 16), nn.Conv2d(2, 4, 3))
    m[0].weight.requires_grad_(False)  # frozen weight, trainable bias
    m[2].requires_grad_(False)  # frozen layer
    m[3].bias.requires_grad_(False)
    m.train()
    m[2].eval()
    flags = _flags(m)
    modes = {n: s.training for n, s in m.named_modules()}
    assert flags == {"0.weight": False, "0.bias": True, "2.weight": False, "2.bias": False, "3.weight": True,
                     "3.bias": False}
    _quiet(quantize_, m, CFG)
    dequantize_(m)
    assert [type(s) for s in m] == [nn.Linear, nn.ReLU, nn.Linear, nn.Conv2d]
    assert _flags(m) == flags
    assert {n: s.training for n, s in m.named_modules()} == modes


def test_frozen_flags_survive_requantizing():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(16, 32), nn.Linear(32, 16))
    m[0].weight.requires_grad_(False)
    flags = _flags(m)
    _quiet(quantize_, m, CFG)
    _quiet(quantize_, m, QuantConfig(bits=8), requantize=True)
    dequantize_(m)
    assert _flags(m) == flags


def test_dequantize_keeps_a_frozen_embedding_frozen():
    torch.manual_seed(0)
    m = _TinyLM()
    m.embed.weight.requires_grad_(False)
    flags = _flags(m)
    _quiet(quantize_, m, CFG)
    quantize_embeddings_(m)
    dequantize_(m)
    assert type(m.embed) is nn.Embedding
    assert _flags(m) == flags
