"""``dequantize_`` gives back the float model the quantized one computes with.

Oracles: the independent numpy reader of the packed buffers (``tests.quant.np_reference``) for the dequantized
weights, plain ``torch`` (``x @ W^T + b``, ``W[ids]``) for the outputs, and object identity for the structure (a
module bound under several names, a head tied to its embedding).
"""
from __future__ import annotations

from collections import OrderedDict

import numpy as np
import torch
from torch import nn

from medquant.quant import (
    QuantConfig,
    QuantEmbedding,
    QuantLinear,
    dequantize_,
    quantize_,
    quantize_embeddings_,
)
from tests.quant.np_reference import np_dequant_layer


def _shared_model() -> nn.Module:
    torch.manual_seed(0)
    enc = nn.Sequential(OrderedDict(a=nn.Linear(40, 24), b=nn.Linear(24, 24)))
    m = nn.Sequential(OrderedDict(enc=enc, head=nn.Linear(24, 8)))
    m.alias = m.enc.a  # one module under two names: named_modules() yields only "enc.a"
    m.outer = nn.Sequential(OrderedDict(inner=m.enc))  # a shared container: "outer.inner.a" names it too
    return m


def test_a_module_shared_under_several_names_comes_back_as_one_float_module_under_all_of_them():
    m = _shared_model().eval()
    quantize_(m, QuantConfig(3, group_size=16))
    q = m.enc.a
    assert isinstance(q, QuantLinear) and m.alias is q and m.outer.inner.a is q
    w = torch.from_numpy(np_dequant_layer(q)).float()  # what the quantized layer computes with
    bias = q.bias.detach().clone()
    dequantize_(m)
    assert type(m.enc.a) is nn.Linear
    assert m.alias is m.enc.a and m.outer.inner.a is m.enc.a  # still one module, float under every name
    assert not any(isinstance(mod, QuantLinear) for _, mod in m.named_modules(remove_duplicate=False))
    torch.testing.assert_close(m.alias.weight.detach(), w, rtol=0, atol=1e-6)
    x = torch.randn(5, 40)
    torch.testing.assert_close(m.alias(x), x @ w.T + bias)
    # the float layers keep the model's mode (quantize_ keeps it too)
    assert not any(mod.training for mod in m.modules())


def test_quantized_embeddings_come_back_as_float_tables_with_their_tied_heads_tied_again():
    torch.manual_seed(0)
    m = nn.Module()
    m.emb = nn.Embedding(50, 32, padding_idx=3)
    m.head = nn.Linear(32, 50, bias=False)
    m.head.weight = m.emb.weight  # tied
    m.eval()
    quantize_embeddings_(m, QuantConfig(4, group_size=16))
    assert isinstance(m.emb, QuantEmbedding) and isinstance(m.head, QuantLinear)
    assert not m.emb.training and not m.head.training  # the model's mode, as quantize_ keeps it
    table = torch.from_numpy(np_dequant_layer(m.emb)).float()
    dequantize_(m)
    assert type(m.emb) is nn.Embedding and type(m.head) is nn.Linear
    assert m.head.weight is m.emb.weight  # one table again, as before quantization
    assert m.emb.padding_idx == 3 and not m.emb.training and not m.head.training
    torch.testing.assert_close(m.emb.weight.detach(), table, rtol=0, atol=1e-6)
    ids = torch.tensor([[0, 3, 49], [7, 7, 1]])
    np.testing.assert_allclose(m.emb(ids).detach().numpy(), table[ids].numpy(), atol=1e-6)
    h = torch.randn(2, 32)
    torch.testing.assert_close(m.head(h), h @ table.T)


class _TaggedLinear(nn.Linear):
    """A subclass that computes as nn.Linear (quantize_ takes it) and carries a plain attribute (as
    transformers' EsmFoldLinear carries ``init``)."""

    def __init__(self, in_features, out_features, bias=True, tag="default"):
        super().__init__(in_features, out_features, bias)
        self.tag = tag


class _TaggedConv(nn.Conv2d):
    pass


def test_a_quantized_subclass_of_linear_or_conv_comes_back_as_its_own_class():
    torch.manual_seed(0)
    m = nn.Sequential(OrderedDict(conv=_TaggedConv(3, 8, 3, padding=1), flat=nn.Flatten(),
                                  lin=_TaggedLinear(8 * 4 * 4, 6, tag="final"))).eval()
    quantize_(m, QuantConfig(8, group_size=16))
    assert isinstance(m.lin, QuantLinear)
    w = torch.from_numpy(np_dequant_layer(m.lin)).float()
    bias = m.lin.bias.detach().clone()
    dequantize_(m)
    assert type(m.lin) is _TaggedLinear and m.lin.tag == "final"
    assert type(m.conv) is _TaggedConv and m.conv.padding == (1, 1)
    assert (m.lin.in_features, m.lin.out_features) == (128, 6)
    h = torch.randn(2, 128)
    torch.testing.assert_close(m.lin(h), h @ w.T + bias)  # nn.Linear's computation, on the dequantized weight
    assert m(torch.randn(2, 3, 4, 4)).shape == (2, 6)
