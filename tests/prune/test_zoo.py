"""Pruning every entry of the extra zoos (medquant.testing.zoo_vlm, zoo_moe): language and vision towers together
(``scope="all"``); the base zoo is in test_exactness.py / test_save_reload.py.

Reference: the unpruned model with what the plan removes zeroed where it leaves its block (the output
projection's input columns of a removed head, the FFN output projection's columns of a removed neuron, each
routed expert's ``down_proj`` slice of its removed neurons): exactly what removing them computes. Reloading is
checked with ``torch.equal`` against the pruned model in memory, through ``load_pruned`` always and through
transformers' ``from_pretrained`` when the plan says the config expresses the result.
"""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

from medquant.models import language_model_layers, transformer_blocks, vision_layers
from medquant.prune import StructuredPruner, load_pruned, save_pruned
from medquant.quant.experts import experts_layout
from medquant.testing.zoo_moe import MOE_ZOO, MOE_ZOO_BY_NAME
from medquant.testing.zoo_vlm import EXTRA_ZOO

ENTRIES = EXTRA_ZOO + MOE_ZOO

# what pruning cannot do on a layout, by entry: the reason it must give for those layers (and every layer it
# names); the zoo's ConvNeXt has no transformer block at all and is refused
REASONS = {
    "blip2": ("fused qkv",), "instructblip": ("fused qkv",), "glm4v": ("fused qkv",), "qwen3_vl": ("fused qkv",),
    "qwen3_5": ("linear attention", "fused qkv"), "lfm2_vl": ("convolution mixer",),
    "janus": ("no separate q/k/v/o",), "phi4mm": ("no separate q/k/v/o",), "kosmos2": ("normalises all",),
    "florence2": ("no attention or FFN", "fused qkv"),  # its decoders' cross-attention heads are pruned
    "chameleon": ("no attention or FFN",),
}  # Gemma 4's vision projections are clamp wrappers around nn.Linear: pruned (tests/prune/test_clipped_linears.py)


def _prune(model: nn.Module, **kw):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        plan = StructuredPruner(0.5, 0.3, scope="all", progress=False, **kw).prune(model)
    return plan, [str(w.message) for w in caught if "plan.skipped" in str(w.message)]


@torch.no_grad()
def _zeroed(model: nn.Module, plan) -> nn.Module:
    ref = copy.deepcopy(model)
    blocks = {b.name: b for b in transformer_blocks(ref, "all", clamp_wrappers=True)}
    for name in plan.heads:
        a = blocks[name].attention
        o = ref.get_submodule(a.o)
        for h in plan.removed_heads(name):
            o.weight[:, h * a.head_dim:(h + 1) * a.head_dim] = 0
    for name in plan.cross_heads:  # an encoder-decoder block's cross-attention (Florence-2's encoder_attn)
        c = blocks[name].cross_attention
        o = ref.get_submodule(c.o)
        for h in plan.removed_cross_heads(name):
            o.weight[:, h * c.head_dim:(h + 1) * c.head_dim] = 0
    for name in plan.neurons:
        ref.get_submodule(blocks[name].ffn.output).weight[:, plan.removed_neurons(name)] = 0
    for name, kept in plan.expert_neurons.items():
        mod = ref.get_submodule(blocks[name].experts)
        lay = experts_layout(mod)
        for e, k in enumerate(kept):
            removed = sorted(set(range(lay["inter"])) - set(k))
            if lay["transposed"]:  # down_proj (E, I, H)
                mod.down_proj[e][removed, :] = 0
            else:  # (E, H, I)
                mod.down_proj[e][:, removed] = 0
    return ref


def _removed_something(plan, name: str) -> bool:
    return (len(plan.heads.get(name, [])) < plan.sizes.get(name, {}).get("heads", 0)
            or len(plan.neurons.get(name, [])) < plan.sizes.get(name, {}).get("neurons", 0)
            or any(len(k) < plan.sizes[name]["expert_neurons"] for k in plan.expert_neurons.get(name, [])))


@pytest.mark.parametrize("entry", ENTRIES, ids=[e.name for e in ENTRIES])
def test_pruned_equals_zeroed_reference_reloads_and_reports_every_layer(entry, tmp_path):
    model = entry.build()
    inputs = entry.inputs(model)
    if entry.name == "convnext":
        with pytest.raises(ValueError, match="no transformer blocks with prunable attention or FFN"):
            _prune(model)
        return
    original = copy.deepcopy(model)
    plan, notes = _prune(model)
    with torch.no_grad():
        out = entry.output(model, inputs)
        ref = entry.output(_zeroed(original, plan), inputs)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5 * max(1.0, float(ref.abs().max())))
    assert sum(p.numel() for p in model.parameters()) < sum(p.numel() for p in original.parameters())

    # every layer of both towers: something removed, or a reason in plan.skipped (and a warning saying so)
    layers = language_model_layers(original) + vision_layers(original)
    silent = [n for n in layers if not _removed_something(plan, n) and n not in plan.skipped]
    assert silent == []
    assert all(why and all(isinstance(w, str) and w for w in why) for why in plan.skipped.values())
    assert bool(plan.skipped) == bool(notes)
    if entry.name in REASONS:  # each expected reason is given, and every skipped layer has one of them
        expected = REASONS[entry.name]
        assert all(any(r in w for r in expected for w in why) for why in plan.skipped.values())
        assert all(any(r in w for why in plan.skipped.values() for w in why) for r in expected)
    else:
        assert plan.skipped == {}

    assert plan.hf_config_exact or plan.config_notes  # a config left as it was says why
    save_pruned(model, tmp_path / "p", plan=plan)
    with torch.no_grad():
        # LLaVA-Med's own class is not part of transformers: load_pruned takes a float instance of it
        back = load_pruned(tmp_path / "p", model=entry.build() if entry.name == "llava_med" else None)
        assert torch.equal(entry.output(back, inputs), out)
    if plan.hf_config_exact:
        model.save_pretrained(tmp_path / "hf")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            again = type(model).from_pretrained(tmp_path / "hf").eval()
        with torch.no_grad():
            assert torch.equal(entry.output(again, inputs), out)


def test_gpt_oss_heads_and_their_sinks():
    """GPT-OSS keeps one attention sink per head: pruning heads removes their sinks too (exact)."""
    entry = MOE_ZOO_BY_NAME["gpt_oss"]
    model = entry.build()
    plan, _ = _prune(model)
    attn = model.model.layers[0].self_attn
    assert tuple(attn.sinks.shape) == (len(plan.heads["model.layers.0"]),) == (2,)
    assert attn.q_proj.out_features == 2 * 16 and attn.k_proj.out_features == 2 * 16  # GQA 4/2: one per group


def test_swin_relative_position_tables_follow_their_heads_and_stages_are_not_half_pruned():
    from transformers import SwinConfig, SwinModel

    torch.manual_seed(0)
    cfg = SwinConfig(image_size=32, patch_size=4, embed_dim=32, depths=[1, 2], num_heads=[2, 4], window_size=4)
    model = SwinModel(cfg).eval()
    x = {"pixel_values": torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))}
    original = copy.deepcopy(model)
    plan, notes = _prune(model)
    table = model.encoder.layers[0].blocks[0].attention.relative_position_bias.relative_position_bias_table
    kept = plan.heads["encoder.layers.0"]
    assert len(kept) == 1 and tuple(table.shape) == (49, 1)
    torch.testing.assert_close(table, original.encoder.layers[0].blocks[0].attention.relative_position_bias
                               .relative_position_bias_table[:, kept])
    # stage 2 holds two blocks: pruning only its first would be silent, so the stage is kept and reported
    assert "encoder.layers.1" not in plan.heads and "a stage of several blocks" in plan.skipped["encoder.layers.1"][0]
    assert notes
    with torch.no_grad():
        torch.testing.assert_close(model(**x).last_hidden_state,
                                   _zeroed(original, plan)(**x).last_hidden_state, rtol=1e-4, atol=1e-5)


def test_kosmos2_full_width_norms_keep_the_text_blocks():
    """Kosmos-2's text blocks normalise all heads (inner_attn_ln) and all FFN neurons (ffn_layernorm) at once:
    the language-only pruner refuses with that reason instead of changing the kept heads' output."""
    entry = next(e for e in EXTRA_ZOO if e.name == "kosmos2")
    model = entry.build()
    with pytest.raises(ValueError, match="inner_attn_ln normalises all heads together"):
        StructuredPruner(0.5, 0.0, progress=False).prune(model)
    with pytest.raises(ValueError, match="ffn_layernorm normalises all 256 FFN neurons"):
        StructuredPruner(0.0, 0.3, progress=False).prune(model)
