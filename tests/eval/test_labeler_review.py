"""Review of medquant.eval.labeler: key-value answers on one line, "not seen on prior" (a new finding), and a bare
string passed to label_reports.

References: hand labels; the same answer written one key per line (a form the parser already reads); the real IU
report sentences of ../shared/data (each test first checks the sentence is in the named train/dev report).
"""
from __future__ import annotations

import numpy as np
import pytest

from medquant.data.reports import load_iu_reports
from medquant.eval.findings import CHEXPERT_FINDINGS
from medquant.eval.labeler import label_report, label_reports, mentions, parse_findings

IDX = {f: i for i, f in enumerate(CHEXPERT_FINDINGS)}


# --- answer mode: several "Finding: value" pairs on one line -----------------------------------------------------

@pytest.mark.parametrize("answer, expected", [
    ("Atelectasis: yes, Edema: no", {"Atelectasis": 1, "Edema": 0}),
    ("Cardiomegaly: yes; Pleural Effusion: absent; Pneumothorax: possible",
     {"Cardiomegaly": 1, "Pleural Effusion": 0, "Pneumothorax": -1}),
    ("Pneumothorax: no, Cardiomegaly: no, Fracture: false", {"Pneumothorax": 0, "Cardiomegaly": 0, "Fracture": 0,
                                                             "No Finding": 1}),
    ("1. Cardiomegaly: yes 2. Edema: no 3. Lung Opacity: uncertain",
     {"Cardiomegaly": 1, "Edema": 0, "Lung Opacity": -1}),
    ("Edema: no, No Finding: no", {"Edema": 0, "No Finding": 0}),
], ids=["comma", "semicolon", "all-negative", "inline-numbered", "no-finding-no"])
def test_key_value_pairs_on_one_line(answer, expected):
    # "Edema: no" after a comma used to be read as a positive "edema" mention (only the first pair of a line was
    # rewritten); the answer must read as the same pairs written one per line
    v = parse_findings(answer)
    for finding, want in expected.items():
        assert v[IDX[finding]] == want, (answer, finding, mentions(answer, "answer"))
    one_per_line = "\n".join(p.strip() for p in answer.replace(";", ",").replace(" 2.", ", 2.").replace(" 3.", ", 3.")
                             .split(","))
    np.testing.assert_array_equal(v, parse_findings(one_per_line), err_msg=one_per_line)


def test_findings_none_is_no_finding():
    # "Findings: none" reads as "no findings" (as "None" alone already does)
    for answer in ("Findings: none", "Findings: None.", "None"):
        v = parse_findings(answer)
        assert v[IDX["No Finding"]] == 1, answer
        assert np.isnan(v[1:]).all(), answer


def test_commas_inside_a_finding_list_are_unchanged():
    # control: comma-separated finding names with no key-value pairs read as before
    v = parse_findings("Cardiomegaly, no edema, possible pneumonia")
    assert (v[IDX["Cardiomegaly"]], v[IDX["Edema"]], v[IDX["Pneumonia"]]) == (1, 0, -1)


# --- report mode: "not seen on prior" marks a new finding, not an absent one --------------------------------------

@pytest.fixture(scope="module")
def reports():
    return {r.uid: r for r in load_iu_reports()}


@pytest.mark.parametrize("uid, sentence, finding", [
    ("CXR2715", "There is a 9 mm right lower lobe pulmonary nodule, not seen on prior exams.", "Lung Lesion"),
    ("CXR3058", "Left midlung opacity noted, not visualized on prior.", "Lung Opacity"),
])
def test_not_seen_on_prior_is_a_new_finding(reports, uid, sentence, finding):
    rep = reports[uid]
    assert sentence in rep.text and rep.split != "test"
    assert label_report(sentence)[IDX[finding]] == 1, mentions(sentence)


@pytest.mark.parametrize("text, finding, want", [
    ("New right upper lobe nodule not present on the previous study.", "Lung Lesion", 1),
    ("Not seen on the prior study, a new left pleural effusion.", "Pleural Effusion", 1),
    # controls: absent now, or absent on the current study
    ("The nodule is not seen on the current study.", "Lung Lesion", 0),
    ("Pneumothorax is not seen.", "Pneumothorax", 0),
    ("No pneumothorax, not seen on prior either.", "Pneumothorax", 0),
])
def test_not_seen_on_prior_hand_labelled(text, finding, want):
    assert label_report(text)[IDX[finding]] == want, mentions(text)


# --- label_reports input checks ----------------------------------------------------------------------------------

def test_label_reports_rejects_a_bare_string():
    # a str is iterated character by character: one report used to become len(text) rows of 1-letter "reports"
    with pytest.raises(TypeError, match="sequence of texts"):
        label_reports("No pleural effusion.")
    with pytest.raises(TypeError, match="sequence of texts"):
        label_reports("Pneumothorax: no", mode="answer")
    out = label_reports(["No pleural effusion."])
    np.testing.assert_array_equal(out, label_report("No pleural effusion.")[None])


# --- report mode: "age-indeterminate" dates a finding, it does not doubt it -----------------------------------------

@pytest.mark.parametrize("uid, sentence", [
    ("CXR525", "Age-indeterminate fracture of the right lateral 9th rib."),
    ("CXR1576", "An age-indeterminate XXXX fracture is present in the lower thoracic vertebra."),
    ("CXR800", ("Limited evaluation of the thoracic spine secondary to osteopenia, age-indeterminate XXXX fracture "
                "deformities.")),
])
def test_age_indeterminate_fracture_is_positive(reports, uid, sentence):
    # the annotators' MeSH terms of these reports carry "Fractures, Bone"; the labeler used to read
    # "indeterminate" as an uncertainty cue for the fracture itself
    rep = reports[uid]
    assert sentence in rep.text and rep.split != "test"
    assert any(t.startswith("Fractures, Bone") for t in rep.mesh_major)
    assert label_report(sentence)[IDX["Fracture"]] == 1, mentions(sentence)


@pytest.mark.parametrize("text, finding, want", [
    ("Rib fracture of indeterminate age.", "Fracture", 1),
    ("Indeterminate age compression fracture of T8.", "Fracture", 1),
    # controls: an indeterminate finding, or a hedged one, stays uncertain
    ("Indeterminate 1.4 cm opacity seen only on lateral view.", "Lung Opacity", -1),
    ("Sternal irregularity may represent an age-indeterminate nondisplaced fracture.", "Fracture", -1),
])
def test_indeterminate_hand_labelled(text, finding, want):
    assert label_report(text)[IDX[finding]] == want, mentions(text)


# --- whitespace: a non-breaking or other Unicode space is a space --------------------------------------------------

@pytest.mark.parametrize("space", ["\u00a0", "\u2009", "\u202f", "\u3000", "\t \u00a0"])
@pytest.mark.parametrize("text, expected", [
    ("Pleural{}thickening.", {"Pleural Other": 1, "No Finding": 0}),
    ("No{}change in the small left pleural effusion.", {"Pleural Effusion": 1}),
    ("Pneumothorax{}is not seen.", {"Pneumothorax": 0, "No Finding": 1}),
    ("No pneumothorax{}but large effusion.", {"Pneumothorax": 0, "Pleural Effusion": 1}),
])
def test_unicode_spaces_read_as_spaces(space, text, expected):
    # text pasted from web pages / PDFs carries U+00A0 and friends; "pleural\xa0thickening" used to be no mention
    # and "no\xa0change" a negation
    v = label_report(text.format(space))
    for finding, want in expected.items():
        assert v[IDX[finding]] == want, (repr(space), finding, mentions(text.format(space)))
    np.testing.assert_array_equal(v, label_report(text.format(" ")))
    a = parse_findings(f"Pleural{space}Effusion:{space}no")
    assert a[IDX["Pleural Effusion"]] == 0


def test_a_hyphen_inside_a_line_is_no_key_value_separator():
    # "right-no pneumothorax" is a hyphenated phrase, not the pair "right: no"; at a line start "Edema - no" is a pair
    v = parse_findings("Effusion, right-no pneumothorax")
    assert v[IDX["Pneumothorax"]] == 0 and v[IDX["Pleural Effusion"]] == 1
    assert parse_findings("Cardiomegaly: yes\nEdema - no")[IDX["Edema"]] == 0
