"""Group fairness metrics (those of "FairQuant: Fairness-Aware Mixed-Precision Quantization for Medical Image
Classification", 2025).

Inputs are labels, not scores: ``y_true`` and ``y_pred`` as integer class ids ``(N,)`` (binary or multi-class) or
0/1 matrices ``(N, C)`` (multi-label), and integer ``groups`` ``(N,)``. Use :func:`predictions` to turn logits
(or, with ``scores="probabilities"``, probabilities) into labels.

* ``acc_g`` per group (with its sample count ``n_g``); ``AvgAcc`` = unweighted mean of ``acc_g`` over groups;
  ``WorstAcc`` = min; ``Gap = AvgAcc - WorstAcc``; ``MaxMinGap = max - min`` is reported too.
  Multi-label accuracy is the label-wise (Hamming) accuracy: the mean over samples and labels of ``pred == true``.
* one-vs-rest rates per class ``c`` and group ``g``: ``TPR = TP/(TP+FN)``, ``TNR = TN/(TN+FP)``,
  ``FPR = FP/(FP+TN) = 1 - TNR``; per class, ``gap = max_g - min_g`` over the groups where the rate is defined
  (at least one positive for TPR, one negative for TNR/FPR); a class with fewer than two such groups is left out
  of the means. Classes: every class ``0..n_classes - 1`` for multi-class tasks (``n_classes`` inferred as the
  largest class id + 1, at most ``MAX_INFERRED_CLASSES``, when not given; a class absent from both label arrays
  has TNR 1 and FPR 0 in every group), every label for multi-label tasks, the positive class (1) only for binary
  tasks.
* ``EOpp1 = mean_c TPR gap``; ``EOpp0 = mean_c TNR gap``; ``EOdd = mean_c (TPR gap + FPR gap)``.
* undefined values are ``nan`` (never a stand-in number): the TPR of a group without positives of a class, its
  TNR / FPR without negatives, a class's gap over fewer than two groups where the rate is defined, and EOpp1 /
  EOpp0 / EOdd when no class has a defined gap; :meth:`FairnessReport.as_dict` writes them as ``None``.
* balanced accuracy: multi-class / binary = mean recall over the classes present in ``y_true`` (as scikit-learn);
  multi-label = mean over labels of ``(TPR + TNR) / 2`` (of the one rate defined when the label's samples are all
  positive or all negative, as scikit-learn's ``balanced_accuracy_score`` on that column). Reported overall and per
  group.
"""
from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

TASKS = ("binary", "multiclass", "multilabel")
SCORES = ("logits", "probabilities")
MAX_INFERRED_CLASSES = 65536
"""The most classes :func:`fairness_report` infers (from the largest class id) when ``n_classes`` is None."""


def _as_np(x: Any, name: str) -> np.ndarray:
    try:
        import torch

        if isinstance(x, torch.Tensor):
            x = x.detach().cpu().numpy()
    except ImportError:  # pragma: no cover
        pass
    a = np.asarray(x)
    what, ids = (("group id", "group ids must be int64 integers") if name == "groups"
                 else ("class index", "class ids are 0, 1, ..., n_classes - 1"))
    if a.dtype.kind not in "iub":
        if not (a.dtype.kind == "f" and np.all(np.isfinite(a)) and np.all(a == np.round(a))):
            if name == "groups":
                raise TypeError(f"groups must hold integer group ids, one per sample, got dtype {a.dtype}: map "
                                "names or values (strings, ages...) to integer ids first, e.g. "
                                "np.unique(groups, return_inverse=True)[1]")
            raise TypeError(f"{name} must hold integer labels (use medquant.eval.predictions for logits), "
                            f"got dtype {a.dtype}")
        # int64 holds [-2^63, 2^63); a float outside wraps to -2^63 in astype, which read as a negative label
        out = (a < -(2.0 ** 63)) | (a >= 2.0 ** 63)
        if out.any():
            raise ValueError(f"{name} holds {int(out.sum())} value(s) out of the range of a {what} (e.g. "
                             f"{float(a[out].flat[0]):g}; int64 holds -2^63..2^63-1): {ids} (a score or a corrupt "
                             "label?)")
    elif a.dtype.kind == "u" and a.size and int(a.max()) > np.iinfo(np.int64).max:  # uint64 past int64 wraps
        raise ValueError(f"{name} holds the value {int(a.max())}, out of the range of a {what} (int64 holds up to "
                         f"2^63-1): {ids}")
    return a.astype(np.int64)


def predictions(logits: Any, task: str = "multiclass", threshold: float | None = None, *,
                scores: str = "logits") -> np.ndarray:
    """Labels from logits (default) or from probabilities (``scores="probabilities"``).

    * binary ``(N,)`` scores and multi-label ``(N, L)`` scores (exactly 2-D, ``L >= 1`` labels) are thresholded
      per entry: ``logit > threshold`` with ``scores="logits"`` (``threshold`` default 0), ``p > threshold`` with
      ``scores="probabilities"`` (``threshold`` default 0.5). Since ``sigmoid(z) > t`` exactly when ``z > log(t / (1 - t))``, the defaults
      give the same labels for logits and their sigmoid probabilities.
    * binary / multi-class ``(N, C)`` scores: the argmax over the last axis (the same for logits and their
      softmax probabilities; ``threshold`` is not used).

    With ``scores="logits"``, thresholded scores that all lie in ``[0, 1]`` (and are not all zero) look like
    probabilities, for which ``logit > 0`` would label almost every entry positive: a ``UserWarning`` says so
    and the labels are still ``logit > threshold``.

    Args:
        logits: ``(N, C)`` or ``(N,)`` scores (tensor or array): logits, or probabilities in ``[0, 1]`` with
            ``scores="probabilities"``.
        task: ``"binary"``, ``"multiclass"`` or ``"multilabel"``.
        threshold: decision threshold for ``(N,)`` binary and multi-label scores, on the logit or on the
            probability as ``scores`` says; None: 0 for logits, 0.5 for probabilities.
        scores: ``"logits"`` or ``"probabilities"``: what ``logits`` holds.

    Returns:
        Integer labels: ``(N,)`` or, for multi-label, ``(N, C)`` 0/1.

    Raises:
        ValueError: an unknown ``task`` or ``scores``, NaN logits (``+-inf`` is accepted), probabilities
            outside ``[0, 1]`` (or NaN), a NaN ``threshold`` or a probability ``threshold`` outside ``[0, 1]``, or
            argmax scores that are not ``(N, C)`` with ``C >= 2`` (a single logit column ``(N, 1)`` is refused:
            pass it as ``(N,)`` binary logits; ``task="binary"`` needs ``C == 2``), or multi-label scores that are
            not ``(N, L)`` with ``L >= 1`` (``(N,)`` is refused: one score per sample is ``task="binary"``).
    """
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; accepted: {', '.join(TASKS)}")
    if scores not in SCORES:
        raise ValueError(f"unknown scores {scores!r}; accepted: {', '.join(SCORES)}")
    try:
        import torch

        if isinstance(logits, torch.Tensor):
            logits = logits.detach().cpu().to(torch.float64).numpy()  # as np.float64: no float32 rounding
    except ImportError:  # pragma: no cover
        pass
    z = np.asarray(logits, dtype=np.float64)
    probabilities = scores == "probabilities"
    if not probabilities and np.isnan(z).any():  # NaN > t is False and argmax picks the NaN: a silent label
        raise ValueError(f"logits hold {int(np.isnan(z).sum())} NaN value(s), which have no label; "
                         "accepted: finite or +-inf logits (check the model's outputs)")
    if probabilities and not np.all((z >= 0) & (z <= 1)):
        bad = z[~((z >= 0) & (z <= 1))]
        raise ValueError(f"scores='probabilities' needs values in [0, 1], got {bad.size} outside (e.g. "
                         f"{float(bad.flat[0])}): pass logits with scores='logits'")
    if task == "multilabel" and (z.ndim != 2 or z.shape[1] < 1):
        hint = (" (one score per sample is a binary task: pass task='binary' for (N,) scores, or reshape to (N, 1) "
                "for a single label)") if z.ndim == 1 else ""
        raise ValueError(f"multilabel scores must be (N, L) with L >= 1 (one column per label), got "
                         f"{z.shape}{hint}")
    if task == "multilabel" or (task == "binary" and z.ndim == 1):
        if threshold is None:
            threshold = 0.5 if probabilities else 0.0
        elif math.isnan(threshold):  # z > NaN is False: every entry would be negative
            raise ValueError("the threshold is NaN; give a number")
        elif probabilities and not 0.0 <= threshold <= 1.0:
            raise ValueError(f"a probability threshold must lie in [0, 1], got {threshold}")
        if not probabilities and np.any(z != 0) and np.all((z >= 0) & (z <= 1)):
            warnings.warn(f"every {task} score lies in [0, 1], as probabilities do, but they are thresholded as "
                          f"logits (logit > {threshold}); for probabilities pass scores='probabilities' "
                          "(p > threshold, 0.5 by default)", UserWarning, stacklevel=2)
        return (z > threshold).astype(np.int64)
    if z.ndim != 2 or z.shape[1] < 2:
        hint = " (a single logit column (N, 1): pass logits[:, 0] as (N,) binary logits)" if z.shape[-1:] == (1,) else ""
        raise ValueError(f"{task} logits must be (N, C) with C >= 2 for the argmax, or (N,) for task='binary'; "
                         f"got {z.shape}{hint}")
    if task == "binary" and z.shape[1] != 2:
        raise ValueError(f"binary scores must be (N,) or (N, 2) for the argmax, got {z.shape}: for more classes "
                         "pass task='multiclass'")
    return z.argmax(-1).astype(np.int64)


def infer_task(y_true: np.ndarray) -> str:
    """The task of a label array: 2-D labels are multi-label, 0/1 labels binary, others multi-class.

    Args:
        y_true: the true labels.

    Returns:
        ``"multilabel"``, ``"binary"`` or ``"multiclass"``.
    """
    if y_true.ndim == 2:
        return "multilabel"
    return "binary" if set(np.unique(y_true).tolist()) <= {0, 1} else "multiclass"


def _rate(num: int, den: int) -> float:
    return num / den if den > 0 else math.nan


@dataclass
class FairnessReport:
    """Per-group and fairness metrics of one set of predictions (built by :func:`fairness_report`).

    Attributes:
        task: ``"binary"``, ``"multiclass"`` or ``"multilabel"``.
        groups: the group ids present, sorted.
        counts: samples per group.
        acc: accuracy per group.
        balanced_acc_group: balanced accuracy (mean per-class recall) per group.
        avg_acc: mean of the per-group accuracies.
        worst_acc: lowest per-group accuracy.
        gap: ``avg_acc - worst_acc``.
        max_min_gap: highest minus lowest per-group accuracy.
        overall_acc: accuracy over all samples.
        balanced_acc: balanced accuracy over all samples.
        eopp0: mean over classes of the TNR gap (``max_g - min_g`` over the groups); ``nan`` when no class has a
            defined gap (also ``eopp1``, ``eodd``).
        eopp1: mean over classes of the TPR gap.
        eodd: mean over classes of (TPR gap + FPR gap).
        classes: the classes scored.
        tpr: true-positive rate, class -> group -> rate, ``nan`` where the group has no positive of the class
            (also ``tnr``, ``fpr``: ``nan`` without a negative; ``positives`` counts).

    Attributes:
        tnr: true-negative rate, class -> group -> rate.
        fpr: false-positive rate, class -> group -> rate.
        positives: positive samples, class -> group -> count.
        tpr_gap: per class, the highest minus the lowest per-group TPR.
        tnr_gap: per class, the highest minus the lowest per-group TNR.
        fpr_gap: per class, the highest minus the lowest per-group FPR.
    """

    task: str
    groups: list[int]
    counts: dict[int, int]  # samples per group
    acc: dict[int, float]  # accuracy per group
    balanced_acc_group: dict[int, float]
    avg_acc: float
    worst_acc: float
    gap: float  # AvgAcc - WorstAcc
    max_min_gap: float
    overall_acc: float
    balanced_acc: float
    eopp0: float
    eopp1: float
    eodd: float
    classes: list[int] = field(default_factory=list)
    tpr: dict[int, dict[int, float]] = field(default_factory=dict)  # class -> group -> rate
    tnr: dict[int, dict[int, float]] = field(default_factory=dict)
    fpr: dict[int, dict[int, float]] = field(default_factory=dict)
    positives: dict[int, dict[int, int]] = field(default_factory=dict)  # class -> group -> count
    tpr_gap: dict[int, float] = field(default_factory=dict)
    tnr_gap: dict[int, float] = field(default_factory=dict)
    fpr_gap: dict[int, float] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        """The report as a JSON-ready dict.

        Group and class ids are string keys; an undefined value (``nan`` in the report) is ``None``, so
        ``json.dumps(..., allow_nan=False)`` accepts it.

        Returns:
            The dict.
        """
        def num(x: Any) -> Any:  # NaN is no JSON value
            return None if isinstance(x, float) and math.isnan(x) else x

        d = {k: num(v) for k, v in asdict(self).items()}
        # JSON keys must be strings
        for k in ("counts", "acc", "balanced_acc_group", "tpr_gap", "tnr_gap", "fpr_gap"):
            d[k] = {str(a): num(b) for a, b in d[k].items()}
        for k in ("tpr", "tnr", "fpr", "positives"):
            d[k] = {str(c): {str(g): num(v) for g, v in m.items()} for c, m in d[k].items()}
        return d


def _ovr_columns(y_true: np.ndarray, y_pred: np.ndarray, task: str, n_classes: int | None
                 ) -> tuple[list[int], Callable[[int], tuple[np.ndarray, np.ndarray]]]:
    """(classes, column) for the classes the rates are computed on: ``column(j)`` is the (true, pred) one-vs-rest
    boolean columns ``(N,)`` of the ``j``-th class, built one class at a time (no ``(N, C)`` one-hot)."""
    if task == "multilabel":
        yt, yp = y_true.astype(bool), y_pred.astype(bool)
        return list(range(y_true.shape[1])), lambda j: (yt[:, j], yp[:, j])
    if task == "binary":
        return [1], lambda j: (y_true == 1, y_pred == 1)
    c = n_classes if n_classes is not None else int(max(y_true.max(), y_pred.max())) + 1
    classes = list(range(c))
    return classes, lambda j: (y_true == classes[j], y_pred == classes[j])


def _check_n_classes(y_true: np.ndarray, y_pred: np.ndarray, task: str, n_classes: int | None) -> None:
    """Refuse labels the per-class rates would silently leave out: negative class ids, and ids >= ``n_classes``."""
    if n_classes is not None and (isinstance(n_classes, bool) or not isinstance(n_classes, (int, np.integer))
                                  or n_classes < 2):
        raise ValueError(f"n_classes must be an integer >= 2, got {n_classes!r}")
    if task == "binary" and n_classes is not None and n_classes != 2:
        raise ValueError(f"n_classes={n_classes} but a binary task has 2 classes (pass task='multiclass')")
    if task == "multilabel":
        if n_classes is not None and n_classes != y_true.shape[1]:
            raise ValueError(f"n_classes={n_classes} but the multi-label matrices have {y_true.shape[1]} columns")
        return
    for name, a in (("y_true", y_true), ("y_pred", y_pred)):
        if a.min() < 0:
            raise ValueError(f"{name} holds the negative label {int(a.min())}: class ids must be 0, 1, ...")
        if n_classes is not None and a.max() >= n_classes:
            bad = sorted(int(x) for x in np.unique(a[a >= n_classes]))
            raise ValueError(f"n_classes={n_classes} but {name} holds the label(s) {bad}: class ids must be "
                             f"0..{n_classes - 1} (raise n_classes or leave it None to infer it)")
        if n_classes is None and a.max() >= MAX_INFERRED_CLASSES:  # classes 0..max: per-class rates of each
            top = int(a.max())
            raise ValueError(f"{name} holds the class id {top}: with n_classes=None the classes are 0..{top} "
                             f"({top + 1} of them, more than MAX_INFERRED_CLASSES={MAX_INFERRED_CLASSES}); class "
                             "ids must be 0..n_classes - 1 (a corrupt label? else pass n_classes)")


def _balanced(y_true: np.ndarray, y_pred: np.ndarray, task: str) -> float:
    if task == "multilabel":
        vals = []
        for c in range(y_true.shape[1]):
            t, p = y_true[:, c] == 1, y_pred[:, c] == 1
            rates = [r for r in (_rate(int((t & p).sum()), int(t.sum())), _rate(int((~t & ~p).sum()),
                                                                                 int((~t).sum())))
                     if not math.isnan(r)]
            if rates:
                vals.append(sum(rates) / len(rates))
        return float(np.mean(vals)) if vals else math.nan
    recalls = [float((y_pred[y_true == c] == c).mean()) for c in np.unique(y_true)]
    return float(np.mean(recalls)) if recalls else math.nan


def _checked_task(task: str | None, yt: np.ndarray, yp: np.ndarray | None = None,
                  n_classes: int | None = None) -> str:
    """``task`` (when None: inferred from ``yt`` and ``yp`` together, multi-class when ``n_classes > 2``), refused
    when unknown or when it does not fit the label shape (multi-label needs ``(N, C)``, the others ``(N,)``)."""
    if task is None:
        task = infer_task(yt if yp is None or yt.ndim == 2 else np.concatenate([yt.reshape(-1), yp.reshape(-1)]))
        if task == "binary" and isinstance(n_classes, (int, np.integer)) and n_classes > 2:
            task = "multiclass"
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; accepted: {', '.join(TASKS)}")
    if (task == "multilabel") != (yt.ndim == 2):
        raise ValueError(f"task {task!r} needs labels of shape {'(N, C)' if task == 'multilabel' else '(N,)'}, "
                         f"got {yt.shape}")
    return task


def fairness_report(y_true: Any, y_pred: Any, groups: Any, task: str | None = None,
                    n_classes: int | None = None) -> FairnessReport:
    """All group metrics of the module docstring.

    ``task`` is inferred when None: 2-D labels are multi-label; ``(N,)`` labels are binary when ``y_true`` and
    ``y_pred`` together hold only 0/1 and ``n_classes`` is None or 2, else multi-class (so a multi-class model
    scored on samples whose true labels are 0/1 only is still multi-class when it predicts class 2, or when
    ``n_classes`` says so).

    Args:
        y_true: true labels, ``(N,)`` (binary / multi-class) or ``(N, C)`` 0/1 (multi-label).
        y_pred: predicted labels of the same shape (e.g. from :func:`predictions`).
        groups: integer group id of every sample, ``(N,)`` (or a column ``(N, 1)``); any integers, in any order.
        task: ``"binary"``, ``"multiclass"``, ``"multilabel"`` or None (inferred).
        n_classes: number of classes, >= 2 (default: inferred from the labels as the largest class id + 1, at
            most :data:`MAX_INFERRED_CLASSES`); multi-class ids must lie in ``0..n_classes - 1``, a multi-label
            matrix must have ``n_classes`` columns.

    Returns:
        A :class:`FairnessReport`.

    Raises:
        ValueError: lengths that differ, group ids that are not one per sample (a matrix), multi-label matrices
            with no column, an unknown task, labels or group ids out of the int64 range of a class index (a float
            such as ``1e20``, a ``uint64`` past ``2^63 - 1``), or labels that do not fit the task (a negative class
            id, a class id >= ``n_classes``, ``n_classes != 2`` for a binary task, or, with ``n_classes`` None, a
            class id >= :data:`MAX_INFERRED_CLASSES`, named in the message: the per-class rates would cover
            every class up to it).
    """
    yt, yp, g = _as_np(y_true, "y_true"), _as_np(y_pred, "y_pred"), _as_np(groups, "groups")
    if yt.shape != yp.shape:
        raise ValueError(f"y_true {yt.shape} and y_pred {yp.shape} must have the same shape")
    if yt.ndim not in (1, 2) or yt.shape[0] == 0 or (yt.ndim == 2 and yt.shape[1] == 0):
        raise ValueError(f"labels must be (N,) or (N, C) with N > 0 and C > 0, got {yt.shape}")
    if g.ndim == 2 and g.shape[1] == 1:  # a column of group ids
        g = g[:, 0]
    if g.ndim != 1 or g.shape[0] != yt.shape[0]:
        raise ValueError(f"group ids of shape {g.shape} for {yt.shape[0]} samples: give one group id per sample, "
                         "(N,) or (N, 1)")
    task = _checked_task(task, yt, yp, n_classes)
    if task == "binary" and not (set(np.unique(yt).tolist()) | set(np.unique(yp).tolist())) <= {0, 1}:
        raise ValueError("binary task: labels must be 0/1")
    if task == "multilabel" and not (set(np.unique(yt).tolist()) | set(np.unique(yp).tolist())) <= {0, 1}:
        raise ValueError("multi-label task: label matrices must be 0/1")
    _check_n_classes(yt, yp, task, n_classes)
    group_ids = sorted(int(x) for x in np.unique(g))
    correct = (yt == yp).astype(np.float64)
    if correct.ndim == 2:
        correct = correct.mean(1)  # label-wise accuracy per sample
    counts = {k: int((g == k).sum()) for k in group_ids}
    acc = {k: float(correct[g == k].mean()) for k in group_ids}
    bal_g = {k: _balanced(yt[g == k], yp[g == k], task) for k in group_ids}
    avg = float(np.mean(list(acc.values())))
    worst = float(min(acc.values()))
    classes, column = _ovr_columns(yt, yp, task, n_classes)
    tpr: dict[Any, dict[Any, float]] = {}
    tnr: dict[Any, dict[Any, float]] = {}
    fpr: dict[Any, dict[Any, float]] = {}
    pos: dict[Any, dict[Any, Any]] = {}
    tpr_gap, tnr_gap, fpr_gap = {}, {}, {}
    for j, c in enumerate(classes):
        tpr[c], tnr[c], fpr[c], pos[c] = {}, {}, {}, {}
        t1, p1 = column(j)
        for k in group_ids:
            sel = g == k
            t, p = t1[sel], p1[sel]
            tp, fn = int((t & p).sum()), int((t & ~p).sum())
            tn, fp = int((~t & ~p).sum()), int((~t & p).sum())
            tpr[c][k] = _rate(tp, tp + fn)
            tnr[c][k] = _rate(tn, tn + fp)
            fpr[c][k] = _rate(fp, fp + tn)
            pos[c][k] = tp + fn

        def spread(m: dict[int, float]) -> float:
            v = [x for x in m.values() if not math.isnan(x)]
            return max(v) - min(v) if len(v) >= 2 else math.nan

        tpr_gap[c], tnr_gap[c], fpr_gap[c] = spread(tpr[c]), spread(tnr[c]), spread(fpr[c])

    def mean_defined(vals: list[float]) -> float:
        v = [x for x in vals if not math.isnan(x)]
        return float(np.mean(v)) if v else math.nan

    eopp1 = mean_defined(list(tpr_gap.values()))
    eopp0 = mean_defined(list(tnr_gap.values()))
    eodd = mean_defined([tpr_gap[c] + fpr_gap[c] for c in classes])
    return FairnessReport(
        task=task, groups=group_ids, counts=counts, acc=acc, balanced_acc_group=bal_g, avg_acc=avg,
        worst_acc=worst, gap=avg - worst, max_min_gap=float(max(acc.values()) - worst),
        overall_acc=float(correct.mean()), balanced_acc=_balanced(yt, yp, task), eopp0=eopp0, eopp1=eopp1,
        eodd=eodd, classes=classes, tpr=tpr, tnr=tnr, fpr=fpr, positives=pos, tpr_gap=tpr_gap, tnr_gap=tnr_gap,
        fpr_gap=fpr_gap,
    )


def balanced_accuracy(y_true: Any, y_pred: Any, task: str | None = None) -> float:
    """Balanced accuracy (module docstring).

    Args:
        y_true: true labels.
        y_pred: predicted labels.
        task: as in :func:`fairness_report` (None: inferred).

    The classes are those present in ``y_true`` (as scikit-learn's ``balanced_accuracy_score``): one recall per
    distinct id, so a large id (``10**12``) costs no more than a small one.

    Returns:
        The mean per-class recall (multi-label: mean over labels of the mean of TPR and TNR).

    Raises:
        ValueError: ``y_true`` and ``y_pred`` differ in shape, an unknown task, a task that does not fit the
            label shape, or labels out of the int64 range of a class index (``1e20``, a ``uint64`` past
            ``2^63 - 1``).
        TypeError: labels that are not integers.
    """
    yt, yp = _as_np(y_true, "y_true"), _as_np(y_pred, "y_pred")
    if yt.shape != yp.shape:
        raise ValueError(f"y_true {yt.shape} and y_pred {yp.shape} must have the same shape")
    task = _checked_task(task, yt)
    return _balanced(yt, yp, task)
