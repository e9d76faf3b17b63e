"""``medquant quantize``: ``--calib-samples`` / ``--seq-len`` shape the calibration data read from ``--calib``;
without ``--calib`` (``--method rtn``) they are read for nothing and are refused with the arguments (exit code 2, one
line naming the option, before the model is loaded), as ``--calib-split`` without ``--calib-images`` and
``--max-hessian-bytes`` without gptq are. They were accepted and silently ignored. With ``--calib`` their defaults
(32 sequences of 512 tokens) still apply."""
from __future__ import annotations

import pytest

import medquant.cli.quantize
from medquant.cli import main
from tests.cli.refusals import exit_code_and_error, refuse_loading
from tests.prune.real_models import REPORTS


@pytest.fixture
def no_loading(monkeypatch, tmp_path):
    refuse_loading(monkeypatch, (medquant.cli.quantize, "_load"), (medquant.cli.quantize, "load_skeleton"))
    (tmp_path / "model").mkdir()
    return tmp_path


@pytest.mark.parametrize("extra, flag", [(["--calib-samples", "8"], "--calib-samples"),
                                         (["--seq-len", "64"], "--seq-len"),
                                         (["--method", "rtn", "--calib-samples", "32"], "--calib-samples")])
def test_calibration_shape_options_without_calib_are_refused_before_loading(no_loading, capsys, extra, flag):
    code, err = exit_code_and_error(["quantize", str(no_loading / "model"), str(no_loading / "out"), *extra], capsys)
    lines = [x for x in err.splitlines() if "error:" in x]
    assert code == 2 and len(lines) == 1
    assert lines[0].startswith("medquant quantize: error: ") and flag in lines[0] and "--calib" in lines[0]
    assert not (no_loading / "out").exists()


def test_the_calibration_defaults_still_apply_with_calib(no_loading, monkeypatch):
    (no_loading / "t.txt").write_text("\n".join(REPORTS))
    seen = {}

    def batches(tok, path, samples, seq_len, text=None):
        seen.update(samples=samples, seq_len=seq_len)
        raise SystemExit("stopped after reading the calibration settings")

    monkeypatch.setattr(medquant.cli.quantize, "_load", lambda *a, **k: (None, None))
    monkeypatch.setattr(medquant.cli.quantize, "calibration_batches", batches)
    assert main(["quantize", str(no_loading / "model"), str(no_loading / "out"), "--method", "gptq",
                 "--calib", str(no_loading / "t.txt")]) == 2
    assert seen == {"samples": 32, "seq_len": 512}
