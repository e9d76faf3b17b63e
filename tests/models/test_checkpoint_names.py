"""``checkpoint_renaming(model)`` names each stored tensor as ``from_pretrained`` loads it: for every stored tensor
the model's tensor under the name it gives holds the stored values after ``from_pretrained`` (transformers' own
loader is the reference). Cases: a LLaVA folder in the older layout (``language_model.model.``,
``language_model.lm_head``, ``vision_tower.vision_model.``), a base-model folder read into a model with a head and
the reverse, and a Mixtral folder whose per-expert tensors a converter fuses (reported with its pattern)."""
from __future__ import annotations

import torch
from safetensors.torch import load_file, save_file

from medquant.models import checkpoint_renaming
from medquant.testing.zoo import ZOO_BY_NAME

LEGACY = (("model.language_model.", "language_model.model."), ("lm_head.", "language_model.lm_head."),
          ("model.vision_tower.", "vision_tower.vision_model."),
          ("model.multi_modal_projector.", "multi_modal_projector."))


def legacy_llava_name(name: str) -> str:
    """The name an older LLaVA checkpoint (``llava-hf/llava-1.5-7b-hf``) stores the current model's tensor under."""
    for new, old in LEGACY:
        if name.startswith(new):
            return old + name[len(new):]
    raise KeyError(name)


def _assert_renaming_is_from_pretrained(cls, folder, expected_unexpected=()):
    ref = cls.from_pretrained(folder).eval()
    state = ref.state_dict()
    renaming = checkpoint_renaming(ref)
    stored = load_file(str(folder / "model.safetensors"))
    for key, tensor in stored.items():
        name, pattern = renaming.rename(key)
        assert pattern is None and renaming(key) == name
        if key in expected_unexpected:  # a tensor from_pretrained ignores
            assert name not in state, key
            continue
        assert torch.equal(state[name], tensor), (key, name)
    return renaming, stored


def test_an_older_llava_layout_is_named_as_from_pretrained_loads_it(tmp_path):
    from transformers import LlavaForConditionalGeneration

    torch.manual_seed(0)
    model = ZOO_BY_NAME["llava"].build()
    model.save_pretrained(tmp_path)
    save_file({legacy_llava_name(k): v.contiguous() for k, v in model.state_dict().items()},
              str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    renaming, stored = _assert_renaming_is_from_pretrained(LlavaForConditionalGeneration, tmp_path)
    assert renaming("language_model.model.layers.0.self_attn.q_proj.weight") == \
        "model.language_model.layers.0.self_attn.q_proj.weight"
    assert renaming("language_model.lm_head.weight") == "lm_head.weight"
    assert renaming("vision_tower.vision_model.embeddings.patch_embedding.weight") == \
        "model.vision_tower.embeddings.patch_embedding.weight"
    assert sorted(renaming(k) for k in stored) == sorted(model.state_dict())


def test_the_base_model_prefix_is_added_and_stripped_as_from_pretrained_does(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaModel

    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=2, tie_word_embeddings=False)
    torch.manual_seed(0)
    LlamaModel(cfg).save_pretrained(tmp_path / "base")
    renaming, _ = _assert_renaming_is_from_pretrained(LlamaForCausalLM, tmp_path / "base")
    assert renaming("layers.0.mlp.up_proj.weight") == "model.layers.0.mlp.up_proj.weight"
    LlamaForCausalLM(cfg).save_pretrained(tmp_path / "head")
    renaming, _ = _assert_renaming_is_from_pretrained(LlamaModel, tmp_path / "head",
                                                      expected_unexpected={"lm_head.weight"})
    assert renaming("model.layers.0.mlp.up_proj.weight") == "layers.0.mlp.up_proj.weight"


def test_converted_tensors_carry_the_converter_pattern(tmp_path):
    from transformers import MixtralConfig, MixtralForCausalLM

    cfg = MixtralConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                        num_attention_heads=2, num_key_value_heads=2, num_local_experts=2)
    torch.manual_seed(0)
    MixtralForCausalLM(cfg).save_pretrained(tmp_path)
    ref = MixtralForCausalLM.from_pretrained(tmp_path)
    stored = load_file(str(tmp_path / "model.safetensors"))
    renaming = checkpoint_renaming(ref)
    w1 = "model.layers.0.block_sparse_moe.experts.1.w1.weight"
    assert w1 in stored  # save_pretrained writes the experts one by one ...
    name, pattern = renaming.rename(w1)
    assert name == "model.layers.0.mlp.experts.gate_up_proj" and pattern is not None
    fused = ref.state_dict()[name]  # ... and from_pretrained stacks them (w1 and w3 of expert 1: its second row)
    assert fused.dim() == 3 and torch.equal(fused[1, : cfg.intermediate_size], stored[w1])
    # the router is only renamed
    assert renaming.rename("model.layers.0.block_sparse_moe.gate.weight") == ("model.layers.0.mlp.gate.weight", None)
