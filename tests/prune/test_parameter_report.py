"""parameter_report: logical parameter counts unchanged by quantization (embedding tables and tied heads
included), and ``bytes`` equal to the bytes of the tensors in ``state_dict`` (what a checkpoint stores)."""
from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import medquant as mq
from medquant.prune import StructuredPruner, load_pruned, parameter_report, save_pruned
from medquant.quant.embeddings import quantize_embeddings_
from medquant.testing.zoo import ZOO_BY_NAME


def _state_bytes(model):
    seen, total = set(), 0
    for t in model.state_dict().values():  # tied tensors: the same storage under two names
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), t.shape, t.dtype)
        if key not in seen:
            seen.add(key)
            total += t.numel() * t.element_size()
    return total


@pytest.mark.parametrize("tie", [False, True])
def test_quantized_embeddings_keep_logical_counts(tie):
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tie))
    before = parameter_report(model)
    cfg = mq.QuantConfig(bits=4, group_size=32)
    mq.quantize_(model, cfg)
    quantize_embeddings_(model, cfg)
    assert bool(mq.quant.modules.tied_heads(model)) == tie
    after = parameter_report(model)
    for key in ("params", "embedding_params", "non_embedding_params"):
        assert after[key] == before[key], key
    assert before["embedding_params"] == 256 * 64
    assert after["bytes"] == _state_bytes(model) < before["bytes"] == _state_bytes(model.__class__(model.config))


def test_reload_after_drop_blocks_and_quantize_reports_the_same(tmp_path):
    model = ZOO_BY_NAME["gemma3_text"].build()  # dropping block 0 leaves no sliding-window layer
    StructuredPruner(drop_blocks=["model.layers.0"], progress=False).prune(model)
    mq.quantize_(model, mq.QuantConfig(bits=4, group_size=32))
    save_pruned(model, tmp_path)
    loaded = load_pruned(tmp_path)
    assert parameter_report(loaded) == parameter_report(model)
    assert parameter_report(model)["bytes"] == _state_bytes(model)
