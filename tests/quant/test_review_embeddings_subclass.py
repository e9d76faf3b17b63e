"""QuantEmbedding.from_float refuses an nn.Embedding subclass with its own forward (a scaled embedding): it quantized
it and looked rows up unscaled, silently. Subclasses computing as nn.Embedding are still taken.

Oracle: the float module's own output (``module(ids)``) against ``F.embedding`` on the dequantized table.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from medquant.quant.config import QuantConfig
from medquant.quant.modules import QuantEmbedding


class ScaledEmbedding(nn.Embedding):
    def __init__(self, *args, scale: float = 3.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.scale = scale

    def forward(self, ids):
        return super().forward(ids) * self.scale


class TaggedEmbedding(nn.Embedding):
    """Computes as nn.Embedding (no forward of its own)."""

    tag = "vocab"


def test_subclass_with_its_own_forward_is_refused_not_silently_unscaled():
    torch.manual_seed(0)
    table = ScaledEmbedding(20, 32)
    ids = torch.tensor([1, 7, 19])
    cfg = QuantConfig(bits=8, scope="channel")
    # what it would compute: F.embedding on the dequantized table, far from the module's own (scaled) output
    approx = F.embedding(ids, table.weight.detach())
    assert not torch.allclose(table(ids), approx, atol=1e-2)
    with pytest.raises(TypeError, match="ScaledEmbedding"):
        QuantEmbedding.from_float(table, cfg)


def test_subclass_computing_as_nn_embedding_is_still_taken():
    torch.manual_seed(0)
    table = TaggedEmbedding(20, 32, padding_idx=2)
    q = QuantEmbedding.from_float(table, QuantConfig(bits=8, scope="channel"))
    ids = torch.tensor([[1, 2], [19, 0]])
    torch.testing.assert_close(q(ids), F.embedding(ids, q.dequantized_weight()))
    torch.testing.assert_close(q(ids), table(ids), atol=0.02, rtol=0)
