"""Gemma 4 KV sharing (``num_kv_shared_layers``): the last layers reuse the keys and values that the last earlier
layer of the same type stores (``store_full_length_kv``; the reusing layers have no k / v projections). Removing
key/value heads of a storing layer (``gqa="group"``) would hand the reusing layers keys and values with fewer heads
than their queries read (the pruned model's forward failed); it is refused before anything changes. Removing query
heads only stays exact (plain-torch reference: :func:`tests.prune.test_review_s0710_prune_gemma4._zeroed`)."""
from __future__ import annotations

import pytest
import torch

from medquant.prune import StructuredPruner, apply_plan, load_pruned, save_pruned
from tests.prune.test_review_s0710_prune_gemma4 import _gemma4, _logits, _zeroed


def test_kv_sharing_group_mode_refused_before_any_change():
    model = _gemma4(num_kv_shared_layers=2, global_head_dim=16)  # layers 2, 3 reuse the k / v of layers 0, 1
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"model\.layers\.[01].*reuse"):
        StructuredPruner(0.5, 0.0, gqa="group", progress=False).prune(model)
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == {k: tuple(v.shape) for k, v in state.items()}
    # a plan given by hand that removes a storing layer's key/value heads: refused by apply_plan, nothing changed
    plan = StructuredPruner(0.5, 0.0, progress=False).plan(model)
    plan.heads["model.layers.0"], plan.kv_heads["model.layers.0"] = [0, 1], [0]
    with pytest.raises(ValueError, match=r"model\.layers\.0.*reuse"):
        apply_plan(model, plan)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    _logits(model)  # still runs


def test_kv_sharing_query_mode_is_exact(tmp_path):
    # positive control: removing query heads only keeps every stored key/value head
    model = _gemma4(num_kv_shared_layers=2, global_head_dim=16)
    pruner = StructuredPruner(0.5, 0.25, progress=False)
    plan = pruner.plan(model)
    assert all(plan.kv_heads[b] == [0, 1] for b in plan.kv_heads)
    ref = _logits(_zeroed(model, plan))
    pruner.apply(model, plan)
    out = _logits(model)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)
    save_pruned(model, tmp_path, plan=plan)
    assert torch.equal(_logits(load_pruned(tmp_path)), out)
