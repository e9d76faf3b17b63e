"""Block-by-block GPTQ calibrates the planned layers outside the blocks too (a VLM's projector, ``lm_head``).

Each such layer is GPTQ-quantized on its inputs in the model's own forward with the blocks and the layers before
it already quantized. References: forward pre-hooks on the finished (quantized) model - the inputs each layer
really gets -, ``2 X^T X / n`` over the right rows (every row of the projector; the unpadded tokens for
``lm_head``), the plain per-layer routine :func:`gptq_quantize_layer` on that Hessian, and whole-model
:func:`gptq_quantize_` on models where the two paths give every outside layer the same inputs.
"""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import medquant.calibrate.gptq as gptq_mod
from medquant import QuantConfig
from medquant.calibrate.gptq import gptq_quantize_, gptq_quantize_layer, gptq_quantize_sequential
from medquant.models import block_stacks
from medquant.quant.modules import QUANT_MODULES
from medquant.testing.zoo import ZOO_BY_NAME, _qwen_vl_inputs
from medquant.testing.zoo_vlm import EXTRA_ZOO_BY_NAME

CFG = QuantConfig(4, group_size=32)
PROJECTOR = ["model.multi_modal_projector.linear_1", "model.multi_modal_projector.linear_2"]


def _llava_padded():
    """The zoo's LLaVA and one batch whose second row ends with 3 padding positions."""
    entry = ZOO_BY_NAME["llava"]
    model = entry.build()
    batch = entry.inputs_fn(model, torch.Generator().manual_seed(0))
    batch["attention_mask"][1, -3:] = 0
    return model, batch


@pytest.fixture
def hessians(monkeypatch):
    """Layer name -> the Hessian GPTQ quantized it with (``_quantize_layer``, wrapped)."""
    got: dict[str, torch.Tensor] = {}
    real = gptq_mod._quantize_layer

    def record(module, hessian, config, damp, block_size, act_order, name, *args):
        got[name] = hessian.clone()
        return real(module, hessian, config, damp, block_size, act_order, name, *args)
    monkeypatch.setattr(gptq_mod, "_quantize_layer", record)
    return got


def _inputs(model, names, batch):
    """Each layer's input in one forward of the (finished) model."""
    got: dict[str, torch.Tensor] = {}
    handles = [model.get_submodule(n).register_forward_pre_hook(
        lambda mod, args, n=n: got.setdefault(n, args[0])) for n in names]
    try:
        with torch.no_grad():
            model(**batch)
    finally:
        for h in handles:
            h.remove()
    return got


def _hessian(x: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
    """``2 X^T X / n`` of the rows of ``x`` (all of them, or those ``rows`` marks); the product in float32, as
    GPTQ forms it, summed in float64."""
    x = x.float()
    x = x[rows.bool()] if rows is not None else x.reshape(-1, x.shape[-1])
    return 2 * (x.T @ x).double() / x.shape[0]


def _codes(layer: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v for k, v in layer.state_dict().items()}


def test_the_projector_is_gptq_quantized_on_its_inputs_in_the_finished_model(hessians):
    model, batch = _llava_padded()
    float_model = copy.deepcopy(model)
    records = gptq_quantize_sequential(model, CFG, [batch], device="cpu", progress=False)
    x = _inputs(model, PROJECTOR, batch)  # linear_1: the quantized vision tower's; linear_2: the quantized linear_1's
    for n in PROJECTOR:
        assert records[n]["method"] == "gptq"
        assert records[n]["rows"] == x[n].shape[0] * x[n].shape[1]  # image rows: never masked
        ref = _hessian(x[n])
        torch.testing.assert_close(hessians[n].reshape(ref.shape), ref, rtol=1e-9, atol=1e-12)
        want = gptq_quantize_layer(float_model.get_submodule(n), hessians[n], CFG, name=n)
        got = _codes(model.get_submodule(n))
        assert {k: torch.equal(v, got[k]) for k, v in _codes(want).items()} == dict.fromkeys(got, True)


def test_lm_head_is_gptq_quantized_on_the_unpadded_tokens(hessians):
    model, batch = _llava_padded()
    float_model = copy.deepcopy(model)
    records = gptq_quantize_sequential(model, CFG, [batch], device="cpu", progress=False)
    mask = batch["attention_mask"]
    assert records["lm_head"]["method"] == "gptq"
    assert records["lm_head"]["rows"] == int(mask.sum())
    x = _inputs(model, ["lm_head"], batch)["lm_head"]  # the final norm of the quantized language blocks
    torch.testing.assert_close(hessians["lm_head"][0], _hessian(x, mask), rtol=1e-9, atol=1e-12)
    want = gptq_quantize_layer(float_model.lm_head, hessians["lm_head"], CFG, name="lm_head")
    assert all(torch.equal(v, _codes(model.lm_head)[k]) for k, v in _codes(want).items())
    assert isinstance(model.lm_head, QUANT_MODULES)


def test_lm_head_of_a_language_model_gets_gptq():
    entry = ZOO_BY_NAME["llama"]
    model = entry.build()
    batches = [entry.inputs_fn(model, torch.Generator().manual_seed(i)) for i in range(2)]
    whole = copy.deepcopy(model)
    records = gptq_quantize_sequential(model, CFG, batches, device="cpu", progress=False)
    ref = gptq_quantize_(whole, CFG, batches, progress=False)
    assert records["lm_head"]["method"] == "gptq" and records["lm_head"]["rows"] == ref["lm_head"]["rows"]
    assert all(torch.equal(v, whole.state_dict()[k]) for k, v in model.state_dict().items() if k.startswith("lm_head"))


def _vision_layers(model):
    """The vision tower's Linear / Conv2d layers (its blocks and patch embedding), not the projector's."""
    return [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))
            and n.startswith(("model.vision_tower.", "model.visual.")) and "merger" not in n]


def _qwen3_vl():
    model = EXTRA_ZOO_BY_NAME["qwen3_vl"].build()
    return model, [_qwen_vl_inputs(model, torch.Generator().manual_seed(i)) for i in range(2)]


def _zoo(name):
    entry = ZOO_BY_NAME[name]
    model = entry.build()
    return model, [entry.inputs_fn(model, torch.Generator().manual_seed(i)) for i in range(2)]


MODELS = {"llava": lambda: _zoo("llava"), "qwen2_vl": lambda: _zoo("qwen2_vl"), "qwen3_vl": _qwen3_vl}


@pytest.mark.parametrize("name", list(MODELS))
def test_block_by_block_gives_the_codes_of_whole_model_gptq_outside_the_blocks(name):
    """The vision tower left in float: the projector (and Qwen3-VL's deepstack mergers) read the same features in
    both paths, so every code - projector, language blocks, lm_head - is the same."""
    model, batches = MODELS[name]()
    skip = _vision_layers(model)
    assert skip
    whole, seq = model, copy.deepcopy(model)
    ref = gptq_quantize_(whole, CFG, batches, skip=skip, progress=False)
    records = gptq_quantize_sequential(seq, CFG, batches, skip=skip, device="cpu", progress=False)
    assert {n: r["method"] for n, r in records.items()} == {n: r["method"] for n, r in ref.items()}
    assert {n: r["rows"] for n, r in records.items()} == {n: r["rows"] for n, r in ref.items()}
    a, b = whole.state_dict(), seq.state_dict()
    assert a.keys() == b.keys()
    assert [k for k in a if not torch.equal(a[k], b[k])] == []


def test_outside_rtn_keeps_round_to_nearest_outside_the_blocks():
    model, batch = _llava_padded()
    rtn = copy.deepcopy(model)
    records = gptq_quantize_sequential(model, CFG, [batch], device="cpu", progress=False, outside="rtn")
    assert not any(n in records for n in [*PROJECTOR, "lm_head"])
    from medquant import quantize_
    quantize_(rtn, CFG, skip=[n for n, m in rtn.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))
                              and n not in PROJECTOR])
    for n in PROJECTOR:
        assert all(torch.equal(v, _codes(model.get_submodule(n))[k]) for k, v in _codes(rtn.get_submodule(n)).items())
    with pytest.raises(ValueError, match="outside must be"):
        gptq_quantize_sequential(copy.deepcopy(rtn), CFG, [batch], device="cpu", progress=False, outside="none")


def test_an_error_in_an_outside_layer_leaves_the_model_as_it_was(monkeypatch):
    model, batch = _llava_padded()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    real = gptq_mod._quantize_layer

    def fail(module, hessian, config, damp, block_size, act_order, name, *args):
        if name == "lm_head":
            raise ValueError("layer lm_head: boom")
        return real(module, hessian, config, damp, block_size, act_order, name, *args)
    monkeypatch.setattr(gptq_mod, "_quantize_layer", fail)
    with pytest.raises(ValueError, match="boom"):
        gptq_quantize_sequential(model, CFG, [batch], device="cpu", progress=False)
    assert not any(isinstance(m, QUANT_MODULES) for m in model.modules())
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_a_planned_layer_outside_the_blocks_that_never_runs_is_rounded_to_nearest():
    model, batch = _llava_padded()
    model.unused = nn.Linear(64, 32)
    rtn = copy.deepcopy(model.unused)
    records = gptq_quantize_sequential(model, CFG, [batch], device="cpu", progress=False)
    assert "unused" not in records and records["lm_head"]["method"] == "gptq"
    from medquant.quant.api import quantize_module
    want = quantize_module(rtn, CFG, name="unused")
    assert all(torch.equal(v, _codes(model.unused)[k]) for k, v in _codes(want).items())


def _idefics():
    from tests.tiny_idefics import idefics_inputs, tiny_idefics
    return tiny_idefics(layers=4, interval=2), [idefics_inputs()]


def _swin():
    from tests.calibrate.test_sequential_between_blocks import _swin as swin
    model, inputs = swin("Swin")
    return model, [inputs]


# IDEFICS's gated cross-attention layers run between its text blocks (each calibrated before the text blocks after
# it are captured again); Swin's patch embedding runs before its stages, which cannot run with recorders
@pytest.mark.parametrize("build", [_idefics, _swin], ids=["idefics", "swin"])
def test_nothing_skipped_block_by_block_gives_the_codes_of_whole_model_gptq(build):
    model, batches = build()
    whole, seq = model, copy.deepcopy(model)
    cfg = QuantConfig(4, group_size=16)
    ref = gptq_quantize_(whole, cfg, batches, progress=False)
    records = gptq_quantize_sequential(seq, cfg, batches, device="cpu", progress=False)
    assert {n: r["method"] for n, r in records.items()} == {n: r["method"] for n, r in ref.items()}
    a, b = whole.state_dict(), seq.state_dict()
    assert a.keys() == b.keys()
    assert [k for k in a if not torch.equal(a[k], b[k])] == []


def test_an_encoder_decoder_layer_outside_both_stacks_takes_its_sides_mask(monkeypatch):
    """bert2bert's enc_to_dec_proj reads the encoder's output (the encoder's rows); BART's lm_head the decoder's
    (the decoder_attention_mask's rows), as in the whole-model path."""
    from tests.calibrate.test_encoder_decoder_masks import (
        _bart,
        _batches,
        _bert2bert,
        _check_hessians,
        _reference_rows,
        _spy_hessians,
    )
    for build, layer in ((_bert2bert, "enc_to_dec_proj"), (_bart, "lm_head")):
        model, batches = build(), _batches()
        ref = _reference_rows(copy.deepcopy(model), [layer], batches)  # the other layers stay float
        got = _spy_hessians(monkeypatch)
        records = gptq_quantize_sequential(model, CFG, batches, skip=[rf"re:^(?!{layer}$).*"], device="cpu",
                                           progress=False)
        _check_hessians(got, ref, records)
        assert set(got) == {layer} and records[layer]["method"] == "gptq"


@pytest.mark.parametrize("name", ["llava", "gemma3_text"])
def test_outside_layers_keep_the_memory_model(name, monkeypatch):
    """With a compute device apart from the offload device (``cpu:0`` / ``cpu``, tracked through ``Tensor.to``):
    no module outside the blocks is on the compute device while a block runs, each is there while it runs with no
    unrelated outside module, everything ends on the offload device - LLaVA's patch embedding, projector and
    lm_head, Gemma 3's tied lm_head (quantized: its embedding table goes back too) - and the codes are those of
    whole-model GPTQ."""
    from tests.calibrate.test_sequential_device_memory import DEVICE, _equal_state, _outside, _watch, _Where

    entry = ZOO_BY_NAME[name]
    torch.manual_seed(0)
    model = entry.build()
    ref = copy.deepcopy(model)
    inputs = entry.inputs(model)
    blocks = [n for g in block_stacks(model) for n in g]
    where = _Where(monkeypatch)
    at_blocks, at_calls = _watch(model, where, _outside(model), blocks)
    records = gptq_quantize_sequential(model, CFG, [inputs], device=DEVICE, offload_device="cpu", progress=False)
    anything_on = where.on_device(model, recurse=True)
    monkeypatch.undo()

    assert records["lm_head"]["method"] == "gptq"
    assert {n for n, _ in at_blocks} == set(blocks) and all(not on for _, on in at_blocks)
    assert at_calls and all(on and not others for _, on, others in at_calls), [x for x in at_calls if not x[1] or x[2]]
    assert not anything_on
    gptq_quantize_(ref, CFG, [inputs], progress=False)
    _equal_state(model, ref)
