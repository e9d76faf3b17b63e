"""Whisper's ``generation_config.alignment_heads`` after applying a plan whose kept cross-attention heads are listed
out of order (a plan edited by hand, or read from JSON written by other code): :func:`apply_plan` accepts the
indices in any order and keeps the heads in their original order, so a kept head's new index is its rank among
the kept heads. The renumbering took its position in the plan's list instead, so a pair named another head than
the one it named before pruning (token timestamps read silently from the wrong head).

Reference: the cross-attention weights of the unpruned model whose removed heads' ``out_proj`` input columns are
zeroed (``_zeroed``, plain torch): the pair ``[layer, j]`` of the pruned model must read the same attention
weights as the pair ``[layer, h]`` it came from in the reference."""
from __future__ import annotations

import pytest
import torch

from medquant.prune import StructuredPruner
from tests.models import seq2seq_models as s2s
from tests.prune.test_cross_attention import _zeroed

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_alignment_heads_follow_heads_kept_in_any_listed_order():
    model = s2s.build("whisper")
    batch = s2s.inputs("whisper")
    model.set_attn_implementation("eager")
    pairs = [[0, 0], [0, 1], [0, 2], [0, 3], [1, 0], [1, 1], [1, 2], [1, 3]]
    model.generation_config.alignment_heads = pairs
    pruner = StructuredPruner(0.25, 0.0, progress=False)
    plan = pruner.plan(model, calib=[batch])
    decoder = [f"model.decoder.layers.{i}" for i in range(2)]
    for b in decoder:  # the same kept heads, listed in reverse
        assert len(plan.cross_heads[b]) == 3
        plan.cross_heads[b] = plan.cross_heads[b][::-1]
        plan.cross_kv_heads[b] = plan.cross_kv_heads[b][::-1]
    ref = _zeroed(model, plan)
    pruner.apply(model, plan)
    got = model.generation_config.alignment_heads
    assert len(got) == 6
    with torch.no_grad():
        out = model(**batch, output_attentions=True, use_cache=False).cross_attentions
        r = ref(**batch, output_attentions=True, use_cache=False).cross_attentions
    kept = [(layer, head) for layer, head in pairs if head in plan.cross_heads[decoder[layer]]]
    for (layer, j), (layer0, h) in zip(got, kept):
        assert layer == layer0
        torch.testing.assert_close(out[layer][:, j], r[layer][:, h], rtol=1e-5, atol=1e-6)
