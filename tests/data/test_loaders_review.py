"""Review of medquant.data's loaders: DICOM corner cases, index CSVs and npz files a user brings.

Each test compares with an independent reference: pydicom's own ``apply_modality_lut``, Pillow, numpy, or a
hand-computed array, or checks that a malformed input is a clear error naming the file and what was wrong.
"""
from __future__ import annotations

import shutil

import numpy as np
import pytest

from medquant import data as mdata
from tests.data._dicom import write_dicom


def _dataset(rows=8, cols=8, bits=8):
    """An in-memory single-frame MONOCHROME2 dataset (uncompressed, explicit VR little endian) without pixel data."""
    pytest.importorskip("pydicom")
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset("mem.dcm", {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Rows, ds.Columns = rows, cols
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = bits
    ds.HighBit = bits - 1
    ds.PixelRepresentation = 0
    return ds


# ------------------------------------------------------------------------------------------------ DICOM
def test_modality_lut_sequence_is_applied_like_pydicom(tmp_path):
    """A Modality LUT (instead of a linear rescale) maps stored values non-linearly; the image must follow it."""
    pytest.importorskip("pydicom")
    from pydicom import dcmread
    from pydicom.dataset import Dataset
    from pydicom.pixels import apply_modality_lut
    from pydicom.sequence import Sequence

    arr = np.array([[0, 100], [200, 255]], np.uint16).repeat(4, 0).repeat(4, 1)
    ds = _dataset(bits=8)
    lut = np.array([int(1000 * np.sqrt(i)) for i in range(256)], dtype="<u2")
    item = Dataset()
    item.LUTDescriptor = [256, 0, 16]
    item.ModalityLUTType = "US"
    item.LUTData = lut.tobytes()
    ds.ModalityLUTSequence = Sequence([item])
    ds.PixelData = arr.astype("<u2").tobytes()
    ds.save_as(str(tmp_path / "lut.dcm"), enforce_file_format=True)
    ds = dcmread(tmp_path / "lut.dcm")
    ref = apply_modality_lut(ds.pixel_array, ds).astype(np.float64)  # pydicom: LUT values
    expected = (ref - lut.min()) / (lut.max() - lut.min())  # over the LUT's output range
    np.testing.assert_allclose(mdata.dicom_to_array(ds)[0], expected)
    np.testing.assert_allclose(mdata.load_image(tmp_path / "lut.dcm"), expected)


def test_float_pixel_data_is_refused_not_divided_by_2_to_the_32(tmp_path):
    """Float Pixel Data has no stored bit range; it used to come out as values near 0 (v / (2**32 - 1))."""
    ds = _dataset()
    del ds.BitsStored, ds.HighBit, ds.PixelRepresentation
    ds.BitsAllocated = 32
    ds.FloatPixelData = np.linspace(0, 3, 64, dtype=np.float32).tobytes()
    ds.save_as(str(tmp_path / "f.dcm"), enforce_file_format=True)
    with pytest.raises(ValueError, match=r"f\.dcm.*Float Pixel Data"):
        mdata.load_image(tmp_path / "f.dcm")


def test_dicom_without_pixel_data_is_a_value_error_naming_the_file(tmp_path):
    ds = _dataset()
    ds.save_as(str(tmp_path / "report.dcm"), enforce_file_format=True)
    with pytest.raises(ValueError, match=r"report\.dcm.*no pixel data"):
        mdata.load_image(tmp_path / "report.dcm")
    with pytest.raises(ValueError, match=r"report\.dcm.*no pixel data"):
        mdata.load_images(tmp_path)


def test_unsupported_dicom_in_a_folder_names_the_file(tmp_path):
    """A multi-frame file among many: the error says which file, not just its shape."""
    arr = np.arange(64, dtype=np.uint16).reshape(8, 8)
    write_dicom(tmp_path / "a.dcm", arr, 12)
    ds = _dataset(bits=12)
    ds.NumberOfFrames = 2
    ds.PixelData = np.stack([arr, arr]).astype("<u2").tobytes()
    ds.save_as(str(tmp_path / "b_cine.dcm"), enforce_file_format=True)
    with pytest.raises(ValueError, match=r"b_cine\.dcm.*single-frame"):
        mdata.load_images(tmp_path)


def test_dicom_file_without_a_dcm_suffix_is_read_as_dicom(tmp_path):
    """PACS exports name files IM0001 or by UID (suffix '.123'); they start with the DICM magic."""
    arr = np.array([[0, 1000], [2000, 4095]], np.uint16).repeat(4, 0).repeat(4, 1)
    src = write_dicom(tmp_path / "x.dcm", arr, 12)
    (tmp_path / "series").mkdir()
    for name in ("IM0001", "1.2.840.99.123"):
        shutil.copy(src, tmp_path / "series" / name)
        np.testing.assert_allclose(mdata.load_image(tmp_path / "series" / name), arr / 4095.0)
    (tmp_path / "series" / "notes.txt").write_text("not an image")
    (tmp_path / "series" / "DICOMDIR").write_bytes(src.read_bytes())  # a directory record, never an image
    images, names = mdata.load_images(tmp_path / "series")
    assert names == ["1.2.840.99.123", "IM0001"]
    for im in images:
        np.testing.assert_allclose(im, arr / 4095.0)


# ------------------------------------------------------------------------------------------------ index CSV
def test_index_csv_saved_with_a_byte_order_mark(tmp_path):
    """Spreadsheet programs write 'CSV UTF-8' with a BOM; the first column is still 'path'."""
    from PIL import Image

    x = np.arange(64, dtype=np.uint8).reshape(8, 8)
    Image.fromarray(x).save(tmp_path / "a.png")
    (tmp_path / "index.csv").write_text("path,split\na.png,test\n", encoding="utf-8-sig")
    assert mdata.read_index(tmp_path / "index.csv", split="test") == [{"path": "a.png", "split": "test"}]
    images, names = mdata.load_images(tmp_path / "index.csv")
    assert names == ["a.png"]
    np.testing.assert_array_equal(images[0], x)


def test_index_rows_with_a_missing_path_or_split_are_named(tmp_path):
    p = tmp_path / "index.csv"
    p.write_text("path,split\na.png,test\nb.png\n")  # line 3 has no split field
    with pytest.raises(ValueError, match=r"index\.csv line 3.*split"):
        mdata.read_index(p, split="train")
    p.write_text("path,split\na.png,test\n,test\n")  # line 3 has an empty path
    with pytest.raises(ValueError, match=r"index\.csv line 3.*'path'"):
        mdata.read_index(p)
    with pytest.raises(KeyError, match=r"no 'split' column \(columns: \['path', ' split'\]\)"):
        (tmp_path / "ws.csv").write_text("path, split\na.png, test\n")
        mdata.read_index(tmp_path / "ws.csv", split="test")


# ------------------------------------------------------------------------------------------------ npz
def test_npz_labels_that_do_not_match_the_images_are_refused(tmp_path):
    np.savez(tmp_path / "mm.npz", test_images=np.zeros((3, 8, 8), np.uint8), test_labels=np.zeros((2, 1)))
    with pytest.raises(ValueError, match=r"3 images but 2 labels"):
        mdata.load_npz_split(tmp_path / "mm.npz", "test", with_labels=True)
    np.savez(tmp_path / "flat.npz", images=np.zeros((3, 8, 8), np.uint8), labels=np.zeros(2),
             split=np.array(["train", "valid", "test"]))
    with pytest.raises(ValueError, match=r"3 images but 2 labels"):
        mdata.load_npz_split(tmp_path / "flat.npz", "test", with_labels=True)
    # consistent files are unchanged: MedMNIST (N, 1) labels come back as stored
    y = np.array([[0], [1], [1]])
    np.savez(tmp_path / "ok.npz", test_images=np.zeros((3, 8, 8), np.uint8), test_labels=y)
    np.testing.assert_array_equal(mdata.load_npz_split(tmp_path / "ok.npz", "test", with_labels=True)[1], y)


def test_flat_npz_unknown_split_lists_the_splits_it_has(tmp_path):
    np.savez(tmp_path / "flat.npz", images=np.zeros((3, 8, 8), np.uint8), split=np.array(["train", "valid", "test"]))
    with pytest.raises(KeyError, match=r"no images with split 'val'.*splits: test, train, valid"):
        mdata.load_npz_split(tmp_path / "flat.npz", "val")


def test_load_images_key_names_the_problem(tmp_path):
    bad = tmp_path / "text.npz"
    bad.write_text("not an archive")
    with pytest.raises(ValueError, match="not an .npz archive") as e:
        mdata.load_images(bad, key="images")
    assert "pickle" not in str(e.value)
    x = np.arange(2 * 8 * 8, dtype=np.uint8).reshape(2, 8, 8)
    np.savez(tmp_path / "d.npz", scans=x, labels=np.array([0, 1]))
    with pytest.raises(KeyError, match=r"no array 'images'.*\['labels', 'scans'\]"):
        mdata.load_images(tmp_path / "d.npz", key="images")
    np.testing.assert_array_equal(mdata.load_images(tmp_path / "d.npz", key="scans")[0], x)


# ------------------------------------------------------------------------------------------------ image files
def test_sixteen_bit_colour_png_is_reduced_to_8_bits_as_documented(tmp_path):
    """Pillow reads 16-bit-per-channel colour PNGs as 8-bit RGB (the high byte); the docstring says so."""
    import struct
    import zlib

    rgb16 = np.random.default_rng(0).integers(0, 65536, (8, 8, 3)).astype(np.uint16)
    raw = b"".join(b"\0" + rgb16[i].astype(">u2").tobytes() for i in range(8))

    def chunk(tag, body):
        return struct.pack(">I", len(body)) + tag + body + struct.pack(">I", zlib.crc32(tag + body) & 0xFFFFFFFF)

    (tmp_path / "rgb16.png").write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 8, 8, 16, 2, 0, 0, 0))
                                         + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))
    got = mdata.load_image(tmp_path / "rgb16.png")
    np.testing.assert_array_equal(got, (rgb16 >> 8).astype(np.uint8))
    assert "16-bit-per-channel colour" in " ".join(mdata.load_image.__doc__.split())


def test_multi_page_tiff_is_refused_not_cut_to_its_first_page(tmp_path):
    """A CT stack saved as a multi-page TIFF used to load as its first slice only (multi-frame DICOM is refused)."""
    from PIL import Image

    pages = [Image.fromarray(np.full((8, 8), 10 * i, np.uint8)) for i in range(3)]
    pages[0].save(tmp_path / "stack.tif", save_all=True, append_images=pages[1:])
    with Image.open(tmp_path / "stack.tif") as im:
        assert im.n_frames == 3
    with pytest.raises(ValueError, match=r"stack\.tif.*3 frames"):
        mdata.load_image(tmp_path / "stack.tif")
    pages[0].save(tmp_path / "one.tif")  # a single page is read as before
    np.testing.assert_array_equal(mdata.load_image(tmp_path / "one.tif"), np.zeros((8, 8), np.uint8))
