"""A folder written by ``medquant.save`` read by transformers' own ``from_pretrained``.

Reference: the in-memory quantized model (every tensor of its state dict, its dtypes and its logits, compared with
``torch.equal``). Before, ``config.json`` of such a folder held no ``quantization_config``: transformers built the
float model, skipped the packed tensors and initialised every quantized layer's weight randomly, with no error.
"""
from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

import medquant as mq
from medquant.quant.embeddings import quantize_embeddings_
from medquant.quant.modules import QuantEmbedding, QuantLinear
from medquant.testing.zoo import ZOO_BY_NAME, text_kwargs
from tests.hf._helpers import state_equal


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


IDS = torch.arange(2, 20).reshape(2, 9)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_from_pretrained_of_a_medquant_save_folder_gives_the_quantized_model(tmp_path, dtype):
    model = ZOO_BY_NAME["llama"].build().to(dtype)
    mq.quantize_(model, {"model.layers.0.mlp.up_proj": mq.QuantConfig(4, scope="channel", channel_bits=(
        2, 4, 8, 16) * 64), "re:.*": mq.QuantConfig(4, group_size=64)}, skip=["@head"])
    mq.save(model, tmp_path / "ck")
    qc = json.loads((tmp_path / "ck" / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "medquant" and "model.layers.0.mlp.up_proj" in qc["modules"]
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "ck").eval()
    assert isinstance(back.model.layers[0].self_attn.q_proj, QuantLinear)
    assert back.model.layers[0].mlp.up_proj.config.channel_bits == model.model.layers[0].mlp.up_proj.config.channel_bits
    state_equal(back, model)
    if dtype == torch.float32:  # bfloat16: transformers rebuilds the rotary inv_freq in float32 (documented)
        assert torch.equal(_logits(back, IDS), _logits(model, IDS))
    assert mq.load(tmp_path / "ck").config.quantization_config["modules"] == qc["modules"]  # medquant.load too


def test_from_pretrained_of_a_medquant_save_folder_ties_a_quantized_head_again(tmp_path):
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**{**text_kwargs(), "tie_word_embeddings": True})).eval()
    mq.quantize_(model, mq.QuantConfig(4, group_size=32), skip=["lm_head"])
    quantize_embeddings_(model, mq.QuantConfig(4, group_size=32), tie=True)
    mq.save(model, tmp_path / "ck")
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "ck").eval()
    assert isinstance(back.model.embed_tokens, QuantEmbedding) and isinstance(back.lm_head, QuantLinear)
    assert back.lm_head.qweight_4 is back.model.embed_tokens.qweight_4
    state_equal(back, model)
    assert torch.equal(_logits(back, IDS), _logits(model, IDS))


def test_a_float_model_s_config_is_written_as_before(tmp_path):
    model = ZOO_BY_NAME["llama"].build()
    mq.save(model, tmp_path / "ck")
    assert "quantization_config" not in json.loads((tmp_path / "ck" / "config.json").read_text())
    state_equal(AutoModelForCausalLM.from_pretrained(tmp_path / "ck"), model)


def test_a_save_pretrained_call_of_a_rank_that_does_not_save_leaves_the_checkpoint(tmp_path):
    """``model.save_pretrained(dir, is_main_process=False)`` (what the other ranks of a distributed script run)
    writes nothing: reference, transformers' own ``save_pretrained`` of a float model, whose folder keeps its
    files. Before, medquant's crash-safe save published an empty version and dropped the checkpoint rank 0
    had just written."""
    ref = ZOO_BY_NAME["llama"].build()
    type(ref).save_pretrained(ref, tmp_path / "ref")
    files = sorted(p.name for p in (tmp_path / "ref").iterdir())
    type(ref).save_pretrained(ref, tmp_path / "ref", is_main_process=False)
    assert sorted(p.name for p in (tmp_path / "ref").iterdir()) == files

    model = ZOO_BY_NAME["llama"].build()
    mq.quantize_(model, mq.QuantConfig(4, group_size=64))
    model.save_pretrained(tmp_path / "ck")  # rank 0
    saved = {p.name: p.read_bytes() for p in (tmp_path / "ck").iterdir()}
    model.save_pretrained(tmp_path / "ck", is_main_process=False)  # another rank, finishing after rank 0
    assert {p.name: p.read_bytes() for p in (tmp_path / "ck").iterdir()} == saved
    state_equal(AutoModelForCausalLM.from_pretrained(tmp_path / "ck"), model)
    mq.hf.save_pretrained(model, tmp_path / "other", is_main_process=False)
    assert not any(p.name.startswith(".other.mq-v-") for p in tmp_path.iterdir())  # no version published
