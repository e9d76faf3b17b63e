"""ComplexityScorer: calibration, levels, combined-score agreement with the reference, state handling."""
from __future__ import annotations

import io

import numpy as np
import pytest
import torch

from medquant.complexity import METRIC_NAMES, ComplexityScorer
from medquant.complexity.reference import reference_metrics


def _spearman(a, b) -> float:
    ra = np.argsort(np.argsort(a)).astype(float)
    rb = np.argsort(np.argsort(b)).astype(float)
    return float(np.corrcoef(ra, rb)[0, 1])


@pytest.fixture(scope="module")
def kermany_metrics(kermany_subset):
    """Torch metrics and all-reference (scikit-image/numpy) metrics of the Kermany test subset."""
    got = ComplexityScorer().metrics(kermany_subset).numpy()
    ref = np.stack([reference_metrics(im) for im in kermany_subset])
    return got, ref


def _load_saved(sd):
    """``sd`` after a round trip through ``torch.save`` / ``torch.load(weights_only=True)``."""
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def test_spearman_of_combined_score_vs_reference_pipeline(kermany_metrics):
    """Spearman >= 0.99 between our combined score and an all-reference pipeline (reference metrics, numpy
    min-max normalisation, mean), on a fixed subset of the Kermany test split: every 4th image, 156 of 624
    (the scikit-image reference over all 624 would take too long for CI)."""
    got, ref = kermany_metrics
    ours = ComplexityScorer().fit(metrics=got).score(metrics=got).numpy()
    lo, hi = ref.min(0), ref.max(0)
    ref_score = ((ref - lo) / np.where(hi > lo, hi - lo, 1.0)).mean(1)
    rho = _spearman(ours, ref_score)
    assert rho >= 0.99, rho
    # and on real images the score is not degenerate
    assert np.unique(np.round(ours, 6)).size > 100


@pytest.mark.parametrize("n_levels", [2, 4, 5])
def test_levels_split_calibration_set_evenly(kermany_metrics, n_levels):
    got, _ = kermany_metrics
    sc = ComplexityScorer(n_levels=n_levels).fit(metrics=got)
    lv = sc.levels(metrics=got).numpy()
    counts = np.bincount(lv, minlength=n_levels)
    n = len(lv)
    assert lv.min() >= 0 and lv.max() < n_levels
    assert np.all(np.abs(counts - n / n_levels) <= 0.02 * n + 1), counts
    # level 0 is the simplest: its scores are below every other level's
    s = sc.score(metrics=got).numpy()
    assert s[lv == 0].max() <= s[lv == n_levels - 1].min()


def test_levels_from_images_match_levels_from_metrics(kermany32):
    sc = ComplexityScorer().fit(kermany32)
    m = sc.metrics(kermany32)
    assert torch.equal(sc.levels(kermany32), sc.levels(metrics=m))
    assert torch.equal(sc(kermany32), sc.levels(kermany32))
    assert sc.levels(kermany32).dtype == torch.int64


def test_quantile_normalisation_and_weights(kermany_metrics):
    got, _ = kermany_metrics
    sc = ComplexityScorer(normalisation="quantile", weights={"entropy": 1.0}).fit(metrics=got)
    s = sc.score(metrics=got).numpy()
    # with only the entropy weight the score is an increasing function of entropy
    assert _spearman(s, got[:, 0]) == pytest.approx(1.0)
    lo, hi = np.quantile(got[:, 0], [0.01, 0.99])
    np.testing.assert_allclose(s, (got[:, 0] - lo) / (hi - lo), rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="unknown metric"):
        ComplexityScorer(weights={"entropi": 1})
    with pytest.raises(ValueError):
        ComplexityScorer(weights=[1, 1, 1])
    with pytest.raises(ValueError):
        ComplexityScorer(weights=[0, 0, 0, 0, 0])


def test_constant_images_and_zero_spread_calibration():
    const = [np.full((32, 32), v, np.uint8) for v in (0, 7, 255)]
    sc = ComplexityScorer()
    m = sc.metrics(const).numpy()
    assert np.all(m[:, :4] == 0.0)  # entropy, edge density, std, fractal dimension
    assert np.all(np.isfinite(m[:, 4]))
    ref = np.stack([reference_metrics(c) for c in const])
    np.testing.assert_allclose(m, ref, atol=1e-9)
    sc.fit(const)  # zero spread in 4 metrics: no division by zero
    assert torch.isfinite(sc.norm_scale).all() and (sc.norm_scale > 0).all()
    lv = sc.levels(const + [np.random.default_rng(0).integers(0, 256, (32, 32), dtype=np.uint8)])
    assert lv.dtype == torch.int64 and lv.min() >= 0 and lv.max() < 4
    one = ComplexityScorer().fit(const[:1])  # a single calibration image
    assert one.levels(const[:1]).tolist() == [0]  # equal to every threshold -> level 0
    assert set(one.levels(const).tolist()) <= {0, 3}


def test_single_level_and_unfitted():
    x = torch.rand(3, 16, 16)
    with pytest.raises(RuntimeError, match="fit"):
        ComplexityScorer().levels(x)
    assert ComplexityScorer(n_levels=1).fit(x).levels(x).tolist() == [0, 0, 0]
    with pytest.raises(ValueError):
        ComplexityScorer(n_levels=0)
    with pytest.raises(ValueError, match="at least one"):
        ComplexityScorer().fit([])
    with pytest.raises(ValueError, match="NaN"):
        ComplexityScorer().fit(x).levels(metrics=torch.full((1, 5), float("nan")))


def test_metrics_as_dict_and_empty():
    x = torch.rand(2, 16, 16)
    d = ComplexityScorer().metrics(x, as_dict=True)
    assert tuple(d) == METRIC_NAMES and d["entropy"].shape == (2,)
    assert ComplexityScorer().metrics([]).shape == (0, 5)


def test_state_dict_roundtrip_and_validation(kermany32):
    sc = ComplexityScorer(n_levels=5, weights=[2, 1, 1, 1, 0.5], edge_threshold=0.08).fit(kermany32)
    sd = sc.state_dict()
    assert all(isinstance(v, torch.Tensor) for v in sd.values())
    other = ComplexityScorer()  # default n_levels=4: loading resizes
    other.load_state_dict(sd)
    assert other.n_levels == 5 and float(other.edge_threshold) == pytest.approx(0.08)
    assert torch.equal(other.levels(kermany32), sc.levels(kermany32))
    assert torch.equal(other.metrics(kermany32), sc.metrics(kermany32))
    # safetensors-style: plain tensors survive a round trip through torch.save / load(weights_only=True)
    third = ComplexityScorer()
    third.load_state_dict(_load_saved(sd))
    assert torch.equal(third.thresholds, sc.thresholds)
    bad = dict(sd)
    bad["thresholds"] = torch.tensor([0.5, 0.1, 0.2, 0.3], dtype=torch.float64)
    with pytest.raises(ValueError, match="non-decreasing"):
        ComplexityScorer().load_state_dict(bad)
    bad = dict(sd)
    bad["norm_scale"] = torch.tensor([1.0, 0.0, 1.0, 1.0, 1.0], dtype=torch.float64)
    with pytest.raises(ValueError, match="positive"):
        ComplexityScorer().load_state_dict(bad)
    bad = dict(sd)
    bad["state_version"] = torch.tensor(99)
    with pytest.raises(ValueError, match="version"):
        ComplexityScorer().load_state_dict(bad)
    bad = {k: v for k, v in sd.items() if k != "norm_offset"}
    with pytest.raises(RuntimeError, match="norm_offset"):
        ComplexityScorer().load_state_dict(bad)


def test_refused_state_leaves_a_fitted_scorer_unchanged():
    """A state refused by validation (here: saved with another n_levels) must not resize the thresholds of the
    scorer it was loaded into (they became zeros: every image then got the top level)."""
    rng = np.random.default_rng(0)
    m = rng.random((40, 5))
    sc = ComplexityScorer(n_levels=4).fit(metrics=m)
    s = sc.score(metrics=m).numpy()
    expected = np.quantile(s, [0.25, 0.5, 0.75])  # numpy's linear interpolation, as documented
    bad = ComplexityScorer(n_levels=6).fit(metrics=m).state_dict()
    bad["norm_scale"] = -bad["norm_scale"]
    with pytest.raises(ValueError, match="norm_scale must be positive"):
        sc.load_state_dict(bad)
    assert sc.n_levels == 4
    np.testing.assert_allclose(sc.thresholds.numpy(), expected, rtol=0, atol=1e-12)
    np.testing.assert_array_equal(sc.levels(metrics=m).numpy(), (s[:, None] > expected).sum(1))


def _twelve_bit_images():
    """uint16 images holding 12-bit data (0..4095) of varied complexity."""
    rng = np.random.default_rng(3)
    out = []
    for i in range(12):
        base = np.linspace(0, 1, 32)[None, :] * np.linspace(0.2, 1, 32)[:, None]
        noise = rng.random((32, 32)) * (i / 11)
        out.append(np.round(np.clip(0.6 * base + 0.4 * noise, 0, 1) * 4095).astype(np.uint16))
    return out


def test_bits_stored_survives_save_and_load():
    """The state did not carry bits_stored: a reloaded bits_stored=12 scorer read 12-bit data as 16-bit (std and
    edges 16x smaller) and gave other levels."""
    imgs = _twelve_bit_images()
    sc = ComplexityScorer(bits_stored=12).fit(imgs)
    sd = _load_saved(sc.state_dict())
    assert int(sd["bits_stored_state"]) == 12
    fresh = ComplexityScorer()
    fresh.load_state_dict(sd)
    assert fresh.bits_stored == 12
    ref12 = np.stack([reference_metrics(im, bits_stored=12) for im in imgs])
    ref16 = np.stack([reference_metrics(im, bits_stored=16) for im in imgs])
    got = fresh.metrics(imgs).numpy()
    np.testing.assert_allclose(got, ref12, atol=1e-4)
    assert not np.allclose(got[:, 2], ref16[:, 2], atol=1e-4)  # the test data tells 12 from 16 bits
    # levels by hand from the 12-bit reference metrics and the saved calibration
    z = (ref12 - sd["norm_offset"].numpy()) / sd["norm_scale"].numpy()
    want = (z.mean(1)[:, None] > sd["thresholds"].numpy()).sum(1)
    np.testing.assert_array_equal(fresh.levels(imgs).numpy(), want)
    np.testing.assert_array_equal(fresh.levels(imgs).numpy(), sc.levels(imgs).numpy())
    # an explicit, equal bits_stored loads; a state saved without bits_stored records "none" (0)
    same = ComplexityScorer(bits_stored=12)
    same.load_state_dict(sd)
    assert same.bits_stored == 12
    plain = ComplexityScorer().fit(metrics=np.random.default_rng(0).random((10, 5))).state_dict()
    assert int(plain["bits_stored_state"]) == 0
    loaded = ComplexityScorer()
    loaded.load_state_dict(sd)
    loaded.load_state_dict(plain)  # not given explicitly: the state decides
    assert loaded.bits_stored is None


def test_bits_stored_conflicting_with_the_constructor_is_refused():
    sd = ComplexityScorer(bits_stored=12).fit(_twelve_bit_images()).state_dict()
    other = ComplexityScorer(bits_stored=16)
    with pytest.raises(ValueError, match="saved with bits_stored=12 but this scorer was constructed with "
                                         "bits_stored=16"):
        other.load_state_dict(sd)
    assert other.bits_stored == 16 and not other.is_fitted  # left as it was
    plain = ComplexityScorer().fit(metrics=np.random.default_rng(0).random((10, 5))).state_dict()
    with pytest.raises(ValueError, match="saved with bits_stored=None"):
        ComplexityScorer(bits_stored=12).load_state_dict(plain)
    bad = dict(sd)
    bad["bits_stored_state"] = torch.tensor(40)
    with pytest.raises(ValueError, match=r"bits_stored_state must be one integer in 0..32"):
        ComplexityScorer().load_state_dict(bad)
    for value in (0, 33, 12.0, True, "12"):
        with pytest.raises(ValueError, match=r"bits_stored must be None or an integer in 1..32"):
            ComplexityScorer(bits_stored=value)


def test_version_1_state_without_bits_stored_still_loads():
    """States saved before bits_stored was recorded keep the loading scorer's bits_stored (the old default)."""
    imgs = _twelve_bit_images()
    sc = ComplexityScorer(bits_stored=12).fit(imgs)
    old = {k: v for k, v in sc.state_dict().items() if k != "bits_stored_state"}
    old["state_version"] = torch.tensor(1)
    default = ComplexityScorer()
    default.load_state_dict(old)  # strict: no missing-key error
    assert default.bits_stored is None and default.is_fitted
    given = ComplexityScorer(bits_stored=12)
    given.load_state_dict(old)
    np.testing.assert_array_equal(given.levels(imgs).numpy(), sc.levels(imgs).numpy())
    resaved = given.state_dict()  # saved again: this build's version, with bits_stored
    assert int(resaved["state_version"]) == 3 and int(resaved["bits_stored_state"]) == 12
    new_without = dict(sc.state_dict())
    del new_without["bits_stored_state"]  # a version-2 state must have it
    with pytest.raises(RuntimeError, match="bits_stored_state"):
        ComplexityScorer().load_state_dict(new_without)


def test_state_travels_with_a_model_and_survives_half(kermany32):
    sc = ComplexityScorer().fit(kermany32)
    model = torch.nn.Sequential(torch.nn.Linear(4, 2))
    model.complexity = sc
    model.half()
    assert sc.thresholds.dtype == torch.float64
    fresh = torch.nn.Sequential(torch.nn.Linear(4, 2))
    fresh.complexity = ComplexityScorer(n_levels=3)
    fresh.load_state_dict(_load_saved(model.state_dict()))
    assert torch.equal(fresh.complexity.levels(kermany32), sc.levels(kermany32))
    assert fresh.complexity.thresholds.tolist() == sc.thresholds.tolist()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu(kermany32, ham8):
    cpu = ComplexityScorer().fit(kermany32)
    gpu = ComplexityScorer().fit(kermany32).to("cuda")
    m_cpu = cpu.metrics(kermany32)
    m_gpu = gpu.metrics(kermany32)
    assert m_gpu.device.type == "cuda"
    assert torch.allclose(m_cpu, m_gpu.cpu(), atol=1e-9)
    assert torch.allclose(cpu.metrics(ham8), gpu.metrics(ham8).cpu(), atol=2e-4)
    assert torch.equal(cpu.levels(kermany32), gpu.levels(kermany32).cpu())


def test_normalisation_and_quantiles_survive_save_and_load(kermany32):
    """The state did not carry normalisation / quantiles: a scorer rebuilt from it and re-fitted used min-max
    (the constructor's default) and gave other levels than the scorer that was saved."""
    cal, new = kermany32[:16], kermany32[16:]
    sc = ComplexityScorer(normalisation="quantile", quantiles=(0.2, 0.7)).fit(cal)
    sd = _load_saved(sc.state_dict())
    assert all(isinstance(v, torch.Tensor) for v in sd.values())
    fresh = ComplexityScorer()
    fresh.load_state_dict(sd)
    assert fresh.normalisation == "quantile" and fresh.quantiles == (0.2, 0.7)
    assert torch.equal(fresh.levels(kermany32), sc.levels(kermany32))
    # re-fitted on the same new data, the rebuilt scorer equals the original
    sc.fit(new)
    fresh.fit(new)
    for name in ("norm_offset", "norm_scale", "thresholds"):
        assert torch.equal(getattr(fresh, name), getattr(sc, name)), name
    assert torch.equal(fresh.levels(kermany32), sc.levels(kermany32))
    # and both follow the documented formula, computed here with scikit-image metrics and numpy
    ref = np.stack([reference_metrics(im) for im in new])
    lo, hi = np.quantile(ref, [0.2, 0.7], axis=0)
    s = ((ref - lo) / (hi - lo)).mean(1)
    np.testing.assert_allclose(fresh.score(new).numpy(), s, atol=1e-3)
    minmax = ComplexityScorer().fit(new)
    assert not torch.allclose(minmax.norm_offset, fresh.norm_offset)  # the data tells the settings apart


def test_normalisation_or_quantiles_conflicting_with_the_constructor_are_refused():
    m = np.random.default_rng(1).random((30, 5))
    sd = ComplexityScorer(normalisation="quantile", quantiles=(0.05, 0.95)).fit(metrics=m).state_dict()
    other = ComplexityScorer(normalisation="minmax")
    with pytest.raises(ValueError, match="saved with normalisation='quantile' but this scorer was constructed "
                                         "with normalisation='minmax'"):
        other.load_state_dict(sd)
    assert other.normalisation == "minmax" and not other.is_fitted  # left as it was
    other = ComplexityScorer(quantiles=(0.1, 0.9))
    with pytest.raises(ValueError, match=r"saved with quantiles=\(0\.05, 0\.95\) but this scorer was constructed "
                                         r"with quantiles=\(0\.1, 0\.9\)"):
        other.load_state_dict(sd)
    assert other.quantiles == (0.1, 0.9) and other.normalisation == "minmax" and not other.is_fitted
    same = ComplexityScorer(normalisation="quantile", quantiles=(0.05, 0.95))  # equal explicit values load
    same.load_state_dict(sd)
    assert same.is_fitted
    plain = ComplexityScorer().fit(metrics=m).state_dict()  # the defaults are recorded too
    with pytest.raises(ValueError, match="saved with normalisation='minmax'"):
        ComplexityScorer(normalisation="quantile").load_state_dict(plain)
    loaded = ComplexityScorer()
    loaded.load_state_dict(sd)
    loaded.load_state_dict(plain)  # not given explicitly: the state decides
    assert loaded.normalisation == "minmax" and loaded.quantiles == (0.01, 0.99)
    for key, value, msg in [("normalisation_state", torch.tensor(2), "normalisation_state must be one integer"),
                            ("normalisation_state", torch.tensor(1.0), "normalisation_state must be one integer"),
                            ("quantiles_state", torch.tensor([0.9, 0.1], dtype=torch.float64), "quantiles_state"),
                            ("quantiles_state", torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64),
                             "quantiles_state"),
                            ("quantiles_state", torch.tensor([False, True]), "quantiles_state")]:
        bad = dict(sd)
        bad[key] = value
        with pytest.raises(ValueError, match=msg):
            ComplexityScorer().load_state_dict(bad)


def test_version_2_state_without_normalisation_still_loads():
    """States saved before normalisation / quantiles were recorded keep the loading scorer's (the old behaviour)."""
    m = np.random.default_rng(2).random((30, 5))
    sc = ComplexityScorer(normalisation="quantile", quantiles=(0.1, 0.9)).fit(metrics=m)
    old = {k: v for k, v in sc.state_dict().items() if k not in ("normalisation_state", "quantiles_state")}
    old["state_version"] = torch.tensor(2)
    default = ComplexityScorer()
    default.load_state_dict(old)  # strict: no missing-key error
    assert default.normalisation == "minmax" and default.quantiles == (0.01, 0.99) and default.is_fitted
    given = ComplexityScorer(normalisation="quantile", quantiles=(0.1, 0.9))
    given.load_state_dict(old)
    np.testing.assert_array_equal(given.fit(metrics=m).thresholds.numpy(), sc.thresholds.numpy())
    resaved = given.state_dict()  # saved again: this build's version, with the settings
    assert int(resaved["state_version"]) == 3 and int(resaved["normalisation_state"]) == 1
    assert resaved["quantiles_state"].tolist() == [0.1, 0.9]
    v1 = {k: v for k, v in old.items() if k != "bits_stored_state"}
    v1["state_version"] = torch.tensor(1)
    ComplexityScorer().load_state_dict(v1)
    new_without = dict(sc.state_dict())
    del new_without["quantiles_state"]  # a version-3 state must have it
    with pytest.raises(RuntimeError, match="quantiles_state"):
        ComplexityScorer().load_state_dict(new_without)
