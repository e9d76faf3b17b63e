"""quantize_embeddings_ of a model that is itself one nn.Embedding: there is no parent to swap the table in. It
quantized the table, then failed in swap_module with "swap_module needs a submodule name; the root module cannot
be swapped", a message about an internal call; quantize_ says what to do for a bare Linear, and so should this.

Reference: the table itself (unchanged) and ``QuantEmbedding.from_float``, which the message names and which
quantizes the bare table.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

from medquant.quant.config import QuantConfig
from medquant.quant.embeddings import quantize_embeddings_
from medquant.quant.modules import QuantEmbedding


def test_a_bare_table_is_refused_naming_what_to_do():
    torch.manual_seed(0)
    table = nn.Embedding(16, 8)
    before = table.weight.detach().clone()
    with pytest.raises(ValueError, match=r"itself the table.*QuantEmbedding\.from_float.*nn\.Sequential"):
        quantize_embeddings_(table)
    assert torch.equal(table.weight, before)
    # what the message says works: the table in a holder, or from_float
    holder = nn.Sequential(table)
    assert quantize_embeddings_(holder)["embeddings"] == ["0"]
    q = QuantEmbedding.from_float(table, QuantConfig(bits=8, scope="channel"))
    assert torch.equal(holder[0](torch.arange(16)), q(torch.arange(16)))
