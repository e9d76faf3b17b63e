"""Review of FINDING_SYNONYMS: plurals / inflections of existing synonyms that the word-boundary regex missed.

Found on the train / dev IU reports only (the test split is never read here). Reference: the report's own words
(quoted, with its id; the quote is first checked against the real report in ../shared/data) and the report's
MeSH-derived label, plus hand-made sentences whose labels are read off by hand.
"""
from __future__ import annotations

import math

import numpy as np
import pytest

from medquant.data.reports import load_iu_reports
from medquant.eval.findings import CHEXPERT_FINDINGS, mesh_labels
from medquant.eval.labeler import label_text, mentions

IDX = {f: i for i, f in enumerate(CHEXPERT_FINDINGS)}


@pytest.fixture(scope="module")
def reports():
    return {r.uid: r for s in ("train", "dev") for r in load_iu_reports(split=s)}


# (report id, split, quoted sentence (lower case, as in the report), finding, label of the sentence)
REAL = [
    # "granulomata": plural of granuloma (MeSH of all four: Granuloma / Calcified Granuloma -> Lung Lesion)
    ("CXR134", "train", "calcified granulomata are present in the right middle lobe and right up", "Lung Lesion", 1),
    ("CXR2272", "train", "a few calcified granulomata are noted", "Lung Lesion", 1),
    ("CXR2278", "train", "right lung calcified granulomata are again seen", "Lung Lesion", 1),
    ("CXR3596", "train", "few calcified granulomata are noted incidentally", "Lung Lesion", 1),
    # "consolidating": as "consolidative" / "consolidated", a Consolidation mention (here negated)
    ("CXR627", "train", "no consolidating airspace disease is seen", "Consolidation", 0),
    ("CXR1723", "train", "no consolidating airspace disease is seen within the lungs", "Consolidation", 0),
    # "cavitations": plural of cavitation
    ("CXR1879", "train", "no cavitations", "Lung Lesion", 0),
    # "masslike": one-word spelling of "mass-like" (which "mass" already matches at the hyphen)
    ("CXR3951", "dev", "masslike opacification of right apex", "Lung Lesion", 1),
    # "portacatheter": a port-a-cath (MeSH Catheters, Indwelling -> Support Devices)
    ("CXR3188", "train", "portacatheter is noted with its tip in superior xxxx xxxx", "Support Devices", 1),
]


@pytest.mark.parametrize("uid, split, sentence, finding, want", REAL)
def test_real_train_dev_sentence(reports, uid, split, sentence, finding, want):
    r = reports[uid]
    assert r.split == split
    assert sentence in r.text.lower()
    y = label_text(sentence)
    assert y[IDX[finding]] == want


@pytest.mark.parametrize("uid, finding", [("CXR134", "Lung Lesion"), ("CXR2272", "Lung Lesion"),
                                          ("CXR2278", "Lung Lesion"), ("CXR3596", "Lung Lesion"),
                                          ("CXR3951", "Lung Lesion"), ("CXR3188", "Support Devices")])
def test_whole_report_agrees_with_mesh(reports, uid, finding):
    # the MeSH-derived label is positive and the labeler, reading the whole report, now says so too
    r = reports[uid]
    assert mesh_labels(r.mesh_major)[IDX[finding]] == 1
    assert label_text(r.text)[IDX[finding]] == 1


@pytest.mark.parametrize("sentence, finding, want", [
    ("Multiple calcified granulomata in both lungs.", "Lung Lesion", 1),
    ("No granulomata.", "Lung Lesion", 0),
    ("Possible consolidating pneumonia in the left base.", "Consolidation", -1),
    ("There is a consolidating opacity in the right lower lobe.", "Consolidation", 1),
    ("No consolidating process.", "Consolidation", 0),
    ("Several cavitations in the right upper lobe.", "Lung Lesion", 1),
    ("A 3 cm masslike density at the left hilum.", "Lung Lesion", 1),
    ("Right chest portacath in place.", "Support Devices", 1),
    ("Two portacatheters are present.", "Support Devices", 1),
])
def test_hand_made_sentence(sentence, finding, want):
    assert label_text(sentence)[IDX[finding]] == want


def test_consolidating_labels_like_consolidative():
    # the existing rule already reads "consolidative" as Consolidation; "consolidating" must read the same
    a = label_text("Consolidative opacity in the right lower lobe.")
    b = label_text("Consolidating opacity in the right lower lobe.")
    np.testing.assert_array_equal(np.isnan(a), np.isnan(b))
    assert [x for x in a if not math.isnan(x)] == [x for x in b if not math.isnan(x)]
    assert b[IDX["Consolidation"]] == 1


def test_new_words_match_whole_words_only():
    # word boundaries still hold: a longer word holding the new spelling is no mention
    found = {m.finding for m in mentions("granulomatalike consolidatingly portacatheterx masslikes")}
    assert not found & {"Lung Lesion", "Consolidation", "Support Devices"}
