"""``medquant demo --save`` names a path that cannot hold the checkpoint before training (exit code 2, one line)."""
from __future__ import annotations

import pytest

import medquant.cli.demo
from medquant.cli import main


def test_a_save_path_that_is_a_file_is_refused_before_training(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(medquant.cli.demo, "_train", lambda *a, **k: pytest.fail("trained before the check"))
    target = tmp_path / "a file"
    target.write_text("kept")
    assert main(["demo", "--epochs", "1", "--plot", "", "--save", str(target)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "--save" in err and str(target) in err
    assert target.read_text() == "kept"
