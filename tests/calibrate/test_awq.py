"""Activation-aware scaling: folding leaves the float model unchanged; at 3 bits it lowers the calibration output
error against plain round-to-nearest (RTN) at the same bits."""
from __future__ import annotations

import copy

import pytest
import torch

from medquant import QuantConfig, quantize_
from medquant.calibrate.awq import awq_groups, awq_quantize_, search_and_fold
from medquant.testing.zoo import ZOO_BY_NAME

CFG3 = QuantConfig(3, group_size=32)


def _with_outlier_channels(model, norms=("input_layernorm", "post_attention_layernorm")):
    """Give a few hidden channels 8x larger activations, as trained LLMs have (same model for both methods)."""
    with torch.no_grad():
        for name, m in model.named_modules():
            if name.rsplit(".", 1)[-1] in norms:
                m.weight[[3, 40, 77, 100]] *= 8.0
    return model


@pytest.mark.parametrize("name", ["llama", "qwen2", "gemma3_text", "siglip_vision"])
def test_folding_keeps_float_outputs(name):
    e = ZOO_BY_NAME[name]
    model = e.build()
    inputs = e.inputs(model)
    with torch.no_grad():
        ref = e.output(model, inputs)
    groups = search_and_fold(model, CFG3, [inputs], progress=False)
    assert any(g.alpha and g.alpha > 0 for g in groups)  # something was actually scaled
    with torch.no_grad():
        out = e.output(model, inputs)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4 * max(1.0, float(ref.abs().max())))


def test_group_layout():
    g = {x.prev.rsplit(".", 1)[-1]: x.linears for x in awq_groups(ZOO_BY_NAME["llama"].build())
         if x.prev.startswith("model.layers.0.")}
    assert g["input_layernorm"][0].endswith("q_proj") and g["post_attention_layernorm"][1].endswith("up_proj")
    assert g["v_proj"][0].endswith("o_proj") and g["up_proj"][0].endswith("down_proj")
    qwen = [x.prev.rsplit(".", 1)[-1] for x in awq_groups(ZOO_BY_NAME["qwen2"].build())]
    assert "v_proj" not in qwen  # grouped-query attention: one v row feeds two heads, not foldable per o column


def test_awq_beats_rtn_at_3_bits():
    e = ZOO_BY_NAME["llama"]
    base = _with_outlier_channels(e.build())
    calib = [e.inputs(base)]
    held = {k: v.clone() for k, v in calib[0].items()}
    held["input_ids"] = torch.randint(4, 200, held["input_ids"].shape, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        ref_c, ref_h = e.output(base, calib[0]), e.output(base, held)
    rtn = copy.deepcopy(base)
    quantize_(rtn, CFG3, skip=["@head"])
    awq = copy.deepcopy(base)
    groups = awq_quantize_(awq, CFG3, calib, progress=False)
    assert all(g.err_awq <= g.err_rtn for g in groups)
    assert sum(g.err_awq for g in groups) < 0.9 * sum(g.err_rtn for g in groups)
    with torch.no_grad():
        e_rtn = (e.output(rtn, calib[0]) - ref_c).pow(2).mean()
        e_awq = (e.output(awq, calib[0]) - ref_c).pow(2).mean()
        h_rtn = (e.output(rtn, held) - ref_h).pow(2).mean()
        h_awq = (e.output(awq, held) - ref_h).pow(2).mean()
    assert e_awq < e_rtn  # calibration outputs
    assert h_awq < h_rtn  # and on inputs not used for the search


def test_awq_errors():
    model = ZOO_BY_NAME["bert"].build()
    with pytest.raises(ValueError, match="no foldable"):
        search_and_fold(model, CFG3, [{}], progress=False)
    with pytest.raises(TypeError, match="QuantConfig"):
        search_and_fold(ZOO_BY_NAME["llama"].build(), 3, [{}], progress=False)


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _same_state(model, state):
    now = model.state_dict()
    return now.keys() == state.keys() and all(torch.equal(now[k], state[k]) for k in state)


@pytest.mark.parametrize("option,value,match", [
    *[("grid", v, rf"grid must be an integer >= 1 .*got {v!r}") for v in (0, -1, True, 2.5, "10")],
    *[("max_rows", v, rf"max_rows must be None .* or an integer >= 1, got {v!r}") for v in (0, -1, True, 8.0)],
])
def test_bad_search_options_are_refused_before_the_model_changes(option, value, match):
    """grid=0 used to raise a bare ZeroDivisionError and grid=-1 skipped the search (plain RTN, err_awq=inf);
    max_rows=0 was reported as NaN/inf *weights* and max_rows=-1 silently dropped one row."""
    e = ZOO_BY_NAME["llama"]
    model = e.build()
    before = _state(model)
    for fn in (search_and_fold, awq_quantize_):
        with pytest.raises(ValueError, match=match):
            fn(model, CFG3, [e.inputs(model)], progress=False, **{option: value})
        assert _same_state(model, before)
        assert not any(type(m).__name__ == "QuantLinear" for m in model.modules())


def test_nan_activations_name_the_layer_and_batch_not_the_weights():
    e = ZOO_BY_NAME["llama"]
    model = e.build()
    ids = e.inputs(model)["input_ids"]
    emb = model.get_input_embeddings()(ids).detach()
    bad = emb.clone()
    bad[0, 1, :3] = float("nan")
    before = _state(model)
    with pytest.raises(ValueError, match=r"layer model\.layers\.0\.self_attn\.q_proj: calibration input holds \d+ "
                                         r"NaN/inf values \(calibration batch 1\)") as info:
        search_and_fold(model, CFG3, [{"inputs_embeds": emb}, {"inputs_embeds": bad}], progress=False)
    assert "weights" not in str(info.value)
    assert _same_state(model, before)
    bad[0, 1, :3] = float("inf")
    with pytest.raises(ValueError, match=r"q_proj: calibration input holds \d+ NaN/inf values"):
        awq_quantize_(model, CFG3, [{"inputs_embeds": bad}], progress=False)
    assert _same_state(model, before)
