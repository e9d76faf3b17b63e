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


def _dataset(arr):
    """An in-memory 12-bit MONOCHROME2 DICOM dataset holding ``arr``."""
    pytest.importorskip("pydicom")
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.Rows, ds.Columns = arr.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = arr.astype(np.uint16).tobytes()
    return ds


def test_a_dicom_dataset_without_pixel_data_gets_the_dicom_message_not_unsupported_type():
    """A pydicom dataset without (integer) Pixel Data was refused as 'unsupported image type Dataset; accepted
    ... pydicom datasets', which contradicts itself; medquant.data.dicom_to_array says what is wrong (no pixel
    data: a report or DICOMDIR; float pixel data: no stored bit range)."""
    from medquant.data import dicom_to_array

    arr = (np.arange(400).reshape(20, 20) * 7) % 4096
    ds = _dataset(arr)
    want = reference_metrics(dicom_to_array(ds)[0])
    np.testing.assert_allclose(ComplexityScorer().metrics(ds)[0].numpy(), want, rtol=0, atol=1e-9)

    no_pixels = _dataset(arr)
    del no_pixels.PixelData
    floats = _dataset(arr)
    floats.FloatPixelData = arr.astype(np.float32).tobytes()
    del floats.PixelData
    for ds in (no_pixels, floats):
        with pytest.raises(ValueError) as lib:
            dicom_to_array(ds)
        with pytest.raises(ValueError) as scorer:
            ComplexityScorer().metrics([ds])
        assert str(lib.value) in str(scorer.value)


@pytest.mark.parametrize("as_list", [False, True])
def test_a_bad_image_of_a_batch_is_named_by_its_index(as_list):
    """'Bad inputs raise a ValueError or TypeError that names the image' (docs/reference/complexity.md): for a
    batch (B, H, W) the message said only 'input contains NaN' / 'values span ...' for the whole batch, not which of
    its B images is bad; the reported range is the bad image's own."""
    import torch

    rng = np.random.default_rng(4)
    floats = rng.random((6, 16, 16))
    floats[4, 2, 3] = np.nan
    too_big = rng.random((6, 16, 16))
    too_big[3] *= 1.5  # only image 3 leaves [0, 1]
    twelve = rng.integers(0, 4096, (6, 16, 16)).astype(np.uint16)
    twelve[5, 0, 0] = 5000  # only image 5 exceeds 12 bits
    cases = [(floats, None, 4, "NaN"), (too_big, None, 3, f"max {too_big[3].max():.6g}"),
             (torch.from_numpy(twelve.astype(np.int32)), 12, 5, f"[{twelve[5].min()}, 5000]")]
    for batch, bits, index, detail in cases:
        with pytest.raises(ValueError) as e:
            ComplexityScorer().metrics([batch] if as_list else batch, bits_stored=bits)
        msg = str(e.value)
        assert f"batch index {index}" in msg and detail in msg, msg
        assert ("image 0" in msg) == as_list, msg


def test_long_double_float_images_are_read_like_float64_ones():
    """np.longdouble arrays are float images in [0, 1] like any other (the module accepts floats); they reached
    torch.from_numpy, which refused them ("can't convert np.ndarray of type numpy.longdouble")."""
    rng = np.random.default_rng(5)
    img = rng.random((20, 24))
    got = ComplexityScorer().metrics(img.astype(np.longdouble))[0].numpy()
    np.testing.assert_allclose(got, reference_metrics(img), rtol=0, atol=1e-9)
