"""Activation-aware scaling: folding leaves the float model unchanged; at 3 bits it lowers the calibration output
error against plain round-to-nearest (RTN) at the same bits."""
from __future__ import annotations

import copy

import pytest
import torch

from medquant import QuantConfig, quantize_
from medquant.calibrate import awq
from medquant.calibrate.awq import awq_groups, awq_quantize_, awq_quantize_sequential, search_and_fold
from medquant.testing.zoo import ZOO_BY_NAME
from tests.calibrate.padding_helpers import gemma3_image_pair, padded_pair

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


def test_dinov2_blocks_fold_into_norm1_and_norm2_and_beat_rtn():
    """DINOv2 (a common medical image backbone) names its pre-norms ``norm1`` / ``norm2``: no group was formed
    ("no foldable groups"). Reference: the float model's own output (folding must not change it) and plain RTN
    at the same bits (the control AWQ must beat on its calibration images)."""
    from medquant.testing.zoo_vlm import EXTRA_ZOO_BY_NAME

    e = EXTRA_ZOO_BY_NAME["dinov2"]
    model = _with_outlier_channels(e.build(), norms=("norm1", "norm2"))
    inputs = e.inputs(model)
    layer0 = {g.prev: g.linears for g in awq_groups(model) if g.prev.startswith("encoder.layer.0.")}
    assert layer0 == {"encoder.layer.0.norm1": [f"encoder.layer.0.attention.{p}_proj" for p in "qkv"],
                      "encoder.layer.0.attention.v_proj": ["encoder.layer.0.attention.o_proj"],
                      "encoder.layer.0.norm2": ["encoder.layer.0.mlp.fc1"]}
    with torch.no_grad():
        ref = e.output(model, inputs)
    folded, rtn = copy.deepcopy(model), copy.deepcopy(model)
    groups = search_and_fold(folded, CFG3, [inputs], progress=False)
    assert any(g.alpha for g in groups)
    with torch.no_grad():
        torch.testing.assert_close(e.output(folded, inputs), ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max()))
    quantize_(rtn, CFG3)
    awq_quantize_(model, CFG3, [inputs], progress=False)
    with torch.no_grad():
        err_awq = float((e.output(model, inputs) - ref).pow(2).mean())
        err_rtn = float((e.output(rtn, inputs) - ref).pow(2).mean())
    assert err_awq < err_rtn


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


# ---------------------------------------------------------------------------------------------- padding
def _float_rows(model, names, batches):
    """Independent reference: the input rows of the layers ``names`` in the float model, each batch run on its own
    (``model(**batch)``, forward pre-hooks), concatenated in batch order."""
    rows = {n: [] for n in names}
    hooks = [model.get_submodule(n).register_forward_pre_hook(
        lambda m, a, n=n: rows[n].append(a[0].detach().float().reshape(-1, a[0].shape[-1]))) for n in names]
    try:
        with torch.no_grad():
            for b in batches:
                model(**b, use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    return {n: torch.cat(v) for n, v in rows.items()}


def _search_inputs(monkeypatch):
    """Record the input rows every group's alpha search receives (``_search_group``'s ``x``), one list per run."""
    runs: list[list[torch.Tensor]] = []
    search = awq._search_group

    def spy(root, g, x, config, grid):
        runs[-1].append(x.clone())
        return search(root, g, x, config, grid)

    monkeypatch.setattr(awq, "_search_group", spy)
    return runs


def _run_awq(sequential, model, calib, **kw):
    if sequential:
        return awq_quantize_sequential(model, CFG3, calib, device="cpu", progress=False, grid=4, **kw)
    return awq_quantize_(model, CFG3, calib, progress=False, grid=4, **kw)


def _assert_same_result(g_pad, m_pad, g_sep, m_sep):
    """Same groups, alphas, errors (up to float rounding) and quantized codes."""
    assert [g.prev for g in g_pad] == [g.prev for g in g_sep]
    assert [g.alpha for g in g_pad] == [g.alpha for g in g_sep]
    for gp, gs in zip(g_pad, g_sep):
        assert gp.err_rtn == pytest.approx(gs.err_rtn, rel=1e-4) and gp.err_awq == pytest.approx(gs.err_awq, rel=1e-4)
    sp, ss = m_pad.state_dict(), m_sep.state_dict()
    codes = [k for k in sp if k.split(".")[-1].startswith("qweight")]
    assert codes and all(torch.equal(sp[k], ss[k]) for k in codes), [k for k in codes if not torch.equal(sp[k], ss[k])]


@pytest.mark.parametrize("sequential", [False, True], ids=["whole", "sequential"])
def test_padded_tokens_are_left_out_of_the_scale_search(monkeypatch, sequential):
    """Padding positions (attention_mask 0) are not calibration data: a right-padded batch of two sequences (12 and
    5 tokens) gives each group's search the input rows of the two sequences run one by one - hence the same
    statistics ``a_j = mean_t |X_tj|``, the same loss, alphas and codes. Before the fix the search took the 7 pad
    positions too (24 rows instead of 17), and 4 of the 8 groups of the zoo's LLaMA chose another alpha."""
    e = ZOO_BY_NAME["llama"]
    model = e.build()
    padded, separate = padded_pair(model.config.vocab_size)
    runs = _search_inputs(monkeypatch)
    results = []
    for calib in ([padded], separate):
        runs.append([])
        m = copy.deepcopy(model)
        results.append((_run_awq(sequential, m, calib), m))
    (g_pad, m_pad), (g_sep, m_sep) = results
    assert len(g_pad) == len(runs[0]) == len(runs[1]) == 8
    # the float model's rows of each sequence run alone: every group's inputs in the whole-model search, the first
    # block's in the sequential one (later blocks read the outputs of quantized blocks, compared run to run below)
    ref = _float_rows(model, [g.linears[0] for g in g_sep], separate)
    for g, xp, xs in zip(g_pad, *runs):
        assert xp.shape == xs.shape == (17, 128 if "down_proj" not in g.linears[0] else 256), g.prev
        # later blocks of the sequential path read the outputs of quantized blocks, whose fp16 scales may differ by
        # one step between the runs (the codes are equal): a looser tolerance there
        float_inputs = not sequential or g.prev.startswith("model.layers.0.")
        want, tol = (ref[g.linears[0]], 1e-5) if float_inputs else (xs, 1e-3)
        scale = float(want.abs().max())
        torch.testing.assert_close(xp, want, rtol=tol, atol=tol * scale)
        torch.testing.assert_close(xp.abs().mean(0), want.abs().mean(0), rtol=tol, atol=tol * scale / 10)
    _assert_same_result(g_pad, m_pad, g_sep, m_sep)


@pytest.mark.parametrize("sequential", [False, True], ids=["whole", "sequential"])
def test_padding_mask_is_not_applied_to_the_vision_tower(monkeypatch, sequential):
    """Gemma 3 VLM, scope "all", two images and a right-padded text of 16 tokens: the vision blocks' inputs are
    ``(2, 16 patches, K)``, the mask's shape, but image patches are never padding - the vision groups keep all 32
    rows and the language groups the 16 + 11 real tokens, as when the two samples run one by one."""
    e = ZOO_BY_NAME["gemma3_vlm"]
    model = e.build()
    padded, separate = gemma3_image_pair(e, model)  # 16 text positions: the vision tower's patches per image
    runs = _search_inputs(monkeypatch)
    results = []
    for calib in ([padded], separate):
        runs.append([])
        m = copy.deepcopy(model)
        results.append((_run_awq(sequential, m, calib, scope="all", skip=["@head", "@projector"]), m))
    (g_pad, m_pad), (g_sep, m_sep) = results
    rows = [x.shape[0] for x in runs[0]]
    vision = ["vision_tower" in g.prev for g in g_pad]
    assert any(vision) and not all(vision)
    assert rows == [x.shape[0] for x in runs[1]] == [32 if v else 27 for v in vision]
    first = g_pad[0].prev.rsplit(".", 2)[0] + "."  # the first block searched (the vision tower's first)
    for g, xp, xs in zip(g_pad, *runs):
        # float inputs: equal up to float rounding; in the sequential path the later blocks read the outputs of
        # quantized blocks, whose fp16 scales may differ by one step between the runs (the codes are equal)
        tol = 1e-5 if not sequential or g.prev.startswith(first) else 1e-3
        torch.testing.assert_close(xp, xs, rtol=tol, atol=tol * float(xs.abs().max()))
    _assert_same_result(g_pad, m_pad, g_sep, m_sep)


def test_a_fused_qkv_projection_gets_its_norms_scales():
    """Qwen2-VL's vision blocks compute q, k and v with one fused ``attn.qkv`` reading ``norm1``: no attention group
    was formed (only norm2 -> fc1), so the vision attention was rounded to nearest. Now ``norm1 -> [attn.qkv]``.
    References: the float model's own output (folding must not change it) and plain RTN at the same bits."""
    e = ZOO_BY_NAME["qwen2_vl"]
    model = e.build()
    with torch.no_grad():  # a few vision channels with 8x larger activations, as trained towers have
        for name, m in model.named_modules():
            if name.startswith("model.visual.blocks.") and name.rsplit(".", 1)[-1] in ("norm1", "norm2"):
                m.weight[[1, 7, 19]] *= 8.0
    inputs = e.inputs(model)
    layer0 = {g.prev: g.linears for g in awq_groups(model, "vision") if g.prev.startswith("model.visual.blocks.0.")}
    assert layer0 == {"model.visual.blocks.0.norm1": ["model.visual.blocks.0.attn.qkv"],
                      "model.visual.blocks.0.norm2": ["model.visual.blocks.0.mlp.fc1"]}
    vision = {"hidden_states": inputs["pixel_values"], "grid_thw": inputs["image_grid_thw"]}

    def tower(m):
        out = m.model.visual(**vision)
        return getattr(out, "last_hidden_state", out if isinstance(out, torch.Tensor) else out[0])
    with torch.no_grad():
        ref = tower(model)
    folded, rtn = copy.deepcopy(model), copy.deepcopy(model)
    groups = search_and_fold(folded, CFG3, [inputs], scope="vision", progress=False)
    assert any(g.alpha for g in groups if g.linears == ["model.visual.blocks.0.attn.qkv"])
    with torch.no_grad():
        torch.testing.assert_close(tower(folded), ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max()))
    quantize_(rtn, CFG3, skip=["@language", "@head"])
    awq_quantize_(model, CFG3, [inputs], scope="vision", skip=["@language", "@head"], progress=False)
    with torch.no_grad():
        err_awq = float((tower(model) - ref).pow(2).mean())
        err_rtn = float((tower(rtn) - ref).pow(2).mean())
    assert err_awq < err_rtn
