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


LLAVA_TEMPLATE = ("{% for m in messages %}{% for c in m['content'] %}{% if c['type'] == 'image' %}<image>\n"
                  "{% else %}{{ c['text'] }}{% endif %}{% endfor %}{% endfor %}")


def tiny_llava_folder(path: Path) -> Path:
    """Save a tiny LLaVA (a 2-layer LLaMA, hidden 64; a 2-layer CLIP vision tower on 28 x 28 images in 14 x 14
    patches; weights drawn with seed 0) with its processor - a CLIP image processor, MiniLM's real tokenizer plus an
    ``<image>`` token, and a chat template placing the image before the text - into the folder ``path``."""
    from transformers import (
        AutoTokenizer,
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    tok = AutoTokenizer.from_pretrained(str(minilm_dir()))
    tok.add_special_tokens({"additional_special_tokens": ["<image>"]})
    torch.manual_seed(0)
    cfg = LlavaConfig(
        text_config=LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                num_attention_heads=4, num_key_value_heads=2, head_dim=16),
        vision_config=CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                       num_attention_heads=2, image_size=28, patch_size=14, projection_dim=32),
        image_token_index=tok.convert_tokens_to_ids("<image>"))
    LlavaForConditionalGeneration(cfg).save_pretrained(path)
    LlavaProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28}),
        tokenizer=tok, patch_size=14, vision_feature_select_strategy="default", num_additional_image_tokens=1,
        chat_template=LLAVA_TEMPLATE).save_pretrained(path)
    return path


def kermany_index() -> Path:
    """The index CSV of the real Kermany chest X-rays (``path``, ``split``, ``label`` columns; test rows first);
    the calling test is skipped when the data is not there."""
    import pytest

    from medquant.data import default_data_dir

    index = default_data_dir() / "kermany_pediatric_cxr_224" / "index.csv"
    if not index.is_file():
        pytest.skip(f"the real chest X-rays are not at {index} (set MEDQUANT_DATA_DIR)")
    return index
