"""Learned rounding (AdaRound) of MoE experts stored as 3-D parameters: each expert's matrices are reconstructed on
the calibration tokens routed to that expert.

References in plain torch: the routed rows (``hidden_states[top_k_index == e]``, read by a forward pre-hook on the
experts module in the same forward) and their padding mask, the round-to-nearest reconstruction error over the real
tokens, ``QuantLinear.from_float`` for the experts no token reaches.
"""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

from medquant import QuantConfig, QuantLinear
from medquant.calibrate import adaround
from medquant.calibrate.adaround import adaround_quantize_
from medquant.quant.experts import QuantExperts, is_experts_module
from medquant.testing.zoo_moe import build_moe, moe_inputs

CFG = QuantConfig(4, group_size=16)
UNIT = "model.layers.0.mlp.experts.gate_up.1"


def test_an_expert_layer_is_reconstructed_on_its_routed_tokens_without_the_padding(monkeypatch):
    model = build_moe("mixtral")
    batch = moe_inputs(batch=2, length=12, seed=3)
    batch["attention_mask"][1, 7:] = 0
    seen: dict = {}
    real = adaround._reconstruct

    def spy(model_, unit, names, plan, calls, *args, **kwargs):
        if unit == UNIT:
            seen["calls"] = calls
            seen["float"] = copy.deepcopy(model_.get_submodule(unit))
            experts = model_.get_submodule(unit.rsplit(".", 2)[0])
            routing = []  # the experts module's own input in a forward of the model as it is now

            def pre(m, a, k):
                routing.append((a[0].detach().clone(), (a[1] if len(a) > 1 else k["top_k_index"]).clone()))

            h = experts.register_forward_pre_hook(pre, with_kwargs=True)
            with torch.no_grad():
                model_(**batch)
            h.remove()
            seen["routing"] = routing[0]
        out = real(model_, unit, names, plan, calls, *args, **kwargs)
        if unit == UNIT:
            seen["record"] = out[unit]
        return out

    monkeypatch.setattr(adaround, "_reconstruct", spy)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        records = adaround_quantize_(model, CFG, [batch], skip=["@head"], iters=20, progress=False)
    (args, _, target, mask), = seen["calls"]
    hidden, idx = seen["routing"]
    rows = torch.where(idx == 1)[0]
    assert torch.equal(args[0], hidden[rows])  # exactly the tokens routed to expert 1
    assert torch.equal(mask, batch["attention_mask"].reshape(-1).bool()[rows]) and not mask.all()
    assert seen["record"]["target"] == "input" and seen["record"]["method"] == "adaround"
    float_layer = seen["float"]
    with torch.no_grad():
        torch.testing.assert_close(target, float_layer(args[0]))
        w = QuantLinear.from_float(float_layer, CFG).dequantized_weight()
        rtn = args[0] @ w.T  # Mixtral's experts have no bias
    d = (rtn - target)[mask]
    assert seen["record"]["mse_rtn"] == pytest.approx(float(d.pow(2).sum()) / d.numel(), rel=1e-4)
    # every expert layer quantized (each with a record), the routers float
    names = [f"model.layers.{i}.mlp.experts.{k}.{e}" for i in range(2) for k in ("gate_up", "down") for e in range(4)]
    assert all(isinstance(model.get_submodule(n), QuantLinear) and n in records for n in names)
    assert not isinstance(model.model.layers[0].mlp.gate, QuantLinear)
    assert all(isinstance(model.model.layers[i].mlp.experts, QuantExperts) for i in range(2))


def test_experts_inside_blocks_are_learned_jointly_and_unreached_experts_are_rounded_to_nearest():
    model = build_moe("gpt_oss")  # transposed weights with biases
    float_experts = {n: copy.deepcopy(m) for n, m in model.named_modules() if is_experts_module(m)}
    blocks = ["model.layers.0", "model.layers.1"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        records = adaround_quantize_(copy.deepcopy(model), CFG, [moe_inputs()], blocks=blocks, iters=20,
                                     progress=False)
    experts = [n for n in records if ".experts." in n]
    assert len(experts) == 16 and all(records[n]["block"] in blocks for n in experts)
    assert all(r["mse"] <= r["mse_rtn"] for r in records.values())
    one = {"input_ids": torch.tensor([[17]]), "attention_mask": torch.ones(1, 1, dtype=torch.long)}
    with pytest.warns(UserWarning, match=r"MoE expert layer\(s\) received no calibration token") as caught:
        records = adaround_quantize_(model, CFG, [one], skip=["@head"], iters=10, progress=False)
    assert {w.filename for w in caught if "no calibration token" in str(w.message)} == {__file__}
    rtn = [n for n, r in records.items() if r["method"] == "rtn"]
    assert len(rtn) == 8  # one token, top-2 of 4 experts: 2 experts x 2 projections x 2 layers unreached
    for n in rtn:
        parent, key, e = n.rsplit(".", 2)
        w, b = QuantExperts.expert_weights(float_experts[parent])["gate_up_proj" if key == "gate_up" else
                                                                  "down_proj"][int(e)]
        lin = nn.Linear(w.shape[1], w.shape[0])
        lin.weight, lin.bias = nn.Parameter(w.clone()), nn.Parameter(b.clone())
        got = model.get_submodule(n)
        assert torch.equal(got.dequantized_weight(), QuantLinear.from_float(lin, CFG).dequantized_weight())
        assert torch.equal(got.bias, b)


def test_a_batch_that_fails_leaves_the_float_experts_in_place():
    model = build_moe("mixtral")
    before = {n: m for n, m in model.named_modules() if is_experts_module(m)}
    bad = {"input_ids": torch.full((1, 4), 10_000)}  # ids beyond the vocabulary: the forward fails
    with warnings.catch_warnings(), pytest.raises(ValueError, match="calibration batch 0"):
        warnings.simplefilter("ignore")
        adaround_quantize_(model, CFG, [bad], iters=5, progress=False)
    assert all(model.get_submodule(n) is m for n, m in before.items())
    assert not any(isinstance(m, (QuantExperts, QuantLinear)) for m in model.modules())


def test_inside_a_block_an_expert_no_token_reaches_keeps_round_to_nearest_codes():
    """Its rounding variables get no reconstruction gradient; the regulariser only pushes each away from 1/2, so
    the final codes are round-to-nearest's. The experts the token reaches learn their rounding (other codes)."""
    model = build_moe("mixtral")
    float_experts = {n: copy.deepcopy(m) for n, m in model.named_modules() if is_experts_module(m)}
    one = {"input_ids": torch.tensor([[17]]), "attention_mask": torch.ones(1, 1, dtype=torch.long)}
    hit: dict[str, set[int]] = {}
    hooks = [m.register_forward_pre_hook(
        lambda mod, a, k, n=n: hit.setdefault(n, set()).update((a[1] if len(a) > 1 else k["top_k_index"]).flatten()
                                                                .tolist()), with_kwargs=True)
        for n, m in model.named_modules() if is_experts_module(m)]
    with torch.no_grad():
        model(**one)
    for h in hooks:
        h.remove()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        adaround_quantize_(model, CFG, [one], blocks=["model.layers.0", "model.layers.1"], skip=["@head"], iters=50,
                           progress=False)
    learned = 0
    for parent, f in float_experts.items():
        weights = QuantExperts.expert_weights(f)
        for key, pkey in (("gate_up", "gate_up_proj"), ("down", "down_proj")):
            for e in range(4):
                lin = nn.Linear(weights[pkey][e][0].shape[1], weights[pkey][e][0].shape[0], bias=False)
                lin.weight = nn.Parameter(weights[pkey][e][0].clone())
                rtn = torch.equal(model.get_submodule(f"{parent}.{key}.{e}").dequantized_weight(),
                                  QuantLinear.from_float(lin, CFG).dequantized_weight())
                if e not in hit[parent]:
                    assert rtn, f"{parent}.{key}.{e}"
                learned += not rtn
    assert learned > 0 and all(len(h) == 2 for h in hit.values())
