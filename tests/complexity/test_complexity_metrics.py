"""The batched torch metrics against independent per-image references on real images.

References: scikit-image (shannon_entropy, filters.sobel, feature.local_binary_pattern, rgb2gray,
img_as_ubyte), numpy (std) and numpy box counting (a plain loop and a reshape version).
Tolerances (issue 5): entropy and std 1e-4; edge density and LBP entropy 1e-3; fractal dimension 1e-2.
"""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from skimage.color import rgb2gray
from skimage.feature import local_binary_pattern
from skimage.filters import sobel
from skimage.measure import shannon_entropy
from skimage.util import img_as_ubyte

from medquant.complexity import ComplexityScorer
from medquant.complexity.metrics import compute_metrics, lbp_codes, sobel_sq_magnitude, uniform_lbp
from medquant.complexity.reference import box_counting_dimension_numpy, reference_metrics

TOL = np.array([1e-4, 1e-3, 1e-4, 1e-2, 1e-3])


def _skimage_metrics(img: np.ndarray, thr: float = 0.1) -> np.ndarray:
    """Written out here (not via medquant.complexity.reference) so the test has its own reference."""
    return skimage_metrics_of_gray(rgb2gray(img) if img.ndim == 3 else img.astype(np.float64) / 255.0, thr)


def skimage_metrics_of_gray(gray: np.ndarray, thr: float = 0.1) -> np.ndarray:
    """The five metrics of a float gray image in [0, 1] with scikit-image and numpy (fractal dimension via the
    reshape version, equal to the plain loop: see test_complexity_fractal.py)."""
    u8 = img_as_ubyte(gray)
    mask = sobel(gray) > thr
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lbp = local_binary_pattern(u8, 8, 1, "uniform")
    return np.array([shannon_entropy(u8), mask.mean(), np.std(gray), box_counting_dimension_numpy(mask),
                     shannon_entropy(lbp)])


def _check(images, scorer=None):
    scorer = scorer or ComplexityScorer()
    got = scorer.metrics(list(images) if not isinstance(images, np.ndarray) else images).cpu().numpy()
    ref = np.stack([_skimage_metrics(im) for im in images])
    err = np.abs(got - ref)
    assert np.all(err <= TOL), f"max abs error per metric {err.max(0)} exceeds {TOL}"
    return got, ref


def test_kermany_224_matches_skimage(kermany32):
    _, ref = _check(kermany32)
    # sanity: the references vary across images, so agreement is not trivial
    assert ref.std(0).min() > 1e-3


def test_ham10000_rgb_matches_skimage(ham8):
    _check(ham8)


def test_pneumoniamnist_28px_matches_skimage(pneumonia28):
    _check(pneumonia28)


def test_nih_64px_matches_skimage(nih64):
    _check(nih64)


def test_reference_module_agrees_with_test_reference(kermany32):
    for im in kermany32[:4]:
        np.testing.assert_allclose(reference_metrics(im), _skimage_metrics(im), atol=1e-12)


def test_lbp_codes_bit_exact_on_real_images(kermany32, ham8):
    u8 = np.concatenate([kermany32[:6], np.stack([img_as_ubyte(rgb2gray(h)) for h in ham8[:2]])])
    got = uniform_lbp(torch.from_numpy(u8)).numpy()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = np.stack([local_binary_pattern(x, 8, 1, "uniform") for x in u8])
    assert np.array_equal(got, ref)


@pytest.mark.parametrize("shape", [(9, 8), (37, 53), (300, 517)])
def test_lbp_codes_bit_exact_on_tie_heavy_images(shape):
    """Flat patches and linear ramps make the interpolated diagonal neighbour tie with the centre; skimage's
    float64 rounding then decides the bit, which depends on the row/column (large sizes exercise that)."""
    rng = np.random.default_rng(sum(shape))
    h, w = shape
    img = rng.integers(0, 256, size=shape).astype(np.int64)
    img[: h // 2, : w // 2] = rng.integers(0, 256)  # flat block
    ramp = (np.arange(w)[None, :] + 2 * np.arange(h)[:, None]) % 256
    img[h // 2 :, :] = ramp[h // 2 :, :]  # linear ramps: D = x, N1 + N2 = 2x along diagonals
    img[:, -3:] = 255
    img[-2:, :] = 0
    img = img.astype(np.uint8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = local_binary_pattern(img, 8, 1, "uniform")
    got = uniform_lbp(torch.from_numpy(img)[None])[0].numpy()
    assert np.array_equal(got, ref)
    # raw codes are in range and the test really has ties (otherwise it would not exercise the float64 path)
    raw = lbp_codes(torch.from_numpy(img)[None])
    assert int(raw.max()) <= 255


def test_sobel_magnitude_matches_skimage(kermany32):
    x = kermany32[:4]
    s = sobel_sq_magnitude(torch.from_numpy(x).float()).numpy()
    mag = np.sqrt(s / 2.0) / (4.0 * 255.0)
    ref = np.stack([sobel(im.astype(np.float64) / 255.0) for im in x])
    np.testing.assert_allclose(mag, ref, atol=1e-6)


@pytest.mark.parametrize("kind", ["uint8", "float32"])
def test_pixels_exactly_at_the_edge_threshold_are_decided_as_skimage_decides_them(kind):
    """Images of a few gray levels put pixels exactly at the threshold (S = 2 (4 * 255 t)^2); scikit-image's
    float64 rounding puts each a few ulps above or below t. Edge density and fractal dimension then match it
    exactly, as every other pixel does (before: a third of these images differed)."""
    rng = np.random.default_rng(1)
    imgs = (rng.integers(0, 5, (60, 16, 16)) * rng.choice([17, 34, 51], (60, 1, 1))).astype(np.uint8)
    tie = sobel_sq_magnitude(torch.from_numpy(imgs).float()).numpy() == 2 * 102.0**2  # = 2 (4 * 255 * 0.1)^2
    sk = np.stack([sobel(im) > 0.1 for im in imgs])
    assert sk[tie].sum() > 20 and (~sk[tie]).sum() > 20  # such pixels, on either side in skimage
    x = imgs if kind == "uint8" else imgs.astype(np.float32) / np.float32(255)
    got = ComplexityScorer().metrics(x).numpy()
    edge = np.stack([sobel(im.astype(np.float64) / 255.0 if kind == "uint8" else im.astype(np.float64)) > 0.1
                     for im in x])
    np.testing.assert_array_equal(got[:, 1], edge.mean(axis=(1, 2)))
    np.testing.assert_allclose(got[:, 3], [box_counting_dimension_numpy(m) for m in edge], rtol=0, atol=1e-12)


@pytest.mark.parametrize("kind", ["float64", "uint16_12bit", "rgb_uint8"])
def test_threshold_ties_of_float64_gray_images_are_decided_on_the_float64_values(kind):
    """The same tie-heavy images as 8-bit data in a float64 image (``img_as_float``), as 12-bit data in uint16, and
    as a 3-channel copy: scikit-image filters the float64 gray image, whose values (k / 255, k / 4095, rgb2gray)
    are not float32 numbers. Ties used to be re-decided on the float32-rounded gray image, so the rounding noise
    decided them (edge density off by up to 5%, fractal dimension by 0.09)."""
    rng = np.random.default_rng(1)
    levels = rng.integers(0, 5, (40, 16, 16))
    if kind == "float64":
        x = levels * rng.choice([17, 34, 51], (40, 1, 1)) / 255.0
        gray, kw = x, {}
    elif kind == "uint16_12bit":
        x = (levels * rng.choice([273, 546, 819], (40, 1, 1))).astype(np.uint16)  # 4 * 4095 * 0.1 = 1638 = 2 * 819
        gray, kw = x / 4095.0, {"bits_stored": 12}
    else:
        x = np.repeat((levels * rng.choice([17, 34, 51], (40, 1, 1))).astype(np.uint8)[..., None], 3, axis=-1)
        gray, kw = np.stack([rgb2gray(im) for im in x]), {}
    edge = np.stack([sobel(g) > 0.1 for g in gray])
    got = ComplexityScorer().metrics(list(x), **kw).numpy()
    np.testing.assert_array_equal(got[:, 1], edge.mean(axis=(1, 2)))
    np.testing.assert_allclose(got[:, 3], [box_counting_dimension_numpy(m) for m in edge], rtol=0, atol=1e-12)
    np.testing.assert_allclose(got[:, 2], gray.std(axis=(1, 2)), rtol=0, atol=1e-12)


@pytest.mark.parametrize("thr", [0.02, 0.05, 0.2])
def test_edge_threshold_configurable(kermany32, thr):
    got = ComplexityScorer(edge_threshold=thr).metrics(kermany32[:6]).numpy()
    ref = np.stack([_skimage_metrics(im, thr) for im in kermany32[:6]])
    assert np.abs(got[:, 1] - ref[:, 1]).max() <= 1e-3
    assert np.abs(got[:, 3] - ref[:, 3]).max() <= 1e-2


def test_float_gray_path_matches_skimage(kermany32):
    """Non-8-bit gray input (a float image with values between the 256 levels)."""
    rng = np.random.default_rng(0)
    x = np.clip(kermany32[:4].astype(np.float64) / 255.0 + rng.normal(0, 0.002, kermany32[:4].shape), 0, 1)
    got = ComplexityScorer().metrics(x.astype(np.float32)).numpy()
    ref = np.stack([reference_metrics(im) for im in x.astype(np.float32)])
    assert np.all(np.abs(got - ref) <= TOL)


def test_compute_metrics_chunking_is_invisible(kermany32):
    u8 = torch.from_numpy(kermany32)
    g = u8.float() / 255
    whole = compute_metrics(g, u8, exact_u8=True)
    single = torch.cat([compute_metrics(g[i : i + 1], u8[i : i + 1], exact_u8=True) for i in range(5)])
    assert torch.equal(whole[:5], single)
    # the exact-u8 fast path equals the generic float path
    generic = compute_metrics(g[:5], u8[:5], exact_u8=False)
    assert torch.allclose(whole[:5], generic, atol=1e-9)


def test_small_integer_lbp_criterion_is_exact_for_8bit_data():
    """lbp_codes decides diagonal bits by sign(577 d + 239 e); it must equal sign(70711 d + 29289 e) (skimage's
    interpolation weights 0.70711 / 0.29289 in integer form) for every 8-bit d = D - x, e = N1 + N2 - 2x."""
    d = np.arange(-255, 256)[:, None]
    e = np.arange(-510, 511)[None, :]
    assert np.array_equal(np.sign(577 * d + 239 * e), np.sign(70711 * d + 29289 * e))


def test_device_generic_code_paths_on_cpu(monkeypatch, kermany32, ham8):
    """The branches taken on GPU (single offset bincount, torch nonzero, torch RGB->gray, no chunking) give the
    same metrics; RGB may differ only at exact .5 gray ties (a few pixels move one gray level)."""
    from medquant.complexity import metrics as m

    sc = ComplexityScorer()
    cpu_gray, cpu_rgb = sc.metrics(kermany32[:8]), sc.metrics(ham8[:3])
    monkeypatch.setattr(m, "FORCE_GENERIC", True)
    assert torch.equal(sc.metrics(kermany32[:8]), cpu_gray)
    gen_rgb = sc.metrics(ham8[:3])
    assert torch.allclose(gen_rgb, cpu_rgb, atol=5e-4)
