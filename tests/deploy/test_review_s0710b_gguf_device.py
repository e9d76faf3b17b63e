"""format="gguf" of a model on a GPU: the same file as from the model on the CPU, and the model is left where it was.

The project accepts models "on the CPU or one GPU" (``medquant.deploy.common``); the GGUF writer packs with numpy,
which reads CPU memory only. Reference: the export of the same model on the CPU (an independent run of the same
weights), tensor by tensor and key by key.
"""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

pytest.importorskip("gguf")

from gguf import GGUFReader

from medquant import quantize_embeddings_
from medquant.deploy import export
from medquant.quant.api import quantize_
from medquant.quant.config import QuantConfig

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _contents(path):
    r = GGUFReader(str(path))
    tensors = {t.name: (t.tensor_type.name, np.array(t.data)) for t in r.tensors}
    keys = {k: f.contents() for k, f in r.fields.items() if k != "general.name"}
    return tensors, keys


@needs_cuda
def test_a_model_on_a_gpu_gives_the_file_of_the_model_on_the_cpu(tok_dir, tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, attention_bias=True, mlp_bias=True)
    model = LlamaForCausalLM(cfg).eval()
    mixed = tuple(0 if i % 5 == 0 else (8 if i % 3 == 0 else 4) for i in range(128))
    quantize_(model, {
        "model.layers.0.self_attn.q_proj": QuantConfig(bits=4, group_size=32, channel_bits=mixed),  # Q8_0, permuted
        "model.layers.0.self_attn.k_proj": QuantConfig(bits=4, group_size=64, symmetric=False),  # Q4_1, permuted
        "model.layers.0.mlp.up_proj": QuantConfig(bits=8, group_size=32, symmetric=False),  # promoted
        "model.layers.1.mlp.down_proj": QuantConfig(bits=2, scope="channel", symmetric=False),  # Q4_0
        "_default": QuantConfig(bits=4, group_size=32, symmetric=True),
    })
    quantize_embeddings_(model, QuantConfig(bits=8, group_size=32, symmetric=True))  # token_embd in Q8_0
    gpu = copy.deepcopy(model).to("cuda")
    export(model, tmp_path / "cpu.gguf", format="gguf", source=tok_dir, promote=True)
    export(gpu, tmp_path / "gpu.gguf", format="gguf", source=tok_dir, promote=True)
    want_t, want_k = _contents(tmp_path / "cpu.gguf")
    got_t, got_k = _contents(tmp_path / "gpu.gguf")
    assert got_k == want_k
    assert set(got_t) == set(want_t)
    for name, (typ, data) in want_t.items():
        assert got_t[name][0] == typ, name
        assert np.array_equal(got_t[name][1], data), name
    assert all(p.device.type == "cuda" for p in gpu.parameters())
    assert all(b.device.type == "cuda" for b in gpu.buffers())
