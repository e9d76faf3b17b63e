"""medquant.deploy.onnx.load_calibration_batches: the layouts, scalings and conversions it documents, against values
computed by hand with numpy; the errors name the file and the sample."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.numpy import save_file

from medquant.deploy.onnx import CalibrationError, load_calibration_batches


def test_channels_last_uint8_scaled_normalized_and_batched(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (5, 6, 7, 3), dtype=np.uint8)  # (N, H, W, C)
    np.save(tmp_path / "c.npy", x)
    batches = load_calibration_batches(tmp_path / "c.npy", batch_size=2, mean=[0.5, 0.4, 0.3], std=[0.2])
    assert [tuple(b.shape) for b in batches] == [(2, 3, 6, 7), (2, 3, 6, 7), (1, 3, 6, 7)]
    want = (x.transpose(0, 3, 1, 2).astype(np.float32) / 255 - np.array([0.5, 0.4, 0.3], np.float32)[:, None, None]) \
        / np.float32(0.2)
    np.testing.assert_allclose(torch.cat(batches).numpy(), want, rtol=1e-6, atol=1e-6)


def test_uint16_gray_repeated_to_three_channels_and_limit(tmp_path):
    x = np.arange(4 * 3 * 3, dtype=np.uint16).reshape(4, 3, 3) * 1000  # (N, H, W)
    save_file({"images": x}, str(tmp_path / "g.safetensors"))
    (b,) = load_calibration_batches(tmp_path / "g.safetensors", limit=3, channels=3)
    assert b.shape == (3, 3, 3, 3)
    np.testing.assert_allclose(b[:, 1].numpy(), x[:3].astype(np.float32) / 65535, rtol=1e-6)
    assert torch.equal(b[:, 0], b[:, 2])


def test_float_arrays_are_used_as_given_and_resized(tmp_path):
    x = np.random.default_rng(1).standard_normal((3, 2, 8, 8)).astype(np.float32)
    np.savez(tmp_path / "f.npz", calib=x, other=x[:1])
    (b,) = load_calibration_batches(tmp_path / "f.npz", key="calib")
    np.testing.assert_array_equal(b.numpy(), x)
    (r,) = load_calibration_batches(tmp_path / "f.npz", key="calib", image_size=4)
    # antialiased bilinear = PIL's bilinear resampling (a triangle filter widened by the scale factor)
    from PIL import Image

    want = np.stack([[np.asarray(Image.fromarray(ch).resize((4, 4), Image.BILINEAR)) for ch in im]
                     for im in x])
    np.testing.assert_allclose(r.numpy(), want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("make,kwargs,message", [
    (lambda p: np.save(p / "a.npy", np.zeros((2, 3, 4, 4), np.float32)), {"mean": [0.5]}, "floating point"),
    (lambda p: np.save(p / "a.npy", np.zeros((2, 3, 4, 4), np.float32)), {"channels": 1}, "not converted"),
    (lambda p: np.save(p / "a.npy", np.zeros((2, 2, 3, 4, 4), np.uint8)), {}, "got shape (2, 2, 3, 4, 4)"),
    (lambda p: np.save(p / "a.npy", np.zeros((0, 3, 4, 4), np.uint8)), {}, "no calibration samples"),
    (lambda p: np.save(p / "a.npy", np.full((2, 3, 4, 4), np.inf, np.float32)), {}, "sample 0 contains 48 NaN/inf"),
    (lambda p: np.save(p / "a.npy", np.zeros((2, 3, 4, 4), np.uint8)), {"std": [1.0, 0.0, 1.0]}, "std must not"),
    (lambda p: np.save(p / "a.npy", np.zeros((2, 3, 4, 4), np.uint8)), {"mean": [0.1, 0.2]}, "mean has 2 values"),
])
def test_errors_name_the_problem(tmp_path, make, kwargs, message):
    make(tmp_path)
    with pytest.raises(CalibrationError) as e:
        load_calibration_batches(tmp_path / "a.npy", **kwargs)
    assert message in str(e.value)


def test_folder_of_different_sizes_needs_image_size(tmp_path):
    from PIL import Image

    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "a.png")
    Image.fromarray(np.full((6, 6), 255, np.uint8)).save(tmp_path / "b.png")
    with pytest.raises(CalibrationError, match="differ in size"):
        load_calibration_batches(tmp_path)
    (b,) = load_calibration_batches(tmp_path, image_size=4)
    assert b.shape == (2, 1, 4, 4) and float(b[0].max()) == 0.0 and float(b[1].min()) == pytest.approx(1.0)
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_calibration_batches(tmp_path / "missing.npy")


@pytest.mark.parametrize("dtype", [np.int64, np.int32, np.int16, np.int8, np.uint32])
def test_integer_pixels_without_a_fixed_range_are_refused(tmp_path, dtype):
    """Only uint8 and uint16 pixels have a fixed [0, 1] scaling (255 / 65535). Other integer types (int64 from
    ``np.array`` of Python ints, int32 from Pillow's mode-I TIFFs, int16 CT numbers) were divided by their type's
    maximum: 8-bit pixels in int64 became values below 3e-17 and calibrated near-zero activation scales."""
    x = np.random.default_rng(0).integers(0, 128, (4, 3, 6, 6)).astype(dtype)
    np.save(tmp_path / "a.npy", x)
    with pytest.raises(CalibrationError, match=rf"sample 0 has integer type {np.dtype(dtype).name}.*uint8 or uint16"):
        load_calibration_batches(tmp_path / "a.npy")
    np.save(tmp_path / "u8.npy", x.astype(np.uint8))  # the same pixels as uint8: scaled by 255
    (b,) = load_calibration_batches(tmp_path / "u8.npy")
    np.testing.assert_allclose(b.numpy(), x.astype(np.float32) / 255, rtol=1e-6)


def test_signed_tiff_folder_is_refused(tmp_path):
    """A folder of 32-bit integer TIFFs (Pillow mode I, read as int32): refused, naming the image."""
    from PIL import Image

    Image.fromarray(np.full((8, 8), 1000, np.int32)).save(tmp_path / "ct.tif")
    with pytest.raises(CalibrationError, match=r"image 0 has integer type int32"):
        load_calibration_batches(tmp_path)


def test_a_dicom_folder_is_pixels_normalized_with_mean_and_std(tmp_path):
    """DICOM images arrive as floats in [0, 1] (medquant.data.dicom_to_array): in a folder they are pixels, so
    mean / std apply to them as to PNG pixels (they were refused as 'preprocessed floats', and the command line then
    calibrated on unnormalized pixels); a folder mixing DICOM and 8-bit PNG scales each image by its own type."""
    from PIL import Image

    from medquant.data import dicom_to_array, read_dicom
    from tests.data._dicom import write_dicom

    rng = np.random.default_rng(4)
    raw = rng.integers(0, 4096, (2, 6, 6))
    folder = tmp_path / "dcm"
    folder.mkdir()
    for i, a in enumerate(raw):
        write_dicom(folder / f"{i}.dcm", a, bits=12)
    png = rng.integers(0, 256, (6, 6), dtype=np.uint8)
    Image.fromarray(png).save(folder / "2.png")
    (b,) = load_calibration_batches(folder, mean=[0.25], std=[0.5])
    dcm = [dicom_to_array(read_dicom(folder / f"{i}.dcm"))[0] for i in range(2)]  # the loader's own [0, 1] pixels
    want = np.stack([*dcm, png / 255.0])[:, None].astype(np.float32)
    np.testing.assert_allclose(b.numpy(), (want - np.float32(0.25)) / np.float32(0.5), rtol=1e-6, atol=1e-6)
    # stacked float arrays stay "preprocessed": mean / std are still refused there
    np.save(tmp_path / "f.npy", want)
    with pytest.raises(CalibrationError, match="preprocessed"):
        load_calibration_batches(tmp_path / "f.npy", mean=[0.25], std=[0.5])


def test_a_single_number_mean_and_std_apply_to_every_channel(tmp_path):
    """``mean`` / ``std`` given as one number (not a list) are that one value for every channel, as ``[0.5]`` is
    (a raw TypeError 'float has no len()' before). Reference: numpy by hand."""
    x = np.random.default_rng(2).integers(0, 256, (3, 3, 4, 4), dtype=np.uint8)
    np.save(tmp_path / "u.npy", x)
    (b,) = load_calibration_batches(tmp_path / "u.npy", mean=0.5, std=0.25)
    want = (x.astype(np.float32) / 255 - np.float32(0.5)) / np.float32(0.25)
    np.testing.assert_allclose(b.numpy(), want, rtol=1e-6, atol=1e-6)
    (c,) = load_calibration_batches(tmp_path / "u.npy", mean=np.float32(0.5), std=[0.25])
    np.testing.assert_allclose(c.numpy(), want, rtol=1e-6, atol=1e-6)
    with pytest.raises(CalibrationError, match="mean must be a number or a list of numbers, got str"):
        load_calibration_batches(tmp_path / "u.npy", mean="0.5")


@pytest.mark.parametrize("array", [np.full((2, 3, 4, 4), 1 + 2j, np.complex64), np.full((2, 3, 4, 4), "a")])
def test_samples_that_are_not_real_numbers_are_refused(tmp_path, array):
    """Complex samples lost their imaginary part with only a torch warning (and strings failed inside torch): both
    are refused, naming the type and what is accepted."""
    np.save(tmp_path / "a.npy", array)
    with pytest.raises(CalibrationError, match=rf"sample 0 has type {array.dtype.name}: expected uint8 / uint16 "
                                               r"pixels or floating"):
        load_calibration_batches(tmp_path / "a.npy")
