"""``quantize_embeddings_`` on a table used under several names. One ``nn.Embedding`` bound under two names (``self.
b = self.a``), or two plain ``nn.Embedding`` modules holding one weight parameter (T5 under transformers 5:
``encoder.embed_tokens`` and ``decoder.embed_tokens`` share ``shared.weight``), became a ``QuantEmbedding`` under
the name quantized only: the other uses kept looking up the float table, without a word (T5's encoder and
decoder, the ones its forward reads, stayed float). Reference: the rows the table's quantized codes give,
``(u - z) * s`` (``QuantEmbedding.to_float``), looked up with plain torch."""
from __future__ import annotations

import copy

import torch
from torch import nn

import medquant
from medquant import QuantConfig
from medquant.quant.embeddings import quantize_embeddings_
from medquant.quant.modules import QuantEmbedding

CFG = QuantConfig(4, group_size=16)


class _TwoUses(nn.Module):
    def __init__(self, same_module: bool):
        super().__init__()
        self.a = nn.Embedding(50, 32)
        if same_module:
            self.b = self.a
        else:
            self.b = nn.Embedding(50, 32)
            self.b.weight = self.a.weight  # one parameter, two modules (transformers' tie)

    def forward(self, ids):
        return self.a(ids) + 2 * self.b(ids)


def _check(same_module: bool, tmp_path) -> None:
    torch.manual_seed(0)
    model = _TwoUses(same_module)
    fresh = copy.deepcopy(model)
    done = quantize_embeddings_(model, CFG, names=["a"])
    assert isinstance(model.a, QuantEmbedding) and model.b is model.a
    assert done["embeddings"] == ["a", "b"]
    ids = torch.randint(0, 50, (3, 7))
    table = model.a.to_float().weight.detach()
    with torch.no_grad():
        assert torch.equal(model(ids), table[ids] + 2 * table[ids])
    path = medquant.save(model, tmp_path / "ck")
    loaded = medquant.load(path, model=fresh)
    assert loaded.b is loaded.a
    with torch.no_grad():
        assert torch.equal(loaded(ids), model(ids))


def test_one_embedding_module_under_two_names_is_quantized_under_both(tmp_path):
    _check(True, tmp_path)


def test_two_embedding_modules_holding_one_weight_become_one_quantized_table(tmp_path):
    _check(False, tmp_path)
