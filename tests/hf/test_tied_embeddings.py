"""Quantized embeddings through the transformers integration: a tied quantized head is saved once and tied again.

Reference: the medquant model's own logits before saving (bit-equal after the round trip) and the safetensors
file's keys (the head's packed tensors are not stored a second time).
"""
from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

import medquant as mq
from medquant.hf import save_pretrained
from medquant.quant import QuantLinear
from medquant.quant.embeddings import quantize_embeddings_
from medquant.quant.modules import QuantEmbedding
from medquant.testing.zoo import text_kwargs


def _model(tied: bool) -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**{**text_kwargs(), "tie_word_embeddings": tied})).eval()


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def test_a_tied_quantized_head_is_saved_once_and_tied_again(tmp_path):
    model = _model(tied=True)
    mq.quantize_(model, mq.QuantConfig(4, group_size=32), skip=["lm_head"])
    quantize_embeddings_(model, mq.QuantConfig(4, group_size=32), tie=True)
    assert model.lm_head.qweight_4 is model.model.embed_tokens.qweight_4
    ids = torch.randint(0, 200, (2, 9))
    ref = _logits(model, ids)
    save_pretrained(model, tmp_path / "a")
    assert "_tied_weights_keys" not in model.__dict__  # the declaration lives only during the save
    with safe_open(str(tmp_path / "a" / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "model.embed_tokens.qweight_4" in keys and not any(k.startswith("lm_head.") for k in keys)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "a").eval()
    assert isinstance(loaded.model.embed_tokens, QuantEmbedding) and isinstance(loaded.lm_head, QuantLinear)
    assert loaded.lm_head.qweight_4 is loaded.model.embed_tokens.qweight_4  # one copy in memory again
    torch.testing.assert_close(_logits(loaded, ids), ref, rtol=0, atol=0)
    loaded.save_pretrained(tmp_path / "b")  # and again
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "b").eval()
    assert again.lm_head.scales_4 is again.model.embed_tokens.scales_4
    torch.testing.assert_close(_logits(again, ids), ref, rtol=0, atol=0)


@pytest.mark.parametrize("head", ["quantized", "float"])
def test_untied_quantized_embedding_round_trip(tmp_path, head):
    model = _model(tied=False)
    mq.quantize_(model, mq.QuantConfig(4, group_size=32), skip=None if head == "quantized" else ["lm_head"])
    quantize_embeddings_(model, mq.QuantConfig(8, scope="channel"), tie=False)
    ids = torch.randint(0, 200, (1, 7))
    ref = _logits(model, ids)
    save_pretrained(model, tmp_path / "m")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    assert isinstance(loaded.model.embed_tokens, QuantEmbedding)
    assert isinstance(loaded.lm_head, QuantLinear) == (head == "quantized")
    torch.testing.assert_close(_logits(loaded, ids), ref, rtol=0, atol=0)
