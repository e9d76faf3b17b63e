"""Attention layouts whose heads do not own just their q / k / v rows and o columns keep their heads.

* DiffLlama (differential attention): query head ``h`` is paired with head ``h + n/2``, the value heads are split in
  two halves, and each pair writes ``2 * head_dim`` columns of ``o_proj`` after a norm over the pair; removing heads
  as if they were independent silently changed the output.
* AFM-MoE (``AfmoeAttention``): a separate output gate ``gate_proj`` with ``n_heads * head_dim`` rows multiplies the
  attention output head channel by head channel; it was not cut with the heads, so the pruned model's forward failed.

Both now keep their heads (a head ratio for them is refused before anything changes, as for any block that cannot
lose heads); their FFN neurons are still pruned, exactly. Reference: plain torch, the unpruned float64 model with the
removed FFN neurons' gate / up rows and down columns zeroed.
"""
from __future__ import annotations

import copy

import pytest
import torch

from medquant.prune import StructuredPruner

transformers = pytest.importorskip("transformers")

IDS = torch.randint(3, 100, (2, 8), generator=torch.Generator().manual_seed(0))
TINY = {"vocab_size": 128, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "pad_token_id": 0}


def _diffllama():
    from transformers import DiffLlamaConfig, DiffLlamaForCausalLM

    torch.manual_seed(0)
    return DiffLlamaForCausalLM(DiffLlamaConfig(**TINY)).eval().double()


def _afmoe():
    from transformers import AfmoeConfig, AfmoeForCausalLM

    torch.manual_seed(0)
    cfg = AfmoeConfig(**TINY, moe_intermediate_size=32, num_dense_layers=2, num_experts=4, num_experts_per_tok=2)
    return AfmoeForCausalLM(cfg).eval().double()


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


def _refused_unchanged(model, reason: str) -> None:
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=reason):  # no block can lose heads: refused, nothing changed
        StructuredPruner(0.5, 0.25, progress=False).prune(model)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == {k: tuple(v.shape) for k, v in state.items()}


def _ffn_exact(model) -> None:
    pruner = StructuredPruner(0.0, {"model.layers.0": 0.25, "model.layers.1": 0.0}, progress=False)
    plan = pruner.plan(model)
    removed = {"model.layers.0": plan.removed_neurons("model.layers.0")}
    assert len(removed["model.layers.0"]) == 24
    ref = _logits(_zeroed(model, removed))
    full = _logits(model)
    pruner.apply(model, plan)
    torch.testing.assert_close(_logits(model), ref, rtol=0, atol=1e-12)
    assert (full - ref).abs().max() > 1e-3  # the removed neurons mattered


def test_differential_attention_keeps_its_heads():
    model = _diffllama()
    _refused_unchanged(model, "DiffLlamaAttention pairs query head")
    _ffn_exact(model)


def test_gated_output_attention_keeps_its_heads():
    model = _afmoe()
    _refused_unchanged(model, r"model\.layers\.0\.self_attn\.gate_proj")
    _ffn_exact(model)  # dense FFNs (num_dense_layers)


def test_a_per_head_parameter_is_named_not_looked_up_as_a_module():
    # Nystromformer's depthwise conv over the heads (weight (n_heads, 1, k, 1)): the refusal names the parameter
    # (an AttributeError looking it up as a module came first, from the gate check above)
    from transformers import NystromformerConfig, NystromformerModel

    model = NystromformerModel(NystromformerConfig(**{k: v for k, v in TINY.items() if k != "head_dim"},
                                                   max_position_embeddings=64)).eval()
    with pytest.raises(ValueError, match=r"attention\.self\.conv\.weight has one entry per head"):
        StructuredPruner(0.5, 0.0, progress=False).plan(model)


def test_a_position_bias_shared_by_the_stack_keeps_the_heads():
    # MPNet: encoder.relative_attention_bias (buckets x n_heads) is computed once and added to every layer's scores;
    # pruned heads made the forward fail. The heads are kept (refused: no block can lose heads), the FFN is pruned.
    from transformers import MPNetConfig, MPNetModel

    torch.manual_seed(0)
    model = MPNetModel(MPNetConfig(**{k: v for k, v in TINY.items() if k != "head_dim"},
                                   max_position_embeddings=64)).eval().double()
    _refused_unchanged(model, r"encoder\.relative_attention_bias is a position bias")
    pruner = StructuredPruner(0.0, {"encoder.layer.0": 0.25, "encoder.layer.1": 0.0}, progress=False)
    plan = pruner.plan(model)
    gone = plan.removed_neurons("encoder.layer.0")
    ref = copy.deepcopy(model)
    with torch.no_grad():
        ref.encoder.layer[0].intermediate.dense.weight[gone] = 0
        ref.encoder.layer[0].intermediate.dense.bias[gone] = 0
        ref.encoder.layer[0].output.dense.weight[:, gone] = 0
        want = ref(input_ids=IDS).last_hidden_state
        pruner.apply(model, plan)
        torch.testing.assert_close(model(input_ids=IDS).last_hidden_state, want, rtol=0, atol=1e-12)
