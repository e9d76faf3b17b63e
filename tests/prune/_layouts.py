"""Tiny models of the layouts issue 22 names for pruning, built offline from configs (transformers 5):
text decoder of hidden 64, 2 layers, 4 heads / 2 key-value heads, intermediate 96, vocabulary 256."""
from __future__ import annotations

import torch
from torch import nn

TEXT = {"vocab_size": 256, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 128, "pad_token_id": 0}
MROPE = {"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 10000.0}


def _build(cls_name: str, model_type: str, **kw) -> nn.Module:
    import transformers
    from transformers import AutoConfig

    torch.manual_seed(0)
    return getattr(transformers, cls_name)(AutoConfig.for_model(model_type, **kw)).eval()


def glm4v() -> nn.Module:
    """GLM-4V: fused ``gate_up_proj`` FFNs."""
    return _build("Glm4vForConditionalGeneration", "glm4v", text_config=dict(TEXT, rope_parameters=MROPE),
                  vision_config={"hidden_size": 32, "intermediate_size": 64, "depth": 1, "num_heads": 2,
                                 "patch_size": 8, "out_hidden_size": 64, "image_size": 32,
                                 "temporal_patch_size": 2, "spatial_merge_size": 2})


def lfm2_vl() -> nn.Module:
    """LFM2-VL: ``w1/w3 -> w2`` FFNs, an attention layer and a convolution layer, FFN size auto-adjusted."""
    return _build("Lfm2VlForConditionalGeneration", "lfm2_vl",
                  text_config=dict(TEXT, layer_types=["full_attention", "conv"], block_auto_adjust_ff_dim=True),
                  vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                                 "num_attention_heads": 2, "patch_size": 8, "num_patches": 16},
                  projector_hidden_size=64)


def chameleon() -> nn.Module:
    """Chameleon: per-head ``q_norm`` / ``k_norm`` (weights ``(heads, head_dim)``)."""
    vocab_map = {"<image>": 250, **{f"IMGIMG{chr(65 + i)}Z": 200 + i for i in range(16)}}
    return _build("ChameleonForConditionalGeneration", "chameleon", **TEXT, vocabulary_map=vocab_map,
                  vq_config={"embed_dim": 8, "num_embeddings": 16, "base_channels": 32, "channel_multiplier": [1, 2],
                             "num_res_blocks": 1, "resolution": 32, "latent_channels": 32, "attn_resolutions": []})


def idefics2() -> nn.Module:
    """Idefics2: the connector MLP is sized by ``text_config.intermediate_size``."""
    return _build("Idefics2ForConditionalGeneration", "idefics2", text_config=dict(TEXT, model_type="mistral"),
                  vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                                 "num_attention_heads": 2, "image_size": 32, "patch_size": 8},
                  perceiver_config={"hidden_size": 64, "resampler_n_latents": 4, "resampler_depth": 1,
                                    "resampler_n_heads": 2, "resampler_head_dim": 16, "num_key_value_heads": 1})


def florence2() -> nn.Module:
    """Florence-2: a BART encoder-decoder language model (cross-attention in the decoder)."""
    return _build("Florence2ForConditionalGeneration", "florence2",
                  text_config={"vocab_size": 256, "d_model": 64, "encoder_layers": 1, "decoder_layers": 2,
                               "encoder_attention_heads": 4, "decoder_attention_heads": 4, "encoder_ffn_dim": 96,
                               "decoder_ffn_dim": 96, "max_position_embeddings": 64},
                  vision_config={"embed_dim": [16, 32], "depths": [1, 1], "num_heads": [2, 2], "num_groups": [2, 2],
                                 "patch_size": [7, 3], "patch_stride": [4, 2], "patch_padding": [3, 1],
                                 "patch_prenorm": [False, True], "projection_dim": 64})


def qwen3_5() -> nn.Module:
    """Qwen3.5: a linear-attention (gated delta rule) layer and a gated full-attention layer."""
    return _build("Qwen3_5ForConditionalGeneration", "qwen3_5",
                  text_config=dict(TEXT, head_dim=16, layer_types=["linear_attention", "full_attention"],
                                   linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=8,
                                   linear_value_head_dim=8, rope_parameters=dict(MROPE, partial_rotary_factor=0.5)),
                  vision_config={"hidden_size": 32, "intermediate_size": 64, "depth": 1, "num_heads": 2,
                                 "patch_size": 8, "out_hidden_size": 64, "temporal_patch_size": 2,
                                 "spatial_merge_size": 2})


def text_inputs(model: nn.Module) -> dict[str, torch.Tensor]:
    ids = torch.randint(3, 200, (2, 8), generator=torch.Generator().manual_seed(0))
    out = {"input_ids": ids}
    if type(model).__name__.startswith("Florence2"):
        out["decoder_input_ids"] = ids[:, :5]
    return out
