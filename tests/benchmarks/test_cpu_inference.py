"""benchmarks.cpu_inference: how a row's model is made, and the paired prefill measurement's bookkeeping."""
from __future__ import annotations

import statistics

import torch

from benchmarks import cpu_inference as ci
from medquant.quant import QuantLinear
from medquant.quant.modules import QuantEmbedding


def test_make_quantizes_what_the_variant_names():
    m, _ = ci._make("llama_small", "W4g128", True)
    assert isinstance(m.lm_head, QuantLinear) and m.lm_head.bit_groups == [4]
    assert isinstance(m.model.layers[0].mlp.down_proj, QuantLinear)
    assert not isinstance(m.model.embed_tokens, QuantEmbedding)
    m, _ = ci._make("llama_small", "W8", False)
    assert isinstance(m.lm_head, torch.nn.Linear) and not isinstance(m.lm_head, QuantLinear)
    assert m.model.layers[0].self_attn.q_proj.bit_groups == [8]
    m, _ = ci._make("llama_small", "W4g128+emb@bf16", True)
    assert isinstance(m.model.embed_tokens, QuantEmbedding) and isinstance(m.lm_head, QuantLinear)
    assert m.model.norm.weight.dtype == torch.bfloat16
    m, _ = ci._make("llama_small", "bfloat16", False)
    assert m.lm_head.weight.dtype == torch.bfloat16


def test_prefill_ab_pairs_rounds_and_reports_their_ratios():
    spec = {"model": "llama_small", "threads": 1, "rounds": 3, "prefill": 16, "ab_variants": [("W4g128", True)]}
    res = ci.prefill_ab(spec)
    v = res["variants"]["W4g128+head"]
    assert v["variant"] == "W4g128" and v["head"] is True
    for mode in ("all", "gen"):
        b, q = v[mode]["bf16_s"], v[mode]["variant_s"]
        assert len(b) == len(q) == 3 and min(b) > 0 and min(q) > 0
        assert v[mode]["ratio_median"] == statistics.median(x / y for x, y in zip(b, q))
        assert v[mode]["ratio_of_minima"] == min(b) / min(q)
