"""Attention classes whose forward cannot run with fewer heads keep them: TrOCR's (``TrOCRAttention`` reshapes its
output to ``embed_dim``) and Moonshine's (``MoonshineAttention`` reshapes its queries with the config's
``num_key_value_heads``). Pruning their heads made the pruned model's forward fail with a shape error; now the heads
are refused up front with the reason named (a head ratio for them alone raises), the FFN neurons are still pruned,
and the pruned model equals the reference with the removed neurons' ``fc2`` input columns zeroed (plain torch)."""
from __future__ import annotations

import copy

import pytest
import torch
import transformers as tf

from medquant.prune import StructuredPruner


def _trocr():
    enc = tf.ViTConfig(image_size=16, patch_size=8, num_channels=3, hidden_size=48, num_hidden_layers=2,
                       num_attention_heads=4, intermediate_size=96)
    dec = tf.TrOCRConfig(vocab_size=128, d_model=64, decoder_layers=2, decoder_attention_heads=4,
                         decoder_ffn_dim=96, cross_attention_hidden_size=48, max_position_embeddings=32,
                         is_decoder=True, add_cross_attention=True)
    cfg = tf.VisionEncoderDecoderConfig.from_encoder_decoder_configs(enc, dec)
    cfg.decoder_start_token_id, cfg.pad_token_id = 1, 0
    gen = torch.Generator().manual_seed(1)
    batch = {"pixel_values": torch.randn(2, 3, 16, 16, generator=gen),
             "decoder_input_ids": torch.randint(3, 128, (2, 6), generator=gen)}
    return tf.VisionEncoderDecoderModel(config=cfg), batch, "TrOCRAttention"


def _moonshine():
    cfg = tf.MoonshineConfig(vocab_size=128, hidden_size=64, intermediate_size=96, encoder_num_hidden_layers=2,
                             decoder_num_hidden_layers=2, encoder_num_attention_heads=4, decoder_num_attention_heads=4,
                             encoder_num_key_value_heads=4, decoder_num_key_value_heads=4, pad_token_id=0,
                             bos_token_id=1, eos_token_id=2, decoder_start_token_id=1)
    gen = torch.Generator().manual_seed(1)
    batch = {"input_values": torch.randn(2, 2000, generator=gen),
             "decoder_input_ids": torch.randint(3, 128, (2, 6), generator=gen)}
    return tf.MoonshineForConditionalGeneration(cfg), batch, "MoonshineAttention"


@pytest.mark.parametrize("build", [_trocr, _moonshine], ids=["trocr", "moonshine"])
def test_heads_are_refused_with_the_reason_and_neurons_still_pruned_exactly(build):
    torch.manual_seed(0)
    model, batch, cls = build()
    model.eval()
    with pytest.raises(ValueError, match=f"{cls} reshapes"):  # before: pruned, then the forward failed
        StructuredPruner(0.5, 0.0, progress=False).plan(model, calib=[batch])
    pruner = StructuredPruner(0.0, 0.5, progress=False)
    plan = pruner.plan(model, calib=[batch])
    assert plan.neurons
    ref = copy.deepcopy(model)
    for name, kept in plan.neurons.items():  # the reference: removed neurons' fc2 input columns zeroed
        down = next(m for n, m in ref.named_modules() if n.startswith(name + ".") and n.endswith("fc2"))
        gone = [i for i in range(down.in_features) if i not in set(kept)]
        with torch.no_grad():
            down.weight[:, gone] = 0
    pruner.apply(model, plan)
    with torch.no_grad():
        torch.testing.assert_close(model(**batch, use_cache=False).logits, ref(**batch, use_cache=False).logits,
                                   rtol=1e-5, atol=1e-5)
