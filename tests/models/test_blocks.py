"""The one block finder: block stacks in forward order and the attention / FFN units of each block."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from medquant.models import (
    block_stacks,
    language_model_layers,
    model_roles,
    transformer_blocks,
    vision_layers,
)
from medquant.testing.zoo import ZOO_BY_NAME, tiny_cnn, zoo_params


@zoo_params
def test_stacks_are_vision_then_language(entry):
    model = entry.build()
    expected = [g for g in (vision_layers(model), language_model_layers(model)) if g]
    assert block_stacks(model) == expected
    assert expected, f"{entry.name}: no blocks found"


@zoo_params
def test_transformer_blocks_lie_in_the_stacks(entry):
    model = entry.build()
    stacks = block_stacks(model)
    listed = [n for g in stacks for n in g]
    blocks = transformer_blocks(model, "all")
    assert blocks
    assert all(b.name in listed for b in blocks)
    # language blocks first, then vision; each in stack order
    roles = [b.role for b in blocks]
    assert roles == sorted(roles, key=lambda r: r != "language")
    for b in blocks:
        assert b.stack == b.name.rpartition(".")[0]
        assert model.get_submodule(b.stack)[b.index] is model.get_submodule(b.name)
    default = transformer_blocks(model)
    want = "language" if "language" in model_roles(model) else "vision"
    assert {b.role for b in default} == {want}


def test_units_of_a_gqa_decoder():
    model = ZOO_BY_NAME["qwen2"].build()
    b = transformer_blocks(model)[0]
    a, f = b.attention, b.ffn
    assert (b.name, b.stack, b.index, b.role) == ("model.layers.0", "model.layers", 0, "language")
    assert a.q == "model.layers.0.self_attn.q_proj" and a.o == "model.layers.0.self_attn.o_proj"
    assert (a.n_heads, a.n_kv, a.group_size) == (4, 2, 2)
    assert a.n_heads * a.head_dim == model.get_submodule(a.q).out_features
    assert f.inputs == ("model.layers.0.mlp.gate_proj", "model.layers.0.mlp.up_proj")
    assert f.output == "model.layers.0.mlp.down_proj" and f.n_neurons == 256


def test_fused_qkv_attention_is_reported():
    model = ZOO_BY_NAME["qwen2_vl"].build()
    vision = transformer_blocks(model, "vision")
    assert vision and all(b.attention is None and b.fused_attention for b in vision)
    assert all(b.ffn is not None for b in vision)


class _Attn(nn.Module):
    def __init__(self, d: int = 16, heads: int = 2) -> None:
        super().__init__()
        self.head_dim = d // heads
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (nn.Linear(d, d) for _ in range(4))


class _Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.self_attn = _Attn()
        self.mlp = nn.Sequential()
        self.mlp.fc1, self.mlp.fc2 = nn.Linear(16, 32), nn.Linear(32, 16)


class _Plain(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList(_Block() for _ in range(3))


def test_plain_module_uses_its_shallowest_module_list():
    model = _Plain()
    blocks = transformer_blocks(model)
    assert [b.name for b in blocks] == ["layers.0", "layers.1", "layers.2"]
    assert all(b.role is None for b in blocks)
    assert blocks[1].ffn.inputs == ("layers.1.mlp.fc1",) and blocks[1].attention.n_heads == 2
    assert block_stacks(model) == []  # no roles: sequential quantization needs explicit blocks
    assert transformer_blocks(tiny_cnn()) == [] and block_stacks(tiny_cnn()) == []


def test_unknown_scope():
    with pytest.raises(ValueError, match="unknown block scope"):
        transformer_blocks(ZOO_BY_NAME["llama"].build(), "text")
    with pytest.raises(ValueError, match="unknown block scope"):
        transformer_blocks(_Plain(), ["language", "head"])


def test_blocks_are_found_without_running_the_model():
    model = ZOO_BY_NAME["llama"].build()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    transformer_blocks(model, "all")
    block_stacks(model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def _t5_text(**over):
    kw = {"d_model": 64, "d_ff": 128, "num_layers": 2, "num_decoder_layers": 3, "num_heads": 4, "d_kv": 16,
          "vocab_size": 300}
    kw.update(over)
    return kw


def _blip2_flan_t5():
    import transformers as tf

    cfg = tf.Blip2Config(
        vision_config={"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
                       "image_size": 32, "patch_size": 8},
        qformer_config={"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                        "num_attention_heads": 4, "encoder_hidden_size": 64},
        text_config={"model_type": "t5", **_t5_text()}, num_query_tokens=4)
    model = tf.Blip2ForConditionalGeneration(cfg)
    lm = model.language_model
    return model, lm.encoder.block, lm.decoder.block


def _t5():
    import transformers as tf

    model = tf.T5ForConditionalGeneration(tf.T5Config(**_t5_text()))
    return model, model.encoder.block, model.decoder.block


def _t5gemma2():
    import transformers as tf

    cls = getattr(tf, "T5Gemma2ForConditionalGeneration", None)
    if cls is None:
        pytest.skip("this transformers has no T5Gemma 2")
    with torch.device("meta"):
        model = cls._from_config(cls.config_class())
    return model, model.model.encoder.text_model.layers, model.model.decoder.layers


@pytest.mark.parametrize("build", [_t5, _blip2_flan_t5, _t5gemma2], ids=["t5", "blip2_flan_t5", "t5gemma2"])
def test_encoder_decoder_language_models_give_the_encoder_stack_then_the_decoder_stack(build):
    """Both stacks of an encoder-decoder language model (T5's ``block`` lists, T5Gemma 2's text encoder beside its
    decoder) are listed, encoder first: sequential quantization must not skip one of them."""
    model, enc, dec = build()
    modules = {id(m): n for n, m in model.named_modules()}
    enc_names = [modules[id(b)] for b in enc]
    dec_names = [modules[id(b)] for b in dec]
    assert len(enc_names) == len(enc) > 0 and len(dec_names) == len(dec) > 0
    language = block_stacks(model)[-2:]
    assert language == [enc_names, dec_names]
    vision = vision_layers(model)
    assert block_stacks(model) == ([vision] if vision else []) + [enc_names, dec_names]


@pytest.mark.parametrize("proj,inputs", [("relu", ("wi",)), ("gated-gelu", ("wi_0", "wi_1"))])
def test_t5_blocks_give_both_stacks_with_their_ffn_and_heads_marked_unsupported(proj, inputs):
    """T5's FFN is ``layer[-1].DenseReluDense`` (``wi -> wo`` in T5 v1.0, ``wi_0, wi_1 -> wo`` gated); its
    self-attention ``layer[0].SelfAttention`` (q/k/v/o, head size ``key_value_proj_dim``) is described, but its heads
    cannot be pruned: the relative position bias of block 0 is shared by the whole stack."""
    import transformers as tf

    model = tf.T5ForConditionalGeneration(tf.T5Config(**_t5_text(feed_forward_proj=proj, num_decoder_layers=2)))
    blocks = transformer_blocks(model)
    assert [b.name for b in blocks] == ["encoder.block.0", "encoder.block.1", "decoder.block.0", "decoder.block.1"]
    assert [b.stack for b in blocks] == ["encoder.block"] * 2 + ["decoder.block"] * 2
    for b in blocks:
        ff = f"{b.name}.layer.{2 if b.stack == 'decoder.block' else 1}.DenseReluDense"
        assert b.ffn is not None and b.ffn.inputs == tuple(f"{ff}.{n}" for n in inputs)
        assert (b.ffn.output, b.ffn.n_neurons, b.ffn.chunks) == (f"{ff}.wo", 128, 1)
        a = b.attention
        assert a is not None and a.name == f"{b.name}.layer.0.SelfAttention"
        assert (a.q, a.o) == (f"{a.name}.q", f"{a.name}.o")
        assert (a.head_dim, a.n_heads, a.n_kv) == (16, 4, 4)
        assert "ffn" not in b.unsupported
        assert "relative_attention_bias" in b.unsupported["heads"]
        assert ("EncDecAttention" in b.unsupported["heads"]) == (b.stack == "decoder.block")


def test_a_quantized_model_has_the_block_stacks_of_its_float_model():
    """Florence-2's DaViT blocks are found as the lists whose blocks hold Linear layers; once quantized they hold
    QuantLinear layers, and the stacks lost them (calibrating or pruning a partly quantized model then skipped
    them). The float model's stacks are the reference, over the VLM zoo."""
    import warnings

    import medquant
    from medquant.testing.zoo_vlm import EXTRA_ZOO_BY_NAME

    for name in ("florence2", "paddleocr_vl", "llava_onevision"):
        model = EXTRA_ZOO_BY_NAME[name].build()
        expected = block_stacks(model)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            medquant.quantize_(model, medquant.QuantConfig(bits=4, group_size=32))
        assert block_stacks(model) == expected, name


def test_qwen3_vl_vision_blocks_have_their_linear_fc1_fc2_ffn():
    """Qwen3-VL's vision MLP names its linears ``linear_fc1`` / ``linear_fc2``: no FFN unit was found, so pruning
    skipped its neurons and AWQ formed no norm2 group there."""
    from medquant.testing.zoo_vlm import EXTRA_ZOO_BY_NAME

    model = EXTRA_ZOO_BY_NAME["qwen3_vl"].build()
    for b in transformer_blocks(model, "vision"):
        mlp = model.get_submodule(f"{b.name}.mlp")
        assert b.ffn is not None and b.ffn.inputs == (f"{b.name}.mlp.linear_fc1",)
        assert b.ffn.output == f"{b.name}.mlp.linear_fc2" and b.ffn.n_neurons == mlp.linear_fc1.out_features
        assert "ffn" not in b.unsupported
