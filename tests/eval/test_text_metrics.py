"""Text metrics against hand computations and an independent implementation (SPEC section 8, seed 001)."""
from __future__ import annotations

import math
from collections import Counter

import pytest
import torch

from medquant.eval.text import bertscore_f1, bleu4, meteor, meteor_variant, minilm_path, rouge_l, text_metrics

HYPS = ["no acute cardiopulmonary abnormality", "mild cardiomegaly without pulmonary edema",
        "the lungs are clear and the heart is normal in size"]
REFS = ["no acute cardiopulmonary disease", "cardiomegaly with mild pulmonary edema",
        "the heart is normal in size and the lungs are clear"]


def _ngrams(toks, n):
    return Counter(tuple(toks[i:i + n]) for i in range(len(toks) - n + 1))


def _hand_bleu4(hyps, refs):
    """Corpus BLEU-4: clipped n-gram precisions pooled over the corpus, geometric mean, brevity penalty."""
    match = [0] * 4
    total = [0] * 4
    c = r = 0
    for h, ref in zip(hyps, refs):
        ht, rt = h.split(), ref.split()
        c, r = c + len(ht), r + len(rt)
        for n in range(1, 5):
            hn, rn = _ngrams(ht, n), _ngrams(rt, n)
            match[n - 1] += sum(min(v, rn[g]) for g, v in hn.items())
            total[n - 1] += max(len(ht) - n + 1, 0)
    logp = sum(math.log(m / t) for m, t in zip(match, total)) / 4
    bp = 1.0 if c > r else math.exp(1 - r / c)
    return bp * math.exp(logp)


def test_bleu4_matches_hand_computation_and_nltk():
    from nltk.translate.bleu_score import corpus_bleu

    got = bleu4(HYPS, REFS)
    assert got == pytest.approx(_hand_bleu4(HYPS, REFS), abs=1e-4)
    ref_nltk = corpus_bleu([[r.split()] for r in REFS], [h.split() for h in HYPS])
    assert got == pytest.approx(ref_nltk, abs=1e-4)
    assert bleu4(REFS, REFS) == pytest.approx(1.0)
    assert 0 < got < 1


def lcs_length(a: list[str], b: list[str]) -> int:
    """Length of the longest common subsequence of two token lists (dynamic programming), the reference of
    ROUGE-L here and in test_metric_references.py."""
    dp = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
    for i, x in enumerate(a):
        for j, y in enumerate(b):
            dp[i + 1][j + 1] = dp[i][j] + 1 if x == y else max(dp[i][j + 1], dp[i + 1][j])
    return dp[-1][-1]


def test_rouge_l_matches_hand_lcs():
    expected = 0.0
    for h, r in zip(HYPS, REFS):
        ht, rt = h.split(), r.split()
        lcs = lcs_length(ht, rt)
        p, rec = lcs / len(ht), lcs / len(rt)
        expected += 2 * p * rec / (p + rec)
    assert rouge_l(HYPS, REFS, stem=False) == pytest.approx(expected / len(HYPS), abs=1e-9)


def test_meteor_matches_hand_formula():
    # 4 exact matches, P = 4/5, R = 4/4, chunks "cat sat" + "on mat" = 2 (no repeated words: NLTK aligns
    # repeated words greedily from the end, which is not always the fewest-chunk alignment)
    got = meteor(["cat sat quietly on mat"], ["cat sat on mat"])
    p, r = 4 / 5, 1.0
    fmean = p * r / (0.9 * p + 0.1 * r)
    expected = fmean * (1 - 0.5 * (2 / 4) ** 3)
    assert got == pytest.approx(expected, abs=1e-6)
    # Porter-stem stage: "effusions" matches "effusion"
    assert meteor(["small effusions"], ["small effusion"]) > meteor(["small fluid"], ["small effusion"])
    assert meteor_variant() in ("exact+stem", "exact+stem+wordnet")


def test_bertscore_matches_manual_greedy_matching():
    from transformers import AutoModel, AutoTokenizer

    path = minilm_path()
    tok = AutoTokenizer.from_pretrained(str(path))
    enc = AutoModel.from_pretrained(str(path)).eval()

    def emb(text):
        t = tok(text, return_tensors="pt")
        with torch.no_grad():
            h = enc(**t).last_hidden_state[0]
        return torch.nn.functional.normalize(h, dim=-1)

    expected = []
    for h, r in zip(HYPS, REFS):
        # [CLS]/[SEP] may be matched but are not averaged over (bert_score gives them idf weight 0)
        sim = emb(r) @ emb(h).T
        rec, prec = sim.max(1).values[1:-1].mean(), sim.max(0).values[1:-1].mean()
        expected.append(float(2 * prec * rec / (prec + rec)))
    got = bertscore_f1(HYPS, REFS, per_pair=True)
    assert got == pytest.approx(expected, abs=1e-4)
    assert bertscore_f1(["the heart is normal"], ["the heart is normal"]) == pytest.approx(1.0, abs=1e-5)


def test_text_metrics_bundle_and_errors():
    m = text_metrics(HYPS, REFS, bertscore=False)
    assert m.n == 3 and math.isnan(m.bertscore_f1)
    assert m.bleu4 == pytest.approx(bleu4(HYPS, REFS)) and m.rouge_l == pytest.approx(rouge_l(HYPS, REFS))
    with pytest.raises(ValueError, match="pair up"):
        bleu4(["a"], ["a", "b"])
    with pytest.raises(ValueError, match="no texts"):
        rouge_l([], [])
    with pytest.raises(TypeError, match="strings"):
        meteor([None], ["a"])


@pytest.mark.parametrize("fn", [text_metrics, bleu4, rouge_l, meteor, bertscore_f1])
def test_a_bare_string_is_refused_not_scored_per_character(fn):
    kwargs = {"bertscore": False} if fn is text_metrics else {}
    with pytest.raises(TypeError, match="list of strings"):
        fn("abc", "abd", **kwargs)
    with pytest.raises(TypeError, match="references.*list of strings"):
        fn(["abc"], "abd", **kwargs)
    with pytest.raises(TypeError, match="hypotheses.*list of strings"):
        fn(b"abc", ["abd"], **kwargs)


def test_bleu4_of_identical_texts_is_exactly_one_and_never_above():
    """sacrebleu's score of identical texts is 100.00000000000004 (its float arithmetic): divided by 100 that was
    1.0000000000000004, above the documented 0-1 scale. Clamped to [0, 1]; other values are sacrebleu's / 100."""
    import sacrebleu

    from medquant.eval.text import bleu4

    same = ["the heart is normal in size and the lungs are clear", "no acute cardiopulmonary abnormality ."]
    assert bleu4(same, same) == 1.0
    hyps = ["the heart is normal in size", "no acute abnormality ."]
    assert bleu4(hyps, same) == sacrebleu.corpus_bleu(hyps, [same], lowercase=True).score / 100.0 < 1.0
