"""Report labeler, findings-answer parser, MeSH mapping and multi-label F1.

Sentences are real IU report sentences (train/dev reports only): each test first checks the sentence is in the
named report of ../shared/data, then labels it.
"""
from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import f1_score, precision_score, recall_score

from medquant.data.reports import load_iu_reports, report_split
from medquant.eval.findings import (
    CHEXPERT_FINDINGS,
    binarize,
    findings_prompt,
    mesh_labels,
    multilabel_scores,
)
from medquant.eval.labeler import label_report, label_reports, mentions, parse_findings

IDX = {f: i for i, f in enumerate(CHEXPERT_FINDINGS)}
NAN = float("nan")


@pytest.fixture(scope="module")
def reports():
    return {r.uid: r for r in load_iu_reports()}


# (report id, sentence, {finding: expected label}); 1 positive, 0 negated, -1 uncertain, nan not mentioned
REAL_SENTENCES = [
    ("CXR631", "Dual-lumen right IJ catheter is identified without pneumothorax.",
     {"Support Devices": 1, "Pneumothorax": 0}),
    ("CXR1205", "Clear lungs without pneumothorax or pleural effusion.",
     {"Pneumothorax": 0, "Pleural Effusion": 0, "No Finding": 1}),
    ("CXR8", "There is no pleural effusion or pneumothorax.", {"Pleural Effusion": 0, "Pneumothorax": 0}),
    ("CXR21", "No focal consolidations or pleural effusions.", {"Consolidation": 0, "Pleural Effusion": 0}),
    ("CXR973", "A subtle infiltrate cannot be excluded.", {"Lung Opacity": -1, "No Finding": 0}),
    ("CXR1991", "Definite infiltrate is not excluded.", {"Lung Opacity": -1}),
    ("CXR372", "Left retrocardiac airspace disease could reflect atelectasis and possible scarring.",
     {"Lung Opacity": 1, "Atelectasis": -1}),
    ("CXR569", "Previously seen left pleural effusion has resolved.", {"Pleural Effusion": 0}),
    ("CXR649", "The left apical pneumothorax has resolved.", {"Pneumothorax": 0}),
    ("CXR45", "Stable cardiomegaly with vascular prominence without overt edema.",
     {"Cardiomegaly": 1, "Edema": 0, "No Finding": 0}),
    ("CXR101", "Mild stable cardiomegaly and central vascular congestion.", {"Cardiomegaly": 1, "Edema": 1}),
    ("CXR253", ("No change in moderate left pneumothorax with left pleural drainage catheter again seen overlying "
               "the left upper lung."), {"Pneumothorax": 1, "Support Devices": 1}),
    ("CXR249", "Interval enlargement of right middle lobe mass, highly suspicious for malignancy.",
     {"Lung Lesion": 1}),
    ("CXR54", "Scattered calcified granulomas are seen without evidence of active granulomatous/tuberculous process.",
     {"Lung Lesion": 1, "Pneumonia": NAN}),
    # a pericardial effusion is no pleural effusion (the CheXpert labeler's "unmention" of Pleural Effusion)
    ("CXR216", "Considerations would include pericardial effusion or dilated cardiomyopathy.",
     {"Pleural Effusion": NAN}),
    ("CXR1666", "Mildly enlarged cardiac silhouette; cardiomegaly versus pericardial effusion.",
     {"Pleural Effusion": NAN, "Cardiomegaly": 1}),
    ("CXR3819", "Continued severe cardiomegaly and/or pericardial effusion.", {"Pleural Effusion": NAN}),
    ("CXR3819", "No XXXX focal airspace consolidation or pleural effusion.", {"Pleural Effusion": 0}),
    # "question X" and "suspicion for X" leave X uncertain (the CheXpert labeler's uncertainty rules)
    ("CXR2194", "Question small right pleural effusion versus pleural thickening.", {"Pleural Effusion": -1}),
    ("CXR1718", "Question edema or atypical infection?", {"Edema": -1, "No Finding": 0}),
    ("CXR2483", "Question mild pulmonary vascular congestion in a patient with prosthetic aortic valve.",
     {"Edema": -1}),
    ("CXR2268", "Suspicion for at XXXX XXXX bilateral pleural effusions.", {"Pleural Effusion": -1}),
    ("CXR2180", "Question pericardial effusion.", {"Pleural Effusion": NAN}),
]


@pytest.mark.parametrize("uid,sentence,expected", REAL_SENTENCES, ids=[s[0] for s in REAL_SENTENCES])
def test_labeler_on_real_report_sentences(reports, uid, sentence, expected):
    rep = reports[uid]
    assert sentence in rep.text, "the test sentence must come from the real report"
    assert rep.split != "test", "tests must not use the held-out split"
    vec = label_report(sentence)
    for finding, want in expected.items():
        got = vec[IDX[finding]]
        if np.isnan(want):
            assert np.isnan(got), (finding, got)
        else:
            assert got == want, (finding, got, [m for m in mentions(sentence) if m.finding == finding])


def test_label_whole_report_and_mesh_labels(reports):
    rep = reports["CXR569"]
    vec = label_report(rep.text)
    assert vec[IDX["Pleural Effusion"]] == 0
    y = mesh_labels(("Cardiomegaly/mild", "Pulmonary Atelectasis/base/left", "Cardiac Shadow"))
    assert y[IDX["Cardiomegaly"]] == 1 and y[IDX["Atelectasis"]] == 1 and y[IDX["No Finding"]] == 0
    assert y.sum() == 2  # "Cardiac Shadow" without "enlarged" maps to nothing
    assert mesh_labels(("normal",))[IDX["No Finding"]] == 1
    assert mesh_labels(("Catheters, Indwelling", "normal"))[IDX["No Finding"]] == 1  # devices are not pathology
    assert mesh_labels(("Costophrenic Angle/right/blunted",))[IDX["Pleural Effusion"]] == 1
    assert mesh_labels(("No Indexing",)) is None
    # the real MeSH terms of a real report
    cxr1628 = reports["CXR1628"]
    y = mesh_labels(cxr1628.mesh_major)
    for f in ("Cardiomegaly", "Pleural Effusion", "Lung Opacity", "Edema", "Support Devices"):
        assert y[IDX[f]] == 1, f


def test_parse_findings_answers():
    def pos(ans):
        v = binarize(parse_findings(ans), "positive")
        return {CHEXPERT_FINDINGS[i] for i in np.flatnonzero(v)}

    assert pos("Cardiomegaly, pleural effusions") == {"Cardiomegaly", "Pleural Effusion"}
    assert pos("Enlarged heart. No pleural effusion. Without pneumothorax.") == {"Cardiomegaly"}
    assert pos("Atelectasis, possible pneumonia") == {"Atelectasis", "Pneumonia"}
    v = parse_findings("Atelectasis, possible pneumonia, cannot exclude small pneumothorax")
    assert v[IDX["Atelectasis"]] == 1 and v[IDX["Pneumonia"]] == -1 and v[IDX["Pneumothorax"]] == -1
    kv = parse_findings("Cardiomegaly: yes\nEdema: no\nPleural Effusion: possible\nFracture: absent")
    assert kv[IDX["Cardiomegaly"]] == 1 and kv[IDX["Edema"]] == 0 and kv[IDX["Pleural Effusion"]] == -1
    assert kv[IDX["Fracture"]] == 0 and np.isnan(kv[IDX["Pneumothorax"]])
    assert pos("1. Lung Opacity\n2. Support Devices") == {"Lung Opacity", "Support Devices"}
    assert parse_findings("No Finding")[IDX["No Finding"]] == 1
    assert parse_findings("normal")[IDX["No Finding"]] == 1
    assert parse_findings("Pneumothorax")[IDX["No Finding"]] == 0
    assert np.isnan(parse_findings("I cannot tell")[IDX["No Finding"]])
    assert all(f in findings_prompt() for f in CHEXPERT_FINDINGS)
    with pytest.raises(TypeError):
        parse_findings(None)


def test_multilabel_scores_match_sklearn():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, (60, 14))
    p = np.where(rng.random((60, 14)) < 0.8, y, 1 - y)
    p[:, 3] = 0  # a column with no predicted positives: precision 0 by convention
    s = multilabel_scores(y, p)
    np.testing.assert_allclose(s.f1, f1_score(y, p, average=None, zero_division=0))
    np.testing.assert_allclose(s.precision, precision_score(y, p, average=None, zero_division=0))
    np.testing.assert_allclose(s.recall, recall_score(y, p, average=None, zero_division=0))
    assert s.micro_f1 == pytest.approx(f1_score(y, p, average="micro"))
    assert s.macro_f1 == pytest.approx(f1_score(y, p, average="macro", zero_division=0))
    sub = multilabel_scores(y, p, columns=[0, 2, 5])
    assert sub.micro_f1 == pytest.approx(f1_score(y[:, [0, 2, 5]], p[:, [0, 2, 5]], average="micro"))
    with pytest.raises(ValueError, match="0/1"):
        multilabel_scores(y, p * 2)
    with pytest.raises(ValueError, match="same shape"):
        multilabel_scores(y, p[:, :3])


def test_binarize_policies():
    v = np.array([[1, 0, -1, np.nan]])
    assert binarize(v, "positive").tolist() == [[1, 0, 1, 0]]
    assert binarize(v, "negative").tolist() == [[1, 0, 0, 0]]
    with pytest.raises(ValueError, match="uncertain"):
        binarize(v, "maybe")


def test_labeler_agrees_with_mesh_on_dev_split():
    """Regression guard on the development split (the held-out test split is scored by the benchmark)."""
    reps = [r for r in load_iu_reports(split="dev") if r.text and mesh_labels(r.mesh_major) is not None]
    y = np.stack([mesh_labels(r.mesh_major) for r in reps]).astype(int)
    p = binarize(label_reports([r.text for r in reps]), "negative")
    s = multilabel_scores(y, p)
    assert s.micro_f1 > 0.85
    # control: labels of a shuffled report order must agree far less
    perm = np.random.default_rng(0).permutation(len(reps))
    assert multilabel_scores(y, p[perm]).micro_f1 < s.micro_f1 - 0.2


def test_splits_are_fixed_and_disjoint(reports):
    assert report_split("CXR3029") == report_split("CXR3029")
    counts = {s: sum(r.split == s for r in reports.values()) for s in ("train", "dev", "test")}
    assert sum(counts.values()) == 3955
    assert 0.55 < counts["train"] / 3955 < 0.65 and 0.15 < counts["test"] / 3955 < 0.25
    with pytest.raises(ValueError, match="split"):
        load_iu_reports(split="validation")
    with pytest.raises(FileNotFoundError, match="MEDQUANT_DATA_DIR"):
        load_iu_reports("/nonexistent/NLMCXR_reports.tgz")


@pytest.mark.parametrize("sentence,finding", [
    ("The right lower lobe pneumonia has not resolved.", "Pneumonia"),
    ("Pneumothorax has not completely resolved.", "Pneumothorax"),
    ("Persistent pneumothorax, not resolved.", "Pneumothorax"),
    ("The left pleural effusion has not yet resolved.", "Pleural Effusion"),
    ("The right IJ catheter has not been removed.", "Support Devices"),
])
def test_not_resolved_stays_present(sentence, finding):
    assert label_report(sentence)[IDX[finding]] == 1, mentions(sentence)
    # the resolved counterpart is still negative
    resolved = sentence.replace("has not completely resolved", "has resolved").replace("has not yet resolved",
                                                                                      "has resolved")
    resolved = resolved.replace("has not resolved", "has resolved").replace("not resolved", "resolved")
    resolved = resolved.replace("has not been removed", "has been removed")
    assert label_report(resolved)[IDX[finding]] == 0, mentions(resolved)


@pytest.mark.parametrize("finding", CHEXPERT_FINDINGS)
def test_every_finding_name_is_recognised_in_answers(finding):
    """Each of the 14 names listed by findings_prompt, alone and as key: yes / no, reads as that finding."""
    assert f"- {finding}" in findings_prompt()
    for answer, want in ((finding, 1), (f"{finding}: yes", 1), (f"{finding}: present", 1), (f"{finding}: no", 0),
                         (f"{finding}: false", 0), (f"{finding}: absent", 0)):
        assert parse_findings(answer)[IDX[finding]] == want, (answer, mentions(answer, "answer"))


def test_no_finding_negated_in_answers():
    for answer in ("No Finding: no", "No Finding: false", "No findings: absent", "- No Finding: negative"):
        assert parse_findings(answer)[IDX["No Finding"]] == 0, answer
    assert parse_findings("No Finding: yes\nCardiomegaly: no")[IDX["No Finding"]] == 1
    assert parse_findings("No Finding: no\nCardiomegaly: yes")[IDX["No Finding"]] == 0


@pytest.mark.parametrize("newline", ["\n", "\r", "\r\n", "\u2028"])
def test_every_line_break_ends_the_negation_scope(newline):
    text = f"No pleural effusion{newline}Large pneumothorax."
    v = label_report(text)
    assert v[IDX["Pleural Effusion"]] == 0 and v[IDX["Pneumothorax"]] == 1, mentions(text)
    a = parse_findings(f"No pleural effusion{newline}Pneumothorax")
    assert a[IDX["Pleural Effusion"]] == 0 and a[IDX["Pneumothorax"]] == 1


def test_unlikely_is_negative_in_reports_as_in_answers():
    # answer mode reads "X: unlikely" as negative; report mode must agree
    assert parse_findings("Pneumonia: unlikely")[IDX["Pneumonia"]] == 0
    for text in ("Pneumonia is unlikely.", "Findings unlikely to represent pneumonia.", "Pneumonia unlikely.",
                 "Effusions are unlikely."):
        v = label_report(text)
        finding = "Pleural Effusion" if "ffusion" in text else "Pneumonia"
        assert v[IDX[finding]] == 0, (text, mentions(text))
    assert label_report("Pneumonia is likely.")[IDX["Pneumonia"]] == -1


@pytest.mark.parametrize("sentence", ["Lines and tubes are in standard position.", "Right IJ catheters in place.",
                                      "Bilateral chest tubes are unchanged.", "Two coronary stents.",
                                      "Pacemakers leads terminate in the right ventricle."])
def test_plural_devices_are_support_devices(sentence):
    assert label_report(sentence)[IDX["Support Devices"]] == 1, mentions(sentence)


def test_kerley_and_septal_lines_are_not_devices():
    for sentence in ("Few septal lines.", "Kerley B lines are present."):
        assert np.isnan(label_report(sentence)[IDX["Support Devices"]]), mentions(sentence)


def test_multilabel_auc_matches_sklearn_and_a_hand_count():
    from sklearn.metrics import roc_auc_score

    from medquant.eval import multilabel_auc

    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, (80, 6))
    scores = y + rng.normal(0, 0.8, (80, 6))
    y[:, 4] = 1  # one class only: AUC undefined
    y[:, 5] = 0
    r = multilabel_auc(y, scores, names=[f"c{i}" for i in range(6)])
    for j in range(4):
        assert r.auc[j] == pytest.approx(roc_auc_score(y[:, j], scores[:, j]))
    assert np.isnan(r.auc[4]) and np.isnan(r.auc[5])
    assert r.macro_auc == pytest.approx(np.mean([roc_auc_score(y[:, j], scores[:, j]) for j in range(4)]))
    assert r.scored == ("c0", "c1", "c2", "c3") and r.as_dict()["per_label"]["c4"] is None
    assert multilabel_auc(y, scores, columns=[0, 4]).macro_auc == pytest.approx(roc_auc_score(y[:, 0], scores[:, 0]))
    # by hand: positives scored 0.9, 0.4; negatives 0.5, 0.1 -> 3 of the 4 positive/negative pairs ordered
    # right; a tie counts one half
    assert multilabel_auc([[1], [1], [0], [0]], [[0.9], [0.4], [0.5], [0.1]]).auc[0] == pytest.approx(0.75)
    assert multilabel_auc([[1], [0]], [[0.3], [0.3]]).auc[0] == pytest.approx(0.5)
    assert np.isnan(multilabel_auc([[1], [1]], [[0.3], [0.2]]).macro_auc)
    with pytest.raises(ValueError, match="same shape"):
        multilabel_auc(y, scores[:, :3])
    with pytest.raises(ValueError, match="0/1"):
        multilabel_auc(y * 2, scores)
    with pytest.raises(ValueError, match="finite"):
        multilabel_auc(y, np.where(y == 1, np.nan, scores))


def test_pleural_and_pericardial_effusions_together():
    # hand-labelled: the pleural effusion is still read when a pericardial one is named beside it
    for text in ("Small pericardial effusion and small left pleural effusion.",
                 "Small pleural and pericardial effusions.", "Pericardial and pleural effusions."):
        assert label_report(text)[IDX["Pleural Effusion"]] == 1, mentions(text)


@pytest.mark.parametrize("text,expected", [
    # a period after a number ("T12.") ends the sentence, so "no" does not reach the next one
    ("No compression fracture of T12. Large right pneumothorax.", {"Fracture": 0, "Pneumothorax": 1}),
    ("No pleural effusion at T12.Large right pneumothorax.", {"Pleural Effusion": 0, "Pneumothorax": 1}),
    ("Degenerative change without fracture at L1-L2. Small left pleural effusion.",
     {"Fracture": 0, "Pleural Effusion": 1}),
    # a decimal point (1.5) and a list number ("1. ") end nothing
    ("No mass over 2.5 cm or pleural effusion.", {"Lung Lesion": 0, "Pleural Effusion": 0}),
    ("1. No pneumothorax. 2. Small right pleural effusion.", {"Pneumothorax": 0, "Pleural Effusion": 1}),
], ids=["T12-space", "T12-no-space", "L1-L2", "decimal", "numbered-list"])
def test_a_period_after_a_number_ends_the_negation_scope(text, expected):
    v = label_report(text)
    for finding, want in expected.items():
        assert v[IDX[finding]] == want, (text, finding, mentions(text))


@pytest.mark.parametrize("text,expected", [
    # a comma followed by a new clause (a subject and its verb) ends the negation scope
    ("No pneumothorax, the heart is enlarged.", {"Pneumothorax": 0, "Cardiomegaly": 1, "No Finding": 0}),
    ("No pleural effusion, the heart is moderately enlarged.", {"Pleural Effusion": 0, "Cardiomegaly": 1}),
    ("Without pneumothorax, a small left pleural effusion is present.",
     {"Pneumothorax": 0, "Pleural Effusion": 1}),
    ("No pneumothorax, heart is enlarged.", {"Pneumothorax": 0, "Cardiomegaly": 1}),
    ("No focal consolidation, lungs are hyperinflated with right basilar atelectasis.",
     {"Consolidation": 0, "Atelectasis": 1}),
    # a comma inside a list of findings continues it
    ("No pneumothorax, effusion, or consolidation.", {"Pneumothorax": 0, "Pleural Effusion": 0, "Consolidation": 0}),
    ("No pneumothorax, pleural effusion or consolidation is seen.",
     {"Pneumothorax": 0, "Pleural Effusion": 0, "Consolidation": 0}),
    ("No focal consolidation, suspicious pulmonary opacity, large pleural effusion, or pneumothorax is identified.",
     {"Consolidation": 0, "Lung Opacity": 0, "Pleural Effusion": 0, "Pneumothorax": 0}),
    ("No visible pneumothorax, focal airspace opacity, or pleural effusion is seen.",
     {"Pneumothorax": 0, "Lung Opacity": 0, "Pleural Effusion": 0}),
    # a comma between adjectives, and a list ending in a passive "is seen / are demonstrated", stay negated
    ("No acute, displaced rib fractures are demonstrated.", {"Fracture": 0}),
    ("No focal consolidation, pleural effusion is seen.", {"Consolidation": 0, "Pleural Effusion": 0}),
], ids=["the-heart-is", "the-heart-is-2", "a-effusion-is", "bare-subject", "lungs-are", "list", "list-is-seen",
        "long-list", "list-first-adjective", "adjectives", "two-item-list-is-seen"])
def test_a_comma_before_a_new_clause_ends_the_negation_scope(text, expected):
    v = label_report(text)
    for finding, want in expected.items():
        assert v[IDX[finding]] == want, (text, finding, mentions(text))


@pytest.mark.parametrize("text,finding,want", [
    # a limited evaluation of X leaves X uncertain (CheXpert: "X is poorly / incompletely evaluated")
    ("Limited evaluation for pneumothorax.", "Pneumothorax", -1),
    ("Limited assessment of the lung bases for consolidation.", "Consolidation", -1),
    ("Lateral view limits evaluation for an effusion.", "Pleural Effusion", -1),
    ("Evaluation for pneumothorax is limited by overlying soft tissue.", "Pneumothorax", -1),
    # ... but not a finding named after the limitation, nor a negated one
    ("Limited evaluation of the thoracic spine secondary to osteopenia, old rib fracture.", "Fracture", 1),
    ("Limited evaluation of the apices without pneumothorax.", "Pneumothorax", 0),
    ("Limited evaluation for pneumothorax, no pleural effusion.", "Pleural Effusion", 0),
    ("Atelectasis is limited to the left base.", "Atelectasis", 1),
])
def test_limited_evaluation_is_uncertain(text, finding, want):
    assert label_report(text)[IDX[finding]] == want, mentions(text)


@pytest.mark.parametrize("text,finding,want", [
    ("Pneumonia may be present.", "Pneumonia", -1),
    ("A small left pleural effusion could be present.", "Pleural Effusion", -1),
    ("Right basilar atelectasis might also be present.", "Atelectasis", -1),
    ("Effusion is possible.", "Pleural Effusion", -1),
    ("The effusion has cleared.", "Pleural Effusion", 0),
    ("The left basilar consolidation has since cleared.", "Consolidation", 0),
    ("Left pleural effusions have cleared.", "Pleural Effusion", 0),
    ("The effusion has resolved.", "Pleural Effusion", 0),
    # still there
    ("The effusion has not cleared.", "Pleural Effusion", 1),
    ("The effusion has partially cleared.", "Pleural Effusion", 1),
    ("Opacity may represent atelectasis.", "Lung Opacity", 1),
    ("The effusion can still be seen on the lateral view.", "Pleural Effusion", 1),
])
def test_uncertainty_and_resolution_after_the_mention(text, finding, want):
    assert label_report(text)[IDX[finding]] == want, mentions(text)


@pytest.mark.parametrize("text,edema", [
    ("Soft tissue edema with no visible bony injury.", NAN),
    ("Subcutaneous edema of the left chest wall.", NAN),
    ("Edema of the soft tissues of the right arm.", NAN),
    ("Diffuse subcutaneous soft tissue edema.", NAN),
    ("No subglottic edema.", NAN),
    # pulmonary edema is still read, also beside a soft tissue one
    ("Mild pulmonary edema.", 1),
    ("Interstitial edema and chest wall soft tissue edema.", 1),
    ("No pulmonary edema.", 0),
])
def test_soft_tissue_edema_is_not_pulmonary_edema(text, edema):
    got = label_report(text)[IDX["Edema"]]
    assert (np.isnan(got) if np.isnan(edema) else got == edema), (text, mentions(text))
