"""``medquant upgrade`` checks that every PATH is a folder before it rewrites any of them (exit code 2, one line)."""
import os
import shutil
from pathlib import Path

import pytest

from medquant.cli import main
from medquant.io import MANIFEST_NAME

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "v1"


@pytest.mark.parametrize("bad", ["missing", "a file"])
def test_upgrade_rewrites_nothing_when_a_later_path_is_no_folder(tmp_path, capsys, bad):
    shutil.copytree(FIXTURE / "plain", tmp_path / "plain")
    before = sorted(os.listdir(tmp_path / "plain"))
    assert MANIFEST_NAME not in before
    if bad == "a file":
        (tmp_path / bad).write_text("x")
    assert main(["upgrade", str(tmp_path / "plain"), str(tmp_path / bad)]) == 2
    captured = capsys.readouterr()
    assert str(tmp_path / bad) in captured.err and len(captured.err.strip().splitlines()) == 1
    assert "upgraded" not in captured.out
    assert sorted(os.listdir(tmp_path / "plain")) == before  # the first folder was not rewritten


def test_upgrade_of_a_checkpoint_that_has_its_manifest_says_it_was_left_as_it_is(tmp_path, capsys):
    import torch
    from torch import nn

    import medquant as mq

    torch.manual_seed(0)
    mq.save(mq.quantize_(nn.Sequential(nn.Linear(16, 16)), mq.QuantConfig(4, group_size=16)), tmp_path / "ck")
    manifest = tmp_path / "ck" / MANIFEST_NAME
    before = (manifest.read_bytes(), manifest.stat().st_ino, manifest.stat().st_mtime_ns)
    shutil.copytree(FIXTURE / "plain", tmp_path / "plain")
    assert main(["upgrade", str(tmp_path / "ck"), str(tmp_path / "plain")]) == 0
    lines = capsys.readouterr().out.splitlines()
    # the reference: the checkpoint's manifest is the same file, untouched
    assert (manifest.read_bytes(), manifest.stat().st_ino, manifest.stat().st_mtime_ns) == before
    assert lines[0].startswith(f"{tmp_path / 'ck'}: ") and "written" not in lines[0] and "left as it is" in lines[0]
    assert lines[1] == f"{tmp_path / 'plain'}: upgraded (manifest written and verified)"
