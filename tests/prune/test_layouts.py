"""Pruning the layouts of issue 22: fused gate_up (GLM-4V), w1/w3/w2 (LFM2-VL), per-head q/k norms (Chameleon),
gated and linear attention (Qwen3.5), a connector sized by the text config (Idefics2), an encoder-decoder language
model (Florence-2), MoE experts (Llama 4, Mixtral).

References: the unpruned model with the removed heads / neurons zeroed where they leave the block (the output
projection's columns of a removed head, the down projection's column of a removed neuron: exactly what removing
them computes), written here by layer path; transformers' own loaders for ``hf_config_exact`` (a fresh model
built from the saved config must take the pruned weights with ``strict=True``).
"""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

from medquant.models import transformer_blocks
from medquant.prune import StructuredPruner, load_pruned, save_pruned
from medquant.testing.zoo_moe import build_moe

from . import _layouts as L

HEAD_DIM = 16  # hidden 64 / 4 heads in every model here but Chameleon (the zoo's: 128 / 4)

# model -> (builder, attention output projection, FFN output projection, head size), paths relative to a block
CASES = {
    "glm4v": (L.glm4v, "self_attn.o_proj", "mlp.down_proj", HEAD_DIM),
    "lfm2_vl": (L.lfm2_vl, "self_attn.out_proj", "feed_forward.w2", HEAD_DIM),
    "chameleon": (L.chameleon, "self_attn.o_proj", "mlp.down_proj", 32),
    "qwen3_5": (L.qwen3_5, "self_attn.o_proj", "mlp.down_proj", HEAD_DIM),
    "idefics2": (L.idefics2, "self_attn.o_proj", "mlp.down_proj", HEAD_DIM),
    "florence2": (L.florence2, "self_attn.out_proj", "fc2", HEAD_DIM),
}


def _logits(model: nn.Module, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits


@torch.no_grad()
def _zeroed(model: nn.Module, plan, o_path: str, down_path: str, head_dim: int) -> nn.Module:
    ref = copy.deepcopy(model)
    for block in plan.heads:
        o = ref.get_submodule(f"{block}.{o_path}")
        for h in plan.removed_heads(block):
            o.weight[:, h * head_dim:(h + 1) * head_dim] = 0
    cross = {b.name: b.cross_attention for b in transformer_blocks(ref, "all")}
    for block in plan.cross_heads:  # Florence-2's decoder: encoder_attn loses heads too
        c = cross[block]
        o = ref.get_submodule(c.o)
        for h in plan.removed_cross_heads(block):
            o.weight[:, h * c.head_dim:(h + 1) * c.head_dim] = 0
    for block in plan.neurons:
        down = ref.get_submodule(f"{block}.{down_path}")
        down.weight[:, plan.removed_neurons(block)] = 0
    return ref


def _fresh_loads(model: nn.Module) -> bool:
    """Whether a model built from the (JSON round-tripped) config takes the pruned weights, strict."""
    cfg = type(model.config).from_dict(model.config.to_dict())
    fresh = type(model)(cfg)
    try:
        fresh.load_state_dict(model.state_dict(), strict=True)
    except RuntimeError:
        return False
    return True


def _prune(model, head_ratio, ffn_ratio):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        plan = StructuredPruner(head_ratio, ffn_ratio, progress=False).prune(model)
    return plan, [str(w.message) for w in caught]


@pytest.mark.parametrize("name", list(CASES))
def test_pruned_equals_zeroed_reference_and_config_claim_holds(name, tmp_path):
    build, o_path, down_path, head_dim = CASES[name]
    model = build()
    inputs = L.text_inputs(model)
    original = copy.deepcopy(model)
    plan, _ = _prune(model, 0.5, 0.3)
    pruned_ffn = [b for b, keep in plan.neurons.items() if len(keep) < plan.sizes[b]["neurons"]]
    pruned_heads = [b for b, keep in plan.heads.items() if len(keep) < plan.sizes[b]["heads"]]
    assert pruned_ffn and pruned_heads  # every layout prunes something of both kinds
    out = _logits(model, inputs)
    torch.testing.assert_close(out, _logits(_zeroed(original, plan, o_path, down_path, head_dim), inputs), rtol=1e-4,
                               atol=1e-5)
    assert plan.hf_config_exact is _fresh_loads(model)
    assert plan.hf_config_exact or plan.config_notes  # a config left as it was says why
    save_pruned(model, tmp_path / "p", plan=plan)
    assert torch.equal(_logits(load_pruned(tmp_path / "p"), inputs), out)


@pytest.mark.parametrize("name", ["glm4v", "lfm2_vl", "qwen3_5", "florence2"])
def test_ffn_pruning_round_trips_through_transformers(name, tmp_path):
    model = CASES[name][0]()
    inputs = L.text_inputs(model)
    plan, _ = _prune(model, 0.0, 0.3)
    assert plan.hf_config_exact is True and _fresh_loads(model)
    model.save_pretrained(tmp_path)
    again = type(model).from_pretrained(tmp_path).eval()
    assert torch.equal(_logits(again, inputs), _logits(model, inputs))


def test_layout_details():
    m = L.glm4v()  # fused gate_up: 2 * I rows, gate half then up half
    _prune(m, 0.0, 0.25)
    mlp = m.model.language_model.layers[0].mlp
    assert mlp.gate_up_proj.out_features == 2 * mlp.down_proj.in_features == 2 * 72
    m = L.chameleon()  # per-head norms follow their heads
    plan, _ = _prune(m, 0.5, 0.0)
    attn = m.model.layers[0].self_attn
    assert tuple(attn.q_norm.weight.shape) == (2, 32) and tuple(attn.k_norm.weight.shape) == (2, 32)
    assert plan.hf_config_exact is False and "head size derived" in plan.config_notes[0]
    m = build_moe("qwen3_moe")  # q_norm / k_norm over head_dim only: shared by every head, left as they are
    plan, _ = _prune(m, 0.5, 0.0)
    attn = m.model.layers[0].self_attn
    assert attn.q_proj.out_features == 2 * HEAD_DIM and tuple(attn.q_norm.weight.shape) == (HEAD_DIM,)
    assert plan.hf_config_exact is True and _fresh_loads(m)
    m = L.lfm2_vl()
    _prune(m, 0.0, 0.3)
    assert m.config.text_config.block_auto_adjust_ff_dim is False
    assert m.config.text_config.intermediate_size == m.model.language_model.layers[1].feed_forward.w2.in_features


def test_unprunable_parts_are_reported_per_block():
    m = L.qwen3_5()
    plan, msgs = _prune(m, 0.5, 0.0)
    assert list(plan.skipped) == ["model.language_model.layers.0"]
    assert "linear attention" in plan.skipped["model.language_model.layers.0"][0]
    assert any("plan.skipped" in s for s in msgs)
    assert len(plan.heads["model.language_model.layers.1"]) == 2  # the gated full-attention layer is pruned
    assert m.model.language_model.layers[1].self_attn.q_proj.out_features == 2 * 2 * HEAD_DIM
    m = L.florence2()
    plan, _ = _prune(m, 0.5, 0.3)
    decoder = [b for b in plan.neurons if ".decoder.layers." in b]
    assert len(decoder) == 2 and all(len(plan.neurons[b]) < 96 for b in decoder)
    # their cross-attention (encoder_attn) loses heads with the head ratio, as their self-attention does
    assert all(b not in plan.skipped and len(plan.cross_heads[b]) == 2 for b in decoder)
    m = L.lfm2_vl()
    plan, _ = _prune(m, 0.5, 0.0)
    assert "convolution" in plan.skipped["model.language_model.layers.1"][0]


def test_connector_sized_by_text_config_keeps_the_config():
    m = L.idefics2()
    plan, _ = _prune(m, 0.0, 0.3)
    assert plan.hf_config_exact is False
    assert "model.connector.modality_projection" in plan.config_notes[-1]
    assert m.config.text_config.intermediate_size == 96  # unchanged: the connector still has 96
    assert m.model.connector.modality_projection.down_proj.in_features == 96


@pytest.mark.parametrize("name", ["mixtral", "qwen2_moe", "llama4_text", "gpt_oss"])
def test_moe_experts_pruned_per_expert(name, tmp_path):
    """Routed experts (3-D weights; GPT-OSS transposed, biased, interleaved) keep their own neurons, all the
    same count; the result equals the unpruned model with each expert's removed neurons zeroed in down_proj."""
    m = build_moe(name)
    original = copy.deepcopy(m)
    ids = {"input_ids": torch.randint(3, 200, (2, 8), generator=torch.Generator().manual_seed(0))}
    plan, _ = _prune(m, 0.0, 0.3)
    assert set(plan.expert_neurons) == {"model.layers.0", "model.layers.1"} and not plan.skipped
    ref = copy.deepcopy(original)
    with torch.no_grad():
        for block, kept in plan.expert_neurons.items():
            mod = next(x for n, x in ref.named_modules() if n.startswith(block + ".") and n.endswith(".experts"))
            transposed = name in ("llama4_text", "gpt_oss")  # (E, I, H) there, (E, H, I) otherwise
            assert len({len(k) for k in kept}) == 1 and len(kept[0]) == 24  # 32 - 10 -> multiple of 8
            assert len({tuple(k) for k in kept}) > 1  # each expert chooses its own neurons
            for e, k in enumerate(kept):
                removed = sorted(set(range(32)) - set(k))
                if transposed:
                    mod.down_proj[e][removed, :] = 0
                else:
                    mod.down_proj[e][:, removed] = 0
        for block in plan.neurons:  # a shared expert MLP
            down = next(x for n, x in ref.named_modules() if n.startswith(block + ".") and n.endswith("down_proj")
                        and isinstance(x, nn.Linear))
            down.weight[:, plan.removed_neurons(block)] = 0
    out = _logits(m, ids)
    torch.testing.assert_close(out, _logits(ref, ids), rtol=1e-4, atol=1e-5)
    assert plan.hf_config_exact is True and _fresh_loads(m)
    m.save_pretrained(tmp_path)
    assert torch.equal(_logits(type(m).from_pretrained(tmp_path).eval(), ids), out)


def test_moe_per_layer_ratios_reload_with_load_pruned(tmp_path):
    m = build_moe("llama4_text")
    ids = {"input_ids": torch.randint(3, 200, (1, 6), generator=torch.Generator().manual_seed(0))}
    plan, _ = _prune(m, 0.0, {"model.layers.0": 0.3})
    assert len(plan.expert_neurons["model.layers.0"][0]) == 24 and len(plan.expert_neurons["model.layers.1"][0]) == 32
    assert plan.hf_config_exact is False and not _fresh_loads(m) and plan.config_notes
    save_pruned(m, tmp_path / "p", plan=plan)
    assert torch.equal(_logits(load_pruned(tmp_path / "p"), ids), _logits(m, ids))


def test_qwen2_moe_shared_expert_size_written_to_config(tmp_path):
    # experts 32 -> 16 and shared expert 48 -> 24 neurons (both multiples of 8): the config can say both
    # (moe_intermediate_size / shared_expert_intermediate_size), whatever intermediate_size (32) is
    m = build_moe("qwen2_moe")
    ids = {"input_ids": torch.randint(3, 200, (2, 8), generator=torch.Generator().manual_seed(0))}
    plan, _ = _prune(m, 0.0, 0.5)
    assert len(plan.expert_neurons["model.layers.0"][0]) == 16 and len(plan.neurons["model.layers.0"]) == 24
    assert plan.hf_config_exact is True, plan.config_notes
    assert (m.config.moe_intermediate_size, m.config.shared_expert_intermediate_size) == (16, 24)
    m.save_pretrained(tmp_path)
    assert torch.equal(_logits(type(m).from_pretrained(tmp_path).eval(), ids), _logits(m, ids))
