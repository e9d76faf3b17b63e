"""Huge but in-range class ids (``10**12``) never make ``fairness_report`` / ``balanced_accuracy`` allocate
per-class arrays of that size.

Safety on code that would: every test runs under ``_guard``, which swaps the ``np`` that ``medquant.eval.fairness``
sees for a proxy whose array constructors (``arange``, ``zeros``, ``bincount``, ...) raise ``MemoryError`` beyond
``10**7`` elements before allocating anything (an 8 TB ``arange`` would otherwise be attempted); and the peak of
numpy's allocations (``tracemalloc`` sees them) is bounded. Reference for the results: scikit-learn.
"""
from __future__ import annotations

import tracemalloc
import types

import numpy as np
import pytest
from sklearn.metrics import balanced_accuracy_score, recall_score

from medquant.eval import fairness
from medquant.eval.fairness import balanced_accuracy, fairness_report

HUGE = 10**12
LIMIT = 10**7  # elements an array constructor may make in these tests


def _guard(monkeypatch):
    def checked(fn):
        def wrapped(*args, **kwargs):
            size = args[0] if args else kwargs.get("shape", kwargs.get("stop", 0))
            if fn.__name__ == "arange":
                nums = [a for a in args if isinstance(a, (int, np.integer))]
                size = (nums[1] - nums[0]) if len(nums) >= 2 else (nums[0] if nums else 0)
            elif fn.__name__ == "bincount":
                a = np.asarray(args[0])
                size = int(a.max()) + 1 if a.size else 0
                size = max(size, kwargs.get("minlength", 0) or 0)
            total = int(np.prod(size)) if isinstance(size, (tuple, list)) else int(size) if np.isscalar(size) else 0
            if total > LIMIT:
                raise MemoryError(f"np.{fn.__name__} of {total} elements")
            return fn(*args, **kwargs)
        return wrapped

    proxy = types.SimpleNamespace(**{k: getattr(np, k) for k in dir(np) if not k.startswith("__")})
    for name in ("arange", "zeros", "ones", "empty", "full", "eye", "bincount", "identity"):
        setattr(proxy, name, checked(getattr(np, name)))
    monkeypatch.setattr(fairness, "np", proxy)


def _labels(seed=0, n=60, c=4):
    rng = np.random.default_rng(seed)
    return rng.integers(0, c, n), rng.integers(0, c, n), rng.integers(0, 3, n)


@pytest.mark.parametrize("task", ["multiclass", None])
def test_inferred_classes_up_to_a_huge_id_are_refused_naming_it(monkeypatch, task):
    _guard(monkeypatch)
    yt, yp, g = _labels()
    yt[5] = HUGE
    with pytest.raises(ValueError, match=r"y_true holds the class id 1000000000000.*0\.\.n_classes - 1"):
        fairness_report(yt, yp, g, task=task)
    yt[5], yp[7] = 1, HUGE
    with pytest.raises(ValueError, match=r"y_pred holds the class id 1000000000000.*0\.\.n_classes - 1"):
        fairness_report(yt, yp, g, task=task)


def test_an_id_past_the_cap_is_refused_and_an_explicit_n_classes_is_still_checked(monkeypatch):
    _guard(monkeypatch)
    assert fairness.MAX_INFERRED_CLASSES == 65536
    monkeypatch.setattr(fairness, "MAX_INFERRED_CLASSES", 10)  # the boundary, without 65536 classes' loops
    yt, yp, g = _labels()
    cap = fairness.MAX_INFERRED_CLASSES
    yt[0] = cap  # cap + 1 classes inferred
    with pytest.raises(ValueError, match=f"class id {cap}"):
        fairness_report(yt, yp, g, task="multiclass")
    yt[0] = cap - 1  # exactly cap classes: accepted
    r = fairness_report(yt, yp, g, task="multiclass")
    assert r.classes == list(range(cap))
    with pytest.raises(ValueError, match=r"n_classes=4 but y_true holds the label\(s\) \[1000000000000\]"):
        yt[0] = HUGE
        fairness_report(yt, yp, g, task="multiclass", n_classes=4)


def test_balanced_accuracy_of_huge_ids_is_sklearns_without_large_arrays(monkeypatch):
    _guard(monkeypatch)
    yt, yp, _ = _labels(1)
    yt, yp = np.where(yt == 3, HUGE, yt), np.where(yp == 3, HUGE, yp)
    tracemalloc.start()
    try:
        got = balanced_accuracy(yt, yp, task="multiclass")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert got == pytest.approx(balanced_accuracy_score(yt, yp), abs=1e-12)
    assert peak < 2**20  # bytes


def test_normal_inputs_unchanged_against_sklearn(monkeypatch):
    _guard(monkeypatch)
    yt, yp, g = _labels(2, n=200, c=5)
    yp[yp == 3] = 4  # class 3 never predicted
    r = fairness_report(yt, yp, g, task="multiclass")
    assert r.classes == [0, 1, 2, 3, 4]
    assert r.balanced_acc == pytest.approx(balanced_accuracy_score(yt, yp), abs=1e-12)
    for k in r.groups:
        s = g == k
        rec = recall_score(yt[s], yp[s], labels=[0, 1, 2, 3, 4], average=None, zero_division=np.nan)
        assert [r.tpr[c][k] for c in r.classes] == pytest.approx(list(rec), abs=1e-12, nan_ok=True)
        assert r.balanced_acc_group[k] == pytest.approx(balanced_accuracy_score(yt[s], yp[s]), abs=1e-12)
    # ids 0..max with a class absent from both: still scored (TNR 1, FPR 0 in every group), as documented
    yt2, yp2 = np.where(yt == 2, 4, yt), np.where(yp == 2, 4, yp)
    r2 = fairness_report(yt2, yp2, g, task="multiclass")
    assert r2.classes == [0, 1, 2, 3, 4] and r2.tnr_gap[2] == 0.0 and r2.fpr_gap[2] == 0.0
    assert r2.eopp0 == pytest.approx(np.mean([r2.tnr_gap[c] for c in r2.classes]), abs=1e-12)
