"""Review (s0710): one dict of keyword inputs is one calibration batch for AWQ, as for GPTQ, learned rounding and
awq_quantize_sequential. awq_quantize_ / search_and_fold iterated the dict, i.e. ran the model on its key strings
("embedding(): argument 'indices' must be Tensor, not str"); ``calib=None`` failed with "'NoneType' object is not
iterable"."""
from __future__ import annotations

import copy
import warnings

import pytest
import torch

from medquant import QuantConfig
from medquant.calibrate.awq import awq_quantize_, search_and_fold
from medquant.testing.zoo import ZOO_BY_NAME

CFG = QuantConfig(bits=3)


def _quiet(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


@pytest.mark.parametrize("fn", [awq_quantize_, search_and_fold])
def test_one_dict_is_one_batch(fn):
    entry = ZOO_BY_NAME["llama"]
    base = entry.build()
    batch = entry.inputs(base)
    listed, single = copy.deepcopy(base), copy.deepcopy(base)
    ref = _quiet(fn, listed, CFG, [batch], progress=False)
    got = _quiet(fn, single, CFG, batch, progress=False)
    assert [(g.prev, g.linears, g.alpha) for g in got] == [(g.prev, g.linears, g.alpha) for g in ref]
    for (name, a), (_, b) in zip(listed.state_dict().items(), single.state_dict().items()):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("fn", [awq_quantize_, search_and_fold])
def test_no_calibration_data_is_refused_with_a_message_before_the_model_changes(fn):
    entry = ZOO_BY_NAME["llama"]
    model = entry.build()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match="AWQ needs calibration data"):
        _quiet(fn, model, CFG, None, progress=False)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
