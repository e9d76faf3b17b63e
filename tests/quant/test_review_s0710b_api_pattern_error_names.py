"""A config pattern that matches modules of which none is quantizable names what it matched and why those stay
float: it said only "none of them is an nn.Linear or nn.Conv2d to quantize", also when it named the ``out_proj``
Linear of an ``nn.MultiheadAttention`` (an nn.Linear subclass, left float because the attention reads its weight
directly) or an embedding table (which ``quantize_embeddings_`` quantizes).

Reference: the module names and classes of the model, read by hand from ``named_modules``.
"""
from __future__ import annotations

from collections import OrderedDict

import pytest
from torch import nn

import medquant as mq


def _model():
    return nn.Sequential(OrderedDict(emb=nn.Embedding(8, 16), mha=nn.MultiheadAttention(16, 2), lin=nn.Linear(16, 16)))


def test_an_attention_out_proj_named_in_the_map_is_explained():
    m = _model()
    assert isinstance(m.mha.out_proj, nn.Linear)  # a Linear, yet not quantized: the message must say why
    for pattern in ("mha.out_proj", "re:mha\\..*"):
        with pytest.raises(ValueError, match=r"none of them is an nn.Linear.*mha\.out_proj "
                                             r"\(NonDynamicallyQuantizableLinear\).*MultiheadAttention.*directly"):
            mq.quantize_(m, {pattern: 4})
    assert type(m.lin) is nn.Linear  # nothing changed


def test_an_embedding_named_in_the_map_points_to_quantize_embeddings():
    m = _model()
    with pytest.raises(ValueError, match=r"none of them is an nn.Linear.*emb \(Embedding\).*quantize_embeddings_"):
        mq.quantize_(m, {"emb": 8, "_default": 4})
    assert type(m.lin) is nn.Linear
