"""Rule-based CheXpert-style report labeler with negation and uncertainty detection, and the parser of answers
to :func:`medquant.eval.findings.findings_prompt` built on the same rules.

One way to read findings from a vision-language model is to let it write a free-text report and label
the report (CheXbert is the usual labeler); no labeler model can be had offline, so this is a transparent
rule-based labeler in the style of the original CheXpert labeler (mention extraction, then negation /
uncertainty classification, then aggregation). Its rules were written on the ``train``/``dev`` reports of
:mod:`medquant.data.reports` only; the ``test`` split is held out.

Steps for one text:

1. lower-case, split into sentences (``.`` unless a digit follows it, as in ``1.5``, so ``"T12."`` ends a
   sentence; ``;``, ``!``, ``?``, line breaks: ``\\n``, ``\\r\\n``, a lone ``\\r``, ``\\u2028``... as
   ``str.splitlines``) and each sentence into clauses at scope breakers ("but", "however", "although", "except",
   "which", "with" (not "without"), "there is/are", "and there"); in ``mode="answer"`` also at commas, and
   ``"Finding: yes|no|possible"`` lines are rewritten to plain phrases first;
2. find mentions of each finding with :data:`medquant.eval.findings.FINDING_SYNONYMS` (word boundaries);
3. classify each mention, inside its clause: a *hard uncertainty* phrase that itself contains a negation word
   ("cannot be excluded", "not ruled out", "not definitely excluded") -> uncertain ("no definite X" is a plain
   negation, as in the CheXpert labeler); else the nearer of the last negation cue ("no", "not", "without",
   "free of", "negative for", "absence of", "resolved", "unlikely"...; "no change" / "unchanged", "has not
   (completely) resolved", "has not been removed", "partially resolved" are not negations) and the last
   uncertainty cue ("possible", "may", "could", "questionable", "question" (not "in question"), "suspicious
   for", "suspicion for", "concern for", "versus", "likely", "borderline", "rule out"...) before the mention
   decides: uncertainty cue after the negation cue -> uncertain, negation cue -> negative; else
   post-mention negation ("is not seen", "has resolved", "are absent", "is unlikely"; "unlikely" is a
   negation as in answer mode, where ``"X: unlikely"`` reads "no X") -> negative, post-mention uncertainty
   ("cannot be excluded", "is possible", "is suspected") -> uncertain; else positive;
4. aggregate per finding over mentions: positive > uncertain > negative > not mentioned (``nan``);
   ``No Finding`` = 0 when any of the 12 pathologies is positive or uncertain, else 1 (in ``"answer"`` mode 1
   only when the answer says "no finding" / "normal" / "none" or negates at least one pathology, 0 when it
   says ``"No Finding: no|false|absent|..."``, else ``nan``).

Output: float vector ``(14,)``, values 1, 0, -1, nan (see :mod:`medquant.eval.findings`).
"""
from __future__ import annotations

import itertools
import re
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from .findings import CHEXPERT_FINDINGS, FINDING_SYNONYMS, PATHOLOGIES

__all__ = ["Mention", "label_report", "label_reports", "label_text", "mentions", "parse_findings"]

_IDX = {f: i for i, f in enumerate(CHEXPERT_FINDINGS)}

_MENTION_RES: dict[str, re.Pattern] = {
    f: re.compile(r"\b(?:" + "|".join(pats) + r")\b") for f, pats in FINDING_SYNONYMS.items() if f != "No Finding"
}
_NO_FINDING_RE = re.compile(r"\b(?:no (?:acute |significant )?(?:findings?|abnormalit(?:y|ies))|no finding|"
                            r"normal (?:chest|study|radiograph|exam)|none of (?:these|the above))\b|^\s*(?:normal|none)"
                            r"\s*$")

# "has not (completely) resolved", "not yet resolved", "has not been removed", "partially resolved": still there
_NOT_GONE = (r"\b(?:(?:not|never)\s+(?:yet\s+)?(?:been\s+)?(?:completely\s+|fully\s+|entirely\s+|totally\s+)?"
             r"(?:resolved|removed|cleared)|(?:partially|partly|incompletely)\s+(?:resolved|removed|cleared))\b")
# phrases that look like negation but are not (removed before looking for negation cues)
_NOT_NEGATION = re.compile(r"\b(?:no (?:significant |interval |appreciable |definite )?(?:change|changes|increase|"
                           r"decrease|progression)(?: in| of| from)?|not (?:significantly )?(?:changed|increased)|"
                           r"unchanged|to (?:suggest|indicate))\b|" + _NOT_GONE)
_HARD_UNCERTAIN = re.compile(r"\b(?:cannot|can not|can't|could not|not) (?:be )?(?:entirely |completely |"
                             r"definitely )?(?:excluded|exclude|ruled out|rule out|differentiated)|"
                             r"\bnot (?:definitely|clearly) excluded\b|\bdifficult to (?:completely |entirely )?exclude\b")
_NEG_CUE = re.compile(r"\b(?:no|not|without|negative for|free of|clear of|absence of|absent|resolved|resolution of|"
                      r"removal of|removed|rather than|none|nor|neither|no longer|never|unlikely)\b")
_UNC_CUE = re.compile(r"\b(?:possible|possibly|probable|probably|likely|may|might|could|questionable|"
                      r"(?<!in )question(?: of)?|questioned|suspicious (?:for|of)|suspicion (?:for|of)|suspected|"
                      r"suspect|suggest|suggests|suggestive|suggesting|"
                      r"concern for|concerning for|worrisome for|versus|vs|equivocal|borderline|rule out|r/o|"
                      r"differential|consider|considered|cannot exclude|atypical|uncertain|indeterminate|"
                      r"not excluded|may represent|could represent|presumably|presumed)\b")
_POST_NEG = re.compile(r"^[^.]{0,40}?\b(?:(?:is|are|was|were|has been|have been)\s+)?(?:not (?:seen|identified|"
                       r"present|visualized|evident|appreciated|demonstrated|noted|detected)|absent|resolved|"
                       r"has resolved|have resolved|no longer (?:seen|present|visualized)|removed|unlikely)\b")
_POST_UNC = re.compile(r"^[^.]{0,40}?\b(?:cannot be (?:excluded|ruled out)|can not be (?:excluded|ruled out)|"
                       r"(?:is|are) not excluded|(?:is|are) (?:possible|suspected|questioned|likely|probable)|"
                       r"not (?:entirely )?excluded|(?:is|are) difficult to exclude)\b")
_BREAK = re.compile(r"\b(?:but|however|although|though|except|whereas|which|while|nonetheless|yet)\b|"
                    r"\bwith(?!out)\b|\band there\b|\bthere (?:is|are|has been|have been)\b|"
                    r"\b(?:otherwise)\b")
_NOT_GONE_RE = re.compile(_NOT_GONE)
_SENT_SPLIT = re.compile(r"\.(?!\d)|[;!?\n]|\s\d+\)\s|(?:^|\s)\d+\.\s")
_KEY_VALUE = re.compile(r"^\s*(?:[-*•]\s*|\d+[.)]\s*)?([a-z][a-z /()-]+?)\s*[:=-]\s*(yes|no|present|absent|positive|"
                        r"negative|possible|uncertain|unlikely|not present|none|maybe|likely|probable|true|false)\b",
                        re.MULTILINE)
_KV_MAP = {"yes": "{}", "present": "{}", "positive": "{}", "true": "{}", "likely": "likely {}",
           "probable": "probable {}", "no": "no {}", "absent": "no {}", "negative": "no {}", "not present": "no {}",
           "none": "no {}", "false": "no {}", "unlikely": "no {}", "possible": "possible {}",
           "uncertain": "possible {}", "maybe": "possible {}"}
_NO_FINDING_KEY = re.compile(r"no (?:acute )?findings?")


@dataclass(frozen=True)
class Mention:
    """One finding mention: the finding, the matched text, its clause and the label it got (1, 0 or -1).

    Attributes:
        finding: the CheXpert finding.
        text: the matched text.
        clause: the clause it was matched in.
        label: 1 positive, 0 negated, -1 uncertain.
    """

    finding: str
    text: str
    clause: str
    label: int


def _normalise(text: str) -> str:
    # every line break ("\r\n", a lone "\r", "\u2028"... as str.splitlines) becomes "\n", which ends a sentence
    t = "\n".join(text.lower().replace("\u2019", "'").splitlines())
    t = re.sub(r"[ \t]+", " ", t)
    return t


def _says_no_finding_is_absent(text: str) -> bool:
    """Whether a normalised answer holds a ``"No Finding: no|false|absent|..."`` line."""
    return any(_NO_FINDING_KEY.fullmatch(m.group(1).strip()) and _KV_MAP[m.group(2)].startswith("no ")
               for m in _KEY_VALUE.finditer(text))


def _rewrite_key_values(text: str) -> str:
    def repl(m: re.Match) -> str:
        key, value = m.group(1).strip(), _KV_MAP[m.group(2)]
        if _NO_FINDING_KEY.fullmatch(key) and value.startswith("no "):
            return "abnormal."  # "No Finding: no" is not "no finding" (label_text sets No Finding = 0)
        return value.format(key) + "."
    return _KEY_VALUE.sub(repl, text)


def _clauses(text: str, mode: str) -> list[str]:
    out: list[str] = []
    for sent in _SENT_SPLIT.split(text):
        parts = [sent]
        if mode == "answer":
            parts = [p for s in parts for p in re.split(r",|\band\b", s)]
        for part in parts:
            starts = [0] + [m.start() for m in _BREAK.finditer(part) if m.start() > 0] + [len(part)]
            for a, b in itertools.pairwise(starts):
                c = part[a:b].strip(" ,:")
                if c:
                    out.append(c)
    return out


def _classify(clause: str, start: int, end: int) -> int:
    before = _NOT_NEGATION.sub(lambda m: "#" * len(m.group(0)), clause[:start])
    after = _NOT_GONE_RE.sub(lambda m: "#" * len(m.group(0)), clause[end:])
    if _HARD_UNCERTAIN.search(before):
        return -1
    neg = [m.end() for m in _NEG_CUE.finditer(before)]
    unc = [m.end() for m in _UNC_CUE.finditer(before)]
    last_neg = neg[-1] if neg else -1
    last_unc = unc[-1] if unc else -1
    if last_unc > last_neg:
        return -1
    if last_neg >= 0:
        return 0
    if _POST_UNC.search(after):
        return -1
    if _POST_NEG.search(after):
        return 0
    return 1


def mentions(text: str, mode: str = "report") -> list[Mention]:
    """Every finding mention in ``text`` with its clause and label (for inspecting the labeler's decisions).

    Args:
        text: the report or answer.
        mode: ``"report"`` or ``"answer"``.

    Returns:
        The :class:`Mention` of every match, clause by clause.

    Raises:
        ValueError: an unknown ``mode``.
        TypeError: ``text`` is not a string.
    """
    if mode not in ("report", "answer"):
        raise ValueError(f"mode must be 'report' or 'answer', got {mode!r}")
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    t = _normalise(text)
    if mode == "answer":
        t = _rewrite_key_values(t)
    found: list[Mention] = []
    for clause in _clauses(t, mode):
        for finding, pat in _MENTION_RES.items():
            for m in pat.finditer(clause):
                found.append(Mention(finding, m.group(0), clause, _classify(clause, m.start(), m.end())))
    return found


def label_text(text: str, mode: str = "report") -> np.ndarray:
    """Three-valued 14-vector (1, 0, -1, nan) for a report (``mode="report"``) or a findings answer.

    Args:
        text: the report or answer.
        mode: ``"report"`` or ``"answer"``.

    Returns:
        ``(14,)`` float array in CHEXPERT_FINDINGS order.
    """
    vec = np.full(len(CHEXPERT_FINDINGS), np.nan)
    rank = {1: 3, -1: 2, 0: 1}
    for m in mentions(text, mode):
        i = _IDX[m.finding]
        if np.isnan(vec[i]) or rank[m.label] > rank[int(vec[i])]:
            vec[i] = m.label
    path = np.array([vec[_IDX[p]] for p in PATHOLOGIES])
    if np.any((path == 1) | (path == -1)):
        vec[0] = 0
    elif mode == "report":
        vec[0] = 1
    elif _says_no_finding_is_absent(_normalise(text)):
        vec[0] = 0
    else:
        explicit = any(_NO_FINDING_RE.search(c) for c in _clauses(_normalise(text), "report"))
        vec[0] = 1 if (explicit or np.any(path == 0)) else np.nan
    return vec


def label_report(text: str) -> np.ndarray:
    """:func:`label_text` in report mode.

    Args:
        text: a free-text radiology report (or its impression).

    Returns:
        ``(14,)`` float array in :data:`CHEXPERT_FINDINGS` order: 1 present, 0 absent, -1 uncertain, nan not
        mentioned.
    """
    return label_text(text, mode="report")


def label_reports(texts: Iterable[str], mode: str = "report") -> np.ndarray:
    """Stack :func:`label_text` over many texts: ``(n, 14)`` float array.

    Args:
        texts: the texts.
        mode: ``"report"`` (free reports) or ``"answer"`` (answers to the findings prompt).

    Returns:
        ``(n, 14)`` float array, one :func:`label_text` row per text.
    """
    rows = [label_text(t, mode) for t in texts]
    return np.stack(rows) if rows else np.zeros((0, len(CHEXPERT_FINDINGS)))


def parse_findings(answer: str) -> np.ndarray:
    """Turn a model's answer to :func:`medquant.eval.findings.findings_prompt` into a three-valued 14-vector.

    1 positive, 0 negated, -1 uncertain, nan not mentioned (:func:`label_text` in ``"answer"`` mode).

    Accepts comma/line/semicolon separated lists, ``"Finding: yes|no|present|absent|possible"`` key-value
    answers, numbered lists, synonyms and plurals ("effusions", "enlarged heart"), negation ("no pleural
    effusion", "without pneumothorax", "pneumothorax: absent") and uncertainty ("possible", "cannot exclude",
    "may represent"). Every finding name of :func:`medquant.eval.findings.findings_prompt` is recognised.
    Findings the answer does not mention are ``nan``. ``No Finding`` is set from the 12 pathologies when any of
    them is positive or uncertain; otherwise it is 1 only if the answer says so ("No Finding", "normal", "none"),
    and 0 when the answer says ``"No Finding: no"`` (or false, absent...).

    Args:
        answer: the model's answer.

    Returns:
        ``(14,)`` float array in CHEXPERT_FINDINGS order.

    Raises:
        TypeError: ``answer`` is not a string.
    """
    if not isinstance(answer, str):
        raise TypeError(f"answer must be a str, got {type(answer).__name__}")
    return label_text(answer, mode="answer")
