"""Group fairness metrics against hand-computed examples and fairlearn / scikit-learn (test-only references)."""
import math

import numpy as np
import pytest
import torch

from medquant.eval import balanced_accuracy, fairness_report, predictions

try:  # test-only references (pip install fairlearn scikit-learn); the hand-computed tests run without them
    import fairlearn.metrics as fairlearn
    import sklearn.metrics as skm
except ImportError:  # pragma: no cover
    fairlearn = skm = None
needs_ref = pytest.mark.skipif(fairlearn is None, reason="fairlearn / scikit-learn not installed (test-only reference)")


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny tensors: one intra-op thread (tests/conftest.py)


def test_binary_hand_computed():
    # group 0: y = 1 1 0 0, pred = 1 0 0 1 -> acc 2/4, TPR 1/2, TNR 1/2, FPR 1/2
    # group 1: y = 1 1 1 0 0 0, pred = 1 1 1 0 0 1 -> acc 5/6, TPR 3/3, TNR 2/3, FPR 1/3
    y = [1, 1, 0, 0, 1, 1, 1, 0, 0, 0]
    p = [1, 0, 0, 1, 1, 1, 1, 0, 0, 1]
    g = [0, 0, 0, 0, 1, 1, 1, 1, 1, 1]
    r = fairness_report(y, p, g)
    assert r.task == "binary" and r.classes == [1]
    assert r.counts == {0: 4, 1: 6}
    assert r.acc == {0: pytest.approx(0.5), 1: pytest.approx(5 / 6)}
    assert r.avg_acc == pytest.approx((0.5 + 5 / 6) / 2)
    assert r.worst_acc == pytest.approx(0.5)
    assert r.gap == pytest.approx((0.5 + 5 / 6) / 2 - 0.5)
    assert r.max_min_gap == pytest.approx(5 / 6 - 0.5)
    assert r.eopp1 == pytest.approx(1 - 0.5)
    assert r.eopp0 == pytest.approx(2 / 3 - 0.5)
    assert r.eodd == pytest.approx((1 - 0.5) + (0.5 - 1 / 3))
    assert r.overall_acc == pytest.approx(7 / 10)
    # balanced: TPR overall 4/5, TNR 3/5
    assert r.balanced_acc == pytest.approx((4 / 5 + 3 / 5) / 2)


def _fl_rates(y, p, g):
    mf = fairlearn.MetricFrame(
        metrics={"tpr": fairlearn.true_positive_rate, "tnr": fairlearn.true_negative_rate,
                 "fpr": fairlearn.false_positive_rate, "acc": skm.accuracy_score, "n": fairlearn.count,
                 "bal": skm.balanced_accuracy_score},
        y_true=y, y_pred=p, sensitive_features=g)
    return mf.by_group, mf.difference(method="between_groups")


@needs_ref
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_binary_against_fairlearn(seed):
    rng = np.random.default_rng(seed)
    n = 300
    g = rng.integers(0, 3, n)
    y = rng.integers(0, 2, n)
    p = np.where(rng.random(n) < 0.7 + 0.1 * g, y, 1 - y)
    r = fairness_report(y, p, g)
    by, diff = _fl_rates(y, p, g)
    for k in range(3):
        assert r.counts[k] == by.loc[k, "n"]
        assert r.acc[k] == pytest.approx(by.loc[k, "acc"])
        assert r.tpr[1][k] == pytest.approx(by.loc[k, "tpr"])
        assert r.tnr[1][k] == pytest.approx(by.loc[k, "tnr"])
        assert r.fpr[1][k] == pytest.approx(by.loc[k, "fpr"])
        assert r.balanced_acc_group[k] == pytest.approx(by.loc[k, "bal"])
    assert r.eopp1 == pytest.approx(diff["tpr"])
    assert r.eopp0 == pytest.approx(diff["tnr"])
    assert r.eodd == pytest.approx(diff["tpr"] + diff["fpr"])
    assert r.worst_acc == pytest.approx(by["acc"].min())
    assert r.avg_acc == pytest.approx(by["acc"].mean())
    assert r.balanced_acc == pytest.approx(skm.balanced_accuracy_score(y, p))
    # fairlearn's own equalized-odds difference is max(TPR gap, FPR gap), ours is their sum: both bound it
    eod = fairlearn.equalized_odds_difference(y, p, sensitive_features=g)
    assert max(r.eopp1, r.fpr_gap[1]) == pytest.approx(eod)


@needs_ref
@pytest.mark.parametrize("seed", [0, 1])
def test_multiclass_against_fairlearn_one_vs_rest(seed):
    rng = np.random.default_rng(seed)
    n, c = 400, 4
    g = rng.integers(0, 2, n)
    y = rng.integers(0, c, n)
    p = np.where(rng.random(n) < 0.6, y, rng.integers(0, c, n))
    r = fairness_report(y, p, g)
    assert r.task == "multiclass" and r.classes == list(range(c))
    tpr_gaps, tnr_gaps, fpr_gaps = [], [], []
    for k in range(c):
        by, diff = _fl_rates((y == k).astype(int), (p == k).astype(int), g)
        for grp in range(2):
            assert r.tpr[k][grp] == pytest.approx(by.loc[grp, "tpr"])
            assert r.tnr[k][grp] == pytest.approx(by.loc[grp, "tnr"])
        tpr_gaps.append(diff["tpr"])
        tnr_gaps.append(diff["tnr"])
        fpr_gaps.append(diff["fpr"])
    assert r.eopp1 == pytest.approx(np.mean(tpr_gaps))
    assert r.eopp0 == pytest.approx(np.mean(tnr_gaps))
    assert r.eodd == pytest.approx(np.mean(np.add(tpr_gaps, fpr_gaps)))
    acc = {grp: skm.accuracy_score(y[g == grp], p[g == grp]) for grp in range(2)}
    assert r.acc == {k: pytest.approx(v) for k, v in acc.items()}
    assert r.balanced_acc == pytest.approx(skm.balanced_accuracy_score(y, p))
    assert balanced_accuracy(y, p) == pytest.approx(skm.balanced_accuracy_score(y, p))


@needs_ref
def test_multilabel_against_sklearn():
    rng = np.random.default_rng(3)
    n, c = 200, 5
    g = rng.integers(0, 2, n)
    y = (rng.random((n, c)) < 0.3).astype(int)
    p = np.where(rng.random((n, c)) < 0.8, y, 1 - y)
    r = fairness_report(y, p, g)
    assert r.task == "multilabel" and r.classes == list(range(c))
    for grp in range(2):
        sel = g == grp
        assert r.acc[grp] == pytest.approx(1 - skm.hamming_loss(y[sel], p[sel]))
    tpr_g, fpr_g = [], []
    for k in range(c):
        _by, diff = _fl_rates(y[:, k], p[:, k], g)
        tpr_g.append(diff["tpr"])
        fpr_g.append(diff["fpr"])
    assert r.eopp1 == pytest.approx(np.mean(tpr_g))
    assert r.eodd == pytest.approx(np.mean(np.add(tpr_g, fpr_g)))
    want_bal = np.mean([skm.balanced_accuracy_score(y[:, k], p[:, k]) for k in range(c)])
    assert r.balanced_acc == pytest.approx(want_bal)


def test_undefined_rates_are_left_out():
    # class 2 never occurs in group 1 -> its TPR is undefined there and the class drops out of EOpp1
    y = [0, 1, 2, 0, 1, 0]
    p = [0, 1, 1, 0, 0, 0]
    g = [0, 0, 0, 1, 1, 1]
    r = fairness_report(y, p, g)
    assert math.isnan(r.tpr[2][1]) and math.isnan(r.tpr_gap[2])
    # class 0: TPR 1 and 1 -> 0; class 1: TPR 1 vs 0 -> 1
    assert r.eopp1 == pytest.approx((0 + 1) / 2)


def test_predictions_and_errors():
    logits = np.array([[0.1, 2.0], [3.0, -1.0]])
    assert predictions(logits).tolist() == [1, 0]
    assert predictions(np.array([0.3, -0.2]), task="binary").tolist() == [1, 0]
    assert predictions(np.array([[0.3, -0.2]]), task="multilabel").tolist() == [[1, 0]]
    with pytest.raises(ValueError, match="same shape"):
        fairness_report([0, 1], [0], [0, 1])
    with pytest.raises(ValueError, match="one group id per sample"):
        fairness_report([0, 1], [0, 1], [0])
    with pytest.raises(TypeError, match="integer labels"):
        fairness_report([0.2, 1.0], [0, 1], [0, 1])
    with pytest.raises(ValueError, match="unknown task"):
        fairness_report([0, 1], [0, 1], [0, 1], task="regression")


def test_labels_outside_n_classes_are_refused_not_dropped():
    yt, yp, g = [0, 1, 3, 3], [0, 1, 3, 0], [0, 0, 1, 1]
    with pytest.raises(ValueError, match=r"n_classes=2.*3"):
        fairness_report(yt, yp, g, n_classes=2)
    with pytest.raises(ValueError, match=r"n_classes=3.*y_pred"):
        fairness_report([0, 1, 2, 2], [0, 1, 2, 3], g, n_classes=3)
    with pytest.raises(ValueError, match="negative"):
        fairness_report([0, 1, -1, 2], [0, 1, 2, 2], g)
    with pytest.raises(ValueError, match="n_classes"):
        fairness_report(yt, yp, g, n_classes=0)
    with pytest.raises(ValueError, match="n_classes"):
        fairness_report(np.eye(4, 3, dtype=int), np.eye(4, 3, dtype=int), g, n_classes=4)
    # enough classes: every label is scored, as the labels alone would give
    full = fairness_report(yt, yp, g, n_classes=4)
    assert full.classes == [0, 1, 2, 3] and full.tpr[3] == fairness_report(yt, yp, g).tpr[3]
    assert full.eopp1 == pytest.approx(fairness_report(yt, yp, g).eopp1, nan_ok=True)


def test_predictions_refuses_a_single_logit_column_instead_of_argmax_zero():
    # argmax over one column (or over the samples of 1-D logits) is no prediction: (N, 1) binary logits gave all 0
    logits = np.array([[2.0], [-1.0], [0.5]])
    assert predictions(logits[:, 0], task="binary").tolist() == (logits[:, 0] > 0).astype(int).tolist()
    for task in ("binary", "multiclass"):
        with pytest.raises(ValueError, match=r"\(N, 1\).*\(N,\)"):
            predictions(logits, task=task)
    with pytest.raises(ValueError, match=r"\(N, C\)"):
        predictions(np.array([0.2, 0.9, 0.1]), task="multiclass")


def test_balanced_accuracy_checks_the_task_as_fairness_report_does():
    from sklearn.metrics import balanced_accuracy_score

    yt, yp = np.array([[1, 0], [0, 0], [1, 1]]), np.array([[1, 1], [0, 0], [0, 1]])
    ref = np.mean([balanced_accuracy_score(yt[:, j], yp[:, j]) for j in range(2)])
    assert balanced_accuracy(yt, yp) == pytest.approx(ref)
    with pytest.raises(ValueError, match="unknown task"):
        balanced_accuracy([0, 1], [0, 1], task="regression")
    with pytest.raises(ValueError, match=r"needs labels of shape \(N,\)"):  # was a pooled score of the matrix entries
        balanced_accuracy(yt, yp, task="binary")


def test_predictions_from_probabilities_threshold_p_not_the_logit():
    # probabilities thresholded at 0 made every sample positive; scores="probabilities" thresholds p > 0.5
    p = np.array([0.2, 0.7, 0.5, 0.9, 0.0])
    assert predictions(p, task="binary", scores="probabilities").tolist() == [0, 1, 0, 1, 0]
    assert predictions(p, task="binary", threshold=0.3, scores="probabilities").tolist() == [0, 1, 1, 1, 0]
    pm = torch.tensor([[0.2, 0.6], [0.51, 0.49]])
    assert predictions(pm, task="multilabel", scores="probabilities").tolist() == [[0, 1], [1, 0]]
    # the same decisions as the logits they came from: sigmoid(z) > 0.5 <=> z > 0 (sigmoid in torch, z != 0)
    z = torch.tensor([[-2.0, 0.3, 1.5], [0.1, -0.4, -3.0], [4.0, -0.05, 0.7]])
    hand = [[0, 1, 1], [1, 0, 0], [1, 0, 1]]
    assert predictions(z, task="multilabel").tolist() == hand
    assert predictions(torch.sigmoid(z), task="multilabel", scores="probabilities").tolist() == hand
    # a custom probability threshold = the logit threshold log(t / (1 - t))
    t = 0.8
    assert predictions(torch.sigmoid(z), task="multilabel", threshold=t, scores="probabilities").tolist() == \
        predictions(z, task="multilabel", threshold=math.log(t / (1 - t))).tolist() == [[0, 0, 1], [0, 0, 0], [1, 0, 0]]
    # the argmax of (N, C) probabilities is that of the logits
    assert predictions(torch.softmax(z, -1), scores="probabilities").tolist() == [2, 0, 0]


def test_predictions_warns_on_logits_that_look_like_probabilities():
    import warnings

    with pytest.warns(UserWarning, match="probabilities"):
        out = predictions(np.array([0.2, 0.7, 0.9]), task="binary")
    assert out.tolist() == [1, 1, 1]  # still the documented logit > 0
    with pytest.warns(UserWarning, match="scores='probabilities'"):
        predictions(np.array([[0.2, 0.0], [1.0, 0.4]]), task="multilabel")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # none of these look like probabilities
        assert predictions(np.array([0.3, -0.2]), task="binary").tolist() == [1, 0]
        assert predictions(np.zeros((2, 3)), task="multilabel").tolist() == [[0, 0, 0]] * 2
        assert predictions(np.array([0.4, 1.2]), task="binary").tolist() == [1, 1]
        assert predictions(np.array([[0.2, 0.8]])).tolist() == [1]  # argmax: the same for logits and probabilities
        assert predictions(np.array([0.2, 0.7]), task="binary", scores="probabilities").tolist() == [0, 1]


def test_predictions_refuses_bad_probabilities_and_options():
    for bad in ([0.2, 1.3], [-0.1, 0.5], [0.2, float("nan")]):
        with pytest.raises(ValueError, match=r"\[0, 1\]"):
            predictions(np.array(bad), task="binary", scores="probabilities")
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        predictions(np.array([[0.2, 1.8], [0.1, 0.3]]), scores="probabilities")  # argmax too: not probabilities
    with pytest.raises(ValueError, match="threshold"):
        predictions(np.array([0.2, 0.7]), task="binary", threshold=-1.0, scores="probabilities")
    with pytest.raises(ValueError, match="scores"):
        predictions(np.array([0.2, 0.7]), task="binary", scores="probs")
    with pytest.raises(ValueError, match="unknown task"):
        predictions(np.array([0.2, 0.7]), task="regression")


# --------------------------------------------------------------------------------------- bug review (6 Dec 2026)
def test_task_is_inferred_from_predictions_and_n_classes_too():
    # a 3-class model on a subset whose true labels are 0/1 only: inferring "binary" from y_true alone scored
    # class 1 only (n_classes=3 was ignored) or refused a prediction of class 2 as "binary task: labels must be 0/1"
    from sklearn.metrics import recall_score

    yt, yp, g = np.array([0, 1, 0, 1, 1, 0]), np.array([0, 1, 2, 1, 0, 0]), np.array([0, 0, 0, 1, 1, 1])
    r = fairness_report(yt, yp, g)
    assert r.task == "multiclass" and r.classes == [0, 1, 2]
    r3 = fairness_report(yt, np.array([0, 1, 1, 1, 0, 0]), g, n_classes=3)
    assert r3.task == "multiclass" and r3.classes == [0, 1, 2]
    for k in (0, 1):
        s = g == k
        assert r.tpr[0][k] == pytest.approx(recall_score(yt[s] == 0, yp[s] == 0))
        assert r.tpr[1][k] == pytest.approx(recall_score(yt[s] == 1, yp[s] == 1))
    assert r.fpr[2] == {0: pytest.approx(1 / 3), 1: 0.0}  # class 2 predicted once among group 0's 3 samples
    with pytest.raises(ValueError, match="n_classes"):  # a binary task has two classes
        fairness_report(yt, yt, g, task="binary", n_classes=3)


def test_group_ids_must_be_one_per_sample_not_a_matrix():
    # (2, 3) group ids for 6 samples were flattened row-major and silently paired with the samples
    y = [0, 1, 0, 1, 1, 0]
    with pytest.raises(ValueError, match="one group id per sample"):
        fairness_report(y, y, [[0, 0, 1], [1, 2, 2]])
    assert fairness_report(y, y, np.array([[0], [0], [1], [1], [2], [2]])).counts == {0: 2, 1: 2, 2: 2}  # (N, 1)


def test_multilabel_matrices_without_labels_are_refused():
    with pytest.raises(ValueError, match=r"\(N, C\).*C > 0"):  # was acc NaN for every group, with RuntimeWarnings
        fairness_report(np.zeros((4, 0), int), np.zeros((4, 0), int), [0, 0, 1, 1])


def test_predictions_refuses_a_nan_threshold_and_binary_scores_of_more_than_two_columns():
    with pytest.raises(ValueError, match="threshold"):  # logit > NaN is False: every sample was negative
        predictions(np.array([1.0, 2.0, -1.0]), "binary", threshold=float("nan"))
    with pytest.raises(ValueError, match="threshold"):
        predictions(np.array([[1.0, -2.0]]), "multilabel", threshold=float("nan"))
    with pytest.raises(ValueError, match=r"binary.*\(N, 2\)"):  # argmax over 3 columns gave class 2 for "binary"
        predictions(np.array([[0.1, 0.2, 3.0]]), "binary")
    assert predictions(np.array([[0.1, 0.2], [2.0, -1.0]]), "binary").tolist() == [1, 0]


def test_non_contiguous_and_single_groups_against_sklearn():
    from sklearn.metrics import accuracy_score, confusion_matrix

    rng = np.random.default_rng(7)
    y, p = rng.integers(0, 3, 40), rng.integers(0, 3, 40)
    g = rng.choice([-4, 7, 1000], 40)
    r = fairness_report(y, p, g)
    assert r.groups == [-4, 7, 1000]
    for k in r.groups:
        s = g == k
        cm = confusion_matrix(y[s], p[s], labels=[0, 1, 2])
        assert r.acc[k] == pytest.approx(accuracy_score(y[s], p[s]))
        for c in range(3):
            tp, fn = cm[c, c], cm[c].sum() - cm[c, c]
            fp = cm[:, c].sum() - cm[c, c]
            tn = cm.sum() - tp - fn - fp
            assert r.tpr[c][k] == pytest.approx(tp / (tp + fn))
            assert r.fpr[c][k] == pytest.approx(fp / (fp + tn))
    one = fairness_report(y, p, np.full(40, 5))  # one group: no gap is defined
    assert one.gap == 0.0 and one.avg_acc == one.worst_acc == pytest.approx(accuracy_score(y, p))
    assert math.isnan(one.eopp1) and math.isnan(one.eopp0) and math.isnan(one.eodd)
