"""``medquant score`` refuses non-positive counts while parsing (exit code 2, one line), before any work."""
from __future__ import annotations

import pytest

from medquant.cli import main


@pytest.mark.parametrize("option", ["--limit", "--fit-limit", "--batch-size", "--n-levels"])
@pytest.mark.parametrize("value", ["-1", "0"])
def test_score_counts_must_be_positive(tmp_path, capsys, monkeypatch, option, value):
    import medquant.data

    def no_work(*a, **k):
        raise AssertionError("images were loaded before the arguments were checked")

    monkeypatch.setattr(medquant.data, "load_images", no_work)
    with pytest.raises(SystemExit) as info:
        main(["score", str(tmp_path), "--out", str(tmp_path / "s.csv"), option, value])
    assert info.value.code == 2
    assert f"{option}: expected a positive integer, got {value}" in capsys.readouterr().err
    assert not (tmp_path / "s.csv").exists()
