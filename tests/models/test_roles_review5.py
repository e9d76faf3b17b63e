"""Fourth-round role / block-stack review: VLM layouts outside the zoo, checked against the architecture's own
attribute names."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from medquant.models import block_stacks, model_roles, role_of, transformer_blocks, vision_layers


def _deepseek_vl_hybrid():
    cfg = transformers.DeepseekVLHybridConfig(
        text_config={"vocab_size": 128, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                         "num_attention_heads": 2, "num_key_value_heads": 1, "max_position_embeddings": 64},
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
                           "image_size": 32, "patch_size": 8},
        high_res_vision_config={"hidden_size": 32, "mlp_dim": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
                                    "image_size": 64, "patch_size": 16, "output_channels": 16, "global_attn_indexes": [1],
                                    "window_size": 2},
    )
    torch.manual_seed(0)
    return transformers.DeepseekVLHybridForConditionalGeneration(cfg).eval()


def test_deepseek_vl_hybrid_both_vision_towers_give_blocks():
    """DeepSeek-VL hybrid runs two towers on the image (``get_image_features``: the SigLIP ``vision_model`` on the
    low-resolution pixels, the SAM ``high_res_vision_model`` on the high-resolution ones); both are vision, and the
    blocks of both are vision blocks, although their block classes differ."""
    model = _deepseek_vl_hybrid()
    inner = model.model
    low = [f"model.vision_model.encoder.layers.{i}" for i in range(len(inner.vision_model.encoder.layers))]
    high = [f"model.high_res_vision_model.vision_encoder.layers.{i}"
            for i in range(len(inner.high_res_vision_model.vision_encoder.layers))]
    assert role_of(model, "model.vision_model") == "vision"
    assert role_of(model, "model.high_res_vision_model") == "vision"
    assert role_of(model, "model.language_model") == "language"
    assert role_of(model, "lm_head") == "head"
    assert "language" in model_roles(model)
    got = vision_layers(model)
    assert set(low) <= set(got) and set(high) <= set(got)
    stacks = block_stacks(model)
    assert stacks[-1] == [f"model.language_model.layers.{i}" for i in range(2)]
    assert set(low) | set(high) == {n for s in stacks[:-1] for n in s}
    vis_blocks = {b.name for b in transformer_blocks(model, scope="vision")}
    assert set(low) <= vis_blocks  # the SigLIP blocks have q/k/v/out_proj and fc1/fc2


def _muse_glimmer():
    cfg = transformers.MuseGlimmerConfig(
        text_config={"vocab_size": 128, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                         "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 16, "layer_types": ["full_attention"],
                         "layer_rope_theta": [0], "max_position_embeddings": 64},
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
                           "layer_types": ["full_attention"]},
        out_hidden_size=32, projector_hidden_size=48,
    )
    torch.manual_seed(0)
    return transformers.MuseGlimmerForConditionalGeneration(cfg).eval()


def test_muse_glimmer_vision_adapter_is_projector():
    """Muse Glimmer's ``get_image_features`` runs ``vision_tower``, then ``vision_adapter`` (an MLP of
    ``config.projector_hidden_size`` with ``projector_hidden_act``) and ``vision_projection`` into the text width:
    the adapter is the first half of the projector, not part of the tower."""
    model = _muse_glimmer()
    adapter = model.model.vision_adapter
    assert adapter.fc1.out_features == model.config.projector_hidden_size  # the architecture's own projector width
    assert role_of(model, "model.vision_tower") == "vision"
    assert role_of(model, "model.vision_adapter.fc1") == "projector"
    assert role_of(model, "model.vision_adapter.fc2") == "projector"
    assert role_of(model, "model.vision_projection") == "projector"
    assert role_of(model, "model.language_model") == "language"
    assert role_of(model, "lm_head") == "head"
    assert vision_layers(model) == [f"model.vision_tower.layers.{i}" for i in range(len(model.model.vision_tower.layers))]


def _llama4():
    cfg = transformers.Llama4Config(
        text_config={"vocab_size": 128, "hidden_size": 32, "intermediate_size": 64, "intermediate_size_mlp": 64,
                         "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 16,
                         "num_local_experts": 2, "max_position_embeddings": 64},
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
                           "image_size": 28, "patch_size": 14, "vision_output_dim": 32, "projector_input_dim": 32,
                           "projector_output_dim": 32, "pixel_shuffle_ratio": 0.5},
    )
    torch.manual_seed(0)
    return transformers.Llama4ForConditionalGeneration(cfg).eval()


def test_llama4_vision_adapter_is_projector_and_tower_embeddings_stay_vision():
    """Llama 4's ``vision_model.vision_adapter`` (``Llama4VisionPixelShuffleMLP``: pixel shuffle, then an MLP of
    ``projector_input_dim`` -> ``projector_output_dim``) maps the tower's patches toward ``multi_modal_projector``:
    projector. The tower's own ``class_embedding`` / ``positional_embedding_vlm`` (parameters of ``vision_model``
    itself, added to the patch embeddings before the encoder) stay vision."""
    model = _llama4()
    vm = model.vision_model
    assert type(vm.vision_adapter).__name__ == "Llama4VisionPixelShuffleMLP"
    roles = model_roles(model)
    assert role_of(model, "vision_model.vision_adapter") == "projector"
    assert role_of(model, "multi_modal_projector") == "projector"
    assert role_of(model, "vision_model.model") == "vision"
    assert role_of(model, "vision_model.patch_embedding") == "vision"
    for p in ("vision_model.class_embedding", "vision_model.positional_embedding_vlm"):
        assert p in roles["vision"] and p not in roles.get("projector", [])
    assert role_of(model, "language_model.model") == "language"
    assert role_of(model, "language_model.lm_head") == "head"
