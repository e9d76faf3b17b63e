"""Train/test leakage in an index CSV: the loaded split's images or patients also listed under another split."""
from __future__ import annotations

import csv
import os
import re
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest

from medquant import data as mdata

DATA = Path(os.environ.get("MEDQUANT_DATA_DIR") or Path(__file__).resolve().parents[3] / "shared" / "data")
needs_data = pytest.mark.skipif(not DATA.exists(), reason=f"shared data not found at {DATA}")


def _index(root: Path, header: list[str], rows: list[list[str]], name: str = "index.csv") -> Path:
    """Write ``name`` under ``root`` and one distinct 3x4 gray PNG per path it names (value = its row number)."""
    from PIL import Image

    path_col = header.index("path")
    for i, r in enumerate(rows):
        f = root / r[path_col]
        if not f.exists():
            f.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.full((3, 4), i, np.uint8)).save(f)
    with open(root / name, "w", newline="") as fh:
        csv.writer(fh).writerows([header, *rows])
    return root / name


def _split_rows(csv_path: Path, split: str) -> list[dict]:
    """Independent reference: the rows of ``split`` as the csv module reads them."""
    with open(csv_path, newline="") as f:
        return [r for r in csv.DictReader(f) if r["split"] == split]


def test_an_image_listed_under_two_splits_is_refused_naming_path_splits_and_counts(tmp_path):
    _index(tmp_path, ["path", "split"], [["a.png", "train"], ["b.png", "train"], ["./a.png", "test"],
                                         ["c.png", "test"], ["sub/d.png", "val"], ["sub//d.png", "test"]])
    with pytest.raises(ValueError) as e:  # was: the test split loaded, a.png and d.png also in train / val
        mdata.load_image_folder(tmp_path, split="test")
    msg = str(e.value)
    assert "split 'test'" in msg and "2 of its 3 rows" in msg, msg
    assert "'./a.png'" in msg and "'train'" in msg and "line 2" in msg, msg  # a.png is also train's line 2
    assert "'sub//d.png'" in msg and "'val'" in msg, msg
    assert re.search(r"train 1, val 1", msg), msg  # per other split: loaded rows that leak into it
    assert "allow_leakage=True" in msg and "fix the index" in msg.lower(), msg
    # the other side of the leak is refused too
    with pytest.raises(ValueError, match=r"split 'train'.*1 of its 2 rows.*'a\.png'"):
        mdata.load_image_folder(tmp_path, split="train")
    with pytest.raises(ValueError, match=r"split 'val'.*1 of its 1 rows.*'sub/d\.png'.*'test'"):
        mdata.load_image_folder(tmp_path, split="val")


@pytest.mark.parametrize("column", ["patient_id", "PatientID", "Patient ID", "subject_id", "participant_id",
                                    "lesion_id"])
def test_a_patient_in_two_splits_is_refused(tmp_path, column):
    csv_path = _index(tmp_path, ["path", "split", column],
                      [["p1_a.png", "train", "P1"], ["p2_a.png", "train", "P2"], ["p1_b.png", "test", "P1"],
                       ["p3_a.png", "test", "P3"], ["p3_b.png", "test", "P3"], ["p2_b.png", "val", " P2 "]])
    with pytest.raises(ValueError) as e:  # was: loaded, P1's images on both sides of the split
        mdata.load_image_folder(tmp_path, split="test")
    msg = str(e.value)
    assert f"column {column!r}" in msg and "1 of its 2 patients" in msg and "'P1'" in msg, msg
    assert "'train'" in msg and "P3" not in msg, msg
    # " P2 " is P2 (surrounding spaces dropped): train and val share it
    with pytest.raises(ValueError, match=r"split 'val'.*'P2'.*'train'"):
        mdata.load_image_folder(tmp_path, split="val")
    # the whole index loads (nothing is held out there), and so does a split with the explicit opt-out: exactly
    # its rows, in index order
    assert len(mdata.load_image_folder(tmp_path)[0]) == 6
    images, rows = mdata.load_image_folder(tmp_path, split="test", allow_leakage=True)
    assert rows == _split_rows(csv_path, "test")
    assert [int(im[0, 0]) for im in images] == [2, 3, 4]


def test_patient_counts_per_other_split_and_a_few_examples_only(tmp_path):
    rows = [[f"t{i}.png", "test", f"P{i}"] for i in range(8)]
    rows += [[f"r{i}.png", "train", f"P{i}"] for i in range(6)]  # P0..P5 also in train
    rows += [[f"v{i}.png", "val", f"P{i}"] for i in (0, 7)]  # P0 and P7 also in val
    rows += [["q.png", "test", ""], ["q2.png", "train", ""]]  # unknown patient: not a patient of its own
    _index(tmp_path, ["path", "split", "patient_id"], rows)
    with pytest.raises(ValueError) as e:
        mdata.load_image_folder(tmp_path, split="test")
    msg = str(e.value)
    assert "7 of its 8 patients" in msg and re.search(r"train 6, val 2", msg), msg  # P0..P7 minus none: P0-P5, P7
    named = set(re.findall(r"'P(\d)'", msg))
    assert 1 <= len(named) <= 5 and "and 2 more" in msg, msg


def test_group_column_names_the_patient_column_explicitly(tmp_path):
    _index(tmp_path, ["path", "split", "case"], [["a.png", "train", "c1"], ["b.png", "test", "c1"],
                                                 ["c.png", "test", "c2"]])
    _, rows = mdata.load_image_folder(tmp_path, split="test")  # 'case' is not a recognised name
    assert [r["path"] for r in rows] == ["b.png", "c.png"]
    with pytest.raises(ValueError, match=r"1 of its 2 patients \(column 'case'\).*'c1'"):
        mdata.load_image_folder(tmp_path, split="test", group_column="case")
    with pytest.raises(KeyError, match=r"'subject'.*columns: \['path', 'split', 'case'\]"):
        mdata.load_image_folder(tmp_path, split="test", group_column="subject")
    with pytest.raises(ValueError, match=r"group_column='case'.*index"):  # a scanned folder has no columns
        mdata.load_image_folder(tmp_path, index_csv=None, group_column="case")


def test_a_clean_index_loads_as_before(tmp_path):
    csv_path = _index(tmp_path, ["path", "split", "patient_id"],
                      [["a.png", "train", "P1"], ["b.png", "train", "P1"], ["c.png", "test", "P2"],
                       ["d.png", "val", "P3"], ["e.png", "test", ""]])
    for split in ("train", "val", "test"):
        images, rows = mdata.load_image_folder(tmp_path, split=split)
        assert rows == _split_rows(csv_path, split)
        assert len(images) == len(rows)


def test_load_images_refuses_a_leaky_split_of_a_folder_or_csv(tmp_path):
    csv_path = _index(tmp_path, ["path", "split", "patient_id"],
                      [["a.png", "train", "P1"], ["b.png", "test", "P1"], ["c.png", "test", "P2"]])
    for where in (tmp_path, csv_path):
        with pytest.raises(ValueError, match=r"'P1'"):
            mdata.load_images(where, split="test")
        images, names = mdata.load_images(where, split="test", allow_leakage=True)
        assert names == ["b.png", "c.png"] and len(images) == 2
    assert len(mdata.load_images(csv_path)[0]) == 3  # no split: the whole index, nothing held out


@needs_data
def test_the_nih_sample_index_has_patients_in_several_splits():
    """The shared NIH sample (README: 30 patients in more than one split) is refused split by split."""
    root = DATA / "nih_cxr14_sample1000_64"
    with open(root / "metadata.csv", newline="") as f:
        index = list(csv.DictReader(f))
    splits: dict[str, set[str]] = defaultdict(set)
    for r in index:
        splits[r["patient_id"]].add(r["split"])
    assert sum(len(s) > 1 for s in splits.values()) == 30
    for split in ("train", "val", "test"):
        mine = {r["patient_id"] for r in index if r["split"] == split}
        leaked = sum(len(splits[p]) > 1 for p in mine)
        with pytest.raises(ValueError, match=rf"{leaked} of its {len(mine)} patients"):
            mdata.load_image_folder(root, "metadata.csv", split=split, limit=1)
    _, rows = mdata.load_image_folder(root, "metadata.csv", split="test", limit=3, allow_leakage=True)
    assert [r["path"] for r in rows] == [r["path"] for r in index if r["split"] == "test"][:3]


def test_score_cli_refuses_a_leaking_split_in_one_line_unless_allow_leakage(tmp_path, capsys):
    """``medquant score --split``: the leakage refusal is the command's one-line error (exit 2); with
    ``--allow-leakage`` the split is scored, its rows those the csv module reads."""
    from PIL import Image

    from medquant.cli import main

    rng = np.random.default_rng(0)
    for name in ("a.png", "b.png", "c.png"):  # the metrics need images of 8x8 pixels or more
        Image.fromarray(rng.integers(0, 256, (16, 16)).astype(np.uint8)).save(tmp_path / name)
    _index(tmp_path, ["path", "split", "patient_id"],
           [["a.png", "train", "p1"], ["b.png", "test", "p1"], ["c.png", "test", "p2"]])
    out = tmp_path / "m.csv"
    assert main(["score", str(tmp_path), "--split", "test", "--out", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "p1" in err and "allow_leakage" in err and not out.exists()
    assert main(["score", str(tmp_path), "--split", "test", "--out", str(out), "--no-progress",
                 "--allow-leakage"]) == 0
    with open(out) as f:
        assert [r["name"] for r in csv.DictReader(f)] == [r["path"] for r in _split_rows(tmp_path / "index.csv",
                                                                                          "test")]
