"""Review 3 of the group fairness metrics: undefined values in the JSON form, clear errors for bad group ids."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from medquant.eval import fairness_report


def test_as_dict_is_strict_json_with_undefined_values_as_none():
    # group 0 has no negative sample (TNR / FPR undefined there), so the TNR and FPR gaps of the positive class have
    # a single defined group: EOpp0 and EOdd are undefined. By hand: TPR group 0 = 1/2, group 1 = 1/1 -> EOpp1 0.5.
    y_true = np.array([1, 1, 0, 1])
    y_pred = np.array([1, 0, 0, 1])
    groups = np.array([0, 0, 1, 1])
    r = fairness_report(y_true, y_pred, groups)
    assert math.isnan(r.tnr[1][0]) and math.isnan(r.eopp0) and math.isnan(r.eodd)  # the dataclass keeps NaN
    d = json.loads(json.dumps(r.as_dict(), allow_nan=False))  # strict JSON: NaN is no JSON value
    assert d["tnr"]["1"] == {"0": None, "1": 1.0} and d["fpr"]["1"] == {"0": None, "1": 0.0}
    assert d["tnr_gap"] == {"1": None} and d["fpr_gap"] == {"1": None}
    assert d["eopp0"] is None and d["eodd"] is None
    assert d["eopp1"] == 0.5 and d["tpr"]["1"] == {"0": 0.5, "1": 1.0} and d["tpr_gap"] == {"1": 0.5}
    assert d["acc"] == {"0": 0.5, "1": 1.0} and d["avg_acc"] == 0.75 and d["worst_acc"] == 0.5
    assert d["counts"] == {"0": 2, "1": 2} and d["positives"]["1"] == {"0": 2, "1": 1}


@pytest.mark.parametrize("groups", [["f", "f", "m", "m"], np.array([34.5, 34.5, 60.0, 60.0]),
                                    torch.tensor([0.5, 0.5, 1.5, 1.5])])
def test_group_ids_that_are_not_integers_are_refused_as_group_ids(groups):
    # the message used to speak of "integer labels" and point at predictions() for logits, which fits y_true /
    # y_pred, not group ids
    with pytest.raises(TypeError, match="groups must hold integer group ids") as e:
        fairness_report([0, 1, 0, 1], [0, 1, 1, 1], groups)
    assert "predictions" not in str(e.value)
    with pytest.raises(TypeError, match="use medquant.eval.predictions for logits"):  # labels keep their hint
        fairness_report([0.2, 1, 0, 1], [0, 1, 1, 1], [0, 0, 1, 1])
