"""More attention classes whose forward cannot run with fewer heads than they were built with: they reshape the
heads' concatenated output to the model width (``self.embed_dim``, or ``embed_dim`` read from the input), not to
``heads x head_dim``: XGLM's and MVP's attention, LED's decoder attention (self- and cross-attention), GroupViT's
attention and SpeechT5's. Pruned, the model's forward failed with a shape error; their heads are now refused up
front with the reason named (as TrOCR's and Moonshine's), and FFN neurons are still pruned exactly: the reference
is the unpruned model with the removed neurons' ``fc2`` input columns zeroed (plain torch)."""
from __future__ import annotations

import copy

import pytest
import torch
import transformers as tf

from medquant.models import transformer_blocks
from medquant.prune import StructuredPruner

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _ids(*shape: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(3, 100, shape, generator=torch.Generator().manual_seed(seed))


_SEQ2SEQ = {"vocab_size": 128, "d_model": 64, "encoder_layers": 2, "decoder_layers": 2, "encoder_attention_heads": 4,
            "decoder_attention_heads": 4, "encoder_ffn_dim": 96, "decoder_ffn_dim": 96}


def _xglm():
    cfg = tf.XGLMConfig(vocab_size=128, d_model=64, num_layers=2, attention_heads=4, ffn_dim=96,
                        max_position_embeddings=32)
    return tf.XGLMForCausalLM(cfg), {"input_ids": _ids(2, 8)}, "XGLMAttention"


def _mvp():
    model = tf.MvpForConditionalGeneration(tf.MvpConfig(max_position_embeddings=32, **_SEQ2SEQ))
    return model, {"input_ids": _ids(2, 8), "decoder_input_ids": _ids(2, 5, seed=2)}, "MvpAttention"


def _led():
    cfg = tf.LEDConfig(max_encoder_position_embeddings=64, max_decoder_position_embeddings=32, attention_window=4,
                       **_SEQ2SEQ)
    model = tf.LEDForConditionalGeneration(cfg)
    return model, {"input_ids": _ids(2, 8), "decoder_input_ids": _ids(2, 5, seed=2)}, "LEDDecoderAttention"


def _groupvit():
    text = {"vocab_size": 128, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
            "num_attention_heads": 4, "max_position_embeddings": 16}
    vision = {"hidden_size": 64, "intermediate_size": 96, "depths": [1, 1], "num_group_tokens": [4, 0],
              "num_output_groups": [4, 4], "num_attention_heads": 4, "image_size": 16, "patch_size": 8,
              "num_hidden_layers": 2}
    cfg = tf.GroupViTConfig(text_config=text, vision_config=vision, projection_dim=32, projection_intermediate_dim=64)
    batch = {"input_ids": _ids(2, 6), "pixel_values": torch.randn(2, 3, 16, 16,
                                                                  generator=torch.Generator().manual_seed(3))}
    return tf.GroupViTModel(cfg), batch, "GroupViTAttention"


def _speecht5():
    cfg = tf.SpeechT5Config(vocab_size=128, hidden_size=64, encoder_layers=2, decoder_layers=2,
                            encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=96,
                            decoder_ffn_dim=96, max_text_positions=64, max_speech_positions=64)
    batch = {"input_values": torch.randn(2, 4000, generator=torch.Generator().manual_seed(3)),
             "decoder_input_ids": _ids(2, 5)}
    return tf.SpeechT5ForSpeechToText(cfg), batch, "SpeechT5Attention"


def _out(model, batch):
    with torch.no_grad():
        out = model(**batch)
    return out.logits if getattr(out, "logits", None) is not None else out.logits_per_image


@pytest.mark.parametrize("build", [_xglm, _mvp, _led, _groupvit, _speecht5],
                         ids=["xglm", "mvp", "led", "groupvit", "speecht5"])
def test_heads_of_attention_reshaping_to_the_model_width_are_refused_and_neurons_still_pruned(build):
    torch.manual_seed(0)
    model, batch, cls = build()
    model.eval()
    blocks = [b for b in transformer_blocks(model, "all", clamp_wrappers=True) if b.attention is not None
              and type(model.get_submodule(b.attention.holder)).__name__ == cls]
    assert blocks
    before = {n: p.clone() for n, p in model.named_parameters()}
    heads = {b.name: 0.5 for b in blocks}
    with pytest.raises(ValueError, match=f"{cls} reshapes"):  # before: pruned, then the forward failed
        StructuredPruner(heads, 0.0, scope="all", progress=False).plan(model, calib=[batch])
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())  # planning changes nothing
    with_ffn = {b.name: 0.5 for b in blocks if b.ffn is not None}
    if not with_ffn:  # SpeechT5's FFN (feed_forward.intermediate_dense / output_dense) is not one medquant prunes
        return
    pruner = StructuredPruner(0.0, with_ffn, scope="all", progress=False)
    plan = pruner.plan(model, calib=[batch])
    pruned = {b for b, k in plan.neurons.items() if len(k) < plan.sizes[b]["neurons"]}
    assert pruned and pruned <= set(with_ffn)
    ref = copy.deepcopy(model)
    for name in pruned:  # the reference: removed neurons' fc2 input columns zeroed
        kept = plan.neurons[name]
        down = ref.get_submodule(next(b.ffn.output for b in blocks if b.name == name))
        gone = [i for i in range(down.in_features) if i not in set(kept)]
        with torch.no_grad():
            down.weight[:, gone] = 0
    pruner.apply(model, plan)
    torch.testing.assert_close(_out(model, batch), _out(ref, batch), rtol=1e-5, atol=1e-5)
