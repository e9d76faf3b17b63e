"""quantize_ and QuantConfig never do nothing, or something else, without a word."""
import warnings

import pytest
import torch
from torch import nn

import medquant as mq
from medquant.quant import quantized_modules


def mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))


def test_quantizing_a_quantized_layer_raises_unless_requantize():
    m = mq.quantize_(mlp(), mq.QuantConfig(4, group_size=16))
    first = m[0].qweight_4.clone()
    with pytest.raises(ValueError, match="already quantized .*requantize=True"):
        mq.quantize_(m, mq.QuantConfig(8, group_size=16))
    with pytest.raises(ValueError, match="already quantized"):
        mq.quantize_(m, {"0": 8})
    assert torch.equal(m[0].qweight_4, first)  # unchanged
    with pytest.warns(UserWarning, match="requantizing 2 already quantized"):
        mq.quantize_(m, mq.QuantConfig(8, group_size=16), requantize=True)
    assert m[0].config.bits == 8 and m[2].config.bits == 8
    ref = mlp()
    mq.quantize_(ref, mq.QuantConfig(4, group_size=16))
    dq = ref[0].to_float(ref[0].weight_dtype)  # from the dequantized weight of the first quantization
    assert torch.equal(m[0].qweight_8, mq.QuantLinear.from_float(dq, mq.QuantConfig(8, group_size=16)).qweight_8)


def test_a_partly_quantized_model_takes_the_rest_without_complaint():
    m = mq.quantize_(mlp(), {"0": mq.QuantConfig(4, group_size=16)})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        mq.quantize_(m, {"2": mq.QuantConfig(8, group_size=16)})
    assert set(quantized_modules(m)) == {"0", "2"}


def test_a_shared_module_is_quantized_once_and_stays_shared():
    m = mlp()
    m.add_module("alias", m[0])
    mq.quantize_(m, mq.QuantConfig(4, group_size=16))
    assert isinstance(m[0], mq.QuantLinear) and m.alias is m[0]
    assert len({id(q) for q in quantized_modules(m).values()}) == 2


class KeepsForward(nn.Linear):
    pass


class OwnForward(nn.Linear):
    def forward(self, x):
        return super().forward(x) * 2


class ExtraParam(nn.Conv2d):
    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        self.gate = nn.Parameter(torch.ones(1))


def test_subclasses_keeping_the_parent_forward_are_quantized_others_reported():
    m = nn.Sequential(KeepsForward(16, 16), OwnForward(16, 16), nn.Unflatten(1, (1, 4, 4)), ExtraParam(1, 4, 3))
    with pytest.warns(UserWarning, match="2 subclass.*left in floating point: 1, 3"):
        mq.quantize_(m, mq.QuantConfig(4, group_size=16))
    assert isinstance(m[0], mq.QuantLinear) and type(m[1]) is OwnForward and type(m[3]) is ExtraParam


def test_a_call_that_quantizes_nothing_warns():
    m = nn.Sequential(nn.ReLU(), nn.LayerNorm(4))
    with pytest.warns(UserWarning, match="quantized nothing"):
        mq.quantize_(m, mq.QuantConfig(4))
    with pytest.warns(UserWarning, match="quantized nothing"):
        mq.quantize_(mlp(), mq.QuantConfig(4), skip=["0", "2"])


@pytest.mark.parametrize("bits", [True, False])
def test_bool_bits_are_refused(bits):
    with pytest.raises(TypeError, match="integer"):
        mq.QuantConfig(bits=bits)
    with pytest.raises(TypeError, match="integer"):
        mq.QuantConfig(4, channel_bits=(4, bits))


def test_subnormal_fp16_scales_are_warned_about_and_fp32_scales_keep_them():
    torch.manual_seed(0)
    lin = nn.Linear(64, 8)
    with torch.no_grad():
        lin.weight.mul_(1e-5 / lin.weight.abs().max())  # weights around 1e-5: 8-bit scales ~8e-8
    with pytest.warns(RuntimeWarning, match="subnormal.*scale_dtype='float32'"):
        q16 = mq.quantize_(nn.Sequential(lin), mq.QuantConfig(8, scope="channel"))[0]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        q32 = mq.quantize_(nn.Sequential(lin), mq.QuantConfig(8, scope="channel", scale_dtype="float32"))[0]
    err16 = (q16.weight - lin.weight).abs().mean()
    err32 = (q32.weight - lin.weight).abs().mean()
    assert err32 < err16 / 5  # the fp16 scale rounds to a subnormal step and the largest weights are clipped


def test_meta_and_empty_weights_are_named_not_crashed_on():
    with torch.device("meta"):
        meta = nn.Sequential(nn.Linear(16, 16))
    with pytest.raises(ValueError, match="0: its weight is on the meta device"):
        mq.quantize_(meta, mq.QuantConfig(4, group_size=16))
    with pytest.raises(ValueError, match="0: its weight is empty \\(0, 4\\)"):
        mq.quantize_(nn.Sequential(nn.Linear(4, 0)), mq.QuantConfig(4, group_size=16))


def test_a_meta_model_is_not_saved(tmp_path):
    with torch.device("meta"):
        meta = nn.Sequential(nn.Linear(16, 16))
    with pytest.raises(ValueError, match="meta device"):
        mq.save(meta, tmp_path / "ck")
    assert not (tmp_path / "ck").exists()
