"""Split leakage outside load_image_folder: npz splits (patient ids, byte-identical images), read_index's split
selection, and load_images on an index CSV (duplicate paths within the split)."""
from __future__ import annotations

import csv
import os
import re
import warnings
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest

from medquant import data as mdata

DATA = Path(os.environ.get("MEDQUANT_DATA_DIR") or Path(__file__).resolve().parents[3] / "shared" / "data")
needs_data = pytest.mark.skipif(not DATA.exists(), reason=f"shared data not found at {DATA}")


def _distinct(n: int) -> np.ndarray:
    """``n`` distinct 4x4 uint8 images (image i is filled with i)."""
    return np.stack([np.full((4, 4), i, np.uint8) for i in range(n)])


def _no_warning(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return fn(*args, **kwargs)


# ------------------------------------------------------------------------------------------------ npz patients
def test_flat_npz_split_with_a_patient_under_another_split_is_refused_with_counts(tmp_path):
    split = np.array(["train", "train", "test", "test", "val", "test", "val"])
    pid = np.array([1, 2, 1, 3, 3, 4, 5], np.int32)  # 1: train+test, 3: test+val
    x = _distinct(7)
    np.savez(tmp_path / "flat.npz", images=x, labels=np.arange(7), split=split, patient_id=pid)
    with pytest.raises(ValueError) as e:  # was: the test split loaded
        mdata.load_npz_split(tmp_path / "flat.npz", "test")
    msg = str(e.value)
    assert "split 'test'" in msg and "2 of its 3 patients" in msg and "array 'patient_id'" in msg, msg
    assert "train 1, val 1" in msg, msg
    assert "'1' also under 'train'" in msg and "'3' also under 'val'" in msg, msg
    assert "allow_leakage=True" in msg, msg
    with pytest.raises(ValueError, match=r"split 'train'.*1 of its 2 patients.*test 1"):
        mdata.load_npz_split(tmp_path / "flat.npz", "train")
    with pytest.raises(ValueError, match=r"split 'val'.*1 of its 2 patients"):
        mdata.load_npz_split(tmp_path / "flat.npz", "val")
    imgs, labels = mdata.load_npz_split(tmp_path / "flat.npz", "test", with_labels=True, allow_leakage=True)
    np.testing.assert_array_equal(imgs, x[split == "test"])
    np.testing.assert_array_equal(labels, np.arange(7)[split == "test"])
    for everything in (None, "all"):  # nothing held out: not checked
        np.testing.assert_array_equal(mdata.load_npz_split(tmp_path / "flat.npz", everything), x)


def test_npz_group_key_chooses_the_id_array_and_the_default_is_a_patient_id_name(tmp_path):
    split = np.array(["train", "test", "test"])
    np.savez(tmp_path / "g.npz", images=_distinct(3), split=split, PatientID=np.array(["a", "b", " a "]),
             study=np.array(["s1", "s2", "s3"]), site=np.array(["x", "x", "y"]))
    with pytest.raises(ValueError, match=r"1 of its 2 patients \(array 'PatientID'\).*'a' also under 'train'"):
        mdata.load_npz_split(tmp_path / "g.npz", "test")  # ids stripped: ' a ' is 'a'
    assert len(mdata.load_npz_split(tmp_path / "g.npz", "test", group_key="study")) == 2  # distinct studies
    with pytest.raises(ValueError, match=r"1 of its 2 patients \(array 'site'\).*'x' also under 'train'"):
        mdata.load_npz_split(tmp_path / "g.npz", "test", group_key="site")
    with pytest.raises(KeyError, match=r"'nope'.*arrays: \['PatientID', 'images', 'site', 'split', 'study'\]"):
        mdata.load_npz_split(tmp_path / "g.npz", "test", group_key="nope")
    np.savez(tmp_path / "short.npz", images=_distinct(3), split=split, patient_id=np.array([1, 2]))
    with pytest.raises(ValueError, match=r"3 images but 2 entries in its 'patient_id' array"):
        mdata.load_npz_split(tmp_path / "short.npz", "test")


def test_medmnist_style_npz_with_per_split_patient_arrays_is_checked(tmp_path):
    np.savez(tmp_path / "m.npz", train_images=_distinct(3), test_images=_distinct(5)[3:],
             train_patient_id=np.array([7, 8, 9]), test_patient_id=np.array([9, 10]))
    with pytest.raises(ValueError, match=r"split 'test'.*1 of its 2 patients \(array 'test_patient_id'\).*'9'"):
        mdata.load_npz_split(tmp_path / "m.npz", "test")
    assert len(mdata.load_npz_split(tmp_path / "m.npz", "test", allow_leakage=True)) == 2


# ------------------------------------------------------------------------------------------------ npz duplicates
def test_byte_identical_images_across_npz_splits_warn_with_counts_but_load(tmp_path):
    tr = _distinct(4)
    te = np.stack([tr[1], tr[1], np.full((4, 4), 50, np.uint8), tr[3]])  # 3 of 4 test images are train images
    va = np.stack([tr[3], np.full((4, 4), 60, np.uint8), np.full((4, 4), 60, np.uint8)])  # a duplicate within val
    np.savez(tmp_path / "m.npz", train_images=tr, val_images=va, test_images=te)
    with pytest.warns(mdata.DuplicateImageWarning) as w:
        imgs = mdata.load_npz_split(tmp_path / "m.npz", "test")
    np.testing.assert_array_equal(imgs, te)
    msg = str(w[0].message)
    assert "3 of the 4 images of split 'test'" in msg and "train 3, val 1" in msg, msg
    assert "test_images[0] = train_images[1]" in msg and "test_images[3] = train_images[3], val_images[0]" in msg
    with pytest.warns(mdata.DuplicateImageWarning, match=r"1 of the 3 images of split 'val'.*train 1"):
        mdata.load_npz_split(tmp_path / "m.npz", "val")  # the duplicate within val is not counted
    np.testing.assert_array_equal(_no_warning(mdata.load_npz_split, tmp_path / "m.npz", "test", allow_leakage=True),
                                  te)
    _no_warning(mdata.load_npz_split, tmp_path / "m.npz", "all")
    # a flat file: rows of the images array, named by their index in it
    np.savez(tmp_path / "f.npz", images=np.concatenate([tr, te]), split=np.array(["train"] * 4 + ["test"] * 4))
    with pytest.warns(mdata.DuplicateImageWarning, match=r"3 of the 4 images of split 'test'.*images\[4\] = "
                                                         r"images\[1\]"):
        mdata.load_npz_split(tmp_path / "f.npz", "test")
    # same bytes, different shape: not the same image
    np.savez(tmp_path / "s.npz", train_images=np.zeros((1, 2, 8), np.uint8), test_images=np.zeros((1, 4, 4), np.uint8))
    _no_warning(mdata.load_npz_split, tmp_path / "s.npz", "test")


def test_load_images_checks_npz_splits_and_passes_allow_leakage(tmp_path):
    np.savez(tmp_path / "flat.npz", images=_distinct(3), split=np.array(["train", "test", "test"]),
             patient_id=np.array([1, 1, 2]))
    with pytest.raises(ValueError, match=r"1 of its 2 patients"):
        mdata.load_images(tmp_path / "flat.npz", split="test")
    images, names = mdata.load_images(tmp_path / "flat.npz", split="test", allow_leakage=True)
    assert len(images) == 2 and names == ["flat.npz[0]", "flat.npz[1]"]
    assert len(mdata.load_images(tmp_path / "flat.npz")[0]) == 3  # no split: everything, not checked


def test_score_cli_refuses_a_leaking_npz_split_unless_allow_leakage(tmp_path, capsys):
    from medquant.cli import main

    x = np.random.default_rng(0).integers(0, 256, (3, 16, 16)).astype(np.uint8)
    np.savez(tmp_path / "flat.npz", images=x, split=np.array(["train", "test", "test"]),
             patient_id=np.array([1, 1, 2]))
    out = tmp_path / "m.csv"
    assert main(["score", str(tmp_path / "flat.npz"), "--split", "test", "--out", str(out), "--no-progress"]) == 2
    assert "1 of its 2 patients" in capsys.readouterr().err and not out.exists()
    assert main(["score", str(tmp_path / "flat.npz"), "--split", "test", "--out", str(out), "--no-progress",
                 "--allow-leakage"]) == 0
    with open(out) as f:
        assert len(list(csv.DictReader(f))) == 2


def test_demo_loader_passes_allow_leakage(tmp_path):
    from medquant.cli.demo import _load_pneumoniamnist, register

    (tmp_path / "pneumoniamnist").mkdir()
    tr = _distinct(3)
    np.savez(tmp_path / "pneumoniamnist" / "pneumoniamnist.npz", train_images=tr, train_labels=np.zeros((3, 1)),
             val_images=tr[:1], val_labels=np.zeros((1, 1)), test_images=tr[2:], test_labels=np.zeros((1, 1)))
    with pytest.warns(mdata.DuplicateImageWarning) as w:
        _load_pneumoniamnist(tmp_path)
    assert sorted(re.search(r"of split '(\w+)'", str(m.message)).group(1) for m in w) == ["test", "train", "val"]
    loaded = _no_warning(_load_pneumoniamnist, tmp_path, allow_leakage=True)
    assert loaded[2][0].shape == (1, 1, 4, 4)
    import argparse

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    assert parser.parse_args(["demo", "--allow-leakage"]).allow_leakage is True


# ------------------------------------------------------------------------------------------------ read_index
def _write(path: Path, header: list[str], rows: list[list[str]]) -> Path:
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows([header, *rows])
    return path


def test_read_index_refuses_a_leaking_split_unless_allow_leakage(tmp_path):
    p = _write(tmp_path / "index.csv", ["path", "split", "patient_id", "site"],
               [["a.png", "train", "P1", "s1"], ["b.png", "test", "P1", "s2"], ["c.png", "test", "P2", "s2"],
                ["./d.png", "train", "P3", "s1"], ["d.png", "val", "P4", "s3"]])
    with pytest.raises(ValueError, match=r"split 'test'.*1 of its 2 patients \(column 'patient_id'\).*'P1'"):
        mdata.read_index(p, split="test")  # was: the two test rows
    with pytest.raises(ValueError, match=r"split 'val'.*1 of its 1 rows.*'d\.png' also under 'train' \(line 5\)"):
        mdata.read_index(p, split="val")
    with open(p, newline="") as f:
        ref = [r for r in csv.DictReader(f) if r["split"] == "test"]
    assert mdata.read_index(p, split="test", allow_leakage=True) == ref
    assert mdata.read_index(p, split="test", group_column="site") == ref  # sites are not shared
    with pytest.raises(KeyError, match=r"'nope'.*columns"):
        mdata.read_index(p, split="test", group_column="nope")
    assert len(mdata.read_index(p)) == 5  # no split: the plain reader


# ------------------------------------------------------------------------------------------------ load_images CSV
def test_load_images_on_a_csv_refuses_a_file_listed_twice_in_the_split_as_folders_do(tmp_path):
    from PIL import Image

    for i, name in enumerate(("a.png", "b.png")):
        Image.fromarray(np.full((3, 4), i, np.uint8)).save(tmp_path / name)
    p = _write(tmp_path / "index.csv", ["path", "split"], [["a.png", "test"], ["b.png", "test"], ["./a.png", "test"]])
    for where in (tmp_path, p):  # the folder always refused it; the CSV now does too
        with pytest.raises(ValueError, match=r"same image more than once in split 'test'.*'a\.png' at lines 2, 4"):
            mdata.load_images(where, split="test")
    with pytest.raises(ValueError, match=r"same image more than once \(duplicate paths"):
        mdata.load_images(p)


# ------------------------------------------------------------------------------------------------ real files
def _rows_duplicated_elsewhere(parts: dict[str, np.ndarray]) -> dict[str, int]:
    """Independent reference (np.unique over flattened rows): per split, its images also found in another split."""
    names = list(parts)
    flat = np.concatenate([parts[s].reshape(len(parts[s]), -1) for s in names])
    owner = np.concatenate([np.full(len(parts[s]), i) for i, s in enumerate(names)])
    _, inv = np.unique(flat, axis=0, return_inverse=True)
    inv = inv.reshape(-1)
    splits_of = defaultdict(set)
    for g, o in zip(inv.tolist(), owner.tolist()):
        splits_of[g].add(o)
    return {s: int(sum(len(splits_of[g]) > 1 for g in inv[owner == i].tolist())) for i, s in enumerate(names)}


@needs_data
def test_the_nih_npz_reports_its_30_leaked_patients():
    path = DATA / "nih_cxr14_sample1000_64" / "nih_cxr14_sample1000_64.npz"
    with np.load(path) as z:
        pid, split, images = z["patient_id"], z["split"].astype(str), z["images"]
    splits_of: dict[int, set[str]] = defaultdict(set)
    for p, s in zip(pid.tolist(), split.tolist()):
        splits_of[p].add(s)
    leaked_ids = {p for p, s in splits_of.items() if len(s) > 1}
    assert len(leaked_ids) == 30
    reported: set[str] = set()
    for s in ("train", "val", "test"):
        mine = set(pid[split == s].tolist())
        with pytest.raises(ValueError) as e:
            mdata.load_npz_split(path, s)
        msg = str(e.value)
        assert f"{len(mine & leaked_ids)} of its {len(mine)} patients (array 'patient_id')" in msg, msg
        reported |= {int(m) for m in re.findall(r"'(\d+)' also under", msg)}
    assert reported <= leaked_ids
    np.testing.assert_array_equal(mdata.load_npz_split(path, "test", allow_leakage=True), images[split == "test"])


@needs_data
def test_official_medmnist_and_kermany_npz_still_load_duplicates_across_splits_warn():
    """Measured on the shared files: PneumoniaMNIST's test split shares no image with train / val (it loads
    silently) but 8 val images are train images; BreastMNIST has 1 test image that is also a train image (with
    the other label); Kermany 64 px has duplicates only within a split (not reported)."""
    for name, rel in (("pneumoniamnist", "pneumoniamnist/pneumoniamnist.npz"),
                      ("breastmnist", "breastmnist/breastmnist.npz"),
                      ("kermany", "kermany_pediatric_cxr_224/kermany_cxr_64.npz")):
        path = DATA / rel
        with np.load(path) as z:
            parts = {s: z[f"{s}_images"] for s in ("train", "val", "test") if f"{s}_images" in z.files}
        ref = _rows_duplicated_elsewhere(parts)
        for s, x in parts.items():
            with warnings.catch_warnings(record=True) as w:
                warnings.simplefilter("always")
                got = mdata.load_npz_split(path, s)
            np.testing.assert_array_equal(got, x)
            dup = [m for m in w if issubclass(m.category, mdata.DuplicateImageWarning)]
            if ref[s]:
                assert len(dup) == 1 and f"{ref[s]} of the {len(x)} images of split {s!r}" in str(dup[0].message)
            else:
                assert not dup, (name, s, [str(m.message) for m in dup])
        if name == "pneumoniamnist":
            assert ref == {"train": 10, "val": 8, "test": 0}
        if name == "breastmnist":
            assert ref == {"train": 1, "val": 0, "test": 1}
        if name == "kermany":
            assert ref == {"train": 0, "test": 0}
