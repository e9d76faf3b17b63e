"""format="compressed-tensors" through a symbolic link, and what ``overwrite=True`` takes for an earlier export.

* An output path that is a symlink to a folder used to be replaced by a real folder (the export swapped its
  temporary folder with the link) and the link was left beside it as a ``.out.xxxx`` leftover. The export now
  writes into the link's target: the link stays as it was, the target's checks (empty, or an earlier export with
  ``overwrite``) apply, nothing is left in either parent folder. A link to a missing folder is refused.
* ``overwrite=True`` used to replace any folder holding only the export's file names with a compressed-tensors
  ``pack-quantized`` ``config.json``: a Hub folder (written by llm-compressor, not by medquant) with those names was
  taken for an earlier export and deleted. Every safetensors file medquant's export writes now carries a marker in
  its metadata (``medquant.export: compressed-tensors``), and only a folder whose weight files all carry it is an
  earlier export.

The references: the folders' listings, ``os.readlink``, and the files' bytes taken before the call; the new files
read with safetensors / json. Every test runs with the current folder in ``tmp_path``.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from safetensors import safe_open

from medquant.deploy import ExportError, export

pytest.importorskip("compressed_tensors")

import tests.deploy.test_compressed_tensors_overwrite as _overwrite
from tests.deploy.test_compressed_tensors_overwrite import FMT, _listing
from tests.deploy.test_compressed_tensors_paths import _snapshot

# the overwrite tests' fixtures: the current folder in tmp_path with warnings silenced (autouse), the tiny llama and
# its W4 / W8 copies
_quiet, llama, w4, w8 = _overwrite._quiet, _overwrite.llama, _overwrite.w4, _overwrite.w8


def _bits(folder: Path) -> int:
    return json.loads((folder / "config.json").read_text())["quantization_config"]["config_groups"]["group_0"][
        "weights"]["num_bits"]


def _link(tmp_path: Path, absolute: bool) -> tuple[Path, Path, str]:
    """``links/out`` -> ``data/target`` (an empty folder), relative or absolute; returns link, target, readlink."""
    target = tmp_path / "data" / "target"
    target.mkdir(parents=True)
    (tmp_path / "links").mkdir()
    link = tmp_path / "links" / "out"
    link.symlink_to(target if absolute else Path("..") / "data" / "target")
    return link, target, os.readlink(link)


# 1. a symlink to a folder: written into its target


@pytest.mark.parametrize("absolute", [False, True])
@pytest.mark.parametrize("overwrite", [False, True])
def test_a_link_to_an_empty_folder_is_written_into_its_target(w4, tmp_path, absolute, overwrite):
    link, target, points = _link(tmp_path, absolute)
    report = export(w4, link, format=FMT, overwrite=overwrite)
    assert link.is_symlink() and os.readlink(link) == points  # the link is kept, pointing where it did
    assert sorted(p.name for p in target.iterdir()) == sorted(report.files)
    assert _bits(target) == 4
    # nothing beside the link or the target: no swapped-out link, no temporary folder
    assert sorted(p.name for p in (tmp_path / "links").iterdir()) == ["out"]
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["target"]
    assert Path(report.path) == link  # the report names the path as given


@pytest.mark.parametrize("absolute", [False, True])
def test_a_link_to_an_earlier_export_is_replaced_in_its_target_with_overwrite(w4, w8, tmp_path, absolute):
    link, target, points = _link(tmp_path, absolute)
    export(w4, target, format=FMT, max_shard_size=20000)  # a sharded earlier export, written at the target
    assert (target / "model.safetensors.index.json").is_file()
    before = _snapshot(target)
    with pytest.raises(ExportError, match=r"not empty \(an earlier compressed-tensors export\); pass overwrite=True"):
        export(w8, link, format=FMT)
    assert _snapshot(target) == before and link.is_symlink()
    report = export(w8, link, format=FMT, overwrite=True)
    assert link.is_symlink() and os.readlink(link) == points
    assert sorted(p.name for p in target.iterdir()) == sorted(report.files)  # the old shards and index are gone
    assert "model.safetensors.index.json" not in report.files and _bits(target) == 8
    assert sorted(p.name for p in (tmp_path / "links").iterdir()) == ["out"]
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["target"]
    # and again, through the link: the same
    export(w4, link, format=FMT, overwrite=True)
    assert link.is_symlink() and _bits(target) == 4 and _listing(tmp_path / "links") == ["out"]


def test_a_link_to_a_folder_that_is_not_an_export_is_refused_and_kept(w4, tmp_path):
    link, target, points = _link(tmp_path, False)
    (target / "notes.txt").write_text("mine")
    listing = _listing(tmp_path)
    for overwrite in (False, True):
        with pytest.raises(ExportError, match=r"not empty and not an earlier compressed-tensors export: it holds "
                                              r"notes\.txt"):
            export(w4, link, format=FMT, overwrite=overwrite)
    assert _listing(tmp_path) == listing and os.readlink(link) == points


def test_a_link_through_two_links_is_followed_to_the_folder(w4, tmp_path):
    link, target, points = _link(tmp_path, False)
    (tmp_path / "links" / "again").symlink_to("out")
    export(w4, tmp_path / "links" / "again", format=FMT)
    assert os.readlink(tmp_path / "links" / "again") == "out" and os.readlink(link) == points
    assert (target / "config.json").is_file()
    assert sorted(p.name for p in (tmp_path / "links").iterdir()) == ["again", "out"]
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["target"]


def test_a_link_to_a_missing_folder_is_refused(w4, tmp_path):
    (tmp_path / "links").mkdir()
    link = tmp_path / "links" / "out"
    link.symlink_to(Path("..") / "data" / "target")
    for overwrite in (False, True):
        with pytest.raises(ExportError, match=r"out is a symbolic link to .*target, which does not exist.*create "
                                              r"that folder"):
            export(w4, link, format=FMT, overwrite=overwrite)
    assert _listing(tmp_path) == ["links", os.path.join("links", "out")] and link.is_symlink()


# 2. what overwrite=True takes for an earlier export


def test_every_weight_file_of_an_export_carries_the_marker(w4, tmp_path):
    for name, shard in (("single", "5GB"), ("sharded", 20000)):
        report = export(w4, tmp_path / name, format=FMT, max_shard_size=shard)
        weights = [f for f in report.files if f.endswith(".safetensors")]
        assert weights and (len(weights) > 1) == (name == "sharded")
        for f in weights:
            with safe_open(str(tmp_path / name / f), "pt") as st:
                assert st.metadata() == {"format": "pt", "medquant.export": "compressed-tensors"}


def _hub_folder(w4, tmp_path: Path, sharded: bool) -> Path:
    """A pack-quantized folder with exactly the export's file names, its weights written by hand (as
    llm-compressor / ``save_pretrained`` write them: safetensors metadata ``{"format": "pt"}`` only)."""
    from safetensors.torch import load_file, save_file

    made = tmp_path / "made"
    export(w4, made, format=FMT, max_shard_size=20000 if sharded else "5GB")
    hub = tmp_path / "hub"
    hub.mkdir()
    for p in made.iterdir():
        if p.suffix == ".safetensors":
            save_file(load_file(str(p)), str(hub / p.name), metadata={"format": "pt"})
        else:
            shutil.copyfile(p, hub / p.name)
    shutil.rmtree(made)
    assert json.loads((hub / "config.json").read_text())["quantization_config"]["format"] == "pack-quantized"
    return hub


@pytest.mark.parametrize("sharded", [False, True])
@pytest.mark.parametrize("overwrite", [False, True])
def test_a_hub_folder_with_the_export_file_names_is_not_an_earlier_export(w4, w8, tmp_path, sharded, overwrite):
    hub = _hub_folder(w4, tmp_path, sharded)
    before, listing = _snapshot(hub), _listing(tmp_path)
    with pytest.raises(ExportError, match="not empty and not an earlier compressed-tensors export") as e:
        export(w8, hub, format=FMT, overwrite=overwrite)
    msg = str(e.value)
    assert "config.json" in msg and "model" in msg  # what it holds
    assert "carries no medquant export marker" in msg  # what was missing
    assert "medquant.export" in msg and "with overwrite=True" in msg  # what overwrite accepts
    assert "pass overwrite=True" not in msg
    assert _snapshot(hub) == before and _listing(tmp_path) == listing


def test_one_weight_file_without_the_marker_is_enough_to_refuse(w4, w8, tmp_path):
    """A sharded export with one shard rewritten by hand (same tensors, no marker): refused, naming that shard."""
    from safetensors.torch import load_file, save_file

    out = tmp_path / "out"
    report = export(w4, out, format=FMT, max_shard_size=20000)
    last = max(f for f in report.files if f.endswith(".safetensors"))
    save_file(load_file(str(out / last)), str(out / last), metadata={"format": "pt"})
    with pytest.raises(ExportError, match=rf"its {last} carries no medquant export marker"):
        export(w8, out, format=FMT, overwrite=True)


def test_a_folder_without_weight_files_is_not_an_earlier_export(w4, w8, tmp_path):
    out = tmp_path / "out"
    export(w4, out, format=FMT)
    (out / "model.safetensors").unlink()
    with pytest.raises(ExportError, match="it has no model.safetensors"):
        export(w8, out, format=FMT, overwrite=True)
    assert (out / "config.json").is_file()


def test_check_export_folder_follows_the_link_as_the_command_line_calls_it(w4, tmp_path):
    """The command line checks OUT with ``check_export_folder`` before loading the model: through a link it checks
    the target, and a link to a missing folder is refused there already."""
    from medquant.deploy.common import check_export_folder

    link, target, _ = _link(tmp_path, False)
    check_export_folder(link, False)  # empty target
    export(w4, target, format=FMT)
    with pytest.raises(ExportError, match="pass overwrite=True"):
        check_export_folder(link, False)
    check_export_folder(link, True)
    dangling = tmp_path / "links" / "gone"
    dangling.symlink_to("nowhere")
    with pytest.raises(ExportError, match="which does not exist"):
        check_export_folder(dangling, True)
