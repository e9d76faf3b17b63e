"""Review of medquant.eval.findings: MeSH mapping on real IU terms, binarize input checks, metric edge cases.

References: scikit-learn (precision_recall_fscore_support, f1_score, roc_auc_score), hand-computed vectors, and
the real MeSH terms of IU reports in ../shared/data (each test first checks the term is in the named report).
"""
from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import f1_score, precision_recall_fscore_support, roc_auc_score

from medquant.data.reports import load_iu_reports
from medquant.eval.findings import CHEXPERT_FINDINGS, binarize, mesh_labels, multilabel_auc, multilabel_scores

IDX = {f: i for i, f in enumerate(CHEXPERT_FINDINGS)}


@pytest.fixture(scope="module")
def reports():
    return {r.uid: r for r in load_iu_reports()}


def _positive(vec):
    return {CHEXPERT_FINDINGS[i] for i in np.flatnonzero(vec == 1)}


# --- MeSH mapping -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("terms, want", [
    (("cardiomegaly",), {"Cardiomegaly"}),
    (("CARDIOMEGALY/Mild",), {"Cardiomegaly"}),
    (("opacity/lung/base/left/mild",), {"Lung Opacity"}),
    (("  Pleural   Effusion / right ",), {"Pleural Effusion"}),
    (("cardiac shadow/Enlarged",), {"Cardiomegaly"}),
])
def test_mesh_heading_case_and_whitespace_variants(terms, want):
    # the IU index itself spells some headings in two cases ("Thoracic Vertebrae" / "Thoracic vertebrae"); a
    # pathology heading in another case must not read as a normal study (No Finding = 1)
    y = mesh_labels(terms)
    assert _positive(y) == want
    assert y[IDX["No Finding"]] == 0


def test_mesh_case_variant_spelled_in_the_real_index(reports):
    headings = {t.split("/")[0] for r in reports.values() for t in r.mesh_major}
    assert {"Thoracic Vertebrae", "Thoracic vertebrae"} <= headings


def test_mesh_labels_rejects_a_bare_string():
    # a str is iterated character by character: "Cardiomegaly" used to read as 12 unknown one-letter terms,
    # i.e. a normal study
    with pytest.raises(TypeError, match="sequence of terms"):
        mesh_labels("Cardiomegaly")


@pytest.mark.parametrize("uid, term, finding", [
    # hemothorax is pleural fluid (PadChest maps hemothorax -> pleural effusion, hydropneumothorax -> both)
    ("CXR2827", "Hemopneumothorax/right/moderate", "Pneumothorax"),
    ("CXR2827", "Hemopneumothorax/right/moderate", "Pleural Effusion"),
    ("CXR3945", "Hemothorax/left/small", "Pleural Effusion"),
    # a blunted (costophrenic) sulcus / pleural space is the sign mapped for "Costophrenic Angle/blunted";
    # CXR592: "blunting of the posterior right sulcus may reflect a ... right pleural effusion"
    ("CXR592", "Sulcus/right/posterior/blunted", "Pleural Effusion"),
    ("CXR2193", "Pleura/right/blunted", "Pleural Effusion"),
    # "Cardiac Shadow/enlarged/borderline" and "Cardiomegaly/borderline" are positive; so is the same
    # annotators' "Cardiac Shadow/borderline" (CXR806 carries it beside "Cardiomegaly/borderline")
    ("CXR806", "Cardiac Shadow/borderline", "Cardiomegaly"),
])
def test_mesh_real_terms_that_mapped_to_nothing(reports, uid, term, finding):
    assert term in reports[uid].mesh_major
    y = mesh_labels((term,))
    assert y[IDX[finding]] == 1
    assert y[IDX["No Finding"]] == 0


def test_mesh_unmapped_and_device_only_terms_hand_checked():
    # not CheXpert findings -> nothing, No Finding = 1; an obscured sulcus is not a blunted one
    for terms in (("Calcinosis/lung/hilum",), ("Sulcus/posterior/obscured",), ("Cardiac Shadow/obscured/severe",),
                  ("Pleura/base/bilateral/abnormal/chronic",), ("normal",), ("Normal",)):
        want = np.zeros(14)
        want[IDX["No Finding"]] = 1
        np.testing.assert_array_equal(mesh_labels(terms), want, err_msg=str(terms))
    # only a device: No Finding stays 1 (Support Devices is no pathology)
    want = np.zeros(14)
    want[[IDX["No Finding"], IDX["Support Devices"]]] = 1
    np.testing.assert_array_equal(mesh_labels(("Catheters, Indwelling/left",)), want)
    assert mesh_labels(("no indexing",)) is None and mesh_labels(()) is None


# --- binarize ---------------------------------------------------------------------------------------------------

def test_binarize_hand_vectors_and_dtypes():
    v = np.array([[1.0, 0.0, -1.0, np.nan], [np.nan, -1.0, 1.0, 0.0]])
    np.testing.assert_array_equal(binarize(v, "positive"), [[1, 0, 1, 0], [0, 1, 1, 0]])
    np.testing.assert_array_equal(binarize(v, "negative"), [[1, 0, 0, 0], [0, 0, 1, 0]])
    np.testing.assert_array_equal(binarize(np.array([True, False])), [1, 0])
    np.testing.assert_array_equal(binarize([[1, -1, 0]], "negative"), [[1, 0, 0]])


@pytest.mark.parametrize("bad", [[0.9, 0.1], [2.0, 0.0], [-0.5, 1.0], [np.inf, 0.0]])
def test_binarize_rejects_values_that_are_not_three_valued_labels(bad):
    # probabilities passed by mistake used to become all 0 silently (0.9 -> 0)
    with pytest.raises(ValueError, match="1, 0, -1"):
        binarize(np.array(bad))


# --- precision / recall / F1 against scikit-learn ----------------------------------------------------------------

def test_multilabel_scores_edge_columns_match_sklearn():
    # columns: no positives and no predictions, positives never predicted, predictions but no positives, all 1
    y = np.array([[0, 1, 0, 1, 1], [0, 1, 0, 1, 0], [0, 0, 0, 1, 1], [0, 0, 0, 1, 0]])
    p = np.array([[0, 0, 1, 1, 1], [0, 0, 1, 1, 1], [0, 0, 0, 1, 0], [0, 0, 0, 1, 0]])
    for yy, pp in ((y, p), (y.astype(bool), p.astype(bool)), (y.astype(float), p.astype(float))):
        s = multilabel_scores(yy, pp)
        prec, rec, f1, sup = precision_recall_fscore_support(y, p, average=None, zero_division=0)
        np.testing.assert_allclose(s.precision, prec)
        np.testing.assert_allclose(s.recall, rec)
        np.testing.assert_allclose(s.f1, f1)
        np.testing.assert_array_equal(s.support, sup)
        mp, mr, mf, _ = precision_recall_fscore_support(y, p, average="micro", zero_division=0)
        assert (s.micro_precision, s.micro_recall, s.micro_f1) == pytest.approx((mp, mr, mf))
        assert s.macro_f1 == pytest.approx(f1_score(y, p, average="macro", zero_division=0))
    # nothing positive, nothing predicted anywhere: 0 everywhere (zero_division=0), not 1
    z = multilabel_scores(np.zeros((3, 14)), np.zeros((3, 14)))
    assert z.micro_f1 == f1_score(np.zeros((3, 14)), np.zeros((3, 14)), average="micro", zero_division=0) == 0
    assert z.macro_f1 == 0


def test_metrics_reject_unbinarized_labels():
    y = np.array([[1, 0], [0, 1], [1, 1]], dtype=float)
    for bad in (np.where(y == 1, -1, 0), np.where(y == 1, np.nan, 0)):
        with pytest.raises(ValueError, match="0/1"):
            multilabel_scores(bad, y)
        with pytest.raises(ValueError, match="0/1"):
            multilabel_auc(bad, y)


def test_multilabel_auc_ties_bool_and_constant_columns():
    y = np.array([[1, 1, 0], [1, 0, 0], [0, 1, 0], [0, 0, 0], [1, 0, 0]], dtype=bool)
    s = np.array([[0.5, 2, 0.1], [0.5, 2, 0.2], [0.5, 1, 0.3], [0.2, 2, 0.4], [0.1, 3, 0.5]])
    r = multilabel_auc(y, s, names=["a", "b", "c"])
    for j in range(2):
        assert r.auc[j] == pytest.approx(roc_auc_score(y[:, j], s[:, j]))
    # by hand, column a: positives 0.5, 0.5, 0.1; negatives 0.5, 0.2 -> pairs (>, <, =): 0.5 vs 0.5 tie x2,
    # 0.5 > 0.2 x2, 0.1 < both -> (2 * 0.5 + 2) / 6
    assert r.auc[0] == pytest.approx(3 / 6)
    assert np.isnan(r.auc[2]) and r.scored == ("a", "b")
    assert r.macro_auc == pytest.approx(np.mean(r.auc[:2]))
    with pytest.raises(ValueError, match="finite"):
        multilabel_auc(y, np.where(y, np.inf, s))
