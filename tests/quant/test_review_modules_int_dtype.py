"""Dequantizing to an integer dtype is refused: ``lookup(ids, dtype=torch.int32)`` and
``dequantized_weight(torch.int64)`` returned the values truncated towards zero (mostly 0), silently.

Oracle: plain torch, where the float table cast to that dtype differs from the float values it stands for, and
``F.embedding`` / the float dequantized weight for floating dtypes.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from medquant.quant.config import QuantConfig
from medquant.quant.modules import QuantEmbedding, QuantLinear


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64, torch.uint8, torch.bool])
def test_lookup_to_an_integer_dtype_is_refused_not_truncated(dtype):
    torch.manual_seed(0)
    q = QuantEmbedding.from_float(nn.Embedding(10, 32), QuantConfig(bits=4, group_size=32))
    ids = torch.tensor([1, 4])
    rows = F.embedding(ids, q.dequantized_weight())
    assert not torch.equal(rows.to(dtype).to(rows.dtype), rows)  # the cast would lose the values
    with pytest.raises(TypeError, match="floating"):
        q.lookup(ids, dtype)
    torch.testing.assert_close(q.lookup(ids, torch.float64), rows.double())


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
def test_dequantized_weight_to_an_integer_dtype_is_refused(dtype):
    torch.manual_seed(0)
    lin = nn.Linear(32, 6)
    q = QuantLinear.from_float(lin, QuantConfig(bits=4, group_size=32))
    w = q.dequantized_weight()
    assert not torch.equal(w.to(dtype).float(), w)
    with pytest.raises(TypeError, match="floating"):
        q.dequantized_weight(dtype)
    torch.testing.assert_close(q.dequantized_weight(torch.float64), w.double())
    torch.testing.assert_close(w, lin.weight.detach(), atol=0.05, rtol=0)
