"""Rule-based CheXpert-style report labeler with negation and uncertainty detection, and the parser of answers
to :func:`medquant.eval.findings.findings_prompt` built on the same rules.

One way to read findings from a vision-language model is to let it write a free-text report and label
the report (CheXbert is the usual labeler); no labeler model can be had offline, so this is a transparent
rule-based labeler in the style of the original CheXpert labeler (mention extraction, then negation /
uncertainty classification, then aggregation). Its rules were written on the ``train``/``dev`` reports of
:mod:`medquant.data.reports` only; the ``test`` split is held out.

Steps for one text:

1. lower-case, read every run of whitespace other than a line break (tab, no-break space...) as one space, split
   into sentences (``.`` unless a digit follows it, as in ``1.5``, so ``"T12."`` ends a
   sentence; ``;``, ``!``, ``?``, line breaks: ``\\n``, ``\\r\\n``, a lone ``\\r``, ``\\u2028``... as
   ``str.splitlines``) and each sentence into clauses at scope breakers ("but", "however", "although", "except",
   "which", "with" (not "without"), "there is/are", "and there", and a comma before a new clause: a subject led by
   a determiner or pronoun and its verb (``"no pneumothorax, the heart is enlarged"``), or a bare subject of up to
   three words whose copula does not close a list (``"..., heart is enlarged"``, not ``"..., effusion is seen"``);
   a comma inside a list of findings (``"no pneumothorax, effusion, or consolidation"``) continues the scope); in
   ``mode="answer"`` also at every comma, and ``"Finding: yes|no|possible"`` pairs (at a line start, after ``,`` /
   ``;`` or an inline list number: ``"Atelectasis: yes, Edema: no"``) are rewritten to plain phrases first;
2. find mentions of each finding with :data:`medquant.eval.findings.FINDING_SYNONYMS` (word boundaries); edema of
   the soft tissues ("soft tissue", "subcutaneous", "subglottic", "chest wall" edema) is no ``Edema`` mention;
3. classify each mention, inside its clause: a *hard uncertainty* phrase that itself contains a negation word
   ("cannot be excluded", "not ruled out", "not definitely excluded") -> uncertain ("no definite X" is a plain
   negation, as in the CheXpert labeler); else the nearer of the last negation cue ("no", "not", "without",
   "free of", "negative for", "absence of", "resolved", "unlikely"...; "no change" / "unchanged", "has not
   (completely) resolved", "has not been removed", "partially resolved", "not seen / present on (the) prior /
   previous / comparison ..." (a new finding) are not negations) and the last
   uncertainty cue ("possible", "may", "could", "questionable", "question" (not "in question"), "suspicious
   for", "suspicion for", "concern for", "versus", "likely", "borderline", "indeterminate" (not "age-indeterminate"
   / "indeterminate age", which dates the finding), "rule out", "limited evaluation for" within four words of the
   mention...) before the mention
   decides: uncertainty cue after the negation cue -> uncertain, negation cue -> negative; else
   post-mention uncertainty ("cannot be excluded", "is possible", "is suspected", "may be present",
   "evaluation for X is limited") -> uncertain, post-mention negation ("is not seen", "has resolved", "has
   cleared", "are absent", "is unlikely"; "unlikely" is a negation as in answer mode, where ``"X: unlikely"``
   reads "no X"; "has not cleared", "has partially cleared", "not seen on prior exams" are not) -> negative;
   else positive;
4. aggregate per finding over mentions: positive > uncertain > negative > not mentioned (``nan``);
   ``No Finding`` = 0 when any of the 12 pathologies is positive or uncertain, else 1 (in ``"answer"`` mode 1
   only when the answer says "no finding" / "normal" / "none" / ``"Findings: none"`` or negates at least one
   pathology, 0 when it says ``"No Finding: no|false|absent|..."``, else ``nan``).

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
# "not seen / present ... on the prior (study)": a new finding, no negation
_NOT_ON_PRIOR = (r"\bnot\s+(?:been\s+)?(?:seen|visuali[sz]ed|present|identified|evident|demonstrated|noted|apparent|"
                 r"appreciated|detected|visible)\s+(?:on|in)\s+(?:the\s+|any\s+)?(?:prior|previous|preceding|earlier|"
                 r"old|comparison)\b")
# phrases that look like negation but are not (removed before looking for negation cues)
_NOT_NEGATION = re.compile(r"\b(?:no (?:significant |interval |appreciable |definite )?(?:change|changes|increase|"
                           r"decrease|progression)(?: in| of| from)?|not (?:significantly )?(?:changed|increased)|"
                           r"unchanged|to (?:suggest|indicate))\b|" + _NOT_GONE + "|" + _NOT_ON_PRIOR)
_HARD_UNCERTAIN = re.compile(r"\b(?:cannot|can not|can't|could not|not) (?:be )?(?:entirely |completely |"
                             r"definitely )?(?:excluded|exclude|ruled out|rule out|differentiated)|"
                             r"\bnot (?:definitely|clearly) excluded\b|\bdifficult to (?:completely |entirely )?exclude\b")
_NEG_CUE = re.compile(r"\b(?:no|not|without|negative for|free of|clear of|absence of|absent|resolved|resolution of|"
                      r"removal of|removed|rather than|none|nor|neither|no longer|never|unlikely)\b")
_UNC_CUE = re.compile(r"\b(?:possible|possibly|probable|probably|likely|may|might|could|questionable|"
                      r"(?<!in )question(?: of)?|questioned|suspicious (?:for|of)|suspicion (?:for|of)|suspected|"
                      r"suspect|suggest|suggests|suggestive|suggesting|"
                      r"concern (?:is |was )?for|concerning for|worrisome for|versus|vs|equivocal|borderline|rule out|r/o|"
                      r"differential|consider|considered|cannot exclude|atypical|uncertain|(?<!age-)(?<!age )indeterminate(?! age)|"
                      r"not excluded|may represent|could represent|presumably|presumed)\b")
_POST_NEG = re.compile(r"^[^.]{0,40}?\b(?:(?:is|are|was|were|has been|have been)\s+)?(?:not (?:seen|identified|"
                       r"present|visualized|evident|appreciated|demonstrated|noted|detected)|absent|resolved|"
                       r"has resolved|have resolved|no longer (?:seen|present|visualized)|removed|unlikely|"
                       r"(?:has|have|had) (?:since |now |completely |entirely |fully )?(?:cleared|resolved))\b")
_POST_UNC = re.compile(r"^[^.]{0,40}?\b(?:cannot be (?:excluded|ruled out)|can not be (?:excluded|ruled out)|"
                       r"(?:is|are) not excluded|(?:is|are) (?:possible|suspected|questioned|likely|probable)|"
                       r"(?:may|might|could) (?:also |possibly )?be (?:present|seen|noted|identified|visuali[sz]ed)|"
                       r"not (?:entirely )?excluded|(?:is|are) difficult to exclude)\b")
# a comma ends the scope only before a new clause: a subject led by a determiner or pronoun (up to four more words)
# and its verb ("..., the heart is enlarged"), or a bare subject of up to three words whose copula does not close a
# list ("..., heart is enlarged", not "..., pleural effusion is seen / is suspected", which reads as the end of a
# negated list); a subject holding "and" / "or" belongs to a list
_LIST_WORD = r"(?:(?!(?:and|or|nor|no|not|without)\b)[a-z/-]+\s+)"
_CLAUSE_VERB = (r"(?:is|are|was|were|has|have|had|appears?|remains?|measures?|projects?|terminates?|overlies|overlie|"
                r"extends?|demonstrates?|shows?|suggests?)\b")
_LIST_PREDICATE = (r"(?:(?:not|also|again|now|clearly|definitely|well|newly)\s+)*(?:seen|identified|noted|"
                   r"demonstrated|present|evident|visuali[sz]ed|visible|appreciated|detected|shown|demonstrable|observed|"
                   r"suspected|possible|likely|probable|questioned|excluded)\b")
_CLAUSE_COMMA = (r",(?=\s*(?:the|this|these|that|those|it|its|a|an)\s+" + _LIST_WORD + r"{0,4}?" + _CLAUSE_VERB + r")|"
                 r",(?=\s*" + _LIST_WORD + r"{1,3}?(?:is|are|was|were|appears?|remains?)\s+(?!" + _LIST_PREDICATE + r"))")
_BREAK = re.compile(r"\b(?:but|however|although|though|except|whereas|which|while|nonetheless|yet)\b|"
                    r"\bwith(?!out)\b|\band there\b|\bthere (?:is|are|has been|have been)\b|"
                    r"\b(?:otherwise)\b|" + _CLAUSE_COMMA)
# "limited evaluation for X", "limits assessment of the ... X" (up to four words between), "evaluation for X is
# limited": X uncertain (the CheXpert labeler's "X is poorly / incompletely evaluated")
_EVALUATION = r"(?:evaluation|assessment|visuali[sz]ation|examination)\s+(?:of|for)\b"
_LIMITED_PRE = re.compile(r"\blimit(?:ed|s|ing)?\s+(?:[a-z]+\s+)?" + _EVALUATION + r"(?=(?:\s+[a-z/-]+){0,4}\s*$)")
_EVALUATION_PRE = re.compile(r"\b" + _EVALUATION + r"(?:\s+[a-z/-]+){0,4}\s*$")
_LIMITED_POST = re.compile(r"^\s*(?:is|are|was|were)\s+(?:somewhat\s+|markedly\s+|mildly\s+|severely\s+)?limited\b")
# edema of the soft tissues is no pulmonary edema (the CheXpert finding)
_NOT_PULMONARY_PRE = re.compile(r"\b(?:soft[- ]tissues?|subcutaneous|subglottic|chest wall|prevertebral)\s+$")
_NOT_PULMONARY_POST = re.compile(r"^\s+(?:of|in|within|involving)\s+(?:the\s+)?(?:[a-z]+\s+){0,2}?"
                                 r"(?:soft[- ]tissues?|subcutaneous|chest wall)\b")
# masked after a mention before looking for post-mention cues: still there / new since the prior study
_POST_MASK = re.compile(_NOT_GONE + "|" + _NOT_ON_PRIOR)
_SENT_SPLIT = re.compile(r"\.(?!\d)|[;!?\n]|\s\d+\)\s|(?:^|\s)\d+\.\s")
# a "Finding: value" pair starts a line ("Edema: no", "- Edema - no", "2) Edema = no"), or follows a "," or ";"
# ("Atelectasis: yes, Edema: no") or is an inline numbered item ("1. Cardiomegaly: yes 2. Edema: no") with ":" or
# "=" (a "-" inside a line is a hyphen: "effusion, right-no pneumothorax"); groups: key (``line_key`` or
# ``inline_key``) and ``value``
_KV_KEY = r"[a-z][a-z /()-]+?"
_KEY_VALUE = re.compile(r"(?:^\s*(?:[-*•]\s*|\d+[.)]\s*)?(?P<line_key>" + _KV_KEY + r")\s*[:=-]|"
                        r"(?:(?<=[,;])|(?<=\s)(?=\d+[.)]\s))\s*(?:\d+[.)]\s*)?(?P<inline_key>" + _KV_KEY + r")\s*[:=])"
                        r"\s*(?P<value>yes|no|present|absent|positive|negative|possible|uncertain|unlikely|not present|"
                        r"none|maybe|likely|probable|true|false)\b", re.MULTILINE)
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
    # every line break ("\r\n", a lone "\r", "\u2028"... as str.splitlines) becomes "\n", which ends a sentence;
    # every run of other whitespace (tab, no-break space U+00A0, thin space, ideographic space...) one " "
    t = "\n".join(text.lower().replace("\u2019", "'").splitlines())
    t = re.sub(r"[^\S\n]+", " ", t)
    return t


def _key_value(m: re.Match) -> tuple[str, str]:
    """The key and the phrase template (:data:`_KV_MAP`) of a :data:`_KEY_VALUE` match."""
    return (m.group("line_key") or m.group("inline_key")).strip(), _KV_MAP[m.group("value")]


def _says_no_finding_is_absent(text: str) -> bool:
    """Whether a normalised answer holds a ``"No Finding: no|false|absent|..."`` pair."""
    return any(_NO_FINDING_KEY.fullmatch(key) and value.startswith("no ")
               for key, value in map(_key_value, _KEY_VALUE.finditer(text)))


def _rewrite_key_values(text: str) -> str:
    def repl(m: re.Match) -> str:
        key, value = _key_value(m)
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
    after = _POST_MASK.sub(lambda m: "#" * len(m.group(0)), clause[end:])
    if _HARD_UNCERTAIN.search(before):
        return -1
    neg = [m.end() for m in _NEG_CUE.finditer(before)]
    unc = [m.end() for m in _UNC_CUE.finditer(before)]
    unc += [m.end() for m in _LIMITED_PRE.finditer(before)]
    last_neg = neg[-1] if neg else -1
    last_unc = unc[-1] if unc else -1
    if last_unc > last_neg:
        return -1
    if last_neg >= 0:
        return 0
    if _POST_UNC.search(after) or (_LIMITED_POST.search(after) and _EVALUATION_PRE.search(before)):
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
                if finding == "Edema" and (_NOT_PULMONARY_PRE.search(clause[:m.start()])
                                           or _NOT_PULMONARY_POST.search(clause[m.end():])):
                    continue
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
        # on the answer with its key-value pairs rewritten too ("Findings: none" -> "no findings")
        t = _normalise(text)
        explicit = any(_NO_FINDING_RE.search(c) for c in _clauses(t, "report") + _clauses(_rewrite_key_values(t),
                                                                                         "report"))
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

    Raises:
        TypeError: ``texts`` is a single string (label it with :func:`label_text`, or pass ``[text]``), or one of
            the texts is not a string.
        ValueError: an unknown ``mode``.
    """
    if isinstance(texts, (str, bytes)):
        raise TypeError(f"texts must be a sequence of texts, got a single {type(texts).__name__} (pass [text])")
    if mode not in ("report", "answer"):
        raise ValueError(f"mode must be 'report' or 'answer', got {mode!r}")
    rows = [label_text(t, mode) for t in texts]
    return np.stack(rows) if rows else np.zeros((0, len(CHEXPERT_FINDINGS)))


def parse_findings(answer: str) -> np.ndarray:
    """Turn a model's answer to :func:`medquant.eval.findings.findings_prompt` into a three-valued 14-vector.

    1 positive, 0 negated, -1 uncertain, nan not mentioned (:func:`label_text` in ``"answer"`` mode).

    Accepts comma/line/semicolon separated lists, ``"Finding: yes|no|present|absent|possible"`` key-value
    answers (one per line, or several on a line after ``,`` / ``;`` / inline numbers), numbered lists, synonyms and plurals ("effusions", "enlarged heart"), negation ("no pleural
    effusion", "without pneumothorax", "pneumothorax: absent") and uncertainty ("possible", "cannot exclude",
    "may represent"). Every finding name of :func:`medquant.eval.findings.findings_prompt` is recognised.
    Findings the answer does not mention are ``nan``. ``No Finding`` is set from the 12 pathologies when any of
    them is positive or uncertain; otherwise it is 1 only if the answer says so ("No Finding", "normal", "none",
    "Findings: none") or negates a pathology,
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
