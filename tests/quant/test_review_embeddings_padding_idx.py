"""QuantEmbedding checks and normalises ``padding_idx`` as ``nn.Embedding`` does: an out-of-range index was stored
and failed only later (an AssertionError in ``to_float``), and a negative one was kept negative (its recipe then
differed from the float table's normalised index).

Oracle: ``nn.Embedding`` itself (its constructor refuses / normalises the same values).
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

from medquant.quant.config import QuantConfig
from medquant.quant.modules import QuantEmbedding

CFG = QuantConfig(bits=4, group_size=32)


@pytest.mark.parametrize("pidx", [10, 12, -11])
def test_out_of_range_padding_idx_is_refused_like_nn_embedding(pidx):
    with pytest.raises(AssertionError):
        nn.Embedding(10, 32, padding_idx=pidx)
    with pytest.raises(ValueError, match="padding_idx"):
        QuantEmbedding(10, 32, CFG, padding_idx=pidx)


@pytest.mark.parametrize("pidx", [-1, -10, 0, 9, None])
def test_padding_idx_is_normalised_like_nn_embedding(pidx):
    ref = nn.Embedding(10, 32, padding_idx=pidx)
    q = QuantEmbedding(10, 32, CFG, padding_idx=pidx)
    assert q.padding_idx == ref.padding_idx
    assert q.to_float().padding_idx == ref.padding_idx
    torch.manual_seed(0)
    back = QuantEmbedding.from_float(ref, CFG)
    assert back.padding_idx == ref.padding_idx
