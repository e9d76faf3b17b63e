"""Distiller's alpha and feature_weight: a bool (True would silently be alpha = 1, all KD) or a string is refused
with the accepted values named; a NumPy real is taken as the float it equals (same loss as the Python float)."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from medquant.distill import Distiller
from medquant.testing.zoo import ZOO_BY_NAME


def _pair():
    e = ZOO_BY_NAME["llama"]
    student = e.build()
    teacher = copy.deepcopy(student)
    with torch.no_grad():
        for p in teacher.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
    return teacher, student, e.inputs(student)


@pytest.mark.parametrize("kw", [{"alpha": True}, {"alpha": False}, {"alpha": "0.5"}, {"alpha": None},
                                {"feature_weight": True}, {"feature_weight": "1"}])
def test_bool_or_string_weights_are_refused(kw):
    teacher, student, _ = _pair()
    (name, value), = kw.items()
    with pytest.raises((TypeError, ValueError), match=f"{name} must be a real number.*got .*{value!r}"):
        Distiller(teacher, student, **kw)


def test_numpy_weights_give_the_loss_of_python_floats():
    teacher, student, inputs = _pair()
    ref = Distiller(teacher, student, alpha=0.25, feature_pairs=[(1, 1)], feature_weight=0.5)(inputs)
    got = Distiller(teacher, student, alpha=np.float32(0.25), feature_pairs=[(1, 1)],
                    feature_weight=np.float32(0.5))(inputs)
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=0, atol=0)
