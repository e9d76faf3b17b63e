"""quantize_embeddings_ leaves the model unchanged when one of its tables cannot be quantized: it swapped the
tables one by one, so a NaN in the second left the first quantized and the second float (half-changed).

Oracle: the model's own modules and outputs before the call (plain torch ``nn.Embedding`` lookups).
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

from medquant.quant.config import QuantConfig
from medquant.quant.embeddings import quantize_embeddings_
from medquant.quant.modules import QuantEmbedding


class TwoTables(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Embedding(10, 32)
        self.b = nn.Embedding(12, 32)
        self.head = nn.Linear(32, 10, bias=False)
        self.head.weight = self.a.weight  # tied to the first table

    def forward(self, ids):
        return self.head(self.a(ids) + self.b(ids))


def test_a_table_that_cannot_be_quantized_leaves_every_table_as_it_was():
    torch.manual_seed(0)
    m = TwoTables()
    with torch.no_grad():
        m.b.weight[11, 4] = float("nan")  # row 11 is never looked up below
    ids = torch.tensor([[1, 2, 3]])
    want = m(ids)
    a, b, head = m.a, m.b, m.head
    with pytest.raises(ValueError, match="NaN"):
        quantize_embeddings_(m, QuantConfig(bits=4, group_size=32), names=["a", "b"])
    assert m.a is a and m.b is b and m.head is head and m.head.weight is m.a.weight
    torch.testing.assert_close(m(ids), want, atol=0, rtol=0)


def test_finite_tables_are_still_all_quantized_and_the_head_tied():
    torch.manual_seed(0)
    m = TwoTables()
    got = quantize_embeddings_(m, QuantConfig(bits=8, scope="channel"), names=["a", "b"])
    assert got == {"embeddings": ["a", "b"], "tied_heads": ["head"]}
    assert isinstance(m.a, QuantEmbedding) and isinstance(m.b, QuantEmbedding)
    ids = torch.tensor([[1, 2, 3]])
    ref = m.a.dequantized_weight()
    want = torch.nn.functional.linear(ref[ids] + m.b.dequantized_weight()[ids], ref)
    torch.testing.assert_close(m(ids), want, atol=1e-4, rtol=1e-4)
