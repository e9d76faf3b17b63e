"""medquant's evaluation metrics cross-checked against independent implementations on random and edge-case inputs:
group fairness vs scikit-learn, BLEU-4 vs NLTK on sacrebleu's 13a tokens, ROUGE-L vs a plain LCS on rouge_score's
tokens, METEOR vs NLTK on medquant's tokens, and BOPs vs a hand count of a tiny mixed-precision model."""
from __future__ import annotations

import math
import re
import warnings
from fractions import Fraction

import numpy as np
import pytest
import sklearn.metrics as skm
import torch
from nltk.translate.bleu_score import SmoothingFunction, corpus_bleu
from nltk.translate.meteor_score import meteor_score
from rouge_score.tokenizers import DefaultTokenizer
from sacrebleu.tokenizers.tokenizer_13a import Tokenizer13a
from torch import nn

from medquant import QuantConfig, quantize_
from medquant.eval import bops, count_macs, fairness_report, predictions, proxy_bops
from medquant.eval import text as _text
from medquant.eval.text import bleu4, meteor, rouge_l
from tests.eval.test_text_metrics import lcs_length

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny tensors: one intra-op thread (tests/conftest.py)


# --------------------------------------------------------------------------------------------------- fairness
def _random_case(rng: np.random.Generator, task: str):
    n = int(rng.integers(1, 25))  # down to one sample: groups of size 1, groups with one class only
    groups = rng.integers(0, int(rng.integers(1, 5)), n)
    if task == "binary":
        return rng.integers(0, 2, n), rng.integers(0, 2, n), groups, 2
    if task == "multiclass":
        c = int(rng.integers(3, 5))
        return rng.integers(0, c, n), rng.integers(0, c, n), groups, c
    c = int(rng.integers(1, 4))
    return rng.integers(0, 2, (n, c)), rng.integers(0, 2, (n, c)), groups, c


def _sk_rates(t: np.ndarray, p: np.ndarray) -> tuple[float, float, float]:
    """(TPR, TNR, FPR) of one one-vs-rest column from scikit-learn's confusion matrix (NaN when undefined)."""
    tn, fp, fn, tp = skm.confusion_matrix(t, p, labels=[False, True]).ravel()
    tpr = tp / (tp + fn) if tp + fn else math.nan
    tnr = tn / (tn + fp) if tn + fp else math.nan
    return tpr, tnr, (1 - tnr if tn + fp else math.nan)


def _gap(values: list[float]) -> float:
    v = [x for x in values if not math.isnan(x)]
    return max(v) - min(v) if len(v) >= 2 else math.nan


@pytest.mark.parametrize("task", ["binary", "multiclass", "multilabel"])
def test_fairness_report_matches_sklearn_on_random_and_degenerate_groups(task):
    rng = np.random.default_rng({"binary": 1, "multiclass": 2, "multilabel": 3}[task])
    for _ in range(30):
        yt, yp, g, c = _random_case(rng, task)
        rep = fairness_report(yt, yp, g, task=task, n_classes=c if task == "multiclass" else None)
        assert rep.groups == sorted(np.unique(g).tolist())
        with warnings.catch_warnings():  # sklearn warns on groups that hold one class only
            warnings.simplefilter("ignore")
            for k in rep.groups:
                s = g == k
                if task == "multilabel":
                    acc = 1 - skm.hamming_loss(yt[s], yp[s])
                    bal = np.mean([skm.balanced_accuracy_score(yt[s, j], yp[s, j]) for j in range(c)])
                else:
                    acc = skm.accuracy_score(yt[s], yp[s])
                    bal = skm.balanced_accuracy_score(yt[s], yp[s])
                assert rep.counts[k] == int(s.sum())
                assert rep.acc[k] == pytest.approx(acc)
                assert rep.balanced_acc_group[k] == pytest.approx(bal)
            accs = list(rep.acc.values())
            assert rep.worst_acc == pytest.approx(min(accs))
            assert rep.gap == pytest.approx(np.mean(accs) - min(accs))
            if task == "multilabel":
                assert rep.overall_acc == pytest.approx(1 - skm.hamming_loss(yt, yp))
            else:
                assert rep.overall_acc == pytest.approx(skm.accuracy_score(yt, yp))
                assert rep.balanced_acc == pytest.approx(skm.balanced_accuracy_score(yt, yp))
            classes = [1] if task == "binary" else list(range(c))
            gaps = {}
            for j, cls in enumerate(classes):
                per_group = {}
                for k in rep.groups:
                    s = g == k
                    t = yt[s, j] == 1 if task == "multilabel" else yt[s] == cls
                    p = yp[s, j] == 1 if task == "multilabel" else yp[s] == cls
                    per_group[k] = _sk_rates(t, p)
                    if t.any():  # where TPR is defined it is sklearn's recall of the class
                        assert rep.tpr[cls][k] == pytest.approx(skm.recall_score(t, p))
                for i, name in enumerate(("tpr", "tnr", "fpr")):
                    got = getattr(rep, name)[cls]
                    for k in rep.groups:
                        assert got[k] == pytest.approx(per_group[k][i], nan_ok=True)
                gaps[cls] = [_gap([per_group[k][i] for k in rep.groups]) for i in range(3)]

        def mean_defined(vals):
            v = [x for x in vals if not math.isnan(x)]
            return float(np.mean(v)) if v else math.nan

        assert rep.eopp1 == pytest.approx(mean_defined([v[0] for v in gaps.values()]), nan_ok=True)
        assert rep.eopp0 == pytest.approx(mean_defined([v[1] for v in gaps.values()]), nan_ok=True)
        assert rep.eodd == pytest.approx(mean_defined([v[0] + v[2] for v in gaps.values()]), nan_ok=True)


def test_fairness_one_sample_groups_and_single_class_groups_by_hand():
    # group 0: one sample (a positive, missed); group 1: negatives only; group 2: both classes
    yt = np.array([1, 0, 0, 1, 0])
    yp = np.array([0, 1, 0, 1, 0])
    g = np.array([0, 1, 1, 2, 2])
    rep = fairness_report(yt, yp, g)
    assert rep.acc == {0: 0.0, 1: 0.5, 2: 1.0}
    assert rep.balanced_acc_group == {0: 0.0, 1: 0.5, 2: 1.0}  # recall over the classes present in the group
    assert rep.tpr[1] == pytest.approx({0: 0.0, 1: math.nan, 2: 1.0}, nan_ok=True)
    assert rep.fpr[1] == pytest.approx({0: math.nan, 1: 0.5, 2: 0.0}, nan_ok=True)
    assert rep.eopp1 == 1.0  # TPR defined in groups 0 and 2
    assert rep.eodd == 1.0 + 0.5  # FPR defined in groups 1 and 2


def test_predictions_refuses_nan_logits_instead_of_labelling_them():
    # NaN > 0 is False and argmax picks the NaN's index: either would give a silent, arbitrary label
    with pytest.raises(ValueError, match="NaN"):
        predictions(np.array([np.nan, 1.0, -1.0]), "binary")
    with pytest.raises(ValueError, match="NaN"):
        predictions(torch.tensor([[0.0, 1.0], [float("nan"), 0.0]]), "multiclass")
    with pytest.raises(ValueError, match="NaN"):
        predictions(np.array([[0.3, np.nan]]), "multilabel")
    # infinite logits are fine: sigmoid(+-inf) is 1 / 0
    assert predictions(np.array([np.inf, -np.inf]), "binary").tolist() == [1, 0]
    assert predictions(np.array([[-np.inf, 0.0], [np.inf, 0.0]]), "multiclass").tolist() == [1, 0]


def test_predictions_ties_take_the_first_class_as_numpy_argmax():
    z = np.array([[0.5, 0.5, 0.1], [0.0, 2.0, 2.0]])
    assert predictions(z, "multiclass").tolist() == np.argmax(z, -1).tolist() == [0, 1]
    # a logit exactly at the threshold is negative (strictly greater)
    assert predictions(np.array([-1.0, 0.0, 1e-12]), "binary").tolist() == [0, 0, 1]


# --------------------------------------------------------------------------------------------------- text
_WORDS = ["the", "lung", "is", "clear", "no", "effusion", "heart", "size", "normal", "There", "Is", "A", "mass,",
          "left", "lobe.", "right-sided", "opacity;", "3.5cm", "nodule"]


def _corpus(rng: np.random.Generator, n: int) -> list[str]:
    return [" ".join(rng.choice(_WORDS, int(rng.integers(4, 15)))) for _ in range(n)]


def test_bleu4_matches_nltk_corpus_bleu_on_13a_tokens():
    # sacrebleu's "exp" smoothing (a zero n-gram count becomes 1 / 2^k) is NLTK's method3
    tok = Tokenizer13a()
    rng = np.random.default_rng(0)
    for _ in range(10):
        hyps, refs = _corpus(rng, 5), _corpus(rng, 5)
        want = corpus_bleu([[tok(r.lower()).split()] for r in refs], [tok(h.lower()).split() for h in hyps],
                           smoothing_function=SmoothingFunction().method3)
        assert bleu4(hyps, refs) == pytest.approx(want, rel=1e-9)


def test_rouge_l_matches_plain_lcs_on_rouge_score_tokens():
    tok = DefaultTokenizer(use_stemmer=True)  # lower-cases, drops punctuation, Porter stems
    rng = np.random.default_rng(1)
    for _ in range(10):
        hyps, refs = _corpus(rng, 5), _corpus(rng, 5)
        fs = []
        for h, r in zip(hyps, refs):
            a, b = tok.tokenize(h), tok.tokenize(r)
            lcs = lcs_length(a, b)
            fs.append(2 * lcs / (len(a) + len(b)) if lcs else 0.0)
        assert rouge_l(hyps, refs) == pytest.approx(sum(fs) / len(fs))
    assert rouge_l(["...", ""], ["...", "a"]) == 0.0  # nothing left to match after punctuation is dropped


def test_tokenisation_per_metric_is_as_the_module_docstring_says():
    text = "Right-sided 3.5cm opacity."
    assert Tokenizer13a()(text.lower()).split() == ["right-sided", "3.5cm", "opacity", "."]
    assert DefaultTokenizer(use_stemmer=False).tokenize(text) == ["right", "sided", "3", "5cm", "opacity"]
    assert _text._tokens(text) == ["right", "-", "sided", "3", ".", "5cm", "opacity", "."]


class _NoWordNet:
    def synsets(self, *args, **kwargs):
        return []


def test_meteor_matches_nltk_on_word_and_punctuation_tokens():
    rng = np.random.default_rng(2)
    for _ in range(10):
        hyps, refs = _corpus(rng, 5), _corpus(rng, 5)

        def toks(s):  # the tokenisation medquant documents: words and single punctuation marks, lower-cased
            return re.findall(r"\w+|[^\w\s]", s.lower())

        want = [meteor_score([toks(r)], toks(h), wordnet=_NoWordNet()) for h, r in zip(hyps, refs)]
        assert meteor(hyps, refs) == pytest.approx(sum(want) / len(want))
    assert meteor([""], ["a b"]) == 0.0


# --------------------------------------------------------------------------------------------------- BOPs
class _Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 6, (3, 1), stride=(1, 2), groups=2, bias=False)
        self.fc = nn.Linear(6, 6)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        t = self.conv(x).mean((-2, -1))
        return self.head(self.fc(self.fc(t)))  # fc runs twice


def test_bops_of_a_tiny_mixed_precision_model_equal_the_exact_hand_count():
    torch.manual_seed(0)
    net = _Tiny()
    quantize_(net, {"conv": QuantConfig(8, scope="channel", channel_bits=(2, 3, 4, 8, 16, 8)),
                    "fc": QuantConfig(4, scope="channel"),
                    "head": QuantConfig(8, scope="channel", channel_bits=(2, 4, 16))})
    x = torch.randn(2, 4, 5, 6)  # conv output (2, 6, 3, 3): 18 positions
    k_conv = (4 // 2) * 3 * 1
    macs = {"conv": 18 * 6 * k_conv, "fc": 2 * (2 * 6 * 6), "head": 2 * 6 * 3}
    bits = {"conv": Fraction(2 + 3 + 4 + 8 + 16 + 8, 6), "fc": Fraction(4), "head": Fraction(2 + 4 + 16, 3)}
    rows = {r.name: r for r in count_macs(net, x)}
    assert {n: r.macs for n, r in rows.items()} == macs
    assert {n: r.params for n, r in rows.items()} == {"conv": 6 * k_conv, "fc": 36, "head": 18}
    want = sum(macs[n] * bits[n] * 8 for n in macs)  # 42144 exactly
    assert bops(net, x, act_bits=8) == float(want)
    assert proxy_bops(net, act_bits=8) == float(k_conv * 41 * 8 + 6 * 4 * 6 * 8 + 6 * 22 * 8)
    # one unbatched image: the output positions halve, so every count halves
    assert bops(net, x[0], act_bits=8) == float(want / 2)
