"""More tiny models: the vision-language layouts and medical vision encoders beyond :mod:`medquant.testing.zoo`.

Same conventions as the zoo (seed 0, hidden 128, 2 layers, vocabulary 256, 32x32 images with 8x8 patches,
batch 2; GLM-4V, LFM2-VL, Idefics2, Florence-2 and Qwen3.5, the layouts pruning treats specially, have a text
model of hidden 64 with 4 heads of 16, 2 key-value heads and intermediate size 96, and one vision layer); the
entries are :class:`~medquant.testing.zoo.ZooEntry` objects listed in :data:`VLM_LAYOUTS` (multimodal models)
and :data:`VISION_ENCODERS`, and :data:`EXTRA_ZOO` is both.

Main output of a multimodal entry: the image features of the model's own image path (vision tower, then
projector) flattened, followed by the logits of a text-only forward flattened; BLIP-2, InstructBLIP and
Kosmos-2 take the image in every forward, so their output is the logits of an image + text forward. A vision
encoder's output is its last hidden state (ConvNeXt: its pooled output). Florence-2's text logits come from
its encoder-decoder with the first 5 tokens as decoder input.

=====================  ======================================================================================
entry                  layout (roles)
=====================  ======================================================================================
blip2                  vision_model / qformer + query_tokens + language_projection / language_model.model /
                       language_model.lm_head (CheXagent's layout, here with a Llama language model)
instructblip           as blip2, the Q-Former also reads the instruction (``qformer_input_ids``)
kosmos2                vision_model / image_to_text_projection / text_model.model / text_model.lm_head
deepseek_vl            model.vision_model (SigLIP) / model.aligner / model.language_model / lm_head
janus                  model.vision_model + model.vqmodel / model.aligner + generation aligner and embeddings /
                       model.language_model / lm_head + model.generation_head
paddleocr_vl           model.visual / model.projector / model.language_model / lm_head
ovis2                  model.vision_tower / model.visual_embeddings_table / model.language_model / lm_head
gemma4                 model.vision_tower / model.embed_vision / model.language_model / lm_head
phi4mm                 vision tower and projection inside ``model.embed_tokens_extend`` beside ``model.layers``;
                       the audio encoder has no role (reported by ``unassigned_modules``)
chameleon              ``model.vqmodel`` (the image tokenizer) beside ``model.layers``
mllama                 model.vision_model (local ``transformer`` + ``global_transformer``) / projector / ...
qwen3_vl               model.visual; ``merger`` and ``deepstack_merger_list`` are projector
llava_onevision        ``model.image_newline`` (a parameter) is projector
llava_med              LLaVA-Med's own ``LlavaMistralForCausalLM`` layout: ``model.vision_tower`` and
                       ``model.mm_projector`` beside ``model.layers`` (:func:`llava_med_class`)
glm4v                  model.visual (``merger`` projector) / model.language_model with fused ``gate_up_proj``
lfm2_vl                model.vision_tower (SigLIP 2 NaFlex) / model.multi_modal_projector / model.language_model
                       (``w1/w3 -> w2`` FFNs, an attention and a convolution layer)
idefics2               model.vision_model / model.connector (perceiver, MLP sized by the text config) /
                       model.text_model
florence2              model.vision_tower (DaViT) / model.multi_modal_projector / model.language_model (BART
                       encoder-decoder)
qwen3_5                model.visual / model.language_model (a linear-attention and a gated attention layer)
=====================  ======================================================================================
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .zoo import (
    BATCH,
    BOI_TOKEN,
    BOS_ID,
    EOI_TOKEN,
    EOS_ID,
    HEADS,
    HIDDEN,
    IMAGE,
    IMAGE_TOKEN,
    INTER,
    LAYERS,
    N_PATCHES,
    PAD_ID,
    PATCH,
    VIDEO_TOKEN,
    VISION_END,
    VISION_START,
    VOCAB,
    ZooEntry,
    _pixels,
    _text_ids,
    siglip_vision_kwargs,
    text_kwargs,
)

_VIT = {"hidden_size": HIDDEN, "intermediate_size": INTER, "num_hidden_layers": LAYERS, "num_attention_heads": HEADS,
        "image_size": IMAGE, "patch_size": PATCH}
_QFORMER = {"vocab_size": VOCAB, "hidden_size": HIDDEN, "num_hidden_layers": LAYERS, "num_attention_heads": HEADS,
            "intermediate_size": INTER, "encoder_hidden_size": HIDDEN, "max_position_embeddings": 64}
_MROPE = {"rope_type": "default", "mrope_section": [4, 6, 6], "rope_theta": 10000.0}
_QUERY_TOKENS = 4


def _first_tensor(x: Any) -> torch.Tensor:
    """The first tensor of a model output (a tensor, a tuple / list, or a ModelOutput)."""
    if isinstance(x, torch.Tensor):
        return x
    if isinstance(x, (tuple, list)):
        return _first_tensor(x[0])
    pooled = getattr(x, "pooler_output", None)
    return _first_tensor(pooled if pooled is not None else x[0])


def _text_logits(model: nn.Module, inputs: dict[str, Any]) -> torch.Tensor:
    return model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits


def _with_image(image_fn):
    """Output function: image features (``image_fn(model, inputs)``) then text-only logits, both flattened."""
    def output(model: nn.Module, inputs: dict[str, Any]) -> torch.Tensor:
        return torch.cat([_first_tensor(image_fn(model, inputs)).flatten(),
                          _text_logits(model, inputs).flatten().to(torch.float32)])
    output.__name__ = f"image_and_text_{image_fn.__name__}"
    return output


def _text_and_image(model: nn.Module, gen: torch.Generator) -> dict[str, Any]:
    ids = _text_ids(gen)
    ids[:, 0] = BOS_ID
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": _pixels(gen, BATCH, 3, IMAGE, IMAGE)}


def _llama_text(**over: Any) -> dict[str, Any]:
    return dict(model_type="llama", **text_kwargs(**over))


# ---------------------------------------------------------------------------------------------- Q-Former family
def _build_blip2() -> nn.Module:
    from transformers import Blip2Config, Blip2ForConditionalGeneration

    return Blip2ForConditionalGeneration(Blip2Config(
        vision_config=_VIT, qformer_config=_QFORMER, text_config=_llama_text(), num_query_tokens=_QUERY_TOKENS,
        image_token_index=IMAGE_TOKEN))


def _build_instructblip() -> nn.Module:
    from transformers import InstructBlipConfig, InstructBlipForConditionalGeneration

    model = InstructBlipForConditionalGeneration(InstructBlipConfig(
        vision_config=_VIT, qformer_config=_QFORMER, text_config=_llama_text(), num_query_tokens=_QUERY_TOKENS,
        image_token_index=IMAGE_TOKEN))
    # transformers initialises this vision tower with std ~1e-10 and the query tokens with zeros, which cuts
    # the image off the output; give them the spread of a trained checkpoint
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2 and (name.startswith("vision_model.") or name == "query_tokens"):
                p.normal_(0.0, 0.02)
    return model


def _qformer_inputs(model: nn.Module, gen: torch.Generator) -> dict[str, Any]:
    text = _text_ids(gen)
    ids = torch.cat([torch.full((BATCH, _QUERY_TOKENS), IMAGE_TOKEN), torch.full((BATCH, 1), BOS_ID), text], dim=1)
    out = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": _pixels(gen, BATCH, 3, IMAGE, IMAGE)}
    if "qformer_config" in type(model.config).sub_configs and type(model).__name__.startswith("InstructBlip"):
        out["qformer_input_ids"] = text
        out["qformer_attention_mask"] = torch.ones_like(text)
    return out


def _build_kosmos2() -> nn.Module:
    from transformers import Kosmos2Config, Kosmos2ForConditionalGeneration

    return Kosmos2ForConditionalGeneration(Kosmos2Config(
        vision_config=_VIT,
        text_config={"vocab_size": VOCAB, "embed_dim": HIDDEN, "layers": LAYERS, "ffn_dim": INTER,
                     "attention_heads": HEADS, "max_position_embeddings": 64},
        latent_query_num=_QUERY_TOKENS))


def _kosmos2_inputs(model: nn.Module, gen: torch.Generator) -> dict[str, Any]:
    n = model.config.latent_query_num
    ids = torch.cat([torch.full((BATCH, 1), BOS_ID), torch.full((BATCH, n), 5), _text_ids(gen)], dim=1)
    mask = torch.zeros_like(ids, dtype=torch.bool)
    mask[:, 1:1 + n] = True
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "image_embeds_position_mask": mask,
            "pixel_values": _pixels(gen, BATCH, 3, IMAGE, IMAGE)}


def _full_logits(model: nn.Module, inputs: dict[str, Any]) -> torch.Tensor:
    return model(**inputs).logits


# ---------------------------------------------------------------------------------------------- other VLMs
def _build_deepseek_vl() -> nn.Module:
    from transformers import DeepseekVLConfig, DeepseekVLForConditionalGeneration

    return DeepseekVLForConditionalGeneration(DeepseekVLConfig(
        vision_config=dict(model_type="siglip_vision_model", **siglip_vision_kwargs()), text_config=_llama_text(),
        image_token_id=IMAGE_TOKEN))


def _inner_image_features(model: nn.Module, inputs: dict[str, Any]) -> Any:
    return model.model.get_image_features(pixel_values=inputs["pixel_values"])


def _build_janus() -> nn.Module:
    from transformers import JanusConfig, JanusForConditionalGeneration

    return JanusForConditionalGeneration(JanusConfig(
        vision_config={"hidden_size": HIDDEN, "num_hidden_layers": LAYERS, "num_attention_heads": HEADS, "image_size": IMAGE,
                           "patch_size": PATCH, "projection_dim": HIDDEN, "num_image_tokens": N_PATCHES, "mlp_ratio": 2.0},
        vq_config={"embed_dim": 32, "num_embeddings": 64, "latent_channels": 32, "base_channels": 32, "channel_multiplier": [1, 1],
                       "num_res_blocks": 1, "projection_dim": HIDDEN, "image_token_embed_dim": HIDDEN, "num_patches": 4},
        text_config=_llama_text(), image_token_id=IMAGE_TOKEN))


def _qwen_like_inputs(model: nn.Module, gen: torch.Generator) -> dict[str, Any]:
    vc = model.config.vision_config
    tp = getattr(vc, "temporal_patch_size", 1)
    g = IMAGE // PATCH
    out = _text_and_image(model, gen)
    out["pixel_values"] = _pixels(gen, BATCH * g * g, 3 * tp * PATCH * PATCH)
    out["image_grid_thw"] = torch.tensor([[1, g, g]] * BATCH)
    return out


def _grid_image_features(model: nn.Module, inputs: dict[str, Any]) -> Any:
    return model.model.get_image_features(pixel_values=inputs["pixel_values"], image_grid_thw=inputs["image_grid_thw"])


def _build_paddleocr_vl() -> nn.Module:
    from transformers import PaddleOCRVLConfig, PaddleOCRVLForConditionalGeneration

    return PaddleOCRVLForConditionalGeneration(PaddleOCRVLConfig(
        vision_config=dict(_VIT, spatial_merge_size=2),
        text_config=dict(text_kwargs(num_key_value_heads=2), head_dim=HIDDEN // HEADS, rope_parameters=_MROPE),
        image_token_id=IMAGE_TOKEN, video_token_id=VIDEO_TOKEN, vision_start_token_id=VISION_START,
        vision_end_token_id=VISION_END))


def _paddle_inputs(model: nn.Module, gen: torch.Generator) -> dict[str, Any]:
    g = IMAGE // PATCH
    out = _text_and_image(model, gen)
    out["pixel_values"] = _pixels(gen, BATCH * g * g, 3, PATCH, PATCH)
    out["image_grid_thw"] = torch.tensor([[1, g, g]] * BATCH)
    return out


def _build_ovis2() -> nn.Module:
    from transformers import Ovis2Config, Ovis2ForConditionalGeneration

    return Ovis2ForConditionalGeneration(Ovis2Config(
        vision_config=dict(_VIT, vocab_size=64, hidden_stride=2),
        text_config=dict(model_type="qwen2", **text_kwargs(num_key_value_heads=2)), image_token_id=IMAGE_TOKEN,
        visual_indicator_token_ids=[245, 246, 247, 248, 249], vocab_size=VOCAB, hidden_size=HIDDEN))


def _top_image_features(model: nn.Module, inputs: dict[str, Any]) -> Any:
    return model.get_image_features(pixel_values=inputs["pixel_values"])


def _build_gemma4() -> nn.Module:
    from transformers import Gemma4Config, Gemma4ForConditionalGeneration

    model = Gemma4ForConditionalGeneration(Gemma4Config(
        vision_config={"hidden_size": HIDDEN, "intermediate_size": INTER, "num_hidden_layers": LAYERS,
                           "num_attention_heads": HEADS, "num_key_value_heads": HEADS, "head_dim": HIDDEN // HEADS,
                           "patch_size": PATCH, "position_embedding_size": 64, "pooling_kernel_size": 2},
        text_config={"vocab_size": VOCAB, "hidden_size": HIDDEN, "intermediate_size": INTER, "num_hidden_layers": LAYERS,
                         "num_attention_heads": HEADS, "num_key_value_heads": 2, "head_dim": HIDDEN // HEADS, "sliding_window": 16,
                         "layer_types": ["sliding_attention", "full_attention"], "vocab_size_per_layer_input": VOCAB,
                         "hidden_size_per_layer_input": 16},
        audio_config=None, image_token_id=IMAGE_TOKEN, boi_token_id=251, eoi_token_id=252, video_token_id=VIDEO_TOKEN,
        boa_token_id=248, eoa_token_index=249, audio_token_id=247))
    return model


def _gemma4_inputs(model: nn.Module, gen: torch.Generator) -> dict[str, Any]:
    g = IMAGE // PATCH
    out = _text_and_image(model, gen)
    out["pixel_values"] = _pixels(gen, BATCH, g * g, 3 * PATCH * PATCH)
    yy, xx = torch.meshgrid(torch.arange(g), torch.arange(g), indexing="ij")
    out["image_position_ids"] = torch.stack([xx.flatten(), yy.flatten()], -1).expand(BATCH, -1, -1).clone()
    return out


def _gemma4_image(model: nn.Module, inputs: dict[str, Any]) -> Any:
    return model.get_image_features(pixel_values=inputs["pixel_values"], image_position_ids=inputs["image_position_ids"])


def _build_phi4mm() -> nn.Module:
    from transformers import Phi4MultimodalConfig, Phi4MultimodalForCausalLM

    return Phi4MultimodalForCausalLM(Phi4MultimodalConfig(
        **text_kwargs(num_key_value_heads=2),
        vision_config=dict(_VIT, crop_size=IMAGE, image_token_id=IMAGE_TOKEN),
        audio_config={"hidden_size": HIDDEN, "intermediate_size": INTER, "num_blocks": 1, "num_attention_heads": HEADS,
                      "ext_pw_out_channel": HIDDEN, "depthwise_separable_out_channel": HIDDEN, "nemo_conv_channels": 32,
                      "bias_max_distance": 16,
                          "audio_token_id": 249}))


def _phi4_image(model: nn.Module, inputs: dict[str, Any]) -> torch.Tensor:
    emb = model.model.embed_tokens_extend.image_embed
    feats = emb.img_processor(inputs["pixel_values"]).last_hidden_state
    return emb.img_projection_down(nn.functional.gelu(emb.img_projection_up(feats)))


def _build_chameleon() -> nn.Module:
    from transformers import ChameleonConfig, ChameleonForConditionalGeneration

    return ChameleonForConditionalGeneration(ChameleonConfig(
        **text_kwargs(),
        vq_config={"embed_dim": 32, "num_embeddings": 64, "latent_channels": 32, "base_channels": 32, "channel_multiplier": [1, 1],
                       "num_res_blocks": 1, "resolution": IMAGE, "attn_resolutions": []},
        vocabulary_map={"<image>": IMAGE_TOKEN}))


def _chameleon_image(model: nn.Module, inputs: dict[str, Any]) -> torch.Tensor:
    return model.model.vqmodel.encode(inputs["pixel_values"]).quantized_last_hidden_state


def _build_mllama() -> nn.Module:
    from transformers import MllamaConfig, MllamaForConditionalGeneration

    return MllamaForConditionalGeneration(MllamaConfig(
        vision_config={"hidden_size": HIDDEN, "num_hidden_layers": LAYERS, "num_global_layers": 1, "attention_heads": HEADS,
                           "intermediate_size": INTER, "vision_output_dim": 2 * HIDDEN, "image_size": IMAGE, "patch_size": PATCH,
                           "max_num_tiles": 1, "intermediate_layers_indices": [0], "supported_aspect_ratios": [[1, 1]]},
        text_config={"vocab_size": VOCAB + 8, "hidden_size": HIDDEN, "num_hidden_layers": LAYERS, "num_attention_heads": HEADS,
                         "num_key_value_heads": 2, "intermediate_size": INTER, "cross_attention_layers": [1], "pad_token_id": 0},
        image_token_index=VOCAB + 1))


def _mllama_image(model: nn.Module, inputs: dict[str, Any]) -> torch.Tensor:
    px = inputs["pixel_values"][:, None, None]  # (batch, images, tiles, 3, H, W)
    out = model.model.vision_model(px, aspect_ratio_ids=torch.ones(BATCH, 1, dtype=torch.long),
                                   aspect_ratio_mask=torch.ones(BATCH, 1, 1, dtype=torch.long)).last_hidden_state
    return model.model.multi_modal_projector(out)


def _build_qwen3_vl(moe: bool = False) -> nn.Module:
    """Qwen3-VL; ``moe=True``: Qwen3-VL-MoE (every text layer an MoE block of 4 experts, top 2, 3-D weights)."""
    from transformers import (
        Qwen3VLConfig,
        Qwen3VLForConditionalGeneration,
        Qwen3VLMoeConfig,
        Qwen3VLMoeForConditionalGeneration,
    )

    text = dict(text_kwargs(num_key_value_heads=2), head_dim=HIDDEN // HEADS,
                rope_parameters=dict(_MROPE, mrope_interleaved=True))
    if moe:
        text.update(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, decoder_sparse_step=1,
                    mlp_only_layers=[])
    config, cls = (Qwen3VLMoeConfig, Qwen3VLMoeForConditionalGeneration) if moe else \
        (Qwen3VLConfig, Qwen3VLForConditionalGeneration)
    return cls(config(
        vision_config={"depth": LAYERS, "hidden_size": HIDDEN, "intermediate_size": INTER, "num_heads": HEADS,
                       "patch_size": PATCH, "spatial_merge_size": 2, "temporal_patch_size": 2,
                       "out_hidden_size": HIDDEN, "num_position_embeddings": 16, "deepstack_visual_indexes": [0]},
        text_config=text, image_token_id=IMAGE_TOKEN, video_token_id=VIDEO_TOKEN, vision_start_token_id=VISION_START,
        vision_end_token_id=VISION_END))


def _build_llava_onevision() -> nn.Module:
    from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration

    return LlavaOnevisionForConditionalGeneration(LlavaOnevisionConfig(
        vision_config=dict(model_type="siglip_vision_model", **siglip_vision_kwargs()),
        text_config=dict(model_type="qwen2", **text_kwargs(num_key_value_heads=2)), image_token_index=IMAGE_TOKEN,
        video_token_index=VIDEO_TOKEN, image_grid_pinpoints=[[IMAGE, IMAGE]]))


def _onevision_image(model: nn.Module, inputs: dict[str, Any]) -> Any:
    px = inputs["pixel_values"][:, None].expand(-1, 2, -1, -1, -1)  # base image + one crop
    return model.get_image_features(pixel_values=px, image_sizes=torch.tensor([[IMAGE, IMAGE]] * BATCH))


# ---------------------------------------------------------------------------------------------- pruning layouts
# smaller text decoder (hidden 64, 4 heads of 16 / 2 key-value heads, intermediate 96): the layouts that pruning
# treats specially (fused gate_up, w1/w3/w2, linear attention, connectors sized by the text config, BART decoder)
_SMALL_TEXT = {"vocab_size": VOCAB, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": LAYERS,
               "num_attention_heads": HEADS, "num_key_value_heads": 2, "max_position_embeddings": 128,
               "pad_token_id": 0}
_SMALL_MROPE = {"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 10000.0}
_SMALL_VISION = {"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2, "patch_size": PATCH}
_QWEN_IDS = {"image_token_id": IMAGE_TOKEN, "video_token_id": VIDEO_TOKEN}


def _auto_build(cls_name: str, model_type: str, **kw: Any) -> nn.Module:
    import transformers
    from transformers import AutoConfig

    return getattr(transformers, cls_name)(AutoConfig.for_model(model_type, **kw))


def _build_glm4v() -> nn.Module:
    return _auto_build("Glm4vForConditionalGeneration", "glm4v", text_config=dict(_SMALL_TEXT, rope_parameters=_SMALL_MROPE),
                       vision_config=dict(_SMALL_VISION, depth=1, out_hidden_size=64, image_size=IMAGE,
                                          temporal_patch_size=2, spatial_merge_size=2),
                       **_QWEN_IDS, image_start_token_id=VISION_START, image_end_token_id=VISION_END,
                       video_start_token_id=BOI_TOKEN, video_end_token_id=EOI_TOKEN)


def _build_lfm2_vl() -> nn.Module:
    return _auto_build("Lfm2VlForConditionalGeneration", "lfm2_vl",
                       text_config=dict(_SMALL_TEXT, layer_types=["full_attention", "conv"],
                                        block_auto_adjust_ff_dim=True),
                       vision_config=dict(_SMALL_VISION, num_hidden_layers=1, num_patches=N_PATCHES),
                       projector_hidden_size=64, image_token_id=IMAGE_TOKEN)


def _naflex_inputs(model: nn.Module, gen: torch.Generator) -> dict[str, Any]:
    g = IMAGE // PATCH
    out = _text_and_image(model, gen)
    out["pixel_values"] = _pixels(gen, BATCH, g * g, 3 * PATCH * PATCH)
    out["pixel_attention_mask"] = torch.ones(BATCH, g * g, dtype=torch.long)
    out["spatial_shapes"] = torch.tensor([[g, g]] * BATCH)
    return out


def _naflex_image(model: nn.Module, inputs: dict[str, Any]) -> Any:
    return model.model.get_image_features(pixel_values=inputs["pixel_values"], spatial_shapes=inputs["spatial_shapes"],
                                          pixel_attention_mask=inputs["pixel_attention_mask"])


def _build_idefics2() -> nn.Module:
    return _auto_build("Idefics2ForConditionalGeneration", "idefics2", text_config=dict(_SMALL_TEXT, model_type="mistral"),
                       vision_config=dict(_SMALL_VISION, num_hidden_layers=1, image_size=IMAGE),
                       perceiver_config={"hidden_size": 64, "resampler_n_latents": 4, "resampler_depth": 1,
                                         "resampler_n_heads": 2, "resampler_head_dim": 16, "num_key_value_heads": 1},
                       image_token_id=IMAGE_TOKEN)


def _idefics2_inputs(model: nn.Module, gen: torch.Generator) -> dict[str, Any]:
    out = _text_and_image(model, gen)
    out["pixel_values"] = out["pixel_values"][:, None]  # (batch, images, 3, H, W)
    return out


def _build_florence2() -> nn.Module:
    return _auto_build("Florence2ForConditionalGeneration", "florence2",
                       text_config={"vocab_size": VOCAB, "d_model": 64, "encoder_layers": 1, "decoder_layers": LAYERS,
                                    "encoder_attention_heads": HEADS, "decoder_attention_heads": HEADS,
                                    "encoder_ffn_dim": 96, "decoder_ffn_dim": 96, "max_position_embeddings": 64,
                                    "pad_token_id": PAD_ID, "bos_token_id": BOS_ID, "eos_token_id": EOS_ID,
                                    "decoder_start_token_id": EOS_ID, "forced_eos_token_id": None},
                       vision_config={"embed_dim": [16, 32], "depths": [1, 1], "num_heads": [2, 2], "num_groups": [2, 2],
                                      "patch_size": [7, 3], "patch_stride": [4, 2], "patch_padding": [3, 1],
                                      "patch_prenorm": [False, True], "projection_dim": 64},
                       image_token_id=IMAGE_TOKEN)


def _seq2seq_text_logits(model: nn.Module, inputs: dict[str, Any]) -> torch.Tensor:
    return model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                 decoder_input_ids=inputs["input_ids"][:, :5]).logits


def _florence2_output(model: nn.Module, inputs: dict[str, Any]) -> torch.Tensor:
    feats = _first_tensor(_inner_image_features(model, inputs))
    return torch.cat([feats.flatten(), _seq2seq_text_logits(model, inputs).flatten().to(torch.float32)])


def _build_qwen3_5() -> nn.Module:
    return _auto_build("Qwen3_5ForConditionalGeneration", "qwen3_5",
                       text_config=dict(_SMALL_TEXT, head_dim=16, layer_types=["linear_attention", "full_attention"],
                                        linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=8,
                                        linear_value_head_dim=8,
                                        rope_parameters=dict(_SMALL_MROPE, partial_rotary_factor=0.5)),
                       vision_config=dict(_SMALL_VISION, depth=1, out_hidden_size=64, temporal_patch_size=2,
                                          spatial_merge_size=2),
                       **_QWEN_IDS, vision_start_token_id=VISION_START, vision_end_token_id=VISION_END)


# ---------------------------------------------------------------------------------------------- LLaVA-Med layout
_LLAVA_MED_CLS: dict[str, type] = {}


def llava_med_class() -> tuple[type, type]:
    """``(config class, model class)`` reproducing LLaVA-Med v1.5's own ``LlavaMistralForCausalLM`` layout.

    A ``MistralForCausalLM`` whose ``model`` (a ``MistralModel``) also holds ``vision_tower`` (a CLIP vision
    model) and ``mm_projector`` (Linear-GELU-Linear), as the LLaVA code base builds it; images come in as
    ``images=`` and their projected patch features replace the ``image_token_index`` tokens. Registered with
    the transformers Auto classes under ``model_type="tiny_llava_mistral"`` so ``from_pretrained`` works.
    """
    if _LLAVA_MED_CLS:
        return _LLAVA_MED_CLS["config"], _LLAVA_MED_CLS["model"]
    from transformers import (
        AutoConfig,
        AutoModelForCausalLM,
        CLIPVisionConfig,
        CLIPVisionModel,
        MistralConfig,
        MistralForCausalLM,
        MistralModel,
    )

    class LlavaMistralConfig(MistralConfig):
        model_type = "tiny_llava_mistral"

        def __init__(self, mm_vision_tower: dict | None = None, image_token_index: int = IMAGE_TOKEN, **kw: Any):
            super().__init__(**kw)
            self.mm_vision_tower = mm_vision_tower or {}
            self.image_token_index = image_token_index

    class LlavaMistralModel(MistralModel):
        config_class = LlavaMistralConfig

        def __init__(self, config: LlavaMistralConfig) -> None:
            super().__init__(config)
            vis = CLIPVisionConfig(**config.mm_vision_tower)
            self.vision_tower = CLIPVisionModel(vis)
            self.mm_projector = nn.Sequential(nn.Linear(vis.hidden_size, config.hidden_size), nn.GELU(),
                                              nn.Linear(config.hidden_size, config.hidden_size))
            self.post_init()

    class LlavaMistralForCausalLM(MistralForCausalLM):
        config_class = LlavaMistralConfig

        def __init__(self, config: LlavaMistralConfig) -> None:
            super().__init__(config)
            self.model = LlavaMistralModel(config)
            self.post_init()

        def encode_images(self, images: torch.Tensor) -> torch.Tensor:
            feats = self.model.vision_tower(images).last_hidden_state[:, 1:]  # CLS dropped
            return self.model.mm_projector(feats)

        def forward(self, input_ids=None, attention_mask=None, images=None, inputs_embeds=None, **kw):
            if images is not None and inputs_embeds is None:
                inputs_embeds = self.model.embed_tokens(input_ids)
                feats = self.encode_images(images).to(inputs_embeds.dtype)
                mask = (input_ids == self.config.image_token_index).unsqueeze(-1).expand_as(inputs_embeds)
                inputs_embeds = inputs_embeds.masked_scatter(mask, feats)
                input_ids = None
            return super().forward(input_ids=input_ids, attention_mask=attention_mask, inputs_embeds=inputs_embeds,
                                   **kw)

    AutoConfig.register("tiny_llava_mistral", LlavaMistralConfig, exist_ok=True)
    AutoModelForCausalLM.register(LlavaMistralConfig, LlavaMistralForCausalLM, exist_ok=True)
    _LLAVA_MED_CLS.update(config=LlavaMistralConfig, model=LlavaMistralForCausalLM)
    return LlavaMistralConfig, LlavaMistralForCausalLM


def _build_llava_med() -> nn.Module:
    cfg_cls, model_cls = llava_med_class()
    cfg = cfg_cls(mm_vision_tower=dict(_VIT), **text_kwargs(num_key_value_heads=2))
    return model_cls(cfg)


def _llava_med_inputs(model: nn.Module, gen: torch.Generator) -> dict[str, Any]:
    ids = torch.cat([torch.full((BATCH, 1), BOS_ID), torch.full((BATCH, N_PATCHES), IMAGE_TOKEN), _text_ids(gen)], dim=1)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "images": _pixels(gen, BATCH, 3, IMAGE, IMAGE)}


# ---------------------------------------------------------------------------------------------- vision encoders
def _build_dinov2() -> nn.Module:
    from transformers import Dinov2Config, Dinov2Model

    return Dinov2Model(Dinov2Config(hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                                    mlp_ratio=2, image_size=IMAGE, patch_size=PATCH))


def _build_clip() -> nn.Module:
    from transformers import CLIPConfig, CLIPModel

    return CLIPModel(CLIPConfig(vision_config=siglip_vision_kwargs(), text_config=_CLIP_TEXT, projection_dim=HIDDEN))


_CLIP_TEXT = {"vocab_size": VOCAB, "hidden_size": HIDDEN, "intermediate_size": INTER, "num_hidden_layers": LAYERS,
              "num_attention_heads": HEADS, "max_position_embeddings": 32}


def _dual_inputs(model: nn.Module, gen: torch.Generator) -> dict[str, Any]:
    ids = _text_ids(gen)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": _pixels(gen, BATCH, 3, IMAGE, IMAGE)}


def _dual_logits(model: nn.Module, inputs: dict[str, Any]) -> torch.Tensor:
    out = model(**inputs)
    return torch.cat([out.logits_per_image.flatten(), out.image_embeds.flatten(), out.text_embeds.flatten()])


def _build_clip_vision() -> nn.Module:
    from transformers import CLIPVisionConfig, CLIPVisionModel

    return CLIPVisionModel(CLIPVisionConfig(**siglip_vision_kwargs()))


def _build_siglip2() -> nn.Module:
    from transformers import Siglip2Config, Siglip2Model

    return Siglip2Model(Siglip2Config(
        vision_config={"hidden_size": HIDDEN, "intermediate_size": INTER, "num_hidden_layers": LAYERS,
                           "num_attention_heads": HEADS, "patch_size": PATCH, "num_patches": N_PATCHES},
        text_config=_CLIP_TEXT))


def _siglip2_inputs(model: nn.Module, gen: torch.Generator) -> dict[str, Any]:
    g = IMAGE // PATCH
    out = _dual_inputs(model, gen)
    out["pixel_values"] = _pixels(gen, BATCH, g * g, 3 * PATCH * PATCH)
    out["pixel_attention_mask"] = torch.ones(BATCH, g * g, dtype=torch.long)
    out["spatial_shapes"] = torch.tensor([[g, g]] * BATCH)
    return out


def _build_swin() -> nn.Module:
    from transformers import SwinConfig, SwinModel

    return SwinModel(SwinConfig(image_size=IMAGE, patch_size=4, embed_dim=32, depths=[1, 1], num_heads=[2, 4],
                                window_size=4))


def _build_convnext() -> nn.Module:
    from transformers import ConvNextConfig, ConvNextModel

    return ConvNextModel(ConvNextConfig(hidden_sizes=[32, 64], depths=[1, 1], num_stages=2, image_size=IMAGE))


def _pooled(model: nn.Module, inputs: dict[str, Any]) -> torch.Tensor:
    return model(**inputs).pooler_output


def _build_beit() -> nn.Module:
    from transformers import BeitConfig, BeitModel

    return BeitModel(BeitConfig(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS,
                                num_attention_heads=HEADS, intermediate_size=INTER, image_size=IMAGE, patch_size=PATCH))


def _image_only(model: nn.Module, gen: torch.Generator) -> dict[str, Any]:
    return {"pixel_values": _pixels(gen, BATCH, 3, IMAGE, IMAGE)}


def _last_hidden(model: nn.Module, inputs: dict[str, Any]) -> torch.Tensor:
    return model(**inputs).last_hidden_state


# ---------------------------------------------------------------------------------------------- the lists
def _vlm(name: str, build, inputs, output, notes: str = "") -> ZooEntry:
    return ZooEntry(name, name, True, build, inputs, output, notes=notes)


VLM_LAYOUTS: list[ZooEntry] = [
    _vlm("blip2", _build_blip2, _qformer_inputs, _full_logits, "4 query tokens -> 4 image tokens"),
    _vlm("instructblip", _build_instructblip, _qformer_inputs, _full_logits, "Q-Former reads qformer_input_ids"),
    _vlm("kosmos2", _build_kosmos2, _kosmos2_inputs, _full_logits, "4 latent queries at image_embeds_position_mask"),
    _vlm("deepseek_vl", _build_deepseek_vl, _text_and_image, _with_image(_inner_image_features)),
    _vlm("janus", _build_janus, _text_and_image, _with_image(_inner_image_features)),
    _vlm("paddleocr_vl", _build_paddleocr_vl, _paddle_inputs, _with_image(_grid_image_features),
         "flattened 8x8 patches + image_grid_thw"),
    _vlm("ovis2", _build_ovis2, _text_and_image, _with_image(_top_image_features)),
    _vlm("gemma4", _build_gemma4, _gemma4_inputs, _with_image(_gemma4_image),
         "patchified pixel_values (B, 16, 192) + image_position_ids; no audio tower"),
    _vlm("phi4mm", _build_phi4mm, _text_and_image, _with_image(_phi4_image),
         "image path: img_processor -> img_projection_up/down; audio encoder without role"),
    _vlm("chameleon", _build_chameleon, _text_and_image, _with_image(_chameleon_image),
         "image path: vqmodel.encode"),
    _vlm("mllama", _build_mllama, _text_and_image, _with_image(_mllama_image),
         "one tile; image path: vision_model -> multi_modal_projector"),
    _vlm("qwen3_vl", _build_qwen3_vl, _qwen_like_inputs, _with_image(_grid_image_features),
         "flattened patches + image_grid_thw; deepstack mergers"),
    _vlm("llava_onevision", _build_llava_onevision, _text_and_image, _with_image(_onevision_image),
         "anyres: base image + one crop"),
    _vlm("llava_med", _build_llava_med, _llava_med_inputs, _full_logits,
         "LLaVA-Med's LlavaMistralForCausalLM layout; images= argument; 16 image tokens"),
    _vlm("glm4v", _build_glm4v, _qwen_like_inputs, _with_image(_grid_image_features),
         "hidden 64; fused gate_up_proj FFNs; flattened patches + image_grid_thw"),
    _vlm("lfm2_vl", _build_lfm2_vl, _naflex_inputs, _with_image(_naflex_image),
         "hidden 64; w1/w3 -> w2 FFNs, an attention and a convolution layer; SigLIP 2 NaFlex tower"),
    _vlm("idefics2", _build_idefics2, _idefics2_inputs, _with_image(_inner_image_features),
         "hidden 64; perceiver connector sized by text_config.intermediate_size; 5-D pixel_values"),
    _vlm("florence2", _build_florence2, _text_and_image, _florence2_output,
         "hidden 64; DaViT tower, BART encoder-decoder language model; text logits from 5 decoder tokens"),
    _vlm("qwen3_5", _build_qwen3_5, _qwen_like_inputs, _with_image(_grid_image_features),
         "hidden 64; a linear-attention (gated delta rule) and a gated full-attention layer"),
]

VISION_ENCODERS: list[ZooEntry] = [
    ZooEntry("dinov2", "dinov2", False, _build_dinov2, _image_only, _last_hidden, notes="RAD-DINO's architecture"),
    ZooEntry("clip", "clip", False, _build_clip, _dual_inputs, _dual_logits,
             notes="both towers (BiomedCLIP-style); output: logits_per_image, image and text embeddings"),
    ZooEntry("clip_vision", "clip", False, _build_clip_vision, _image_only, _last_hidden),
    ZooEntry("siglip2", "siglip2", False, _build_siglip2, _siglip2_inputs, _dual_logits,
             notes="NaFlex: patchified pixel_values + pixel_attention_mask + spatial_shapes"),
    ZooEntry("swin", "swin", False, _build_swin, _image_only, _last_hidden),
    ZooEntry("convnext", "convnext", False, _build_convnext, _image_only, _pooled),
    ZooEntry("beit", "beit", False, _build_beit, _image_only, _last_hidden),
]

def _blip_image(model: nn.Module, inputs: dict[str, Any]) -> Any:
    extra = {k: inputs[k] for k in ("qformer_input_ids", "qformer_attention_mask") if k in inputs}
    return model.get_image_features(pixel_values=inputs["pixel_values"], **extra)


def _llava_med_image(model: nn.Module, inputs: dict[str, Any]) -> torch.Tensor:
    return model.encode_images(inputs["images"])


IMAGE_PATH: dict[str, Any] = {
    "blip2": _blip_image, "instructblip": _blip_image, "kosmos2": _top_image_features,
    "deepseek_vl": _inner_image_features, "janus": _inner_image_features, "paddleocr_vl": _grid_image_features,
    "ovis2": _top_image_features, "gemma4": _gemma4_image, "phi4mm": _phi4_image, "chameleon": _chameleon_image,
    "mllama": _mllama_image, "qwen3_vl": _grid_image_features, "llava_onevision": _onevision_image,
    "llava_med": _llava_med_image, "glm4v": _grid_image_features, "lfm2_vl": _naflex_image,
    "idefics2": _inner_image_features, "florence2": _inner_image_features, "qwen3_5": _grid_image_features,
}
"""Entry name -> ``fn(model, inputs)`` running only the image path (vision tower, then projector) of a multimodal
entry: the modules that run in it are the ones that see the image."""

EXTRA_ZOO: list[ZooEntry] = VLM_LAYOUTS + VISION_ENCODERS
EXTRA_ZOO_BY_NAME: dict[str, ZooEntry] = {e.name: e for e in EXTRA_ZOO}


def __getattr__(name: str):
    """``extra_zoo_params``: a ``pytest.mark.parametrize`` mark over :data:`EXTRA_ZOO` (lazy pytest import)."""
    if name == "extra_zoo_params":
        import pytest

        return pytest.mark.parametrize("entry", EXTRA_ZOO, ids=[e.name for e in EXTRA_ZOO])
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
