"""Group labels given as NumPy integers (a pandas column, ``list(np.array(...))``) are integer labels.

Before, ``groups=[np.int64(0), np.int64(1)]`` (one label per batch) failed deep in the Hessian accumulation with
``TypeError: 'numpy.int64' object is not iterable`` (a label that is not a Python ``int`` / ``str`` was taken for a
sequence of per-sample labels), and a float label the same way with ``'float' object is not iterable``. The
reference: the same calibration with Python ``int`` labels, whose per-group row counts are counted here by hand
(2 samples x 6 tokens per batch).
"""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from medquant import QuantConfig
from medquant.calibrate.gptq import gptq_quantize_, gptq_quantize_sequential
from medquant.testing.zoo import ZOO_BY_NAME

CFG = QuantConfig(4, group_size=16)


def _batches() -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [{"input_ids": torch.randint(4, 200, (2, 6), generator=g)} for _ in range(3)]


def _run(sequential: bool, groups):
    model = ZOO_BY_NAME["llama"].build()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*stay in floating point")
        if sequential:
            records = gptq_quantize_sequential(model, CFG, _batches(), groups=groups, progress=False,
                                               offload_device=None)
        else:
            records = gptq_quantize_(model, CFG, _batches(), groups=groups, progress=False)
    return model, records


@pytest.mark.parametrize("sequential", [False, True], ids=["whole", "block_by_block"])
@pytest.mark.parametrize("labels", [list(np.array([0, 1, 1])), [np.int32(0), np.array(1), torch.tensor(1)]],
                         ids=["numpy_ints", "mixed_scalars"])
def test_numpy_integer_labels_are_the_python_int_labels(sequential, labels):
    ref_model, ref = _run(sequential, [0, 1, 1])
    model, got = _run(sequential, labels)
    assert got == ref
    rec = next(iter(got.values()))
    assert rec["group_rows"] == {"0": 12, "1": 24} and rec["group_weights"] == {"0": 0.5, "1": 0.5}
    ref_state = ref_model.state_dict()
    assert all(torch.equal(v, ref_state[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("sequential", [False, True], ids=["whole", "block_by_block"])
def test_a_label_that_is_neither_an_int_nor_a_str_nor_a_sequence_is_refused_up_front(sequential):
    with pytest.raises(ValueError, match=r"groups\[1\] is 1\.5 \(float\)"):
        _run(sequential, [0, 1.5, 1])
