"""Gemma 3n's FFN with activation sparsity (``activation_sparsity_pattern``, 0.95 in the first layers of the
released models) thresholds its gate activations at ``mean + k * std`` taken over all of the layer's FFN neurons
(``_gaussian_topk``), so removing neurons changes what the kept ones output: those layers keep their neurons (said
in ``plan.skipped``), the others are pruned exactly.

Reference: plain torch, the unpruned float64 model with the removed neurons' gate / up rows and down columns
zeroed; a control shows that zeroing neurons of the sparse layer does change its kept neurons' contribution.
"""
from __future__ import annotations

import copy

import pytest
import torch

from medquant.prune import StructuredPruner, apply_plan

transformers = pytest.importorskip("transformers")

IDS = torch.randint(3, 100, (2, 8), generator=torch.Generator().manual_seed(0))


def _gemma3n(pattern):
    from transformers import Gemma3nForCausalLM, Gemma3nTextConfig

    cfg = Gemma3nTextConfig(vocab_size=128, vocab_size_per_layer_input=128, hidden_size=64,
                            hidden_size_per_layer_input=8, intermediate_size=96, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=8,
                            pad_token_id=0, layer_types=["sliding_attention", "full_attention"],
                            activation_sparsity_pattern=pattern, num_kv_shared_layers=0, laurel_rank=4,
                            altup_num_inputs=2)
    torch.manual_seed(0)
    return Gemma3nForCausalLM(cfg).eval().double()


@torch.no_grad()
def _zeroed(model, removed: dict[str, list[int]]):
    ref = copy.deepcopy(model)
    for block, gone in removed.items():
        mlp = ref.get_submodule(f"{block}.mlp")
        mlp.gate_proj.weight[gone] = 0
        mlp.up_proj.weight[gone] = 0
        mlp.down_proj.weight[:, gone] = 0
    return ref


@torch.no_grad()
def _logits(model):
    return model(input_ids=IDS).logits


def test_sparse_ffn_keeps_its_neurons_and_the_rest_is_exact():
    model = _gemma3n([0.95, 0.0])
    pruner = StructuredPruner(0.0, 0.25, progress=False)
    with pytest.warns(UserWarning, match="skips parts"):
        plan = pruner.plan(model)
    assert "activation sparsity" in " ".join(plan.skipped["model.layers.0"])
    assert plan.neurons.get("model.layers.0", list(range(96))) == list(range(96))
    gone = plan.removed_neurons("model.layers.1")
    assert len(gone) == 24
    ref = _logits(_zeroed(model, {"model.layers.1": gone}))
    pruner.apply(model, plan)
    torch.testing.assert_close(_logits(model), ref, rtol=0, atol=1e-12)
    assert model.model.layers[0].mlp.gate_proj.out_features == 96


def test_a_plan_removing_sparse_neurons_is_refused():
    model = _gemma3n([0.95, 0.0])
    plan = StructuredPruner(0.0, 0.25, progress=False).plan(_gemma3n([0.0, 0.0]))  # same shapes, no sparsity
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"neurons\['model\.layers\.0'\].*activation sparsity"):
        apply_plan(model, plan)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_control_zeroing_neurons_of_the_sparse_layer_is_not_exact():
    # why the layer is kept: with its threshold over all neurons, the kept neurons' output changes when some are
    # zeroed (the same holds when they are removed), so no removal equals masking
    model = _gemma3n([0.95, 0.0])
    mlp = model.model.layers[0].mlp
    x = torch.randn(2, 8, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full_gate = mlp._gaussian_topk(mlp.gate_proj(x))
        zeroed = _zeroed(model, {"model.layers.0": list(range(24))}).model.layers[0].mlp
        gate = zeroed._gaussian_topk(zeroed.gate_proj(x))
    assert (gate[..., 24:] - full_gate[..., 24:]).abs().max() > 1e-3
