"""``medquant pipeline --text FILE --reports TGZ``: two text sources; ``--text`` is read and ``--reports`` was silently
ignored (the report then named only the text file). Refused with the arguments: exit code 2, one line naming both
options, before the model is loaded."""
from __future__ import annotations

import pytest

import medquant.cli.prune
from medquant.cli import main
from tests.prune.real_models import REPORTS


def test_reports_with_text_is_refused_before_loading(monkeypatch, tmp_path, capsys):
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr(medquant.cli.prune, "_load", refuse)
    (tmp_path / "model").mkdir()
    (tmp_path / "t.txt").write_text("\n".join(f"{r} ({i})" for i, r in enumerate(REPORTS * 8)))
    with pytest.raises(SystemExit) as e:
        main(["pipeline", str(tmp_path / "model"), "--out", str(tmp_path / "out"), "--text", str(tmp_path / "t.txt"),
              "--reports", str(tmp_path / "NLMCXR_reports.tgz")])
    lines = [x for x in capsys.readouterr().err.splitlines() if "error:" in x]
    assert e.value.code == 2 and len(lines) == 1
    assert lines[0].startswith("medquant pipeline: error: ") and "--reports" in lines[0] and "--text" in lines[0]
    assert not (tmp_path / "out").exists()
