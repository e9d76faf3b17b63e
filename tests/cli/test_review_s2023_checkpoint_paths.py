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
