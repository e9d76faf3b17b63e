"""medquant.models.structure: roles of architectures outside the table, found from their structure.

References: the expected roles are written out by hand from the transformers 5 module trees; which modules see
the image is measured here with forward hooks on each model's own image path (``IMAGE_PATH``), independently of
the code under test.
"""
import copy

import pytest
import torch
import transformers as tf
from torch import nn

from medquant.models import (
    ROLES,
    UnsupportedArchitectureError,
    language_model_layers,
    model_roles,
    role_of,
    unassigned_modules,
    vision_layers,
)
from medquant.models.introspect import unassigned_parameters
from medquant.testing.zoo_vlm import (
    EXTRA_ZOO_BY_NAME,
    IMAGE_PATH,
    VLM_LAYOUTS,
    extra_zoo_params,
    llava_med_class,
)

tf.logging.set_verbosity_error()

_LM = "model.language_model"
EXPECTED = {
    "blip2": {"vision": ["vision_model"], "projector": ["qformer", "language_projection", "query_tokens"],
              "language": ["language_model.model"], "head": ["language_model.lm_head"]},
    "instructblip": {"vision": ["vision_model"], "projector": ["qformer", "language_projection", "query_tokens"],
                     "language": ["language_model.model"], "head": ["language_model.lm_head"]},
    "kosmos2": {"vision": ["vision_model"], "projector": ["image_to_text_projection"],
                "language": ["text_model.model"], "head": ["text_model.lm_head"]},
    "deepseek_vl": {"vision": ["model.vision_model"], "projector": ["model.aligner"], "language": [_LM],
                    "head": ["lm_head"]},
    "janus": {"vision": ["model.vision_model", "model.vqmodel"],
              "projector": ["model.aligner", "model.generation_embeddings", "model.generation_aligner"],
              "language": [_LM], "head": ["lm_head", "model.generation_head"]},
    "paddleocr_vl": {"vision": ["model.visual"], "projector": ["model.projector"], "language": [_LM],
                     "head": ["lm_head"]},
    "ovis2": {"vision": ["model.vision_tower"], "projector": ["model.visual_embeddings_table"], "language": [_LM],
              "head": ["lm_head"]},
    "gemma4": {"vision": ["model.vision_tower"], "projector": ["model.embed_vision"], "language": [_LM],
               "head": ["lm_head"]},
    "phi4mm": {
        "vision": ["model.embed_tokens_extend.image_embed.img_processor"],
        "projector": ["model.embed_tokens_extend.image_embed.img_projection_up",
                      "model.embed_tokens_extend.image_embed.img_projection_down",
                      "model.embed_tokens_extend.image_embed.global_img_feature_extensor",
                      "model.embed_tokens_extend.image_embed.sub_img_feature_extensor"],
        "language": ["model.embed_tokens", "model.layers", "model.norm", "model.rotary_emb", "model.embed_dropout",
                     "model.embed_tokens_extend.image_embed.drop",
                     "model.embed_tokens_extend.image_embed.image_token_compression"],
        "head": ["lm_head"]},
    "chameleon": {"vision": ["model.vqmodel"], "language": ["model.embed_tokens", "model.layers", "model.norm",
                                                             "model.rotary_emb"], "head": ["lm_head"]},
    "mllama": {"vision": ["model.vision_model"], "projector": ["model.multi_modal_projector"], "language": [_LM],
               "head": ["lm_head"]},
    "qwen3_vl": {"vision": ["model.visual.patch_embed", "model.visual.pos_embed", "model.visual.rotary_pos_emb",
                            "model.visual.blocks"],
                 "projector": ["model.visual.merger", "model.visual.deepstack_merger_list"], "language": [_LM],
                 "head": ["lm_head"]},
    "llava_onevision": {"vision": ["model.vision_tower"], "projector": ["model.multi_modal_projector",
                                                                        "model.image_newline"],
                        "language": [_LM], "head": ["lm_head"]},
    "llava_med": {"vision": ["model.vision_tower"], "projector": ["model.mm_projector"],
                  "language": ["model.embed_tokens", "model.layers", "model.norm", "model.rotary_emb"],
                  "head": ["lm_head"]},
    "glm4v": {"vision": ["model.visual.embeddings", "model.visual.patch_embed", "model.visual.rotary_pos_emb",
                         "model.visual.blocks", "model.visual.post_conv_layernorm", "model.visual.downsample",
                         "model.visual.post_layernorm"],
              "projector": ["model.visual.merger"], "language": [_LM], "head": ["lm_head"]},
    "lfm2_vl": {"vision": ["model.vision_tower"], "projector": ["model.multi_modal_projector"], "language": [_LM],
                "head": ["lm_head"]},
    "idefics2": {"vision": ["model.vision_model"], "projector": ["model.connector"], "language": ["model.text_model"],
                 "head": ["lm_head"]},
    "florence2": {"vision": ["model.vision_tower"], "projector": ["model.multi_modal_projector"], "language": [_LM],
                  "head": ["lm_head"]},
    "qwen3_5": {"vision": ["model.visual.patch_embed", "model.visual.pos_embed", "model.visual.rotary_pos_emb",
                           "model.visual.blocks"], "projector": ["model.visual.merger"], "language": [_LM],
                "head": ["lm_head"]},
    "dinov2": {"vision": ["embeddings", "encoder", "layernorm"]},
    "clip": {"vision": ["vision_model"], "language": ["text_model"],
             "head": ["visual_projection", "text_projection", "logit_scale"]},
    "clip_vision": {"vision": ["embeddings", "pre_layrnorm", "encoder", "post_layernorm"]},
    "siglip2": {"vision": ["vision_model"], "language": ["text_model"], "head": ["logit_scale", "logit_bias"]},
    "swin": {"vision": ["embeddings", "encoder", "layernorm", "pooler"]},
    "convnext": {"vision": ["embeddings", "encoder", "layernorm"]},
    "beit": {"vision": ["embeddings", "layers", "layernorm"], "head": ["pooler"]},
}
# block lists (name, count) of the language model and of the vision tower
LAYERS = {
    "blip2": ("language_model.model.layers", "vision_model.encoder.layers"),
    "kosmos2": ("text_model.model.layers", "vision_model.model.encoder.layers"),
    "llava_med": ("model.layers", "model.vision_tower.encoder.layers"),
    "chameleon": ("model.layers", None),
    "phi4mm": ("model.layers", "model.embed_tokens_extend.image_embed.img_processor.encoder.layers"),
    "qwen3_vl": (f"{_LM}.layers", "model.visual.blocks"),
    "dinov2": (None, "encoder.layer"),
    "clip": ("text_model.encoder.layers", "vision_model.encoder.layers"),
}

_models: dict[str, nn.Module] = {}


def _model(name: str) -> nn.Module:
    if name not in _models:
        _models[name] = EXTRA_ZOO_BY_NAME[name].build()
    return _models[name]


def test_every_extra_entry_has_expected_roles():
    assert set(EXPECTED) == set(EXTRA_ZOO_BY_NAME)


@extra_zoo_params
def test_roles_match_expected_and_cover_every_parameter_once(entry):
    model = _model(entry.name)
    roles = model_roles(model)
    assert roles == EXPECTED[entry.name]
    assert list(roles) == [r for r in ROLES if r in roles]
    prefixes = [(r, p) for r, ps in roles.items() for p in ps]
    free = set(unassigned_parameters(model))
    for pname, _ in model.named_parameters():
        owners = {r for r, p in prefixes if pname == p or pname.startswith(p + ".")}
        assert len(owners) == (0 if pname in free else 1), (pname, owners)
    # only Phi-4's audio encoder is outside every role, and it is reported
    audio = "model.embed_tokens_extend.audio_embed"
    assert all(n.startswith(audio) for n in free)
    weighted = [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d))]
    assert unassigned_modules(model) == [n for n in weighted if n.startswith(audio)]
    assert bool(free) == (entry.name == "phi4mm")


@pytest.mark.parametrize("entry", VLM_LAYOUTS, ids=[e.name for e in VLM_LAYOUTS])
def test_modules_that_see_the_image_are_never_language(entry):
    """Forward hooks on the model's own image path: every parameter used there is vision or projector."""
    model = _model(entry.name)
    ran: list[str] = []
    handles = [m.register_forward_pre_hook(lambda _m, _a, n=n: ran.append(n)) for n, m in model.named_modules()]
    try:
        with torch.no_grad():
            IMAGE_PATH[entry.name](model, entry.inputs(model))
    finally:
        for h in handles:
            h.remove()
    seen = {f"{n}.{p}" if n else p for n in set(ran) for p, _ in model.get_submodule(n).named_parameters(recurse=False)}
    assert seen
    roles = {p: role_of(model, p) for p in seen}
    assert {r for r in roles.values()} <= {"vision", "projector"}, {p: r for p, r in roles.items()
                                                                   if r not in ("vision", "projector")}
    assert "vision" in roles.values()


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_block_lists(name):
    model = _model(name)
    lm, vis = LAYERS[name]
    if lm is not None:
        assert language_model_layers(model) == [f"{lm}.{i}" for i in range(2)]
    if vis is not None:
        assert vision_layers(model) == [f"{vis}.{i}" for i in range(2)]
    else:
        assert all(n.startswith("model.vqmodel.") for n in vision_layers(model))


def test_mllama_vision_layers_include_the_global_transformer():
    model = _model("mllama")
    base = "model.vision_model"
    assert vision_layers(model) == [f"{base}.transformer.layers.0", f"{base}.transformer.layers.1",
                                    f"{base}.global_transformer.layers.0"]


def test_janus_vision_layers_are_the_vit_blocks_not_the_vq_tokenizer():
    assert vision_layers(_model("janus")) == ["model.vision_model.encoder.layers.0", "model.vision_model.encoder.layers.1"]


# ---------------------------------------------------------------------------------------------- names do not decide
def _renamed_llava_med(with_image_features: bool) -> nn.Module:
    """LLaVA-Med's layout with a tower and a projector whose names give no hint (``backbone``, ``bridge``)."""
    _, base = llava_med_class()
    model = EXTRA_ZOO_BY_NAME["llava_med"].build()

    class Renamed(base):
        pass

    if with_image_features:
        def get_image_features(self, pixel_values):
            return self.model.bridge(self.model.backbone(pixel_values).last_hidden_state)
        Renamed.get_image_features = get_image_features
    model.__class__ = Renamed
    inner = model.model
    inner.backbone = inner.vision_tower
    inner.bridge = inner.mm_projector
    del inner.vision_tower, inner.mm_projector
    # the trace reads the image size from config.vision_config; a copy, so the tower is not found by its config
    model.config.vision_config = copy.deepcopy(model.model.backbone.config)
    model.config.mm_vision_tower = {}
    return model


def test_unhinted_tower_inside_the_language_model_is_found_by_tracing():
    model = _renamed_llava_med(with_image_features=True)
    roles = model_roles(model)
    assert roles["vision"] == ["model.backbone"]
    assert roles["projector"] == ["model.bridge"]
    assert roles["language"] == ["model.embed_tokens", "model.layers", "model.norm", "model.rotary_emb"]
    assert unassigned_modules(model) == []


def test_unhinted_projector_beside_a_known_tower_is_found_by_tracing():
    """The tower is found by its config; the projector beside model.layers has no hint: traced, not language."""
    model = _renamed_llava_med(with_image_features=True)
    model.config.vision_config = model.model.backbone.config
    roles = model_roles(model)
    assert roles["vision"] == ["model.backbone"] and roles["projector"] == ["model.bridge"]


def test_undecidable_multimodal_model_raises_with_what_was_found():
    model = _renamed_llava_med(with_image_features=False)
    with pytest.raises(UnsupportedArchitectureError) as info:
        model_roles(model)
    msg = str(info.value)
    assert "no vision module" in msg and "get_image_features" in msg
    assert "language: model" in msg  # what was found
    assert "explicit" in msg and "skip=" in msg  # how to proceed


# ---------------------------------------------------------------------------------------------- meta-device builds
# default configs, built on the meta device (no weights: roles are structural); expected roles written by hand
META = {
    "GitForCausalLM": ("git", {"vision": ["git.image_encoder"], "projector": ["git.visual_projection"],
                               "language": ["git.embeddings", "git.encoder"], "head": ["output"]}),
    "Gemma4ForConditionalGeneration": ("gemma4", {"language": ["model.language_model"], "head": ["lm_head"]}),
    # the T5 encoder's embed_patches runs the top-level patch_embed's weights on the pixels: vision too
    "UdopForConditionalGeneration": ("udop", {
        "vision": ["patch_embed", "encoder.embed_patches"],
        "language": ["shared", "encoder.embed_tokens", "encoder.block", "encoder.final_layer_norm", "encoder.dropout",
                     "encoder.cell_2d_embedding", "encoder.relative_bias", "decoder"],
        "head": ["lm_head"]}),
    "VisionEncoderDecoderModel": ("vision-encoder-decoder", {"vision": ["encoder"], "language": ["decoder.bert"],
                                                             "head": ["decoder.cls"]}),
    # the lm_head sits in the text decoder beside its layers (get_output_embeddings): head, not language
    "Pix2StructForConditionalGeneration": ("pix2struct", {
        "vision": ["encoder"], "language": ["decoder.embed_tokens", "decoder.layer", "decoder.final_layer_norm",
                                            "decoder.dropout"], "head": ["decoder.lm_head"]}),
}


@pytest.mark.parametrize("cls_name", sorted(META))
def test_layouts_found_on_the_meta_device(cls_name):
    """GIT's visual_projection inside the language model is projector; Gemma 4 built without a vision config has
    no vision role (and no error); UDOP's patch_embed is vision; VisionEncoderDecoder's encoder is vision."""
    model_type, expected = META[cls_name]
    with torch.device("meta"):
        model = getattr(tf, cls_name)(tf.CONFIG_MAPPING[model_type]())
    assert model_roles(model) == expected
    assert unassigned_modules(model) == []
    if expected.get("head") == ["decoder.lm_head"]:  # the head is the module transformers projects to the vocabulary
        assert model.get_output_embeddings() is model.get_submodule("decoder.lm_head")
        assert language_model_layers(model) == [f"decoder.layer.{i}" for i in range(model.config.text_config.num_layers)]


# ---------------------------------------------------------------------------------------- text-only encoder-decoder
def _t5gemma(cls_name: str) -> nn.Module:
    cls = getattr(tf, cls_name, None)
    assert cls is not None, f"transformers {tf.__version__} has no {cls_name}"
    stack = {"vocab_size": 300, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
             "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "query_pre_attn_scalar": 16,
             "sliding_window": 16}
    torch.manual_seed(0)
    return cls(tf.T5GemmaConfig(encoder=stack, decoder={**stack, "num_hidden_layers": 3}, vocab_size=300))


# written out from the module tree: model.encoder (embed_tokens, layers, norm) and model.decoder (its own
# embed_tokens, layers, norm), lm_head (T5GemmaLMHead around out_proj)
T5GEMMA = {
    "T5GemmaForConditionalGeneration": {"language": ["model.encoder", "model.decoder"], "head": ["lm_head"]},
    "T5GemmaModel": {"language": ["encoder", "decoder"]},
}


@pytest.mark.parametrize("cls_name", sorted(T5GEMMA))
def test_t5gemma_decoder_is_language_like_t5_and_bart(cls_name):
    """Text-only T5Gemma: the decoder beside the encoder that owns the token embedding is language, as the
    decoders of T5 (``encoder`` / ``decoder``) and BART (``model``) are; every weight has a role."""
    model = _t5gemma(cls_name)
    pre = "model." if cls_name.endswith("Generation") else ""
    assert model_roles(model) == T5GEMMA[cls_name]
    assert unassigned_modules(model) == [] and unassigned_parameters(model) == []
    assert role_of(model, pre + "decoder.layers.2.mlp.down_proj") == "language"
    from medquant.models import block_stacks

    assert block_stacks(model) == [[f"{pre}encoder.layers.{i}" for i in range(2)],
                                   [f"{pre}decoder.layers.{i}" for i in range(3)]]


def test_t5gemma_decoder_blocks_are_described_for_pruning():
    """Decoder blocks: the self-attention (registered first) and the MLP are the pruned units; the cross-attention
    (``cross_attn``, separate q / k / v / o linears) is a second attention unit, as BART's ``encoder_attn``."""
    from medquant.models import transformer_blocks

    model = _t5gemma("T5GemmaForConditionalGeneration")
    blocks = transformer_blocks(model)
    assert [b.name for b in blocks] == ([f"model.encoder.layers.{i}" for i in range(2)]
                                        + [f"model.decoder.layers.{i}" for i in range(3)])
    dec = blocks[2]
    layer = model.model.decoder.layers[0]
    assert dec.attention.name == "model.decoder.layers.0.self_attn"
    assert (dec.attention.n_heads, dec.attention.n_kv, dec.attention.head_dim) == (4, 2, 16)
    assert model.get_submodule(dec.ffn.output) is layer.mlp.down_proj
    assert dec.unsupported == {} and dec.cross_attention.name == "model.decoder.layers.0.cross_attn"
    assert (dec.cross_attention.n_heads, dec.cross_attention.n_kv, dec.cross_attention.head_dim) == (4, 2, 16)
    assert blocks[0].unsupported == {}
