"""Per-image reference pipeline built on scikit-image and numpy (no torch).

Used by the tests (as the independent reference the batched torch code must match) and by the speed benchmark
(as the baseline). It computes the metric definitions of :mod:`medquant.complexity.metrics` literally, one image
at a time:

* gray: ``skimage.color.rgb2gray`` for RGB, ``skimage.util.img_as_float`` for uint8 (``bits_stored`` None or
  >= 8), ``x / (2**bits - 1)`` for other integers and for uint8 with ``bits_stored`` < 8 (as the scorer reads
  them), floats as given (must be in [0, 1]);
* 8-bit image: ``skimage.util.img_as_ubyte(gray)``;
* entropy: ``skimage.measure.shannon_entropy(u8)``;
* edge mask: ``skimage.filters.sobel(gray) > threshold``; edge density its mean;
* std: ``np.std(gray)``;
* fractal dimension: :func:`box_counting_dimension_numpy` (or the explicit loop
  :func:`box_counting_dimension_loop`);
* LBP entropy: ``shannon_entropy(local_binary_pattern(u8, 8, 1, "uniform"))``.
"""
from __future__ import annotations

import warnings

import numpy as np

METRIC_NAMES = ("entropy", "edge_density", "intensity_std", "fractal_dimension", "lbp_entropy")


def to_gray_float(image: np.ndarray, bits_stored: int | None = None) -> np.ndarray:
    """(H, W) or (H, W, 3) array -> float64 gray image in [0, 1].

    Integers are divided by ``2**bits - 1`` (``bits = bits_stored``, default from the dtype); a uint8 image is read
    as 8-bit (``x / 255``) unless ``bits_stored`` < 8, as in :mod:`medquant.complexity.inputs`. RGB is reduced
    with ``rgb2gray`` after that scaling.

    Args:
        image: a gray ``(H, W)`` or RGB ``(H, W, 3)`` image.
        bits_stored: bit depth of integer images (default from the dtype; for uint8 used only when below 8).

    Returns:
        ``(H, W)`` float64 in [0, 1].
    """
    from skimage.color import rgb2gray
    from skimage.util import img_as_float

    image = np.asarray(image)
    native_u8 = image.dtype == np.uint8 and (bits_stored is None or bits_stored >= 8)
    if image.ndim == 3:
        if native_u8:
            return rgb2gray(image)
        return rgb2gray(to_gray_float_channels(image, bits_stored))
    if native_u8:
        return img_as_float(image)
    if image.dtype.kind in "ui":
        bits = bits_stored or 8 * image.dtype.itemsize
        return image.astype(np.float64) / (2**bits - 1)
    return image.astype(np.float64)


def to_gray_float_channels(image: np.ndarray, bits_stored: int | None) -> np.ndarray:
    """An image's values scaled to [0, 1] channel by channel (integers by ``2^bits - 1``; floats unchanged).

    Args:
        image: the image.
        bits_stored: bit depth of integer images (default from the dtype).

    Returns:
        A float64 array of the image's shape.
    """
    if image.dtype.kind in "ui":
        bits = bits_stored or 8 * image.dtype.itemsize
        return image.astype(np.float64) / (2**bits - 1)
    return image.astype(np.float64)


def box_sizes(h: int, w: int) -> list[int]:
    """Box sizes 2, 4, 8, ... up to ``min(h, w) / 2`` (the same as the torch code's).

    Args:
        h: image height.
        w: image width.

    Returns:
        The sizes.
    """
    sizes, s = [], 2
    while s <= min(h, w) / 2:
        sizes.append(s)
        s *= 2
    return sizes


def _slope(sizes, counts) -> float:
    pts = [(np.log(1.0 / s), np.log(n)) for s, n in zip(sizes, counts) if n > 0]
    if len(pts) < 2:
        return 0.0
    x, y = np.array(pts).T
    return float(np.polyfit(x, y, 1)[0])


def box_counting_dimension_loop(mask: np.ndarray) -> float:
    """Plain loop over every whole box (top-left tiling) of every size; slope via ``np.polyfit``.

    Args:
        mask: a boolean ``(H, W)`` mask.

    Returns:
        The dimension (0 when fewer than two box sizes are occupied).
    """
    mask = np.asarray(mask, dtype=bool)
    h, w = mask.shape
    sizes = box_sizes(h, w)
    counts = []
    for s in sizes:
        n = 0
        for y in range(0, h - s + 1, s):
            for x in range(0, w - s + 1, s):
                if mask[y : y + s, x : x + s].any():
                    n += 1
        counts.append(n)
    return _slope(sizes, counts)


def box_counting_dimension_numpy(mask: np.ndarray) -> float:
    """Same as :func:`box_counting_dimension_loop`, vectorised per size with a reshape.

    Args:
        mask: a boolean ``(H, W)`` mask.

    Returns:
        The dimension.
    """
    mask = np.asarray(mask, dtype=bool)
    h, w = mask.shape
    sizes = box_sizes(h, w)
    counts = []
    for s in sizes:
        hh, ww = h // s, w // s
        blocks = mask[: hh * s, : ww * s].reshape(hh, s, ww, s)
        counts.append(int(blocks.any(axis=(1, 3)).sum()))
    return _slope(sizes, counts)


def reference_metrics(image: np.ndarray, edge_threshold: float = 0.1, bits_stored: int | None = None,
                      fd_loop: bool = False) -> np.ndarray:
    """The five metrics of one image with scikit-image / numpy -> float64 array (5,).

    Args:
        image: a gray or RGB image (uint8 / uint16 / float in [0, 1]).
        edge_threshold: Sobel magnitude above which a pixel is an edge.
        bits_stored: bit depth of integer images (default from the dtype; for uint8 used only when below 8).
        fd_loop: compute the fractal dimension with an explicit loop (slower; a cross-check).

    Returns:
        entropy, edge density, intensity std, fractal dimension, LBP entropy.
    """
    from skimage.feature import local_binary_pattern
    from skimage.filters import sobel
    from skimage.measure import shannon_entropy
    from skimage.util import img_as_ubyte

    gray = to_gray_float(image, bits_stored)
    u8 = img_as_ubyte(gray)
    entropy = shannon_entropy(u8)
    mask = sobel(gray) > edge_threshold
    edge_density = float(mask.mean())
    std = float(np.std(gray))
    fd = box_counting_dimension_loop(mask) if fd_loop else box_counting_dimension_numpy(mask)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lbp = local_binary_pattern(u8, 8, 1, "uniform")
    lbp_entropy = shannon_entropy(lbp)
    return np.array([entropy, edge_density, std, fd, lbp_entropy], dtype=np.float64)


def reference_metrics_batch(images, edge_threshold: float = 0.1, bits_stored: int | None = None) -> np.ndarray:
    """:func:`reference_metrics` over an iterable of images -> (N, 5).

    Args:
        images: the images.
        edge_threshold: as in :func:`reference_metrics`.
        bits_stored: as in :func:`reference_metrics`.

    Returns:
        ``(N, 5)`` float64 array.
    """
    rows = [reference_metrics(im, edge_threshold, bits_stored) for im in images]
    return np.stack(rows) if rows else np.zeros((0, 5))
