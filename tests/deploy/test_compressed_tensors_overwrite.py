"""format="compressed-tensors" with ``overwrite=True`` replaces only an empty folder or an earlier export of its own.

The export replaces its output folder as a whole. ``overwrite=True`` used to replace any non-empty folder, deleting
a user's training folder or a medquant checkpoint; it now replaces only a folder that is recognisably an earlier
export (``config.json`` whose ``quantization_config`` has ``quant_method: "compressed-tensors"`` and format
``pack-quantized``, and nothing but the files the export writes), and refuses anything else, naming what the folder
holds. The independent reference is the folder's listing and file contents taken before the call; an accepted
replacement is checked against the new export's ``config.json`` and file list.

Every test runs with the current folder in ``tmp_path`` (``monkeypatch.chdir``), so nothing outside it is touched.
"""
from __future__ import annotations

import copy
import json
import os
import warnings
from pathlib import Path

import pytest

import medquant as mq
from medquant.deploy import ExportError, export
from medquant.testing.zoo import ZOO_BY_NAME

pytest.importorskip("compressed_tensors")

from tests.deploy.test_compressed_tensors import _qconfig, _tensors
from tests.deploy.test_compressed_tensors_paths import _snapshot, _user_files

FMT = "compressed-tensors"


@pytest.fixture(autouse=True)
def _quiet(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


@pytest.fixture(scope="module")
def llama():
    return ZOO_BY_NAME["llama"].build()


@pytest.fixture(scope="module")
def w4(llama):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return mq.quantize_(copy.deepcopy(llama), mq.QuantConfig(4, symmetric=True, group_size=32))


@pytest.fixture(scope="module")
def w8(llama):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return mq.quantize_(copy.deepcopy(llama), mq.QuantConfig(8, scope="channel"))


def _listing(tmp_path: Path) -> list[str]:
    return sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*"))


def _earlier_export(model, out: Path) -> None:
    export(model, out, format=FMT)


def _training_folder(model, out: Path) -> None:
    _user_files(out)  # notes.txt, data/x.bin


def _hf_float_folder(model, out: Path) -> None:
    """transformers' own save_pretrained of a float model: the export's file names, but no compressed-tensors
    quantization_config."""
    ZOO_BY_NAME["llama"].build().save_pretrained(str(out))


def _medquant_checkpoint(model, out: Path) -> None:
    mq.save(model, out)


def _medquant_checkpoint_saved_twice(model, out: Path) -> None:  # a version link to a sibling folder
    mq.save(model, out)
    mq.save(model, out)


def _medquant_hf_folder(model, out: Path) -> None:
    from medquant.hf import save_pretrained

    save_pretrained(model, out)


def _export_plus_a_user_file(model, out: Path) -> None:
    export(model, out, format=FMT)
    (out / "README.md").write_text("my notes on this export")


def _export_plus_a_subfolder(model, out: Path) -> None:
    export(model, out, format=FMT)
    (out / "eval").mkdir()
    (out / "eval" / "scores.json").write_text("{}")


def _other_quant_method(model, out: Path) -> None:
    export(model, out, format=FMT)
    config = json.loads((out / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "gptq", "bits": 4}
    (out / "config.json").write_text(json.dumps(config))


def _unreadable_config(model, out: Path) -> None:
    export(model, out, format=FMT)
    (out / "config.json").write_text("{not json")


NOT_EXPORTS = {"training folder": _training_folder, "transformers float folder": _hf_float_folder,
               "medquant checkpoint": _medquant_checkpoint,
               "medquant checkpoint saved twice": _medquant_checkpoint_saved_twice,
               "medquant.hf.save_pretrained folder": _medquant_hf_folder,
               "export plus a user file": _export_plus_a_user_file,
               "export plus a subfolder": _export_plus_a_subfolder,
               "another quant_method": _other_quant_method, "unreadable config.json": _unreadable_config}


@pytest.mark.parametrize("overwrite", [True, False])
@pytest.mark.parametrize("kind", list(NOT_EXPORTS))
def test_a_folder_that_is_not_an_earlier_export_is_never_replaced(w4, w8, tmp_path, kind, overwrite):
    out = tmp_path / "out"
    out.mkdir()
    NOT_EXPORTS[kind](w4, out)
    before, listing = _snapshot(out), _listing(tmp_path)
    with pytest.raises(ExportError, match="not empty and not an earlier compressed-tensors export") as e:
        export(w8, out, format=FMT, overwrite=overwrite)
    msg = str(e.value)
    assert "choose another path or remove the folder yourself" in msg
    assert "pass overwrite=True" not in msg  # it would not help
    shown = sorted(p.name + ("/" if p.is_dir() and not p.is_symlink() else "") for p in out.iterdir())
    assert all(name in msg for name in shown[:8])  # what the folder holds
    assert _snapshot(out) == before and _listing(tmp_path) == listing  # nothing changed, nothing left beside it


def test_an_earlier_export_is_replaced_whole(w4, w8, tmp_path):
    """An earlier sharded export with tokenizer files is replaced by a single-file one: the old shards and index go
    with the old folder."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "tokenizer.json").write_text('{"version": "1.0"}')
    out = tmp_path / "out"
    export(w4, out, format=FMT, max_shard_size=20000, source=src)
    assert (out / "model.safetensors.index.json").is_file() and (out / "tokenizer.json").is_file()
    with pytest.raises(ExportError, match=r"not empty \(an earlier compressed-tensors export\); pass overwrite=True"):
        export(w8, out, format=FMT)
    report = export(w8, out, format=FMT, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == sorted(report.files)
    assert "model.safetensors" in report.files and "model.safetensors.index.json" not in report.files
    assert _qconfig(out)["config_groups"]["group_0"]["weights"]["num_bits"] == 8
    assert any(k.endswith("weight_packed") for k in _tensors(out))
    assert _listing(tmp_path) == sorted(["src", "src/tokenizer.json", "out"] + [f"out/{f}" for f in report.files])


def test_an_empty_folder_is_written_with_or_without_overwrite(w4, tmp_path):
    for name, overwrite in (("a", False), ("b", True)):
        (tmp_path / name).mkdir()
        report = export(w4, tmp_path / name, format=FMT, overwrite=overwrite)
        assert sorted(p.name for p in (tmp_path / name).iterdir()) == sorted(report.files)


def test_a_failed_export_removes_the_parent_folders_it_created(w4, tmp_path, monkeypatch):
    """The move into place fails (the last step, after the temporary folder was written beside the target): the
    parents this call created are removed, a folder that existed before is kept with its files."""
    import medquant.deploy.compressed_tensors as ct

    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "keep.txt").write_text("x")

    def failing(new, path):
        raise OSError("simulated failure of the move into place")

    monkeypatch.setattr(ct, "_move_into_place", failing)
    with pytest.raises(OSError, match="simulated"):
        export(w4, existing / "new" / "deeper" / "ct", format=FMT)
    assert _listing(tmp_path) == ["existing", os.path.join("existing", "keep.txt")]


def test_a_folder_filled_during_the_export_is_checked_again_before_the_move(w4, tmp_path, monkeypatch):
    """The folder was empty when the export started and got a user's file while the export ran: the check before
    the move into place refuses it, the file stays and the temporary folder is removed."""
    import medquant.deploy.compressed_tensors as ct

    out = tmp_path / "out"
    out.mkdir()
    real = ct.publish_mode

    def publish_and_meanwhile_write(folder):
        (out / "notes.txt").write_text("written while the export ran")
        return real(folder)

    monkeypatch.setattr(ct, "publish_mode", publish_and_meanwhile_write)
    with pytest.raises(ExportError, match="not an earlier compressed-tensors export: it holds notes.txt"):
        export(w4, out, format=FMT, overwrite=True)
    assert _listing(tmp_path) == ["out", os.path.join("out", "notes.txt")]
    assert (out / "notes.txt").read_text() == "written while the export ran"
