"""A tiny random LLaMA folder with a real tokenizer, as the command-line tests run ``medquant`` verbs on it, and a
text file of real reports to calibrate and train it with."""
from __future__ import annotations

from pathlib import Path

import torch

from tests.prune.real_models import REPORTS, minilm_dir


def tiny_llama_folder(path: Path) -> Path:
    """Save a 2-layer LLaMA (hidden 64, 4 heads / 2 KV heads, untied head; weights drawn with seed 0) with MiniLM's
    real tokenizer (its vocabulary size) into the folder ``path``, as ``save_pretrained`` writes it."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(str(minilm_dir()))
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=tok.vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, tie_word_embeddings=False)
    LlamaForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def report_text_file(folder: Path) -> Path:
    """``folder / "t.txt"``: the real reports eight times over, one per line, each numbered so no two lines match."""
    text = folder / "t.txt"
    text.write_text("\n".join(f"{r} ({i})" for i, r in enumerate(REPORTS * 8)))
    return text
