"""medquant.complexity.reference against scikit-image written out by hand."""
import numpy as np
import pytest
from skimage.color import rgb2gray

from medquant.complexity.reference import reference_metrics
from tests.complexity.test_complexity_metrics import skimage_metrics_of_gray


@pytest.mark.parametrize("rgb", [False, True])
def test_uint8_with_fewer_bits_stored_is_scaled_by_its_bit_depth(rgb):
    # 6-bit data in a uint8 container: gray = x / 63 (as the scorer reads it), not x / 255
    rng = np.random.default_rng(3)
    six = rng.integers(0, 64, (24, 24, 3) if rgb else (24, 24)).astype(np.uint8)
    scaled = six.astype(np.float64) / 63.0
    want = skimage_metrics_of_gray(rgb2gray(scaled) if rgb else scaled)
    np.testing.assert_allclose(reference_metrics(six, bits_stored=6), want, rtol=0, atol=1e-12)
    assert want[2] > 0.2  # the full-range reading (std ~0.29), far from the x / 255 one (~0.07)


@pytest.mark.parametrize("bits", [None, 8, 12, 16])
def test_uint8_with_8_or_more_bits_stored_is_read_as_8_bit(bits):
    rng = np.random.default_rng(4)
    im = rng.integers(0, 256, (20, 20)).astype(np.uint8)
    want = skimage_metrics_of_gray(im.astype(np.float64) / 255.0)
    np.testing.assert_allclose(reference_metrics(im, bits_stored=bits), want, rtol=0, atol=1e-12)
