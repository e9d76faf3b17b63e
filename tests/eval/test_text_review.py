"""Text metrics on real IU X-ray impressions and edge cases against the reference libraries configured as the
module docstring says (sacrebleu corpus BLEU, rouge_score ROUGE-L, NLTK METEOR on medquant's tokens), the
edge cases the docstring states, and no process-wide side effect of BERTScore."""
from __future__ import annotations

import os
import re

import pytest

from medquant.eval import text as T

EDGE = [("", "no acute disease"), ("no acute disease", ""), ("", ""), ("...", "..."), ("!", "?"),
        ("Normal.", "normal ."), ("épanchement pleural", "épanchement pleural"), ("1 cm", "1 cm"),
        ("Right-sided 3.5cm opacity.", "right sided 3.5 cm opacity"), ("NO ACUTE DISEASE", "no acute disease")]


@pytest.fixture(scope="module")
def pairs():
    from medquant.data import DataDirNotSet
    from medquant.data.reports import load_iu_reports

    try:
        reps = [r for r in load_iu_reports() if r.impression and r.findings][:60]
    except (FileNotFoundError, DataDirNotSet):
        pytest.skip("IU reports not in $MEDQUANT_DATA_DIR")
    hyps = [r.impression for r in reps[:30]] + [r.findings for r in reps[:10]] + [h for h, _ in EDGE]
    refs = [r.impression for r in reps[30:60]] + [r.findings.split(". ")[0] for r in reps[:10]] + [r for _, r in EDGE]
    return hyps, refs


class _NoWordNet:
    def synsets(self, *args, **kwargs):
        return []


def test_every_metric_equals_its_reference_library_on_real_reports(pairs):
    import sacrebleu
    from nltk.translate.meteor_score import meteor_score
    from rouge_score import rouge_scorer

    hyps, refs = pairs
    # BLEU-4: one corpus score (pooled n-gram counts), not a mean of sentence scores
    assert T.bleu4(hyps, refs) == sacrebleu.corpus_bleu(hyps, [refs], lowercase=True).score / 100
    sent = sum(sacrebleu.sentence_bleu(h, [r], lowercase=True).score for h, r in zip(hyps, refs)) / 100 / len(hyps)
    assert abs(T.bleu4(hyps, refs) - sent) > 1e-3
    for stem in (True, False):
        sc = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=stem)
        want = sum(sc.score(r, h)["rougeL"].fmeasure for h, r in zip(hyps, refs)) / len(hyps)
        assert T.rouge_l(hyps, refs, stem=stem) == pytest.approx(want, abs=1e-12)
    if T.meteor_variant() == "exact+stem":

        def tok(s):
            return re.findall(r"\w+|[^\w\s]", s.lower())

        want = [meteor_score([tok(r)], tok(h), wordnet=_NoWordNet()) if tok(h) and tok(r) else 0.0
                for h, r in zip(hyps, refs)]
        assert T.meteor(hyps, refs) == pytest.approx(sum(want) / len(want), abs=1e-12)


def test_documented_edge_cases():
    import sacrebleu

    # identical texts: BLEU 1 when the corpus has 4-grams; none at all (every text under 4 tokens) gives 0, as
    # sacrebleu's corpus_bleu (no effective order), however identical the texts
    assert T.bleu4(["no acute disease seen", "normal"], ["no acute disease seen", "normal"]) == 1.0
    short = ["no acute disease", "normal"]
    assert T.bleu4(short, short) == sacrebleu.corpus_bleu(short, [short]).score == 0.0
    # METEOR of identical texts is below 1: one chunk of m matches still costs gamma / m^3
    assert T.meteor(["normal"], ["normal"]) == pytest.approx(1 - 0.5)
    assert T.meteor(["no acute disease"], ["no acute disease"]) == pytest.approx(1 - 0.5 / 27)
    # ROUGE-L keeps ASCII letters and digits only: accented and non-Latin letters are dropped
    assert T.rouge_l(["épanchement"], ["panchement"]) == 1.0
    assert T.rouge_l(["肺 正常"], ["肺 正常"]) == 0.0
    assert T.meteor(["肺 正常"], ["肺 正常"]) == pytest.approx(1 - 0.5 / 8)
    # punctuation-only texts: BLEU and ROUGE-L 0 here; METEOR counts punctuation tokens
    assert T.rouge_l(["..."], ["..."]) == 0.0 and T.meteor(["..."], ["..."]) > 0.9


def test_bertscore_does_not_switch_the_process_offline(monkeypatch):
    """bertscore_f1 used to ``os.environ.setdefault("HF_HUB_OFFLINE", "1")``: every later Hugging Face download of
    the process (or of its subprocesses) failed. A local encoder folder needs no such switch."""
    pytest.importorskip("bert_score")
    try:
        T.minilm_path()
    except (ModuleNotFoundError, FileNotFoundError):
        pytest.skip("no local MiniLM encoder")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    got = T.bertscore_f1(["no acute disease", ""], ["no acute disease", "normal"], per_pair=True)
    assert "HF_HUB_OFFLINE" not in os.environ
    assert got[0] == pytest.approx(1.0, abs=1e-5) and got[1] == 0.0


def test_bertscore_batch_size_reaches_the_encoder():
    """``bertscore_f1(batch_size=...)`` went to ``BERTScorer(batch_size=...)``, which ``BERTScorer.score`` ignores (its
    own ``batch_size`` argument, default 64, is what batches the encoder): every call ran in batches of 64."""
    pytest.importorskip("bert_score")
    try:
        path = str(T.minilm_path())
    except (ModuleNotFoundError, FileNotFoundError):
        pytest.skip("no local MiniLM encoder")
    hyps = [f"there is a {w} opacity" for w in ("small", "large", "faint", "left", "right")]
    refs = [f"no {w} effusion" for w in ("small", "large", "pleural", "left", "right")]
    want = T.bertscore_f1(hyps, refs, per_pair=True)  # builds (or reuses) the cached scorer
    scorer = next(s for (p, _), s in T._SCORERS.items() if p == path)
    seen: list[int] = []
    handle = scorer._model.register_forward_pre_hook(lambda mod, args, kwargs: seen.append(
        (args[0] if args else kwargs["input_ids"]).shape[0]), with_kwargs=True)
    try:
        got = T.bertscore_f1(hyps, refs, batch_size=3, per_pair=True)
    finally:
        handle.remove()
    assert seen and max(seen) <= 3 and sum(seen) == 10  # 10 distinct texts, in batches of at most 3
    assert got == pytest.approx(want, abs=1e-5)  # batching does not change the scores
