"""medquant.models.introspect: vision / projector / language / head roles of Hugging Face models."""

import pytest
import torch
import transformers as tf
from torch import nn

from medquant.models import (
    ROLES,
    UnsupportedArchitectureError,
    language_model_layers,
    model_roles,
    modules_in_role,
    role_of,
    supported_architectures,
    unassigned_modules,
    vision_layers,
)
from medquant.testing.zoo import (
    ZOO_BY_NAME,
    siglip_vision_kwargs,
    text_kwargs,
    tiny_cnn,
    vlm_zoo_params,
    zoo_params,
)

WEIGHTED = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)

# Expected roles, written out from the transformers 5 module trees (not computed by the code under test).
_VLM_V5 = {
    "vision": ["model.vision_tower"],
    "projector": ["model.multi_modal_projector"],
    "language": ["model.language_model"],
    "head": ["lm_head"],
}
_QWEN_VL = {
    "vision": ["model.visual.patch_embed", "model.visual.rotary_pos_emb", "model.visual.blocks"],
    "projector": ["model.visual.merger"],
    "language": ["model.language_model"],
    "head": ["lm_head"],
}
_LM = {"language": ["model"], "head": ["lm_head"]}
EXPECTED_ROLES = {
    "llama": _LM,
    "qwen2": _LM,
    "gemma3_text": _LM,
    "gemma3_vlm": _VLM_V5,
    "llava": _VLM_V5,
    "paligemma": _VLM_V5,
    "qwen2_vl": _QWEN_VL,
    "qwen2_5_vl": _QWEN_VL,
    "idefics3": {
        "vision": ["model.vision_model"],
        "projector": ["model.connector"],
        "language": ["model.text_model"],
        "head": ["lm_head"],
    },
    "siglip_vision": {"vision": ["embeddings", "encoder", "post_layernorm"], "head": ["head"]},
    "vit": {"vision": ["vit"], "head": ["classifier"]},
    "bert": {"language": ["embeddings", "encoder"], "head": ["pooler"]},
}
# the module that holds the whole vision tower (for Qwen2-VL it also holds the projector, `merger`)
VISION_TOWER = {
    "gemma3_vlm": "model.vision_tower",
    "llava": "model.vision_tower",
    "paligemma": "model.vision_tower",
    "qwen2_vl": "model.visual",
    "qwen2_5_vl": "model.visual",
    "idefics3": "model.vision_model",
}
LM_LAYERS = {
    "llama": "model.layers", "qwen2": "model.layers", "gemma3_text": "model.layers",
    "gemma3_vlm": "model.language_model.layers", "llava": "model.language_model.layers",
    "paligemma": "model.language_model.layers", "qwen2_vl": "model.language_model.layers",
    "qwen2_5_vl": "model.language_model.layers", "idefics3": "model.text_model.layers",
    "bert": "encoder.layer",
}
VISION_LAYERS = {
    "gemma3_vlm": "model.vision_tower.encoder.layers", "llava": "model.vision_tower.encoder.layers",
    "paligemma": "model.vision_tower.encoder.layers", "qwen2_vl": "model.visual.blocks",
    "qwen2_5_vl": "model.visual.blocks", "idefics3": "model.vision_model.encoder.layers",
    "siglip_vision": "encoder.layers", "vit": "vit.layers",
}

_models: dict[str, nn.Module] = {}


def _model(name: str) -> nn.Module:
    if name not in _models:
        _models[name] = ZOO_BY_NAME[name].build()
    return _models[name]


def _under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


@zoo_params
def test_roles_match_expected(entry):
    roles = model_roles(_model(entry.name))
    assert roles == EXPECTED_ROLES[entry.name]
    assert list(roles) == [r for r in ROLES if r in roles]  # ordered like ROLES


@zoo_params
def test_roles_are_disjoint_and_cover_every_weight_layer(entry):
    model = _model(entry.name)
    members = {r: set(modules_in_role(model, r)) for r in ROLES}
    for i, a in enumerate(ROLES):
        for b in ROLES[i + 1:]:
            assert not members[a] & members[b], (a, b)
    weighted = [n for n, m in model.named_modules() if isinstance(m, WEIGHTED)]
    assert weighted
    for name in weighted:
        owners = [r for r in ROLES if name in members[r]]
        assert len(owners) == 1, (name, owners)
        assert role_of(model, name) == owners[0]
        assert role_of(model, name + ".weight") == owners[0]
    assert unassigned_modules(model) == []
    # every module named by a role exists in the model
    names = {n for n, _ in model.named_modules()}
    assert set().union(*members.values()) <= names


@vlm_zoo_params
def test_vlm_has_all_four_roles_and_exact_vision_tower(entry):
    model = _model(entry.name)
    members = {r: modules_in_role(model, r) for r in ROLES}
    assert all(members[r] for r in ROLES)
    tower = VISION_TOWER[entry.name]
    under_tower = {n for n, _ in model.named_modules() if _under(n, tower)}
    vision = set(members["vision"])
    assert all(_under(n, tower) for n in vision)
    if any(_under(p, tower) for p in model_roles(model)["projector"]):
        # Qwen2-VL: the tower container also holds the merger (projector); the container is split
        expected = under_tower - {tower} - set(members["projector"])
        assert role_of(model, tower) is None
    else:
        expected = under_tower
        assert role_of(model, tower) == "vision"
    assert vision == expected
    assert role_of(model, "lm_head") == "head"
    assert role_of(model, "") is None


@zoo_params
def test_layer_lists(entry):
    model = _model(entry.name)
    modules = dict(model.named_modules())
    cfg = model.config
    text_cfg = getattr(cfg, "text_config", cfg)
    lm = language_model_layers(model)
    if entry.name in LM_LAYERS:
        assert lm == [f"{LM_LAYERS[entry.name]}.{i}" for i in range(text_cfg.num_hidden_layers)]
        assert all(role_of(model, n) == "language" for n in lm)
    else:
        assert lm == []
    vis = vision_layers(model)
    if entry.name in VISION_LAYERS:
        vcfg = getattr(cfg, "vision_config", cfg)
        depth = getattr(vcfg, "depth", None) or vcfg.num_hidden_layers
        assert vis == [f"{VISION_LAYERS[entry.name]}.{i}" for i in range(depth)]
        assert all(role_of(model, n) == "vision" for n in vis)
        assert len({type(modules[n]) for n in vis}) == 1
    else:
        assert vis == []


def test_language_models_have_no_vision_role():
    for name in ("llama", "qwen2", "gemma3_text", "bert"):
        roles = model_roles(_model(name))
        assert "vision" not in roles and "projector" not in roles
        assert modules_in_role(_model(name), "vision") == []


def test_hf_model_without_token_embedding_or_image_input_raises():
    """Nothing to anchor roles on: the error says what was found and how to select modules explicitly."""

    class Regressor(tf.PreTrainedModel):
        config_class = tf.PretrainedConfig

        def __init__(self, config):
            super().__init__(config)
            self.body = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 1))

        def forward(self, features):
            return self.body(features)

    model = Regressor(tf.PretrainedConfig())
    with pytest.raises(UnsupportedArchitectureError) as info:
        model_roles(model)
    msg = str(info.value)
    assert "Regressor" in msg and "no token embedding" in msg and "body" in msg  # what was found
    assert "explicit" in msg and "re:" in msg  # how to select modules instead
    assert isinstance(info.value, ValueError)
    for fn in (language_model_layers, vision_layers, unassigned_modules):
        with pytest.raises(UnsupportedArchitectureError):
            fn(model)


def test_gpt2_resolves_by_structure():
    """Not in the table: the token embedding's owner (with the block list ``h``) is language, lm_head is head."""
    torch.manual_seed(0)
    gpt2 = tf.GPT2LMHeadModel(tf.GPT2Config(n_embd=128, n_layer=2, n_head=4, vocab_size=256, n_positions=32,
                                            bos_token_id=0, eos_token_id=0))
    assert "GPT2LMHeadModel" not in supported_architectures()
    assert model_roles(gpt2) == {"language": ["transformer"], "head": ["lm_head"]}
    assert language_model_layers(gpt2) == ["transformer.h.0", "transformer.h.1"]


def test_known_class_with_unexpected_tree_raises():
    model = ZOO_BY_NAME["llama"].build()
    del model.lm_head
    with pytest.raises(UnsupportedArchitectureError, match="LlamaForCausalLM.*does not match"):
        model_roles(model)


def test_plain_module_has_no_roles():
    cnn = tiny_cnn()
    assert model_roles(cnn) == {}
    assert modules_in_role(cnn, "language") == []
    assert role_of(cnn, "classifier") is None
    assert language_model_layers(cnn) == [] and vision_layers(cnn) == []
    assert unassigned_modules(cnn) == ["features.0", "features.3", "classifier"]


def test_unknown_role_is_rejected():
    with pytest.raises(ValueError, match="unknown role 'text'.*vision, projector, language, head"):
        modules_in_role(_model("llama"), "text")


def test_structural_fallback_for_unlisted_classes():
    class MyLlava(tf.LlavaForConditionalGeneration):
        pass

    class MyCausalLM(tf.LlamaForCausalLM):
        pass

    assert "MyLlava" not in supported_architectures()
    torch.manual_seed(0)
    llava = MyLlava(_model("llava").config)
    assert model_roles(llava) == _VLM_V5
    lm = MyCausalLM(_model("llama").config)
    assert model_roles(lm) == _LM
    assert language_model_layers(lm) == ["model.layers.0", "model.layers.1"]


def test_older_top_level_layout_is_split_around_nested_head():
    """transformers 4 style: language_model is a *ForCausalLM holding lm_head; roles stay disjoint."""

    class OldStyleLlava(tf.PreTrainedModel):
        config_class = tf.LlavaConfig
        _supports_sdpa = True

        def __init__(self, config):
            super().__init__(config)
            self.vision_tower = tf.CLIPVisionModel(config.vision_config)
            self.multi_modal_projector = nn.Linear(128, 128)
            self.language_model = tf.LlamaForCausalLM(config.text_config)

    model = OldStyleLlava(_model("llava").config)
    roles = model_roles(model)
    assert roles == {
        "vision": ["vision_tower"],
        "projector": ["multi_modal_projector"],
        "language": ["language_model.model"],
        "head": ["language_model.lm_head"],
    }
    assert unassigned_modules(model) == []
    assert language_model_layers(model) == ["language_model.model.layers.0", "language_model.model.layers.1"]


def _extra_models():
    vis = siglip_vision_kwargs()
    return {
        "MistralForCausalLM": lambda: tf.MistralForCausalLM(tf.MistralConfig(**text_kwargs(num_key_value_heads=2))),
        "GemmaForCausalLM": lambda: tf.GemmaForCausalLM(tf.GemmaConfig(**text_kwargs(head_dim=32))),
        "Gemma2ForCausalLM": lambda: tf.Gemma2ForCausalLM(tf.Gemma2Config(**text_kwargs(head_dim=32))),
        "Qwen3ForCausalLM": lambda: tf.Qwen3ForCausalLM(tf.Qwen3Config(**text_kwargs(head_dim=32))),
        "LlamaModel": lambda: tf.LlamaModel(tf.LlamaConfig(**text_kwargs())),
        "SmolVLMForConditionalGeneration": lambda: tf.SmolVLMForConditionalGeneration(tf.SmolVLMConfig(
            vision_config=dict(model_type="smolvlm_vision", **vis),
            text_config=tf.LlamaConfig(**text_kwargs()), image_token_id=250, scale_factor=2)),
        "SiglipModel": lambda: tf.SiglipModel(tf.SiglipConfig(vision_config=vis, text_config={
            "hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4,
            "vocab_size": 256, "max_position_embeddings": 16})),
        "CLIPVisionModel": lambda: tf.CLIPVisionModel(tf.CLIPVisionConfig(**vis)),
        "ViTModel": lambda: tf.ViTModel(tf.ViTConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                                     num_attention_heads=4, image_size=32, patch_size=8)),
        "BertForSequenceClassification": lambda: tf.BertForSequenceClassification(tf.BertConfig(
            vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
            num_labels=3)),
    }


EXTRA_EXPECTED = {
    "MistralForCausalLM": {"language", "head"},
    "GemmaForCausalLM": {"language", "head"},
    "Gemma2ForCausalLM": {"language", "head"},
    "Qwen3ForCausalLM": {"language", "head"},
    "LlamaModel": {"language"},
    "SmolVLMForConditionalGeneration": {"vision", "projector", "language", "head"},
    "SiglipModel": {"vision", "language", "head"},  # head: logit_scale and logit_bias (parameters)
    "CLIPVisionModel": {"vision"},
    "ViTModel": {"vision", "head"},
    "BertForSequenceClassification": {"language", "head"},
}


@pytest.mark.parametrize("cls_name", sorted(EXTRA_EXPECTED))
def test_other_listed_architectures(cls_name):
    torch.manual_seed(0)
    model = _extra_models()[cls_name]()
    assert type(model).__name__ == cls_name
    assert cls_name in supported_architectures()
    roles = model_roles(model)
    assert set(roles) == EXTRA_EXPECTED[cls_name]
    assert unassigned_modules(model) == []
    if "language" in roles:
        assert len(language_model_layers(model)) == 2
    if "vision" in roles:
        assert len(vision_layers(model)) == 2


def test_peft_wrapped_model_keeps_prefix():
    peft = pytest.importorskip("peft")
    model = ZOO_BY_NAME["llama"].build()
    wrapped = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    roles = model_roles(wrapped)
    assert roles == {"language": ["base_model.model.model"], "head": ["base_model.model.lm_head"]}
    lora = [n for n in modules_in_role(wrapped, "language") if n.endswith("lora_A.default")]
    assert len(lora) == 4
    assert language_model_layers(wrapped) == ["base_model.model.model.layers.0", "base_model.model.model.layers.1"]
