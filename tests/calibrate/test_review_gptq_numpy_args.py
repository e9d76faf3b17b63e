"""GPTQ's integer and number arguments given as NumPy scalars (a sweep over ``np.arange`` / ``np.linspace``) are the
same arguments as Python ``int`` / ``float``, and the records stay JSON-serialisable.

Before, ``block_size=np.int64(64)`` was refused with the self-contradictory "block_size must be a positive integer,
got np.int64(64)" (as were ``max_samples`` and ``max_hessian_bytes``), and ``damp=np.float32(0.01)`` with "damp must
be a finite number >= 0". The reference: the same calibration with Python numbers.
"""
from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch

from medquant import QuantConfig
from medquant.calibrate.gptq import gptq_quantize_, gptq_quantize_sequential
from medquant.testing.zoo import ZOO_BY_NAME

CFG = QuantConfig(4, group_size=16)


def _run(sequential: bool, **kw):
    model = ZOO_BY_NAME["llama"].build()
    g = torch.Generator().manual_seed(2)
    batches = [{"input_ids": torch.randint(4, 200, (2, 6), generator=g)} for _ in range(3)]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*stay in floating point")
        if sequential:
            records = gptq_quantize_sequential(model, CFG, batches, progress=False, offload_device=None, **kw)
        else:
            records = gptq_quantize_(model, CFG, batches, progress=False, **kw)
    return model, records


@pytest.mark.parametrize("sequential", [False, True], ids=["whole", "block_by_block"])
def test_numpy_scalars_are_the_python_numbers(sequential):
    python = {"block_size": 64, "max_samples": 2, "max_hessian_bytes": 300_000, "damp": 0.25}  # 0.25: exact in float32
    ref_model, ref = _run(sequential, **python)
    model, got = _run(sequential, block_size=np.int64(64), max_samples=np.int32(2),
                      max_hessian_bytes=np.int64(300_000), damp=np.float32(0.25))
    assert json.loads(json.dumps(got)) == json.loads(json.dumps(ref))
    rec = next(iter(got.values()))
    assert rec["samples"] == 2 and rec["block_size"] == 64 and type(rec["block_size"]) is int
    assert rec["damp"] == 0.25 and type(rec["damp"]) is float
    ref_state = ref_model.state_dict()
    assert all(torch.equal(v, ref_state[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("bad", [{"block_size": np.float64(64.0)}, {"block_size": np.int64(0)}, {"damp": np.nan},
                                 {"max_samples": True}])
def test_invalid_values_are_still_refused(bad):
    with pytest.raises(ValueError, match=f"{next(iter(bad))} must be"):
        _run(False, **bad)


def test_the_layer_and_weight_functions_take_numpy_scalars_too():
    """gptq_quantize_layer / gptq_quantize_weight: the same codes and record as with Python numbers."""
    from medquant.calibrate.gptq import gptq_quantize_layer, gptq_quantize_weight

    g = torch.Generator().manual_seed(3)
    layer = torch.nn.Linear(32, 8)
    x = torch.randn(64, 32, generator=g)
    h = 2 * x.double().T @ x.double() / x.shape[0]
    ref = gptq_quantize_layer(layer, h, CFG, block_size=8, damp=0.25)
    got = gptq_quantize_layer(layer, h, CFG, block_size=np.int64(8), damp=np.float32(0.25))
    assert json.dumps(got.calibration) == json.dumps(ref.calibration)
    assert all(torch.equal(v, ref.state_dict()[k]) for k, v in got.state_dict().items())
    q_ref, _ = gptq_quantize_weight(layer.weight, h, CFG, block_size=8)
    q_got, _ = gptq_quantize_weight(layer.weight, h, CFG, block_size=np.int16(8))
    assert torch.equal(q_got.codes, q_ref.codes) and torch.equal(q_got.scales, q_ref.scales)
