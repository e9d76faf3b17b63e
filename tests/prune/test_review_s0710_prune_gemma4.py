"""Gemma 4 text decoders whose config gives per-layer values: ``attention_k_eq_v`` with
``num_global_key_value_heads`` / ``global_head_dim`` (the released Gemma 4 layout). The full-attention layers have
other key/value counts and head sizes than the sliding ones, so the config is heterogeneous and reading
``config.num_key_value_heads`` raises transformers' ``AmbiguousGlobalPerLayerAttributeError``. Pruning must finish
(the config left as it was, the model reloaded with ``load_pruned``) instead of raising after the layers were
already cut.

The reference is plain torch: the unpruned float64 model with the removed heads' q rows / o columns (and removed
key/value heads' k / v rows) and the removed FFN neurons' rows / columns zeroed.
"""
from __future__ import annotations

import copy

import pytest
import torch

from medquant.prune import PrunePlan, StructuredPruner, load_pruned, save_pruned

transformers = pytest.importorskip("transformers")


def _gemma4(**over):
    from transformers import Gemma4ForCausalLM, Gemma4TextConfig

    kw = {"vocab_size": 128, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 4,
          "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "sliding_window": 8,
          "hidden_size_per_layer_input": 0, "pad_token_id": 0, "layer_types": ["sliding_attention", "full_attention"] * 2}
    kw.update(over)
    torch.manual_seed(0)
    return Gemma4ForCausalLM(Gemma4TextConfig(**kw)).eval().double()


IDS = torch.randint(3, 100, (2, 8), generator=torch.Generator().manual_seed(0))


@torch.no_grad()
def _zeroed(model, plan: PrunePlan):
    ref = copy.deepcopy(model)
    for b in plan.sizes:
        attn = ref.get_submodule(f"{b}.self_attn")
        d = attn.head_dim
        for h in plan.removed_heads(b) if b in plan.heads else []:
            attn.q_proj.weight[h * d:(h + 1) * d] = 0
            attn.o_proj.weight[:, h * d:(h + 1) * d] = 0
        for h in plan.removed_kv_heads(b) if b in plan.kv_heads else []:
            for lin in (attn.k_proj, attn.v_proj):
                lin.weight[h * d:(h + 1) * d] = 0
        mlp = ref.get_submodule(f"{b}.mlp")
        gone = plan.removed_neurons(b) if b in plan.neurons else []
        mlp.gate_proj.weight[gone] = 0
        mlp.up_proj.weight[gone] = 0
        mlp.down_proj.weight[:, gone] = 0
    return ref


@torch.no_grad()
def _logits(model):
    return model(input_ids=IDS).logits


def test_heterogeneous_config_prunes_and_reloads(tmp_path):
    # the released Gemma 4 layout: full-attention layers share k and v (no v_proj), with their own key/value head
    # count and head size; the sliding layers are pruned, the full ones are reported as skipped
    model = _gemma4(attention_k_eq_v=True, global_head_dim=32, num_global_key_value_heads=1)
    before = model.config.to_dict()
    pruner = StructuredPruner(0.5, 0.25, progress=False)
    with pytest.warns(UserWarning, match="skips parts"):
        plan = pruner.plan(model)
    assert plan.removed_heads("model.layers.0") and plan.removed_neurons("model.layers.1")
    ref = _logits(_zeroed(model, plan))
    full = _logits(model)
    pruner.apply(model, plan)  # raised AmbiguousGlobalPerLayerAttributeError after cutting the layers
    out = _logits(model)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)
    assert (full - ref).abs().max() > 1e-3  # the removal matters
    assert plan.hf_config_exact is False and plan.config_notes
    assert model.config.to_dict() == before
    save_pruned(model, tmp_path, plan=plan)
    assert torch.equal(_logits(load_pruned(tmp_path)), out)
