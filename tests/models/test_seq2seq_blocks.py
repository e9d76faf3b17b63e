"""Encoder-decoder blocks: both stacks of Whisper (whose encoder reads audio and has no language role), BART,
mBART and T5 are listed, encoder first, in the language scope; their attention / FFN units by name."""
from __future__ import annotations

import pytest

from medquant.models import block_stacks, transformer_blocks
from tests.models.seq2seq_models import ARCHS, build

ENC_DEC = {"whisper": ("model.encoder.layers", "model.decoder.layers"),
           "bart": ("model.encoder.layers", "model.decoder.layers"),
           "mbart": ("model.encoder.layers", "model.decoder.layers"),
           "t5": ("encoder.block", "decoder.block")}


@pytest.mark.parametrize("arch", ARCHS)
def test_both_stacks_encoder_first(arch):
    model = build(arch)
    enc, dec = ENC_DEC[arch]
    want = [[f"{enc}.0", f"{enc}.1"], [f"{dec}.0", f"{dec}.1"]]
    assert block_stacks(model) == want
    for scope in (None, "language", "all"):
        blocks = transformer_blocks(model, scope)
        assert [b.name for b in blocks] == want[0] + want[1], scope
        assert all(b.attention is not None and b.ffn is not None for b in blocks)
        assert all(b.attention.n_heads == 4 and b.attention.head_dim == 16 for b in blocks)
    assert transformer_blocks(model, "vision") == []


def test_whisper_units():
    model = build("whisper")
    enc, dec = transformer_blocks(model)[0], transformer_blocks(model)[2]
    assert enc.role == dec.role == "language"
    for b in (enc, dec):
        a = b.attention
        assert (a.q, a.k, a.v, a.o) == tuple(f"{b.name}.self_attn.{p}" for p in ("q_proj", "k_proj", "v_proj",
                                                                                    "out_proj"))
        assert (b.ffn.inputs, b.ffn.output) == ((f"{b.name}.fc1",), f"{b.name}.fc2")
    assert "heads" not in enc.unsupported
    assert "heads" not in dec.unsupported and enc.cross_attention is None  # the cross-attention is a unit of its own
    c = dec.cross_attention
    assert (c.q, c.k, c.v, c.o) == tuple(f"{dec.name}.encoder_attn.{p}" for p in ("q_proj", "k_proj", "v_proj",
                                                                                   "out_proj"))
    assert (c.n_heads, c.n_kv, c.head_dim) == (4, 4, 16)
