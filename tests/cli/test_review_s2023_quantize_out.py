"""``medquant quantize MODEL_DIR OUT_DIR`` with an ``OUT_DIR`` beneath a file (``a_file/sub``): refused with the
argument errors, exit code 2, one line naming ``OUT_DIR``, before the model is loaded; the save refused it after the
whole quantization with ``[Errno 17] File exists``, naming no option."""
from __future__ import annotations

import pytest

import medquant.cli.quantize
from tests.cli.refusals import exit_code_and_error, refuse_loading


@pytest.fixture
def no_loading(monkeypatch, tmp_path):
    refuse_loading(monkeypatch, (medquant.cli.quantize, "_load"), (medquant.cli.quantize, "load_skeleton"))
    (tmp_path / "model").mkdir()
    (tmp_path / "a_file").write_text("mine")
    return tmp_path


@pytest.mark.parametrize("out", ["a_file", "a_file/sub", "a_file/sub/deeper"])
def test_quantize_refuses_an_out_dir_that_cannot_be_a_folder_before_loading(no_loading, capsys, out):
    code, err = exit_code_and_error(["quantize", str(no_loading / "model"), str(no_loading / out)], capsys)
    lines = [x for x in err.splitlines() if "error:" in x]
    assert code == 2 and len(lines) == 1
    assert lines[0].startswith("medquant quantize: error: OUT_DIR") and str(no_loading / "a_file") in lines[0]
    assert (no_loading / "a_file").read_text() == "mine"
