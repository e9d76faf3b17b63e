"""Review round 3 of ComplexityScorer: each test failed before its fix (see the report of that round)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from skimage.color import rgb2gray
from skimage.util import img_as_ubyte

from medquant.complexity.scorer import ComplexityScorer
from tests.complexity.test_complexity_metrics import skimage_metrics_of_gray


def _rgb_tie_image() -> np.ndarray:
    """A 32 x 32 RGB uint8 image of pixels whose exact gray level 255 * gray = 0.2125 R + 0.7154 G + 0.0721 B is
    k + 0.5: ``img_as_ubyte`` rounds them by the last bit of scikit-image's float64 ``rgb2gray``."""
    r, g, b = np.meshgrid(np.arange(256), np.arange(256), np.arange(256), indexing="ij", sparse=True)
    v = 2125 * r + 7154 * g + 721 * b
    ties = np.argwhere(v % 10000 == 5000).astype(np.uint8)  # (n, 3) triples (R, G, B)
    rng = np.random.default_rng(0)
    return ties[rng.choice(len(ties), 32 * 32, replace=False)].reshape(32, 32, 3)


def test_rgb_channel_first_tensors_and_arrays_read_as_scikit_image_reads_them():
    # rgb2gray's rounding must not depend on the memory layout of the input: a plain (B, 3, H, W) tensor (the
    # usual layout) once gave other 8-bit gray levels than the same image as (H, W, 3) or channels-last
    img = _rgb_tie_image()
    gray = rgb2gray(img)
    want = skimage_metrics_of_gray(gray)
    u8_want = img_as_ubyte(gray)
    scorer = ComplexityScorer()
    nchw = torch.from_numpy(img).permute(2, 0, 1)[None].contiguous()
    inputs = {
        "HWC array": img,
        "NCHW tensor": nchw,
        "NCHW channels-last tensor": nchw.contiguous(memory_format=torch.channels_last),
        "NCHW array": np.ascontiguousarray(img.transpose(2, 0, 1)[None]),
    }
    for name, x in inputs.items():
        got = scorer.metrics(x)[0].numpy()
        assert np.abs(got - want).max() <= 1e-12, (name, got, want)
    # float images are used as given: rgb2gray of img / 255, whatever the layout
    unit = img / 255.0
    want_f = skimage_metrics_of_gray(rgb2gray(unit))
    t = torch.from_numpy(unit).permute(2, 0, 1)[None]
    for x in (t.contiguous(), t.contiguous(memory_format=torch.channels_last), unit):
        assert np.abs(scorer.metrics(x)[0].numpy() - want_f).max() <= 1e-12
    # the 8-bit gray levels themselves (entropy is only a summary of them)
    from medquant.complexity.inputs import prepare

    for name, x in inputs.items():
        _, [grp] = prepare(x)
        assert np.array_equal(grp.u8[0].numpy(), u8_want), name


def test_images_and_metrics_together_are_refused_not_one_silently_ignored():
    # score / levels / fit took metrics= and silently ignored the images passed with them
    rng = np.random.default_rng(1)
    ims = rng.integers(0, 256, (6, 16, 16)).astype(np.uint8)
    scorer = ComplexityScorer(n_levels=2).fit(ims)
    other = scorer.metrics(ims[::-1].copy())
    for call in (scorer.score, scorer.levels, scorer.fit):
        with pytest.raises(ValueError, match="not both"):
            call(ims, metrics=other)
    # each alone still works, and they agree when they describe the same images
    assert torch.equal(scorer.score(ims), scorer.score(metrics=scorer.metrics(ims)))


def test_n_levels_as_a_numpy_integer():
    # ComplexityScorer(n_levels=np.int64(4)) said "n_levels must be a positive integer, got np.int64(4)"
    m = torch.arange(40, dtype=torch.float64).reshape(8, 5)
    a = ComplexityScorer(n_levels=np.int64(4)).fit(metrics=m)
    b = ComplexityScorer(n_levels=4).fit(metrics=m)
    assert a.n_levels == 4 and torch.equal(a.thresholds, b.thresholds)
    assert torch.equal(a.levels(metrics=m), torch.tensor([0, 0, 1, 1, 2, 2, 3, 3]))
    for bad in (0, -1, True, 2.0, np.float64(2.0)):
        with pytest.raises(ValueError, match="n_levels must be a positive integer"):
            ComplexityScorer(n_levels=bad)


@pytest.mark.parametrize("weights", [1.0, "abcde", [1, 2, "x", 4, 5], {"entropy": "a"}, torch.ones(5, 2)])
def test_malformed_weights_raise_value_error_saying_what_is_accepted(weights):
    # were TypeError "'float' object is not iterable" / "could not convert string to float: 'a'"
    with pytest.raises(ValueError, match="weights must be 5 non-negative numbers in the order entropy"):
        ComplexityScorer(weights=weights)
    with pytest.raises(ValueError, match="weights must be 5 non-negative numbers"):
        ComplexityScorer().set_weights(weights)


@pytest.mark.parametrize("thr", [None, "0.1", float("nan"), -0.1])
def test_malformed_edge_threshold_raises_value_error(thr):
    # None and "0.1" were TypeError "must be real number, not ..." from math.isfinite
    with pytest.raises(ValueError, match="edge_threshold must be a non-negative number"):
        ComplexityScorer(edge_threshold=thr)
    assert float(ComplexityScorer(edge_threshold=np.float32(0.25)).edge_threshold) == 0.25
