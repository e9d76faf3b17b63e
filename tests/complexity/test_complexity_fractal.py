"""Box-counting fractal dimension: shapes of known dimension and a plain numpy loop reference."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from skimage.filters import sobel

from medquant.complexity.metrics import box_counting_dimension, box_counts
from medquant.complexity.reference import box_counting_dimension_loop, box_counting_dimension_numpy


def _fd(mask: np.ndarray) -> float:
    return float(box_counting_dimension(torch.from_numpy(mask)[None])[0])


def sierpinski(order: int) -> np.ndarray:
    """Sierpinski triangle on a 2^order grid: cell (r, c) is set iff (r & c) == 0 (Pascal's triangle mod 2)."""
    n = 2**order
    r, c = np.indices((n, n))
    return (r & c) == 0


def test_filled_square_is_2():
    m = np.zeros((256, 256), bool)
    m[:, :] = True
    assert abs(_fd(m) - 2.0) < 0.05
    m = np.zeros((256, 256), bool)
    m[128:, :128] = True  # a 128-px square on the box grid: N(s) = (128 / s)^2 exactly
    assert abs(_fd(m) - 2.0) < 1e-9
    m = np.zeros((512, 512), bool)
    m[3:509, 5:510] = True  # off the grid by a few pixels
    assert abs(_fd(m) - 2.0) < 0.05


@pytest.mark.parametrize("kind", ["row", "column", "diagonal"])
def test_line_is_1(kind):
    m = np.zeros((256, 256), bool)
    if kind == "row":
        m[100, :] = True
    elif kind == "column":
        m[:, 37] = True
    else:
        np.fill_diagonal(m, True)
    assert abs(_fd(m) - 1.0) < 0.05


def test_sierpinski_is_log3_log2():
    m = sierpinski(9)  # 512 x 512
    assert abs(_fd(m) - np.log(3) / np.log(2)) < 0.05
    assert abs(box_counting_dimension_loop(sierpinski(7)) - np.log(3) / np.log(2)) < 0.05


def test_empty_and_single_pixel_masks():
    assert _fd(np.zeros((64, 64), bool)) == 0.0
    one = np.zeros((64, 64), bool)
    one[10, 10] = True
    assert _fd(one) == pytest.approx(0.0, abs=1e-12)  # N(s) = 1 at every size: slope 0
    # 8x8 image: only s = 2, 4 -> two sizes, still a slope; 4x... images are rejected upstream (< 8 px)
    assert _fd(np.ones((8, 8), bool)) == pytest.approx(2.0)


def test_partial_boxes_at_the_edge_are_dropped():
    m = np.zeros((10, 10), bool)
    m[9, 9] = True  # only in the partial strip for s = 4 (boxes cover rows 0..7)
    sizes, counts = box_counts(torch.from_numpy(m)[None])
    assert sizes == [2, 4]
    assert counts[0].tolist() == [1, 0]
    assert _fd(m) == 0.0  # one size left


def test_matches_numpy_loop_on_random_and_real_masks(kermany32):
    rng = np.random.default_rng(1)
    masks = [rng.random((h, w)) < p for (h, w, p) in [(64, 64, 0.1), (100, 37, 0.02), (224, 224, 0.5),
                                                       (50, 130, 0.001)]]
    masks += [sobel(im / 255.0) > 0.1 for im in kermany32[:3]]
    for m in masks:
        ref = box_counting_dimension_loop(m)
        assert abs(_fd(m) - ref) < 1e-2
        assert abs(box_counting_dimension_numpy(m) - ref) < 1e-12
    batch = np.stack([sobel(im / 255.0) > 0.1 for im in kermany32[:8]])
    got = box_counting_dimension(torch.from_numpy(batch)).numpy()
    ref = np.array([box_counting_dimension_loop(m) for m in batch])
    assert np.abs(got - ref).max() < 1e-9
