"""quantize_embeddings_ on a model without any nn.Embedding table (a ViT / CNN, or an LM whose tables were
already swapped for something else) returned ``{"embeddings": [], "tied_heads": []}`` without a word, where
quantize_ warns when it quantizes nothing. It now warns, naming the model class.

Reference: the model's modules, read with plain torch (no ``nn.Embedding`` among them).
"""
from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from medquant.quant.config import QuantConfig
from medquant.quant.embeddings import quantize_embeddings_


def test_a_model_without_tables_warns():
    m = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Flatten(), nn.LazyLinear(2))
    m(torch.randn(1, 3, 8, 8))
    assert not any(isinstance(s, nn.Embedding) for s in m.modules())
    with pytest.warns(UserWarning, match="quantize_embeddings_ quantized nothing in Sequential"):
        assert quantize_embeddings_(m) == {"embeddings": [], "tied_heads": []}


def test_a_model_with_a_table_does_not_warn():
    m = nn.Sequential(nn.Embedding(10, 8), nn.Linear(8, 2))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert quantize_embeddings_(m, QuantConfig(bits=8, scope="channel"))["embeddings"] == ["0"]
