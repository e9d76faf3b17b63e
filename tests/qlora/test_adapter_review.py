"""Adversarial review of QLoRAAdapter: KV cache off on the text config of VLMs while training, and one train / eval
mode for the whole wrapped model (the new LoRA dropouts included), checked against transformers and plain torch."""
from __future__ import annotations

import math

import bitsandbytes as bnb
import pytest
import torch

from medquant.qlora import QLoRAAdapter
from medquant.testing.zoo import ZOO_BY_NAME


def _randomise_b(ad: QLoRAAdapter, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in ad.model.named_parameters():
            if ".lora_B." in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)


@pytest.mark.parametrize("name", ["llava", "qwen2_vl"])
def test_vlm_training_forward_builds_no_kv_cache(name):
    """VLMs keep ``use_cache`` in ``config.text_config``: setting only ``config.use_cache = False`` (a key these
    configs do not even have) left the language model caching keys / values in every training forward (and
    transformers warning 'use_cache=True is incompatible with gradient checkpointing'). Reference: the model's own
    forward with ``use_cache=False``."""
    entry = ZOO_BY_NAME[name]
    model = entry.build()
    inp = entry.inputs(model)
    batch = dict(inp, labels=inp["input_ids"].clone())
    ref = model(**batch, use_cache=False)
    assert getattr(ref, "cache", None) is None and getattr(ref, "past_key_values", None) is None
    ad = QLoRAAdapter(model, r=2)
    ad.model.train()
    out = ad.model(**batch)
    assert getattr(out, "cache", None) is None and getattr(out, "past_key_values", None) is None
    assert model.config.get_text_config().use_cache is False
    # merge() turns the cache back on where the language model reads it (generation)
    merged = ad.merge()
    assert merged.config.get_text_config().use_cache is True
    with torch.no_grad():
        gen = merged(**inp)
    assert getattr(gen, "cache", None) is not None or getattr(gen, "past_key_values", None) is not None


def test_wrapped_model_has_one_mode_and_load_to_continue_training_reproduces_the_saved_outputs(tmp_path):
    """A model in eval mode (as ``from_pretrained`` gives it) was wrapped with its new LoRA dropouts in train mode;
    ``load(..., is_trainable=True)`` then computed with dropout active, giving outputs off by ~1 from the saved
    adapter's. Reference: ``W x + s B A x`` in plain torch (no dropout) on a layer of the loaded model, and the saved
    adapter's eval-mode logits."""
    entry = ZOO_BY_NAME["llama"]
    model = entry.build().eval()
    inp = entry.inputs(model)
    ad = QLoRAAdapter(model, r=4, lora_alpha=8.0, lora_dropout=0.5)
    wrapped_modes = {m.training for m in ad.model.modules()}
    _randomise_b(ad)
    ad.model.eval()
    with torch.no_grad():
        want = ad.model(**inp).logits
    ad.save(tmp_path)

    fresh = entry.build().eval()
    ad2 = QLoRAAdapter.load(fresh, tmp_path, is_trainable=True)
    assert ad2.trainable_parameters()
    with torch.no_grad():
        got = ad2.model(**inp).logits
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    assert not any(m.training for m in ad2.model.modules())
    assert wrapped_modes == {False}  # the mode the model was given in, LoRA dropouts included
    # one adapted layer against plain torch: dequantized NF4 weight + (alpha / sqrt(r)) B A, no dropout
    layer = ad2.model.base_model.model.model.layers[0].self_attn.q_proj
    w = bnb.functional.dequantize_4bit(layer.base_layer.weight.data, layer.base_layer.weight.quant_state)
    a, b = layer.lora_A["default"].weight.detach(), layer.lora_B["default"].weight.detach()
    x = torch.randn(3, w.shape[1], generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(layer(x), x @ (w + 8.0 / math.sqrt(4) * b @ a).T, rtol=1e-5, atol=1e-5)
    # the given training mode is kept too: a train-mode model is wrapped in train mode throughout
    ad3 = QLoRAAdapter(entry.build().train(), r=2)
    assert all(m.training for m in ad3.model.modules())
