"""``medquant pipeline --out``: a path that cannot become the output folder (an existing file, or a path beneath a
file) is refused with the argument errors, exit code 2, one line naming ``--out``, before the model is loaded; it was
refused by the save, after every stage had run, in a line that did not name the option."""
from __future__ import annotations

import pytest

import medquant.cli.prune
from tests.cli.refusals import exit_code_and_error, refuse_loading
from tests.prune.real_models import REPORTS


@pytest.fixture
def no_loading(monkeypatch, tmp_path):
    refuse_loading(monkeypatch, (medquant.cli.prune, "_load"))
    (tmp_path / "model").mkdir()
    (tmp_path / "t.txt").write_text("\n".join(f"{r} ({i})" for i, r in enumerate(REPORTS * 8)))
    (tmp_path / "a_file").write_text("mine")
    return tmp_path


@pytest.mark.parametrize("out", ["a_file", "a_file/sub"])
def test_pipeline_refuses_an_out_that_cannot_be_a_folder_before_loading(no_loading, capsys, out):
    code, err = exit_code_and_error(["pipeline", str(no_loading / "model"), "--out", str(no_loading / out),
                                      "--text", str(no_loading / "t.txt")], capsys)
    lines = [x for x in err.splitlines() if "error:" in x]
    assert code == 2 and len(lines) == 1
    assert lines[0].startswith("medquant pipeline: error: --out") and str(no_loading / "a_file") in lines[0]
    assert (no_loading / "a_file").read_text() == "mine"
