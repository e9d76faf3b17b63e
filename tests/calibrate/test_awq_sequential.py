"""Sequential (block-by-block) AWQ: ``awq_quantize_sequential``.

Reference for the equality test: a hand-written loop over the whole model in memory, independent of
``quantize_sequential``'s block capture: for block ``i``, forward pre-hooks on the *whole* model (blocks ``< i``
already AWQ-folded and quantized, blocks ``>= i`` float) collect each group's input rows, the shared per-group
search (``_search_group``, tested against RTN in tests/distill/test_awq.py) chooses the scales, they are folded and
block ``i`` is quantized with ``quantize_``. The sequential path must give the same buffers bit for bit.
"""
from __future__ import annotations

import copy

import pytest
import torch
from accelerate import init_empty_weights
from safetensors.torch import save_model

from medquant import QuantConfig, quantize_
from medquant.calibrate.awq import (
    ScaleGroup,
    _fold,
    _search_group,
    awq_groups,
    awq_quantize_,
    awq_quantize_sequential,
    search_and_fold_block,
)
from medquant.calibrate.sequential import BlockInputs
from medquant.models import language_model_layers
from medquant.testing.zoo import ZOO_BY_NAME

CFG3 = QuantConfig(3, group_size=32)
GRID = 4  # alpha in {0, .25, .5, .75, 1}: a coarser grid keeps the tests fast

# tiny tensors: intra-op threads only add overhead on a loaded 2-core machine
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _with_outlier_channels(model, norms=("input_layernorm", "post_attention_layernorm")):
    """A few hidden channels with 8x larger activations, as trained LLMs have."""
    with torch.no_grad():
        for name, m in model.named_modules():
            if name.rsplit(".", 1)[-1] in norms:
                m.weight[[3, 40, 77, 100]] *= 8.0
    return model


def _calib(entry, model, n=2):
    batches = [entry.inputs(model)]
    for seed in range(1, n):
        b = {k: v.clone() for k, v in batches[0].items()}
        b["input_ids"][:, 1:] = torch.randint(4, 200, b["input_ids"][:, 1:].shape,
                                              generator=torch.Generator().manual_seed(seed))
        batches.append(b)
    return batches


@torch.no_grad()
def _reference(model, config, calib, skip=("@head",)):
    """Block-by-block AWQ by hand on the whole in-memory model (see the module docstring)."""
    model.eval()
    all_groups = awq_groups(model)
    out = []
    for bn in language_model_layers(model):
        groups = [copy.copy(g) for g in all_groups if g.prev.startswith(bn + ".")]
        xs = {g.linears[0]: [] for g in groups}
        hooks = [model.get_submodule(n).register_forward_pre_hook(
            lambda m, a, n=n, xs=xs: xs[n].append(a[0].float().reshape(-1, a[0].shape[-1]))) for n in xs]
        for batch in calib:
            model(**batch, use_cache=False)
        for h in hooks:
            h.remove()
        scales = [_search_group(model, g, torch.cat(xs[g.linears[0]]), config, GRID) for g in groups]
        for g, s in zip(groups, scales):
            _fold(model, g, s)
        quantize_(model.get_submodule(bn), config)
        out.extend(groups)
    # the rest (embeddings, norms, head): the blocks are quantized already, and quantize_ refuses to redo them
    quantize_(model, config, skip=list(skip) + list(language_model_layers(model)))
    return out


def _assert_same(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert set(sa) == set(sb)
    for k in sa:
        assert sa[k].device.type != "meta", k
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k


@pytest.mark.parametrize("name", ["llama", "gemma3_text"])
def test_sequential_awq_equals_block_by_block_reference(name):
    entry = ZOO_BY_NAME[name]
    base = _with_outlier_channels(entry.build(), ("input_layernorm", "pre_feedforward_layernorm",
                                                  "post_attention_layernorm"))
    calib = _calib(entry, base)
    ref, seq, whole = copy.deepcopy(base), copy.deepcopy(base), copy.deepcopy(base)
    g_ref = _reference(ref, CFG3, calib)
    g_seq = awq_quantize_sequential(seq, CFG3, calib, device="cpu", progress=False, grid=GRID)
    _assert_same(ref, seq)
    assert [(g.prev, g.linears, g.alpha, g.err_rtn, g.err_awq) for g in g_seq] == \
        [(g.prev, g.linears, g.alpha, g.err_rtn, g.err_awq) for g in g_ref]
    assert any(g.alpha > 0 for g in g_seq)
    # awq_quantize_ searches every block on float activations: block 0 sees the same inputs (the embeddings),
    # later blocks do not (their inputs come from quantized blocks in the sequential path)
    g_whole = awq_quantize_(whole, CFG3, calib, progress=False, grid=GRID)
    first = language_model_layers(base)[0] + "."
    for gw, gs in zip(g_whole, g_seq):
        assert gw.prev == gs.prev
        if gw.prev.startswith(first):
            assert gw.alpha == gs.alpha and gw.err_rtn == pytest.approx(gs.err_rtn, rel=1e-5)
    later = [(gw, gs) for gw, gs in zip(g_whole, g_seq) if not gw.prev.startswith(first)]
    assert later and any(gw.err_rtn != pytest.approx(gs.err_rtn, rel=1e-5) for gw, gs in later)


def test_sequential_awq_beats_rtn_at_3_bits():
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
    groups = awq_quantize_sequential(awq, CFG3, calib, device="cpu", progress=False)  # default grid (10)
    assert len(groups) == len(awq_groups(base))
    assert all(g.err_awq <= g.err_rtn for g in groups)
    assert sum(g.err_awq for g in groups) < 0.9 * sum(g.err_rtn for g in groups)
    with torch.no_grad():
        e_rtn = (e.output(rtn, calib[0]) - ref_c).pow(2).mean()
        e_awq = (e.output(awq, calib[0]) - ref_c).pow(2).mean()
        h_rtn = (e.output(rtn, held) - ref_h).pow(2).mean()
        h_awq = (e.output(awq, held) - ref_h).pow(2).mean()
    assert e_awq < e_rtn
    assert h_awq < h_rtn


@pytest.mark.parametrize("name", ["qwen2", "gemma3_vlm"])
def test_sequential_awq_from_meta_checkpoint(name, tmp_path):
    """Model built under init_empty_weights, float weights streamed from safetensors: same result as the in-memory
    sequential path (qwen2: grouped-query attention, no v->o group; gemma3_vlm: vision blocks quantized plainly,
    language blocks calibrated through the whole VLM forward)."""
    entry = ZOO_BY_NAME[name]
    real = entry.build()
    calib = [entry.inputs(real)]
    save_model(real, str(tmp_path / "float.safetensors"))
    with init_empty_weights():
        meta = entry.build()
    assert any(p.device.type == "meta" for p in meta.parameters())
    g_real = awq_quantize_sequential(real, CFG3, calib, device="cpu", progress=False, grid=GRID)
    g_meta = awq_quantize_sequential(meta, CFG3, calib, device="cpu", progress=False, grid=GRID,
                                     checkpoint=tmp_path / "float.safetensors")
    _assert_same(real, meta)
    assert [g.alpha for g in g_meta] == [g.alpha for g in g_real]
    assert g_meta and all(g.prev.startswith(tuple(b + "." for b in language_model_layers(real))) for g in g_meta)
    if name == "qwen2":
        assert not any(g.prev.endswith("v_proj") for g in g_meta)
    with torch.no_grad():
        assert torch.equal(entry.output(meta, calib[0]), entry.output(real, calib[0]))


def test_sequential_awq_errors():
    e = ZOO_BY_NAME["llama"]
    model = e.build()
    inputs = e.inputs(model)
    with pytest.raises(ValueError, match="calibration data"):
        awq_quantize_sequential(model, CFG3, None, progress=False, grid=GRID)
    with pytest.raises(ValueError, match="calibration data"):
        awq_quantize_sequential(model, CFG3, [], progress=False, grid=GRID)
    with pytest.raises(TypeError, match="list of such dicts"):
        awq_quantize_sequential(model, CFG3, [inputs["input_ids"]], progress=False, grid=GRID)
    with pytest.raises(TypeError, match="QuantConfig"):
        awq_quantize_sequential(model, 3, [inputs], progress=False, grid=GRID)
    bert = ZOO_BY_NAME["bert"]
    with pytest.raises(ValueError, match="no foldable"):
        awq_quantize_sequential(bert.build(), CFG3, [bert.inputs(bert.build())], progress=False, grid=GRID)
    assert not any(type(m).__name__ == "QuantLinear" for m in model.modules())  # nothing touched
    block = model.model.layers[0]
    with pytest.raises(ValueError, match="calibration data"):
        search_and_fold_block(block, CFG3, BlockInputs("model.layers.0"), [])


def _linear_pair_block():
    """A two-linear block whose second linear reads the first one's output (a ``v -> o`` style scale group)."""
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.Linear(16, 8))


def test_block_search_validates_grid_and_max_rows_and_its_inputs():
    cfg = QuantConfig(4, group_size=16)
    block = _linear_pair_block()
    before = {k: v.clone() for k, v in block.state_dict().items()}

    def unchanged():
        now = block.state_dict()
        return all(torch.equal(now[k], before[k]) for k in before)

    def call(*xs, **kw):
        ins = BlockInputs("blk", [(x,) for x in xs], [{} for _ in xs])
        return search_and_fold_block(block, cfg, ins, [ScaleGroup("0", ["1"])], **kw)

    good = torch.randn(6, 16, generator=torch.Generator().manual_seed(1))
    for grid in (0, -2, False, 1.0):
        with pytest.raises(ValueError, match=rf"grid must be an integer >= 1 .*got {grid!r}"):
            call(good, grid=grid)
    for max_rows in (0, -1, True):
        with pytest.raises(ValueError, match=rf"max_rows must be None .*got {max_rows!r}"):
            call(good, max_rows=max_rows)
    nan = good.clone()
    nan[2, 3] = float("nan")
    with pytest.raises(ValueError, match=r"layer blk\.1: calibration input holds \d+ NaN/inf values \(calibration "
                                         r"batch 1\)"):
        call(good, nan)
    with pytest.raises(ValueError, match=r"layer blk\.1 was called 1 time\(s\) but received 0 input rows: the "
                                         "calibration batches are empty"):
        call(torch.randn(0, 16))
    assert unchanged()
    # valid limits: grid=1 searches alpha in {0, 1}; max_rows=None keeps every row (same as a limit above them)
    g_none = call(good, good * 2, max_rows=None, grid=1)[0]
    assert g_none.alpha in (0.0, 1.0) and g_none.err_awq <= g_none.err_rtn
    block.load_state_dict(before)
    g_big = call(good, good * 2, max_rows=10**6, grid=1)[0]
    assert (g_big.alpha, g_big.err_rtn, g_big.err_awq) == (g_none.alpha, g_none.err_rtn, g_none.err_awq)


def test_sequential_awq_refuses_bad_grid_and_max_rows_before_any_block():
    e = ZOO_BY_NAME["llama"]
    model = e.build()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="grid must be an integer >= 1"):
        awq_quantize_sequential(model, CFG3, [e.inputs(model)], grid=0, device="cpu", progress=False)
    with pytest.raises(ValueError, match="max_rows must be None"):
        awq_quantize_sequential(model, CFG3, [e.inputs(model)], max_rows=-1, grid=GRID, device="cpu",
                                progress=False)
    assert not any(type(m).__name__ == "QuantLinear" for m in model.modules())
    now = model.state_dict()
    assert now.keys() == before.keys() and all(torch.equal(now[k], before[k]) for k in before)


def test_block_search_leaves_out_the_masked_rows():
    """``masks``: the padding rows of a ``(batch, tokens, K)`` input are left out of the search - the result equals
    the search on the real rows alone, given as 2-D inputs without a mask (an ``attention_mask`` of 0 / 1 works as
    a bool mask); an input of another shape is not masked; one mask per call or an error."""
    cfg = QuantConfig(4, group_size=16)
    block = _linear_pair_block()
    before = {k: v.clone() for k, v in block.state_dict().items()}
    g = torch.Generator().manual_seed(3)
    xs = [torch.randn(2, 5, 16, generator=g), torch.randn(3, 4, 16, generator=g)]
    xs[0][1, 3:] *= 50.0  # padding rows with large values: they would change the statistics and the loss
    xs[1][2, 1:] *= 50.0
    attn = [torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]), torch.tensor([[1, 1, 1, 1], [1, 1, 1, 1], [1, 0, 0, 0]])]

    def search(inputs, **kw):
        block.load_state_dict(before)
        ins = BlockInputs("blk", [(x,) for x in inputs], [{} for _ in inputs])
        g = search_and_fold_block(block, cfg, ins, [ScaleGroup("0", ["1"])], grid=4, **kw)[0]
        return g.alpha, g.err_rtn, g.err_awq, block[1].weight.detach().clone()

    masked = search(xs, masks=attn)
    as_bool = search(xs, masks=[m.bool() for m in attn])
    real = search([x[m.bool()] for x, m in zip(xs, attn)])
    everything = search(xs)
    assert masked[:3] == as_bool[:3] == real[:3] and torch.equal(masked[3], real[3])
    assert everything[1] != masked[1]  # the padding rows do count without the masks
    # a mask that does not fit the input's (batch, tokens) leaves every row in
    assert search(xs, masks=[attn[0][:, :4], None])[:3] == everything[:3]
    with pytest.raises(ValueError, match="masks must hold one entry per recorded call: 1 masks for 2 calls"):
        search(xs, masks=attn[:1])
