"""model_size / layer_table review: bitsandbytes NF4 / int8 layers and the float layers quantize_ leaves float
(Conv1d, Conv3d, transposed convolutions, transformers' Conv1D) against hand counts from torch shapes and the
tensors bitsandbytes itself saves."""
from __future__ import annotations

import copy

import bitsandbytes as bnb
import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

import medquant as mq
from medquant.eval import proxy_bops
from medquant.qlora import nf4_quantize_


def _bytes(sd: dict) -> int:
    return sum(t.numel() * t.element_size() for t in sd.values())


def _nf4_model(double_quant: bool = True) -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 32, bias=False))
    nf4_quantize_(model, ["0"], double_quant=double_quant)
    return model


@pytest.mark.parametrize("double_quant", [True, False])
def test_nf4_layer_counts_4_bits_and_the_bytes_bitsandbytes_saves(double_quant):
    model = _nf4_model(double_quant)
    q = model[0]
    assert isinstance(q, bnb.nn.Linear4bit) and q.weight.dtype == torch.uint8
    saved = q.state_dict()  # what bitsandbytes writes: uint8 codes, bias, absmax, quant_map (nested ...), JSON state
    assert "weight.absmax" in saved and "weight.quant_map" in saved
    assert ("weight.nested_absmax" in saved) == double_quant
    rep = mq.model_size(model)
    params = 128 * 64 + 64 * 32
    assert rep.linear_params == params
    assert rep.effective_bits == pytest.approx((128 * 64 * 4 + 64 * 32 * 32) / params, abs=1e-12)
    assert rep.total_bytes == rep.tensor_bytes == _bytes(saved) + 64 * 32 * 4
    assert rep.linear_weight_bytes == _bytes(saved) - 64 * 4 + 64 * 32 * 4  # NF4 codes + constants, no bias
    assert saved["weight"].numel() == 128 * 64 // 2  # two codes a byte: the 4 bits are the stored codes
    rows = {r["name"]: r for r in mq.quant.layer_table(model)}
    assert rows["0"]["shape"] == [64, 128] and rows["0"]["bits"] == "4" and rows["0"]["effective_bits"] == 4.0
    assert rows["0"]["bytes"] == _bytes(saved)
    assert rows["2"]["shape"] == [32, 64] and rows["2"]["bits"] == "32" and rows["2"]["bytes"] == 64 * 32 * 4


def test_nf4_in_a_cpu_packed_layout_is_counted_as_saved_and_left_untouched():
    """bitsandbytes' AVX512-BF16 CPU layout is undone by Linear4bit's state_dict (in the module): model_size reports
    the bytes a save writes (the standard layout) and leaves the packed layout as it was."""
    from bitsandbytes.functional import _convert_weight_packed_for_cpu

    model = _nf4_model()
    ref = _bytes(model[0].state_dict())
    q = model[0]
    q.weight.data, q.weight.quant_state = _convert_weight_packed_for_cpu(q.weight.data.clone(),
                                                                         copy.deepcopy(q.weight.quant_state))
    state = q.weight.quant_state
    data, absmax, fields = q.weight.data.clone(), state.absmax.clone(), dict(vars(state))
    assert state.packing_format_for_cpu and data.shape == (64, 64)
    rep = mq.model_size(model)
    assert rep.effective_bits == pytest.approx((128 * 64 * 4 + 64 * 32 * 32) / (128 * 64 + 64 * 32), abs=1e-12)
    assert rep.total_bytes == ref + 64 * 32 * 4
    rows = {r["name"]: r for r in mq.quant.layer_table(model)}
    assert rows["0"]["bits"] == "4" and rows["0"]["bytes"] == ref
    assert q.weight.quant_state is state and state.packing_format_for_cpu and not hasattr(state, "state2")
    assert torch.equal(q.weight.data, data) and torch.equal(state.absmax, absmax) and state.absmax.dtype == torch.bfloat16
    assert vars(state).keys() == fields.keys()


def test_int8_linear8bitlt_counts_8_bits_and_its_saved_bytes():
    torch.manual_seed(0)
    lin = nn.Linear(128, 64)
    q8 = bnb.nn.Linear8bitLt(128, 64, has_fp16_weights=False)
    q8.load_state_dict(lin.state_dict())
    q8 = q8.to("cpu")  # quantizes: int8 rows + one float32 scale (SCB) a row
    model = nn.Sequential(q8, nn.Linear(64, 16, bias=False).half())
    saved = q8.state_dict()
    assert saved["weight"].dtype == torch.int8 and saved["SCB"].shape == (64,)
    rep = mq.model_size(model)
    assert rep.linear_params == 128 * 64 + 64 * 16
    assert rep.effective_bits == pytest.approx((128 * 64 * 8 + 64 * 16 * 16) / (128 * 64 + 64 * 16), abs=1e-12)
    assert rep.total_bytes == _bytes(saved) + 64 * 16 * 2
    assert rep.linear_weight_bytes == _bytes(saved) - 64 * 4 + 64 * 16 * 2
    rows = {r["name"]: r for r in mq.quant.layer_table(model)}
    assert rows["0"]["bits"] == "8" and rows["0"]["shape"] == [64, 128] and rows["0"]["bytes"] == _bytes(saved)


def _conv_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.ModuleDict({
        "c1": nn.Conv1d(3, 8, 5),  # 8 * 3 * 5 = 120 fp32
        "c3": nn.Conv3d(2, 4, (1, 2, 3), groups=2).half(),  # 4 * 1 * 6 = 24 fp16
        "t2": nn.ConvTranspose2d(4, 6, 3, groups=2),  # 4 * 3 * 9 = 108 fp32
        "t1": nn.ConvTranspose1d(2, 2, 4).bfloat16(),  # 2 * 2 * 4 = 16 bf16
        "gpt": Conv1D(12, 10),  # transformers' GPT-2 Conv1D, weight [in 10, out 12]: 120 fp32
        "lin": nn.Linear(16, 4, bias=False).half(),  # 64 fp16
        "c2": nn.Conv2d(1, 2, 2, bias=False),  # 8 fp32
    })


def test_float_conv1d_conv3d_transposed_and_hf_conv1d_weights_count_at_their_dtype_width():
    model = _conv_model()
    sizes = {"c1": (120, 32), "c3": (24, 16), "t2": (108, 32), "t1": (16, 16), "gpt": (120, 32), "lin": (64, 16),
             "c2": (8, 32)}
    params = sum(n for n, _ in sizes.values())
    rep = mq.model_size(model)
    assert rep.linear_params == params == 460
    assert rep.effective_bits == pytest.approx(sum(n * b for n, b in sizes.values()) / params, abs=1e-12)
    assert rep.linear_weight_bytes == sum(n * b // 8 for n, b in sizes.values())
    assert rep.total_bytes == sum(p.numel() * p.element_size() for p in model.parameters())
    rows = {r["name"]: r for r in mq.quant.layer_table(model)}
    shapes = {"c1": [8, 15], "c3": [4, 6], "t2": [6, 18], "t1": [2, 8], "gpt": [12, 10], "lin": [4, 16],
              "c2": [2, 4]}
    assert {k: r["shape"] for k, r in rows.items()} == shapes
    assert {k: r["bits"] for k, r in rows.items()} == {k: str(b) for k, (_, b) in sizes.items()}
    assert {k: r["bytes"] for k, r in rows.items()} == {
        k: sum(p.numel() * p.element_size() for p in model[k].parameters()) for k in sizes}


def test_quantized_model_with_a_float_conv1d_averages_both():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv1d(4, 64, 1), nn.Flatten(), nn.Linear(64 * 8, 64, bias=False))
    q = mq.quantize_(copy.deepcopy(model), mq.QuantConfig(4, group_size=64))
    assert type(q[0]) is nn.Conv1d  # quantize_ leaves Conv1d float
    params = 64 * 4 + 64 * 64 * 8
    rep = mq.model_size(q)
    assert rep.linear_params == params
    assert rep.effective_bits == pytest.approx((64 * 4 * 32 + 64 * 64 * 8 * 4) / params, abs=1e-12)


def test_effective_bits_match_bops_weight_bits_over_its_layers():
    """medquant.eval.bops is the consistency reference: its proxy (params * weight bits over the same layers, act
    bits 1) divided by the weights is the effective bits."""
    model = _conv_model()
    model["nf4"] = _nf4_model()
    model["q"] = mq.quantize_(nn.Sequential(nn.Linear(64, 32, bias=False)), mq.QuantConfig(3, group_size=32))
    rep = mq.model_size(model)
    assert rep.linear_params == 460 + 128 * 64 + 64 * 32 + 64 * 32
    assert rep.effective_bits == pytest.approx(proxy_bops(model, act_bits=1) / rep.linear_params, rel=1e-12)
