"""format="compressed-tensors" output paths that must never be replaced: ``.``, the current folder (also through a
symlink), a folder above it and a file system root are refused before any work, as medquant's checkpoint save
refuses them; a non-empty folder that is not an export is refused (with or without ``overwrite``, see
test_compressed_tensors_overwrite.py) and its files are kept.

Every test runs with the current folder inside ``tmp_path`` (``monkeypatch.chdir``), so nothing outside it can be
touched; the independent reference is the folder's listing and file contents taken before the call."""
from __future__ import annotations

import os
import warnings
from pathlib import Path

import pytest

import medquant as mq
from medquant.deploy import ExportError
from medquant.deploy.compressed_tensors import export_compressed_tensors
from medquant.testing.zoo import ZOO_BY_NAME

pytest.importorskip("compressed_tensors")


@pytest.fixture(scope="module")
def model():
    m = ZOO_BY_NAME["llama"].build()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return mq.quantize_(m, mq.QuantConfig(4, symmetric=True, group_size=32))


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _user_files(folder: Path) -> dict[str, bytes]:
    (folder / "notes.txt").write_text("user notes")
    (folder / "data").mkdir()
    (folder / "data" / "x.bin").write_bytes(b"\x00\x01")
    return _snapshot(folder)


# the root only without overwrite: were the check ever lost, the call stops at "not empty", never replacing "/"
@pytest.mark.parametrize("given, overwrite", [(g, o) for g in (".", "", "cwd", "cwd_link", "parent")
                                              for o in (False, True)] + [("root", False)])
def test_current_folder_above_it_or_root_is_refused_before_any_work(model, tmp_path, monkeypatch, given, overwrite):
    work = tmp_path / "a" / "work"
    work.mkdir(parents=True)
    monkeypatch.chdir(work)
    before_work = _user_files(work)
    (tmp_path / "link").symlink_to(work)
    before_tmp = sorted(str(p) for p in tmp_path.rglob("*"))
    path = {".": ".", "": "", "cwd": str(work), "cwd_link": str(tmp_path / "link"), "parent": "..",
            "root": os.path.abspath(os.sep)}[given]
    with pytest.raises(ExportError, match="current folder"):
        export_compressed_tensors(model, path, overwrite=overwrite)
    assert _snapshot(work) == before_work
    assert sorted(str(p) for p in tmp_path.rglob("*")) == before_tmp  # no temporary folder left anywhere


@pytest.mark.parametrize("given", [".", "cwd"])
def test_empty_current_folder_is_refused(model, tmp_path, monkeypatch, given):
    monkeypatch.chdir(tmp_path)
    path = "." if given == "." else str(tmp_path)
    with pytest.raises(ExportError, match="current folder"):
        export_compressed_tensors(model, path)
    assert list(tmp_path.iterdir()) == []


def test_non_empty_user_folder_is_refused_without_overwrite(model, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "mine"
    out.mkdir()
    before = _user_files(out)
    with pytest.raises(ExportError, match="not empty"):
        export_compressed_tensors(model, "mine")
    assert _snapshot(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]


def test_export_into_a_subfolder_of_the_current_folder_works(model, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    keep = _user_files(tmp_path)
    report = export_compressed_tensors(model, "out")
    assert Path(report.path) == Path("out")
    assert (tmp_path / "out" / "config.json").is_file()
    assert {k: v for k, v in _snapshot(tmp_path).items() if not k.startswith("out")} == keep
