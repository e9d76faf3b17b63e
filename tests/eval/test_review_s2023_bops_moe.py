"""BOPs / MACs of mixture-of-experts models whose experts are float 3-D parameters (transformers 5 layout).

``model_size`` / ``average_bits`` count the float experts' stacked weights, and a quantized model's experts
(:class:`~medquant.quant.experts.QuantExperts`, one QuantLinear per expert) are counted by ``count_macs``; the float
experts module itself (no ``nn.Linear`` inside) used to be left out of ``count_macs``, ``bops`` and ``proxy_bops``,
so a float MoE model reported the BOPs of its attention alone, fewer than its 4-bit quantized copy. Reference
values are hand-counted from the configs: every token goes to ``top_k`` experts (routed style) or every expert sees
every token (Llama 4's dense style); an expert computes ``H -> 2I`` (gate and up) then ``I -> H``."""
from __future__ import annotations

import pytest
import torch

from medquant.eval import bops, count_macs, proxy_bops
from medquant.testing.zoo_moe import build_moe, moe_inputs

pytestmark = pytest.mark.usefixtures("one_torch_thread")

H, I, E, LAYERS = 64, 32, 4, 2  # the tiny MoE zoo: hidden 64, expert intermediate 32, 4 experts, 2 layers
PER_TOKEN = H * 2 * I + I * H  # one expert on one token: gate_up (H -> 2I) and down (I -> H)


@pytest.mark.parametrize("name, slots_per_token", [("mixtral", 2), ("gpt_oss", 2), ("llama4_text", E)])
def test_float_experts_are_counted(name, slots_per_token):
    model = build_moe(name)
    x = moe_inputs(batch=1, length=8)
    tokens = x["input_ids"].numel()
    rows = count_macs(model, **x)
    experts = [r for r in rows if r.name.endswith(".experts")]
    assert len(experts) == LAYERS, [r.name for r in rows]
    for r in experts:
        assert r.macs == tokens * slots_per_token * PER_TOKEN
        assert r.params == E * PER_TOKEN
        assert r.weight_bits == 32.0
    others = sum(r.macs for r in rows if r not in experts)
    assert bops(model, **x, act_bits=8) == pytest.approx(
        (others + LAYERS * tokens * slots_per_token * PER_TOKEN) * 32 * 8)


def test_float_experts_proxy_bops_counts_the_stacked_weights():
    model = build_moe("mixtral")
    linear = sum(m.in_features * m.out_features for m in model.modules() if isinstance(m, torch.nn.Linear))
    # Mixtral's router is no nn.Linear in transformers 5 (a weight of its own): neither form counts it
    assert proxy_bops(model, act_bits=8) == pytest.approx((linear + LAYERS * E * PER_TOKEN) * 32 * 8)
