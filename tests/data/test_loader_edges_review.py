"""Review of medquant.data.load_image_folder edge cases: a missing named index CSV, duplicate index paths."""
from __future__ import annotations

import csv
import re

import numpy as np
import pytest

from medquant import data as mdata


def _folder(tmp_path, n=3):
    from PIL import Image

    for i in range(n):
        Image.fromarray(np.full((4, 5), 10 * i, np.uint8)).save(tmp_path / f"{i}.png")
    return tmp_path


def _csv(path, rows):
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows(rows)


def test_a_named_index_csv_that_does_not_exist_is_refused_not_replaced_by_a_folder_scan(tmp_path):
    root = _folder(tmp_path)
    _csv(root / "metadata.csv", [["path", "split"], ["0.png", "test"]])
    _csv(root / "labels.csv", [["path"], ["1.png"]])
    with pytest.raises(FileNotFoundError) as e:  # was: all 3 images of the folder, silently
        mdata.load_image_folder(root, "misspelt.csv")
    msg = str(e.value)
    assert str(root / "misspelt.csv") in msg
    assert re.search(r"labels\.csv, metadata\.csv", msg), msg  # the CSV files that are there, sorted
    with pytest.raises(FileNotFoundError, match="misspelt.csv"):
        mdata.load_image_folder(root, "misspelt.csv", split="test")
    # the named file, when it exists, is what is loaded
    imgs, rows = mdata.load_image_folder(root, "metadata.csv")
    assert [r["path"] for r in rows] == ["0.png"] and len(imgs) == 1
    # a folder with no CSV at all says so
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match=r"no CSV file"):
        mdata.load_image_folder(empty, "index2.csv")


def test_the_default_index_csv_stays_optional(tmp_path):
    """The default ``index.csv`` absent: every image under the folder, as documented (and as before)."""
    root = _folder(tmp_path)
    _csv(root / "other.csv", [["path"], ["0.png"]])
    imgs, rows = mdata.load_image_folder(root)
    assert [r["path"] for r in rows] == ["0.png", "1.png", "2.png"]
    np.testing.assert_array_equal(imgs[2], np.full((4, 5), 20, np.uint8))
    with pytest.raises(FileNotFoundError, match=r"index\.csv.*split 'test'"):  # a split still needs the index
        mdata.load_image_folder(root, split="test")


def test_duplicate_index_paths_are_refused_with_their_lines(tmp_path):
    root = _folder(tmp_path)
    _csv(root / "index.csv", [["path", "split"], ["0.png", "test"], ["1.png", "test"], ["0.png", "test"],
                              ["./1.png", "train"], ["2.png", "test"]])
    with pytest.raises(ValueError) as e:  # was: 0.png loaded twice, silently
        mdata.load_image_folder(root)
    msg = str(e.value)
    assert "'0.png'" in msg and re.search(r"lines 2, 4\b", msg), msg
    assert "'1.png'" in msg and re.search(r"lines 3, 5\b", msg), msg  # ./1.png is the same file
    with pytest.raises(ValueError, match=r"duplicate.*'0\.png'.*lines 2, 4"):
        mdata.load_image_folder(root, split="test")
    # only the rows that are loaded count: the train split holds 1.png once (but 1.png is also a test image, which
    # the split leakage check refuses unless allowed: tests/data/test_split_leakage.py)
    with pytest.raises(ValueError, match=r"split 'train' leaks.*'\./1\.png' also under 'test' \(line 3\)"):
        mdata.load_image_folder(root, split="train")
    imgs, rows = mdata.load_image_folder(root, split="train", allow_leakage=True)
    assert [r["path"] for r in rows] == ["./1.png"] and len(imgs) == 1
    # read_index itself still returns the rows as they are (a CSV reader, not a loader)
    assert [r["path"] for r in mdata.read_index(root / "index.csv")] == ["0.png", "1.png", "0.png", "./1.png", "2.png"]
