"""``read_index(csv, split=...)`` refuses two rows of the selected split naming the same file (normalised path), as
``load_image_folder`` and ``load_images`` do, with the same message; ``split=None`` stays the plain reader, and a
path repeated across splits is the leakage check's business, not this one's."""
from __future__ import annotations

import pytest

import medquant.data as mdata


def _csv(path, rows):
    path.write_text("path,split\n" + "".join(f"{p},{s}\n" for p, s in rows))
    return path


def _loader_message(tmp_path, p):
    """The message load_image_folder gives for the same index (the reference)."""
    with pytest.raises(ValueError) as info:
        mdata.load_image_folder(tmp_path, split="test")
    return str(info.value)


def test_read_index_split_refuses_duplicate_paths_like_the_loader(tmp_path):
    p = _csv(tmp_path / "index.csv", [("a.png", "train"), ("b.png", "test"), ("./b.png", "test"), ("c.png", "test")])
    ref = _loader_message(tmp_path, p)
    assert "'b.png' at lines 3, 4" in ref
    with pytest.raises(ValueError) as info:  # before the fix: the 3 test rows, b.png twice
        mdata.read_index(p, split="test")
    assert str(info.value) == ref
    assert [r["path"] for r in mdata.read_index(p, split="train")] == ["a.png"]  # the other split is clean
    assert [r["path"] for r in mdata.read_index(p)] == ["a.png", "b.png", "./b.png", "c.png"]  # plain reader


def test_read_index_distinct_paths_pass(tmp_path):
    p = _csv(tmp_path / "index.csv", [("a.png", "test"), ("sub/a.png", "test"), ("b.png", "train")])
    assert mdata.read_index(p, split="test") == [{"path": "a.png", "split": "test"},
                                                 {"path": "sub/a.png", "split": "test"}]
