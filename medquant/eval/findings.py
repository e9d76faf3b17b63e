"""The 14 CheXpert findings: names, the prompt that asks a vision-language model which of them an image shows,
the mapping from the IU reports' MeSH terms to the findings, multi-label precision / recall / F1, and per-label /
macro ROC AUC of scores (:func:`multilabel_auc`).

The answer to :func:`findings_prompt` is parsed by :func:`medquant.eval.labeler.parse_findings` (the report
labeler's rules in answer mode).

Label vectors have one entry per :data:`CHEXPERT_FINDINGS` entry, in CheXpert's order. Three-valued vectors
(from the parser and the labeler) use ``1`` positive, ``0`` negative (mentioned and negated), ``-1``
uncertain and ``nan`` not mentioned; :func:`binarize` turns them into 0/1 with uncertain counted as positive
(``uncertain="positive"``, CheXpert's "U-Ones") or negative.

``No Finding`` follows CheXpert: positive when none of the 12 pathologies (everything except ``No Finding``
and ``Support Devices``) is positive or uncertain.

MeSH mapping (:data:`MESH_MAP`): an IU MeSH term is ``"Heading/qualifier/qualifier..."``. A term maps to a
finding when its heading is listed for that finding and, where the table names qualifiers, one of them is
present (e.g. ``"Cardiac Shadow/enlarged"`` -> Cardiomegaly, but ``"Cardiac Shadow"`` alone -> nothing).
Headings and qualifiers are compared case-insensitively, with runs of whitespace read as one space (the IU index
spells some headings in two cases, e.g. ``"Thoracic Vertebrae"`` / ``"Thoracic vertebrae"``).
Headings not in the table (emphysema, degenerative spine, calcinosis, scarring...) are not CheXpert findings
and map to nothing. Reports indexed ``"No Indexing"`` have no usable labels (:func:`mesh_labels` returns
``None``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

__all__ = [
    "CHEXPERT_FINDINGS",
    "FINDING_SYNONYMS",
    "MESH_MAP",
    "PATHOLOGIES",
    "MultilabelAUC",
    "MultilabelScores",
    "binarize",
    "findings_prompt",
    "mesh_labels",
    "mesh_table_markdown",
    "multilabel_auc",
    "multilabel_scores",
]

CHEXPERT_FINDINGS: tuple[str, ...] = (
    "No Finding", "Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Opacity", "Lung Lesion", "Edema",
    "Consolidation", "Pneumonia", "Atelectasis", "Pneumothorax", "Pleural Effusion", "Pleural Other",
    "Fracture", "Support Devices",
)
#: The 12 pathologies whose absence defines "No Finding".
PATHOLOGIES: tuple[str, ...] = tuple(f for f in CHEXPERT_FINDINGS if f not in ("No Finding", "Support Devices"))

#: heading -> (finding, qualifiers that must be present or None for "any").
MESH_MAP: dict[str, list[tuple[str, tuple[str, ...] | None]]] = {
    "Mediastinum": [("Enlarged Cardiomediastinum", ("enlarged", "prominent", "widened", "large"))],
    "Cardiomegaly": [("Cardiomegaly", None)],
    # "borderline" as for "Cardiomegaly/borderline" (any qualifier) and "Cardiac Shadow/enlarged/borderline"
    "Cardiac Shadow": [("Cardiomegaly", ("enlarged", "large", "borderline"))],
    "Heart": [("Cardiomegaly", ("enlarged", "large"))],
    "Opacity": [("Lung Opacity", None)],
    "Airspace Disease": [("Lung Opacity", None)],
    "Infiltrate": [("Lung Opacity", None)],
    "Density": [("Lung Opacity", None)],
    "Lung Diseases, Interstitial": [("Lung Opacity", None)],
    "Nodule": [("Lung Lesion", None)],
    "Mass": [("Lung Lesion", None)],
    "Calcified Granuloma": [("Lung Lesion", None)],
    "Granuloma": [("Lung Lesion", None)],
    "Cavitation": [("Lung Lesion", None)],
    "Pulmonary Edema": [("Edema", None)],
    "Edema": [("Edema", None)],
    "Pulmonary Congestion": [("Edema", None)],
    "Heart Failure": [("Edema", None)],
    "Consolidation": [("Consolidation", None)],
    "Pneumonia": [("Pneumonia", None)],
    "Pulmonary Atelectasis": [("Atelectasis", None)],
    "Atelectasis": [("Atelectasis", None)],
    "Pneumothorax": [("Pneumothorax", None)],
    "Hydropneumothorax": [("Pneumothorax", None), ("Pleural Effusion", None)],
    # blood in the pleural space is pleural fluid (as PadChest: hemothorax -> pleural effusion)
    "Hemopneumothorax": [("Pneumothorax", None), ("Pleural Effusion", None)],
    "Hemothorax": [("Pleural Effusion", None)],
    "Pleural Effusion": [("Pleural Effusion", None)],
    # a blunted costophrenic angle / sulcus / pleural space (not an obscured one)
    "Costophrenic Angle": [("Pleural Effusion", ("blunted",))],
    "Sulcus": [("Pleural Effusion", ("blunted",))],
    "Thickening": [("Pleural Other", ("pleura",))],
    "Pleura": [("Pleural Other", ("thickening", "thickened")), ("Pleural Effusion", ("blunted",))],
    "Fractures, Bone": [("Fracture", None)],
    "Catheters, Indwelling": [("Support Devices", None)],
    "Implanted Medical Device": [("Support Devices", None)],
    "Medical Device": [("Support Devices", None)],
    "Surgical Instruments": [("Support Devices", None)],
    "Tube, Inserted": [("Support Devices", None)],
    "Stents": [("Support Devices", None)],
    "Pacemaker, Artificial": [("Support Devices", None)],
}

#: Phrases (regular expressions, matched on lower-cased text at word boundaries) that mention each finding.
#: Shared by the answer parser and the report labeler. Plurals / spellings found on the train / dev reports only:
#: "granulomata" (plural of granuloma), "cavitations", "masslike" (as "mass-like"), "consolidating" (as
#: "consolidative" / "consolidated"), "portacath" / "portacatheter" (as "port-a-cath").
FINDING_SYNONYMS: dict[str, tuple[str, ...]] = {
    "No Finding": (r"no (acute )?findings?", r"no finding", r"normal (chest|study|radiograph|exam)",
                   r"no abnormalit(y|ies)"),
    "Enlarged Cardiomediastinum": (
        r"enlarged cardiomediastin\w*", (r"cardiomediastinal (silhouette |contour )?(is |are )?(enlarged|widened|"
        r"prominent)"), r"(widened|widening of the|enlarged|prominent) (superior )?mediastin\w*",
        r"mediastin\w* (is |are )?(widened|enlarged|prominent)", r"mediastinal widening"),
    "Cardiomegaly": (r"cardiomegaly", r"cardiac enlargement", r"enlarged (heart|cardiac (silhouette|shadow|size))",
                     (r"(heart|cardiac silhouette|cardiac shadow)( size)? (is |are )?(mildly |moderately |severely |"
                     r"markedly |slightly )?(enlarged|large)"), (r"(heart|cardiac) size (is )?(top normal|upper limits"
                     r" of normal|borderline)"), r"borderline (enlarged )?(heart|cardiac) size",
                     r"enlarged heart size", r"heart is enlarged"),
    "Lung Opacity": (r"opacit(y|ies)", r"opacification", r"infiltrates?", r"airspace (disease|process)",
                     r"air space (disease|process)", r"densit(y|ies)", (r"interstitial (disease|prominence|"
                     r"opacit\w+|infiltrate\w*|lung disease)")),
    "Lung Lesion": (r"nodules?", r"nodular (density|densities|opacit\w+)", r"masse?s?", r"masslike",
                    r"granulomas?", r"granulomata", r"lesions?", r"cavitary", r"cavitations?", r"tumou?rs?",
                    r"neoplasms?", r"carcinoma"),
    "Edema": (r"edema", r"oedema", r"(vascular|pulmonary) congestion", r"congestive heart failure", r"chf",
              r"heart failure", r"fluid overload"),
    "Consolidation": (r"consolidations?", r"consolidative", r"consolidated", r"consolidating"),
    "Pneumonia": (r"pneumonias?", r"pneumonitis"),
    "Atelectasis": (r"atelectas[ie]s", r"atelectatic", r"collapse"),
    "Pneumothorax": (r"pneumothora(x|ces|xes)", r"hydropneumothorax"),
    # a pericardial effusion is no pleural effusion (as the CheXpert labeler's "unmention" phrases)
    "Pleural Effusion": (r"(?<!pericardial )effusions?", r"pleural (and|or|and/or) pericardial effusions?",
                         r"pleural fluid", r"hydropneumothorax",
                         r"blunt(ed|ing)( of)?( the)?( (right|left|bilateral|posterior))? costophrenic",
                         r"costophrenic (angle|recess|sulcus|sulci|angles)( is| are)? blunt\w*"),
    "Pleural Other": (r"pleural other", r"pleural (thickening|plaques?|scar\w*|fibrosis|calcification)",
                      r"fibrothorax", r"pleural[- ]parenchymal scar\w*", r"pleural reaction"),
    "Fracture": (r"fractures?", r"fractured", r"fx"),
    # plurals too ("lines and tubes", "catheters"); "lines" is no device after kerley / b / septal / suture / lung
    "Support Devices": ((r"(pace ?makers?|icds?|defibrillators?|catheters?|line|(?<!kerley )(?<!b )(?<!b-)(?<!b- )"
                        r"(?<!septal )(?<!suture )(?<!lung )lines|tubes?|ports?|stents?|wires?|clips?|leads?|devices?|"
                        r"hardware|valve replacements?|prosthe\w+|piccs?|port-a-caths?|portacath(?:eter)?s?|"
                        r"sternotomy wires?)"),),
}


def findings_prompt(findings: tuple[str, ...] = CHEXPERT_FINDINGS) -> str:
    """The prompt listing ``findings`` and asking which are present.

    Parse the answer with :func:`medquant.eval.labeler.parse_findings`.

    Args:
        findings: the finding names to list.

    Returns:
        The prompt text.
    """
    listed = "\n".join(f"- {f}" for f in findings)
    return ("You are reading a chest X-ray. From the list below, name every finding that is present in the image. "
            "Answer with the names from the list, separated by commas; say 'No Finding' if none is present, and "
            "write 'possible' before a finding you are unsure of.\n" + listed)


def _norm(s: str) -> str:
    """Lower case, runs of whitespace -> one space, no leading / trailing space."""
    return " ".join(s.split()).lower()


def _heading_qualifiers(term: str) -> tuple[str, list[str]]:
    parts = [_norm(p) for p in term.split("/")]
    return parts[0], parts[1:]


def mesh_labels(terms: tuple[str, ...] | list[str]) -> np.ndarray | None:
    """Binary 14-vector from IU MeSH ``<major>`` terms through :data:`MESH_MAP`; ``None`` for "No Indexing".

    Headings and qualifiers match case-insensitively and whitespace-normalised (``"opacity / Lung"`` is
    ``"Opacity/lung"``). ``No Finding`` is 1 when no term maps to one of the 12 :data:`PATHOLOGIES`.

    Args:
        terms: the report's MeSH major terms (a sequence of strings, not one string).

    Returns:
        ``(14,)`` 0/1 array in CHEXPERT_FINDINGS order, or None (no terms, or a ``"No Indexing"`` term).

    Raises:
        TypeError: ``terms`` is a single string (it would be read character by character).
    """
    if isinstance(terms, str):
        raise TypeError("terms must be a sequence of terms, e.g. (\"Cardiomegaly/mild\",), not one string")
    terms = list(terms)
    if not terms or any(_norm(t) == "no indexing" for t in terms):
        return None
    vec = np.zeros(len(CHEXPERT_FINDINGS), dtype=np.float64)
    idx = {f: i for i, f in enumerate(CHEXPERT_FINDINGS)}
    table = {_norm(h): targets for h, targets in MESH_MAP.items()}
    for term in terms:
        heading, quals = _heading_qualifiers(term)
        for finding, need in table.get(heading, []):
            if need is None or any(_norm(q) in quals for q in need):
                vec[idx[finding]] = 1.0
    vec[0] = 0.0 if any(vec[idx[p]] == 1 for p in PATHOLOGIES) else 1.0
    return vec


def binarize(labels: np.ndarray, uncertain: str = "positive") -> np.ndarray:
    """Three-valued labels (1, 0, -1, nan) -> 0/1 ints: nan and 0 -> 0, 1 -> 1, -1 -> 1 or 0 per ``uncertain``.

    Every column, ``No Finding`` included, is mapped alike: ``No Finding`` is not recomputed from the binarized
    pathologies (with ``uncertain="negative"`` a vector whose only pathology is uncertain becomes all 0, as
    CheXpert's U-Zeros).

    Args:
        labels: array of 1 / 0 / -1 / nan (bool is read as 1 / 0).
        uncertain: ``"positive"`` (-1 counts as present) or ``"negative"``.

    Returns:
        Integer 0/1 array of the same shape.

    Raises:
        ValueError: an unknown ``uncertain`` policy, or a value other than 1, 0, -1, nan (e.g. probabilities:
            threshold them first).
    """
    if uncertain not in ("positive", "negative"):
        raise ValueError(f"uncertain must be 'positive' or 'negative', got {uncertain!r}")
    a = np.asarray(labels, dtype=np.float64)
    bad = ~(np.isin(a, (1.0, 0.0, -1.0)) | np.isnan(a))
    if bad.any():
        raise ValueError(f"labels must hold only 1, 0, -1 or nan, got {np.unique(a[bad])[:5].tolist()}")
    out = (a == 1).astype(np.int64)
    if uncertain == "positive":
        out |= (a == -1).astype(np.int64)
    return out


@dataclass
class MultilabelScores:
    """Per-finding precision / recall / F1 / support plus micro and macro averages (:func:`multilabel_scores`).

    Attributes:
        names: the findings, in column order.
        precision: per finding, ``TP / (TP + FP)`` (0 when nothing was predicted).
        recall: per finding, ``TP / (TP + FN)`` (0 when there is no positive).
        f1: per finding, the harmonic mean of precision and recall.
        support: per finding, the number of positive samples.
        micro_precision: precision of the pooled counts of every finding.
        micro_recall: recall of the pooled counts.
        micro_f1: F1 of the pooled counts.
        macro_f1: the mean of the per-finding F1.
    """

    names: tuple[str, ...]
    precision: np.ndarray
    recall: np.ndarray
    f1: np.ndarray
    support: np.ndarray
    micro_precision: float
    micro_recall: float
    micro_f1: float
    macro_f1: float

    def as_dict(self) -> dict:
        """JSON-ready scores.

        Returns:
            ``per_finding`` (precision, recall, F1, support per finding) and the micro / macro values.
        """
        per = {n: {"precision": float(p), "recall": float(r), "f1": float(f), "support": int(s)}
               for n, p, r, f, s in zip(self.names, self.precision, self.recall, self.f1, self.support)}
        return {"per_finding": per, "micro_precision": self.micro_precision, "micro_recall": self.micro_recall,
                "micro_f1": self.micro_f1, "macro_f1": self.macro_f1}

    def table(self) -> str:
        """The scores as a text table, one line per finding, then the micro and macro lines.

        Returns:
            The table.
        """
        lines = [f"{'finding':28s} {'P':>6s} {'R':>6s} {'F1':>6s} {'n':>5s}"]
        for n, p, r, f, s in zip(self.names, self.precision, self.recall, self.f1, self.support):
            lines.append(f"{n:28s} {p:6.3f} {r:6.3f} {f:6.3f} {int(s):5d}")
        lines.append(f"{'micro':28s} {self.micro_precision:6.3f} {self.micro_recall:6.3f} {self.micro_f1:6.3f}")
        lines.append(f"{'macro F1':28s} {'':6s} {'':6s} {self.macro_f1:6.3f}")
        return "\n".join(lines)


def _safe_div(a: float, b: float) -> float:
    return float(a) / float(b) if b else 0.0


def multilabel_scores(y_true: np.ndarray, y_pred: np.ndarray, names: tuple[str, ...] | None = None,
                      columns: list[int] | None = None) -> MultilabelScores:
    """Precision, recall, F1 per column and micro / macro F1 of binary label matrices ``(n, k)``.

    ``P = TP/(TP+FP)``, ``R = TP/(TP+FN)``, ``F1 = 2PR/(P+R)`` (0 where undefined, as scikit-learn's
    ``zero_division=0``); micro pools TP/FP/FN over the selected columns, macro averages the per-column F1.
    ``columns`` selects a subset (e.g. the five most frequent findings).

    Args:
        y_true: ``(n, k)`` 0/1 reference labels.
        y_pred: ``(n, k)`` 0/1 predicted labels.
        names: column names (default the first ``k`` CheXpert findings).
        columns: indices of the columns to score (default all).

    Returns:
        A :class:`MultilabelScores` (per-column precision, recall, F1, support; micro and macro F1).

    Raises:
        ValueError: the matrices are not 2-D of one shape, hold values other than 0/1, or ``names`` has the
            wrong length.
    """
    t = np.asarray(y_true)
    p = np.asarray(y_pred)
    if t.shape != p.shape or t.ndim != 2:
        raise ValueError(f"y_true and y_pred must be 2-D of the same shape, got {t.shape} and {p.shape}")
    for name, a in (("y_true", t), ("y_pred", p)):
        if not np.isin(a, (0, 1)).all():
            raise ValueError(f"{name} must hold only 0/1 (binarize three-valued labels first)")
    names = tuple(names) if names is not None else tuple(CHEXPERT_FINDINGS[: t.shape[1]])
    if len(names) != t.shape[1]:
        raise ValueError(f"{len(names)} names for {t.shape[1]} columns")
    if columns is not None:
        t, p, names = t[:, columns], p[:, columns], tuple(names[c] for c in columns)
    tp = ((t == 1) & (p == 1)).sum(0)
    fp = ((t == 0) & (p == 1)).sum(0)
    fn = ((t == 1) & (p == 0)).sum(0)
    prec = np.array([_safe_div(a, a + b) for a, b in zip(tp, fp)])
    rec = np.array([_safe_div(a, a + b) for a, b in zip(tp, fn)])
    f1 = np.array([_safe_div(2 * a, 2 * a + b + c) for a, b, c in zip(tp, fp, fn)])
    mp = _safe_div(tp.sum(), tp.sum() + fp.sum())
    mr = _safe_div(tp.sum(), tp.sum() + fn.sum())
    mf = _safe_div(2 * tp.sum(), 2 * tp.sum() + fp.sum() + fn.sum())
    return MultilabelScores(names, prec, rec, f1, t.sum(0), mp, mr, mf, float(f1.mean()) if len(f1) else math.nan)


@dataclass
class MultilabelAUC:
    """Per-label ROC AUC and their macro mean (:func:`multilabel_auc`).

    Attributes:
        names: the labels, in column order.
        auc: per label, the ROC AUC; ``nan`` for a label whose reference holds one class only (undefined).
        macro_auc: the mean of the defined per-label AUCs (``nan`` when none is defined).
        scored: the labels that entered the macro mean.
    """

    names: tuple[str, ...]
    auc: np.ndarray
    macro_auc: float
    scored: tuple[str, ...]

    def as_dict(self) -> dict:
        """JSON-ready values.

        Returns:
            ``per_label`` (AUC per label, None where undefined), ``macro_auc`` (None when undefined) and ``scored``.
        """
        def num(x: float) -> float | None:
            return None if math.isnan(x) else float(x)

        return {"per_label": {n: num(a) for n, a in zip(self.names, self.auc)}, "macro_auc": num(self.macro_auc),
                "scored": list(self.scored)}


def multilabel_auc(y_true, y_score, names: tuple[str, ...] | list[str] | None = None,
                   columns: list[int] | None = None) -> MultilabelAUC:
    """ROC AUC per label and macro AUC of multi-label scores (``sklearn.metrics.roc_auc_score`` per column).

    The AUC of a label is the probability that a random positive sample scores higher than a random negative one
    (ties count one half). A label whose reference holds only one class in these samples has no AUC: it is
    ``nan`` and left out of the macro mean (scikit-learn's ``average="macro"`` raises instead).

    Args:
        y_true: ``(n, k)`` 0/1 reference labels.
        y_score: ``(n, k)`` finite scores (probabilities or logits: only their order matters).
        names: column names (default the first ``k`` CheXpert findings).
        columns: indices of the columns to score (default all).

    Returns:
        A :class:`MultilabelAUC`.

    Raises:
        ValueError: the arrays are not 2-D of one shape, ``y_true`` holds values other than 0/1, ``y_score``
            values that are not finite, or ``names`` has the wrong length.
    """
    from sklearn.metrics import roc_auc_score

    t = np.asarray(y_true)
    s = np.asarray(y_score, dtype=np.float64)
    if t.shape != s.shape or t.ndim != 2:
        raise ValueError(f"y_true and y_score must be 2-D of the same shape, got {t.shape} and {s.shape}")
    if not np.isin(t, (0, 1)).all():
        raise ValueError("y_true must hold only 0/1 (binarize three-valued labels first)")
    if not np.isfinite(s).all():
        raise ValueError("y_score must be finite (no nan / inf)")
    names = tuple(names) if names is not None else tuple(CHEXPERT_FINDINGS[: t.shape[1]])
    if len(names) != t.shape[1]:
        raise ValueError(f"{len(names)} names for {t.shape[1]} columns")
    if columns is not None:
        t, s, names = t[:, columns], s[:, columns], tuple(names[c] for c in columns)
    auc = np.array([float(roc_auc_score(t[:, j], s[:, j])) if len(np.unique(t[:, j])) == 2 else math.nan
                    for j in range(t.shape[1])], dtype=np.float64)
    defined = ~np.isnan(auc)
    return MultilabelAUC(names, auc, float(auc[defined].mean()) if defined.any() else math.nan,
                         tuple(n for n, d in zip(names, defined) if d))


def mesh_table_markdown() -> str:
    """The MeSH -> finding mapping as a Markdown table (for the docs).

    Returns:
        The table text.
    """
    rows = ["| MeSH heading | qualifier required | CheXpert finding |", "|---|---|---|"]
    for heading, targets in MESH_MAP.items():
        for finding, need in targets:
            rows.append(f"| {heading} | {', '.join(need) if need else 'any'} | {finding} |")
    return "\n".join(rows)
