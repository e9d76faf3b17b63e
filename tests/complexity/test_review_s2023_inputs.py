"""Review (s2023) of ``medquant.complexity.inputs``: inputs the module docstring accepts, checked against
scikit-image (``reference_metrics``)."""
from __future__ import annotations

import numpy as np
import pytest

from medquant.complexity import ComplexityScorer, reference_metrics


@pytest.mark.parametrize("dtype, scale, bits", [(">u2", 65535, None), (">i2", 4095, 12), (">f4", 1.0, None),
                                                (">f8", 1.0, None)])
def test_big_endian_arrays_are_read_like_native_ones(dtype, scale, bits):
    """Big-endian arrays (np.fromfile(..., '>u2'), FITS, some TIFF readers) are uint16 / int16 / float arrays like
    any other; they raised torch's 'byte order different from the native byte order' ValueError, and a big-endian
    uint16 array did not declare its 16 bits."""
    rng = np.random.default_rng(0)
    native = (rng.random((24, 20)) * scale).astype(np.dtype(dtype).newbyteorder("="))
    want = reference_metrics(native, bits_stored=bits)
    got = ComplexityScorer().metrics(native.astype(dtype), bits_stored=bits)[0].numpy()
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-9)
    rgb = np.dstack([native, native[::-1], native[:, ::-1]])
    got = ComplexityScorer().metrics([rgb.astype(dtype)], bits_stored=bits)[0].numpy()
    np.testing.assert_allclose(got, reference_metrics(rgb, bits_stored=bits), rtol=0, atol=1e-9)
