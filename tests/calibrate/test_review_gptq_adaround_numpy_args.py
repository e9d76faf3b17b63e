"""AdaRound's number arguments given as NumPy scalars: the same run as with Python numbers, and records that
``medquant.save``'s ``extras`` can hold (JSON).

Before, ``lr`` / ``reg`` / ``warmup`` of a NumPy float type were accepted (the docstring says "Python or NumPy")
but recorded as that type, so ``json.dumps(calibration_records(model))`` - what ``save(..., extras=...)`` stores -
raised ``TypeError: Object of type float32 is not JSON serializable``; and ``iters=np.int64(2)`` was refused with
"iters must be a positive integer, got np.int64(2)" (``act_bits`` likewise). The reference: the same call with
Python numbers (values exact in float32).
"""
from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch

from medquant import QuantConfig
from medquant.calibrate.adaround import adaround_quantize_
from medquant.testing.zoo import tiny_cnn

CFG = QuantConfig(4, group_size=16)


def _run(**kw):
    model = tiny_cnn()
    calib = [torch.randn(2, 3, 12, 12, generator=torch.Generator().manual_seed(0))]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        records = adaround_quantize_(model, CFG, calib, progress=False, **kw)
    return model, records


def test_numpy_scalars_are_the_python_numbers_and_the_records_are_json():
    ref_model, ref = _run(iters=3, lr=0.0625, reg=0.125, warmup=0.25, act_bits=8)
    model, got = _run(iters=np.int64(3), lr=np.float32(0.0625), reg=np.float32(0.125), warmup=np.float32(0.25),
                      act_bits=np.int32(8))
    assert json.loads(json.dumps(got)) == json.loads(json.dumps(ref))
    rec = next(iter(got.values()))
    assert type(rec["iters"]) is int and type(rec["lr"]) is float and rec["lr"] == 0.0625
    ref_state = ref_model.state_dict()
    assert all(torch.equal(v, ref_state[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("bad", [{"iters": np.float64(3.0)}, {"iters": True}, {"lr": np.float32("nan")},
                                 {"act_bits": np.int64(1)}])
def test_invalid_values_are_still_refused(bad):
    with pytest.raises(ValueError, match=f"{next(iter(bad))} must be"):
        _run(**bad)
