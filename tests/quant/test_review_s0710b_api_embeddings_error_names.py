"""quantize_embeddings_'s refusal of a table that cannot be quantized names that table, as quantize_ names the
layer: with several tables (``names=[...]``, or every ``nn.Embedding`` of a model without
``get_input_embeddings``) the message said only "weights contain NaN/inf values" / "on the meta device", not
which table.

Reference: the table that was given the NaN / put on the meta device by the test itself.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

from medquant.quant.config import QuantConfig
from medquant.quant.embeddings import quantize_embeddings_


class Tables(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.words = nn.Embedding(10, 32)
        self.positions = nn.Embedding(12, 32)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.words(ids) + self.positions(ids)


def test_a_table_with_nan_is_named():
    torch.manual_seed(0)
    m = Tables()
    with torch.no_grad():
        m.positions.weight[3, 1] = float("nan")
    with pytest.raises(ValueError, match=r"'positions'.*NaN"):
        quantize_embeddings_(m, QuantConfig(bits=8, scope="channel"))
    assert type(m.words) is nn.Embedding and type(m.positions) is nn.Embedding  # nothing changed


def test_a_table_on_the_meta_device_is_named():
    m = Tables()
    m.words = nn.Embedding(10, 32, device="meta")
    with pytest.raises(ValueError, match=r"'words'.*meta"):
        quantize_embeddings_(m, names=["positions", "words"])
    assert type(m.positions) is nn.Embedding
