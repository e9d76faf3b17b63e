"""Float heads tied to a table that quantize_embeddings_ turns into a QuantLinear on the table's packed tensors:

* a head that is a subclass of nn.Linear with its own forward (here a logit scale) was replaced by a plain
  QuantLinear: its forward was silently dropped (quantize_ leaves such subclasses float and reports them). It now
  stays float on the float table with a warning, as a head with a bias does;
* a head bound under two names was swapped under the first only: the second name kept the float head (a float
  copy of the table the config says is quantized, and two different modules for one).

Reference: the float model's own forward with the table's dequantized rows (plain torch: ``F.linear`` times the
scale), and ``names_by_module``-style identity of the modules under both names.
"""
from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from medquant.quant.config import QuantConfig
from medquant.quant.embeddings import quantize_embeddings_
from medquant.quant.modules import QuantEmbedding, QuantLinear, tied_to

CFG = QuantConfig(bits=8, scope="channel")


class ScaledHead(nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) * 0.5


class LM(nn.Module):
    def __init__(self, head_cls=nn.Linear) -> None:
        super().__init__()
        self.embed = nn.Embedding(32, 16)
        self.head = head_cls(16, 32, bias=False)
        self.head.weight = self.embed.weight

    def get_input_embeddings(self) -> nn.Module:
        return self.embed

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(ids))


def test_a_tied_head_with_its_own_forward_stays_float_with_a_warning():
    torch.manual_seed(0)
    m = LM(ScaledHead)
    ids = torch.tensor([[1, 4, 9]])
    with pytest.warns(RuntimeWarning, match="'head'.*ScaledHead.*own forward"):
        done = quantize_embeddings_(m, CFG)
    assert done == {"embeddings": ["embed"], "tied_heads": []}
    assert type(m.head) is ScaledHead and isinstance(m.embed, QuantEmbedding)
    table = m.embed.dequantized_weight()
    want = nn.functional.linear(table[ids], m.head.weight) * 0.5  # the head's own forward, on its float weight
    torch.testing.assert_close(m(ids), want, rtol=1e-5, atol=1e-5)


def test_a_tied_head_under_two_names_is_one_quantized_head_under_both():
    torch.manual_seed(0)
    m = LM()
    m.output = m.head  # a second name of the same head
    ids = torch.tensor([[1, 4, 9]])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        done = quantize_embeddings_(m, CFG)
    assert done["tied_heads"] == ["head", "output"]
    assert isinstance(m.head, QuantLinear) and m.output is m.head and tied_to(m.head, m.embed)
    table = m.embed.dequantized_weight()
    torch.testing.assert_close(m(ids), nn.functional.linear(table[ids], table), rtol=1e-5, atol=1e-5)
