"""A parametrization the architecture builds itself (``torch.nn.utils.parametrize``) is part of the model, not a
change the file would lose: Wav2Vec2 / HuBERT / WavLM register ``parametrizations.weight_norm`` on their
positional convolution (``encoder.pos_conv_embed.conv``) in ``__init__``. A model of the architecture (built from
the saved config by ``medquant.load`` or transformers' ``from_pretrained``) has that parametrization again and
reads ``parametrizations.weight.original0/1`` from the file, as transformers' own ``save_pretrained`` /
``from_pretrained`` round trip shows. ``medquant.save`` and ``medquant.hf.save_pretrained`` refused every such
model (stock speech encoders could not be saved at all), and the refusal's remedy (make the parametrization
permanent) gave a folder a model of the architecture cannot load. A parametrization the architecture does not
build (a user's, or one stacked on the native one) is still refused.

References: the model's own logits; transformers' ``save_pretrained`` / ``from_pretrained`` of the same model."""
from __future__ import annotations

import pytest
import torch
import transformers as tf
from torch import nn

import medquant
import medquant.hf

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _wav2vec2() -> nn.Module:
    torch.manual_seed(0)
    cfg = tf.Wav2Vec2Config(vocab_size=32, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                            intermediate_size=64, conv_dim=(16, 16), conv_stride=(5, 2), conv_kernel=(10, 3),
                            num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4)
    model = tf.Wav2Vec2ForCTC(cfg).eval()
    with torch.no_grad():  # g (original0) away from its initial ||v||, so a weight rebuilt from v alone differs
        model.wav2vec2.encoder.pos_conv_embed.conv.parametrizations.weight.original0.mul_(1.7)
    return model


def _logits(model: nn.Module) -> torch.Tensor:
    x = torch.randn(2, 4000, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return model(x).logits


def test_the_architectures_own_weight_norm_saves_and_loads_like_transformers(tmp_path):
    model = _wav2vec2()
    want = _logits(model)
    model.save_pretrained(tmp_path / "hf")  # transformers' own round trip: the reference behaviour
    assert torch.equal(_logits(tf.Wav2Vec2ForCTC.from_pretrained(tmp_path / "hf").eval()), want)
    medquant.save(model, tmp_path / "mq")
    assert torch.equal(_logits(medquant.load(tmp_path / "mq")), want)
    assert torch.equal(_logits(tf.Wav2Vec2ForCTC.from_pretrained(tmp_path / "mq").eval()), want)
    # quantized (its Linear layers; the positional convolution stays float and parametrized): both writers
    medquant.quantize_(model, medquant.QuantConfig(4, group_size=16))
    want = _logits(model)
    medquant.save(model, tmp_path / "q")
    assert torch.equal(_logits(medquant.load(tmp_path / "q")), want)
    medquant.hf.save_pretrained(model, tmp_path / "qhf")
    assert torch.equal(_logits(tf.Wav2Vec2ForCTC.from_pretrained(tmp_path / "qhf").eval()), want)


def test_a_parametrization_the_architecture_does_not_build_is_still_refused(tmp_path):
    model = _wav2vec2()
    nn.utils.parametrizations.weight_norm(model.lm_head)
    with pytest.raises(ValueError, match=r"1 module\(s\).*lm_head: weight.*remove_parametrizations") as err:
        medquant.save(model, tmp_path / "a")
    assert "pos_conv_embed" not in str(err.value)
    assert not (tmp_path / "a").exists()
    model = _wav2vec2()  # a second parametrization stacked on the native one
    conv = model.wav2vec2.encoder.pos_conv_embed.conv
    nn.utils.parametrize.register_parametrization(conv, "weight", nn.Identity())
    with pytest.raises(ValueError, match=r"pos_conv_embed.conv: weight"):
        medquant.save(model, tmp_path / "b")
