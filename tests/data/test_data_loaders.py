"""medquant.data: npz / folder / CSV loaders, data-dir resolution and the DICOM path."""
from __future__ import annotations

import csv
import os
from pathlib import Path

import numpy as np
import pytest

from medquant import data as mdata
from tests.data._dicom import write_dicom as _write_dicom

DATA = Path(os.environ.get("MEDQUANT_DATA_DIR") or Path(__file__).resolve().parents[3] / "shared" / "data")
needs_data = pytest.mark.skipif(not DATA.exists(), reason=f"shared data not found at {DATA}")


def test_default_data_dir_argument_then_env_else_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("MEDQUANT_DATA_DIR", str(tmp_path))
    assert mdata.default_data_dir() == tmp_path
    assert mdata.default_data_dir(tmp_path / "x") == tmp_path / "x"  # an explicit argument wins
    monkeypatch.delenv("MEDQUANT_DATA_DIR")
    assert mdata.default_data_dir(str(tmp_path)) == tmp_path
    with pytest.raises(mdata.DataDirNotSet, match="data_dir.*MEDQUANT_DATA_DIR"):
        mdata.default_data_dir()
    assert issubclass(mdata.DataDirNotSet, FileNotFoundError)


def test_reports_default_path_follows_the_data_dir(monkeypatch, tmp_path):
    from medquant.data.reports import default_reports_path, load_iu_reports

    monkeypatch.setenv("MEDQUANT_DATA_DIR", str(tmp_path))
    assert default_reports_path() == tmp_path / "iu_xray_reports" / "NLMCXR_reports.tgz"
    monkeypatch.delenv("MEDQUANT_DATA_DIR")
    with pytest.raises(FileNotFoundError, match="MEDQUANT_DATA_DIR"):
        load_iu_reports()


@needs_data
def test_npz_medmnist_and_flat_files():
    imgs, labels = mdata.load_npz_split(DATA / "pneumoniamnist" / "pneumoniamnist.npz", "test", with_labels=True)
    assert imgs.shape == (624, 28, 28) and imgs.dtype == np.uint8 and len(labels) == 624
    assert mdata.load_npz_split(DATA / "pneumoniamnist" / "pneumoniamnist.npz", "all").shape[0] == 4708 + 524 + 624
    # the shipped NIH split puts 30 patients in several splits (refused by default, see test_leakage_npz.py); this
    # test is about the flat layout only
    nih = mdata.load_npz_split(DATA / "nih_cxr14_sample1000_64" / "nih_cxr14_sample1000_64.npz", "test",
                               allow_leakage=True)
    assert nih.shape == (200, 64, 64)
    with pytest.raises(KeyError):
        mdata.load_npz_split(DATA / "pneumoniamnist" / "pneumoniamnist.npz", "nosuchsplit")


def test_npz_on_a_users_own_file(tmp_path):
    x = np.arange(2 * 9 * 9, dtype=np.uint8).reshape(2, 9, 9)
    np.savez(tmp_path / "mine.npz", train_images=x, train_labels=np.array([0, 1]))
    np.testing.assert_array_equal(mdata.load_npz_split(tmp_path / "mine.npz", "train"), x)


@needs_data
def test_image_folder_with_index_csv():
    root = DATA / "kermany_pediatric_cxr_224"
    imgs, rows = mdata.load_image_folder(root, split="test", limit=5, gray=True)
    assert len(imgs) == 5 and all(r["split"] == "test" for r in rows)
    assert imgs[0].shape == (224, 224) and imgs[0].dtype == np.uint8
    ham, rows = mdata.load_image_folder(DATA / "ham10000_lesion_subset_224", "metadata.csv", split="val", limit=2)
    assert ham[0].shape == (224, 224, 3)


def test_image_folder_without_index(tmp_path):
    from PIL import Image

    (tmp_path / "sub").mkdir()
    for i in range(3):
        Image.fromarray(np.full((10, 12), 40 * i, np.uint8)).save(tmp_path / "sub" / f"{i}.png")
    imgs, rows = mdata.load_image_folder(tmp_path)
    assert [r["path"] for r in rows] == ["sub/0.png", "sub/1.png", "sub/2.png"]
    assert imgs[2][0, 0] == 80
    images, names = mdata.load_images(tmp_path)
    assert len(images) == 3 and names[0] == "sub/0.png"


def test_dicom_12bit_monochrome1_rescale(tmp_path):
    from medquant.complexity import ComplexityScorer
    from medquant.complexity.reference import reference_metrics

    rng = np.random.default_rng(0)
    arr = rng.integers(0, 4096, (48, 40)).astype(np.uint16)
    arr[:10, :10] = 4095
    p2 = _write_dicom(tmp_path / "m2.dcm", arr, 12)
    p1 = _write_dicom(tmp_path / "m1.dcm", arr, 12, "MONOCHROME1", slope=2.0, intercept=-1024.0)
    x2, _ = mdata.dicom_to_array(mdata.read_dicom(p2))
    x1, _ = mdata.dicom_to_array(mdata.read_dicom(p1))
    np.testing.assert_allclose(x2, arr / 4095.0)  # 12-bit depth honoured (not / 65535)
    np.testing.assert_allclose(x1, 1.0 - arr / 4095.0, atol=1e-12)  # rescale cancels, MONOCHROME1 inverted
    sc = ComplexityScorer()
    got = sc.metrics([mdata.read_dicom(p2), mdata.read_dicom(p1)]).numpy()
    np.testing.assert_allclose(got[0], reference_metrics(arr, bits_stored=12), atol=1e-4)
    np.testing.assert_allclose(got[1], reference_metrics(1.0 - arr / 4095.0), atol=1e-4)
    images, names = mdata.load_images(p1)
    assert names == ["m1.dcm"] and images[0].shape == (48, 40)


def test_dicom_signed_and_rejects_colour(tmp_path):
    arr = np.array([[-2048, 0], [1000, 2047]] * 4, dtype=np.int16).repeat(4, axis=1)
    p = _write_dicom(tmp_path / "s.dcm", arr, 12, signed=True)
    x, _ = mdata.dicom_to_array(mdata.read_dicom(p))
    np.testing.assert_allclose(x, (arr + 2048) / 4095.0)
    ds = mdata.read_dicom(p)
    ds.PhotometricInterpretation = "RGB"
    with pytest.raises(ValueError, match="grayscale"):
        mdata.dicom_to_array(ds)


def test_read_index_errors(tmp_path):
    p = tmp_path / "index.csv"
    with open(p, "w", newline="") as f:
        csv.writer(f).writerows([["file", "split"], ["a.png", "test"]])
    with pytest.raises(KeyError, match="path"):
        mdata.read_index(p)
    assert mdata.read_index(p, path_column="file")[0]["file"] == "a.png"


def test_npz_that_is_not_an_archive_is_named_as_such(tmp_path):
    bad = tmp_path / "text.npz"
    bad.write_text("not an archive")
    with pytest.raises(ValueError, match="not an .npz archive") as e:
        mdata.load_npz_split(bad)
    assert "pickle" not in str(e.value)


def test_negative_limit_is_refused_not_sliced_from_the_end(tmp_path):
    from PIL import Image

    for i in range(3):
        Image.fromarray(np.full((8, 8), 40 * i, np.uint8)).save(tmp_path / f"{i}.png")
    assert len(mdata.load_images(tmp_path, limit=2)[0]) == 2
    assert len(mdata.load_images(tmp_path, limit=0)[0]) == 0
    for load in (mdata.load_images, mdata.load_image_folder):
        with pytest.raises(ValueError, match="limit must be None .* or an integer >= 0, got -1"):
            load(tmp_path, limit=-1)


def test_dicom_rescale_slope_zero_is_refused_missing_slope_means_one(tmp_path):
    arr = np.array([[0, 1000], [2000, 4095]], dtype=np.uint16).repeat(4, axis=0).repeat(4, axis=1)
    p = _write_dicom(tmp_path / "s0.dcm", arr, 12, slope=0.0, intercept=5.0)
    with pytest.raises(ValueError, match="RescaleSlope"):
        mdata.dicom_to_array(mdata.read_dicom(p))
    with pytest.raises(ValueError, match="RescaleSlope"):
        mdata.load_image(p)
    # no RescaleSlope element at all: slope 1 (the stored values over the 12-bit range)
    ds = mdata.read_dicom(_write_dicom(tmp_path / "none.dcm", arr, 12))
    assert "RescaleSlope" not in ds
    np.testing.assert_allclose(mdata.dicom_to_array(ds)[0], arr / 4095.0)
    ds.RescaleIntercept = 7.0  # an intercept alone shifts both the values and their range: same image
    np.testing.assert_allclose(mdata.dicom_to_array(ds)[0], arr / 4095.0)


@needs_data
def test_load_images_index_csv_and_folder_give_the_same_grayscale_arrays():
    from PIL import Image

    root = DATA / "kermany_pediatric_cxr_224"
    folder, names_folder = mdata.load_images(root, split="test", limit=3)
    csv_images, names_csv = mdata.load_images(root / "index.csv", split="test", limit=3)
    assert names_folder == names_csv
    for a, b, name in zip(folder, csv_images, names_csv):
        assert a.shape == b.shape == (224, 224) and a.dtype == b.dtype == np.uint8
        np.testing.assert_array_equal(a, b)
        with Image.open(root / name) as im:  # the file itself: RGB with three equal channels
            rgb = np.asarray(im)
        assert rgb.shape == (224, 224, 3)
        np.testing.assert_array_equal(b, rgb[..., 0])
        single, _ = mdata.load_images(root / name)  # one file: the same grayscale array
        np.testing.assert_array_equal(single[0], b)


@needs_data
def test_load_images_keeps_real_colour_images_in_colour():
    root = DATA / "ham10000_lesion_subset_224"
    csv_images, names = mdata.load_images(root / "metadata.csv", split="val", limit=2)
    assert csv_images[0].shape == (224, 224, 3)
    np.testing.assert_array_equal(csv_images[0], mdata.load_image(root / names[0]))


def test_corrupt_report_archive_is_a_value_error_naming_the_file(tmp_path):
    import tarfile

    bad = tmp_path / "NLMCXR_reports.tgz"
    bad.write_bytes(b"garbage")
    with pytest.raises(ValueError, match="NLMCXR_reports.tgz") as e:
        mdata.load_iu_reports(bad)
    assert isinstance(e.value.__cause__, tarfile.TarError)
    # a real archive cut short
    good = tmp_path / "ok.tgz"
    with tarfile.open(good, "w:gz") as tar:
        for i in range(40):
            xml = tmp_path / f"{i}.xml"
            xml.write_text(f'<eCitation><uId id="CXR{i}"/>' + "x" * 3000 + f"{os.urandom(2000).hex()}</eCitation>")
            tar.add(xml, arcname=f"ecgen-radiology/{i}.xml")
    assert len(mdata.load_iu_reports(good)) == 40
    cut = tmp_path / "cut.tgz"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(ValueError, match="cut.tgz"):
        mdata.load_iu_reports(cut)


def test_unknown_split_is_named_with_the_splits_that_exist(tmp_path):
    p = tmp_path / "index.csv"
    with open(p, "w", newline="") as f:
        csv.writer(f).writerows([["path", "split"], ["a.png", "train"], ["b.png", "test"], ["c.png", "train"]])
    with pytest.raises(ValueError, match=r"unknown split 'bogus' in .*index.csv: its splits are test, train"):
        mdata.read_index(p, split="bogus")
    with pytest.raises(ValueError, match="unknown split 'bogus'"):
        mdata.load_image_folder(tmp_path, split="bogus")
    assert [r["path"] for r in mdata.read_index(p, split="train")] == ["a.png", "c.png"]
    np.savez(tmp_path / "m.npz", train_images=np.zeros((1, 2, 2)), test_images=np.zeros((1, 2, 2)))
    with pytest.raises(KeyError, match=r"no split 'bogus'.*splits: test, train"):
        mdata.load_npz_split(tmp_path / "m.npz", split="bogus")


@pytest.mark.parametrize("dtype", [np.int16, np.int32, np.float32])
def test_wide_and_float_images_keep_their_values(tmp_path, dtype):
    """Signed 16-bit (CT numbers), 32-bit integer and floating-point TIFFs are read with their stored values, not
    squashed to 8-bit RGB."""
    from PIL import Image

    rng = np.random.default_rng(0)
    if dtype is np.float32:
        arr = rng.normal(0.0, 300.0, (12, 10)).astype(np.float32)
    else:
        info = np.iinfo(dtype)
        arr = rng.integers(max(info.min, -70_000), min(info.max, 70_000), (12, 10)).astype(dtype)
    path = tmp_path / "slice.tif"
    Image.fromarray(arr).save(path)
    with Image.open(path) as im:  # what the file holds, read by Pillow alone
        stored = np.asarray(im)
    np.testing.assert_array_equal(stored, arr)
    got = mdata.load_image(path)
    assert got.shape == arr.shape and got.dtype.kind == arr.dtype.kind
    np.testing.assert_array_equal(got, arr)
    images, _ = mdata.load_images(tmp_path)  # the folder loader and the CLI path read the same values
    np.testing.assert_array_equal(images[0], arr)


def test_paths_with_a_tilde_are_expanded(tmp_path, monkeypatch):
    from PIL import Image

    monkeypatch.setenv("HOME", str(tmp_path))
    assert Path("~").expanduser() == tmp_path
    x = np.arange(2 * 5 * 5, dtype=np.uint8).reshape(2, 5, 5)
    np.savez(tmp_path / "mine.npz", test_images=x, test_labels=np.array([0, 1]))
    np.testing.assert_array_equal(mdata.load_npz_split("~/mine.npz", "test"), x)
    np.testing.assert_array_equal(mdata.load_images("~/mine.npz")[0], x)
    (tmp_path / "imgs").mkdir()
    Image.fromarray(x[1]).save(tmp_path / "imgs" / "a.png")
    with open(tmp_path / "imgs" / "index.csv", "w", newline="") as f:
        csv.writer(f).writerows([["path", "split"], ["a.png", "test"]])
    np.testing.assert_array_equal(mdata.load_image("~/imgs/a.png"), x[1])
    assert [r["path"] for r in mdata.read_index("~/imgs/index.csv", split="test")] == ["a.png"]
    images, _ = mdata.load_image_folder("~/imgs", split="test")
    np.testing.assert_array_equal(images[0], x[1])
    for src in ("~/imgs", "~/imgs/index.csv", "~/imgs/a.png"):
        np.testing.assert_array_equal(mdata.load_images(src)[0][0], x[1])
    assert [p.name for p in mdata.list_image_files("~/imgs")] == ["a.png"]
    (tmp_path / "reports").mkdir()
    (tmp_path / "reports" / "1.xml").write_text(
        '<eCitation><uId id="CXR1"/><MedlineCitation><Article><Abstract>'
        '<AbstractText Label="FINDINGS">Clear lungs.</AbstractText></Abstract></Article></MedlineCitation>'
        "</eCitation>")
    assert [r.findings for r in mdata.load_iu_reports("~/reports")] == ["Clear lungs."]


def test_a_split_without_an_index_is_refused_not_ignored(tmp_path):
    from PIL import Image

    for i in range(3):
        Image.fromarray(np.full((4, 4), i, np.uint8)).save(tmp_path / f"{i}.png")
    assert len(mdata.load_image_folder(tmp_path, index_csv=None)[0]) == 3  # no split: every file
    with pytest.raises(ValueError, match="split 'test'.*index"):
        mdata.load_image_folder(tmp_path, index_csv=None, split="test")


def test_load_images_refuses_options_it_would_ignore(tmp_path):
    """``key`` replaces the split of an npz (both given: refused, not the split silently dropped); ``key`` on anything
    but an npz and ``split`` on a single image file are refused too. Each accepted form still reads what it names."""
    from PIL import Image

    rng = np.random.default_rng(0)
    train, test, other = (rng.integers(0, 256, (n, 8, 8), dtype=np.uint8) for n in (3, 2, 4))
    np.savez(tmp_path / "d.npz", train_images=train, test_images=test, other=other)
    with pytest.raises(ValueError, match="key.*split"):
        mdata.load_images(tmp_path / "d.npz", split="test", key="other")
    images, _ = mdata.load_images(tmp_path / "d.npz", key="other")
    assert np.array_equal(images, other)
    images, _ = mdata.load_images(tmp_path / "d.npz", split="test")
    assert np.array_equal(images, test)
    Image.fromarray(test[0]).save(tmp_path / "one.png")
    with pytest.raises(ValueError, match="key"):
        mdata.load_images(tmp_path / "one.png", key="other")
    with pytest.raises(ValueError, match="split"):
        mdata.load_images(tmp_path / "one.png", split="test")
    images, _ = mdata.load_images(tmp_path / "one.png")
    assert np.array_equal(images[0], test[0])
