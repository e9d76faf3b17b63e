"""AWQ's ``grid`` and ``max_rows`` of NumPy's integer types are the Python ints they equal (GPTQ's and AdaRound's
settings take them too): the folded scales, alphas and codes equal those of the run with Python ints; a bool, a
float and a value below 1 are still refused."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from medquant import QuantConfig
from medquant.calibrate.awq import awq_quantize_
from medquant.testing.zoo import ZOO_BY_NAME

CFG = QuantConfig(4, group_size=32)


def test_numpy_integers_give_the_python_int_run():
    entry = ZOO_BY_NAME["llama"]
    model = entry.build().float().eval()
    batches = [entry.inputs(model)]
    a, b = copy.deepcopy(model), copy.deepcopy(model)
    ga = awq_quantize_(a, CFG, batches, grid=4, max_rows=64, progress=False)
    gb = awq_quantize_(b, CFG, batches, grid=np.int64(4), max_rows=np.int32(64), progress=False)
    assert [g.alpha for g in ga] == [g.alpha for g in gb] and all(type(g.alpha) is float for g in gb)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize(("kw", "match"), [({"grid": True}, "grid"), ({"grid": 2.0}, "grid"),
                                           ({"grid": np.int64(0)}, "grid"), ({"max_rows": np.float32(8)}, "max_rows"),
                                           ({"max_rows": False}, "max_rows")])
def test_bad_values_are_still_refused(kw, match):
    entry = ZOO_BY_NAME["llama"]
    model = entry.build().float().eval()
    with pytest.raises(ValueError, match=match):
        awq_quantize_(model, CFG, [entry.inputs(model)], progress=False, **kw)
