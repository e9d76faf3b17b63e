"""``quantize_embeddings_`` with a float head tied to the table that has a bias: it is not replaced by a tied
``QuantLinear`` (a tied head shares the table's packed tensors and has no bias), so it keeps the float table - its
outputs unchanged - and says so with a ``RuntimeWarning`` naming it, instead of leaving it out silently (the model
then stores the table twice: packed for the lookup, float for the head)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from medquant import QuantConfig, quantize_embeddings_


class _Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(40, 32)
        self.head = nn.Linear(32, 40, bias=True)
        self.head.weight = self.emb.weight

    def forward(self, ids):
        return self.head(self.emb(ids))


def test_a_tied_head_with_a_bias_stays_float_with_a_warning():
    torch.manual_seed(0)
    model = _Tied().eval()
    ids = torch.randint(0, 40, (2, 5))
    float_weight = model.emb.weight.detach().clone()
    with pytest.warns(RuntimeWarning, match="'head'.*bias"):
        done = quantize_embeddings_(model, QuantConfig(4, group_size=32), names=["emb"])
    assert done == {"embeddings": ["emb"], "tied_heads": []}
    assert type(model.head) is nn.Linear and torch.equal(model.head.weight, float_weight)
    hidden = model.emb(ids)  # the quantized lookup
    assert torch.equal(model(ids), hidden @ float_weight.T + model.head.bias)  # the head's float reference


def test_a_tied_head_without_a_bias_is_tied_without_a_warning():
    import warnings

    model = _Tied().eval()
    model.head.bias = None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        done = quantize_embeddings_(model, QuantConfig(4, group_size=32), names=["emb"])
    assert done == {"embeddings": ["emb"], "tied_heads": ["head"]}
