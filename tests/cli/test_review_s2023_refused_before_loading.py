"""Arguments refused before any work: exit code 2, one line naming the option (the model is never loaded, nothing is
compiled or trained). ``medquant compile-decoder``: a ``--chunk`` / ``--cache-lengths`` beyond ``--max-len``;
``medquant generate`` / ``demo``: a ``--seed`` torch cannot seed with."""
from __future__ import annotations

import pytest

import medquant.cli.info
from tests.cli.refusals import exit_code_and_error, refuse_loading


@pytest.fixture
def no_loading(monkeypatch, tmp_path):
    refuse_loading(monkeypatch, (medquant.cli.info, "load_hf_folder"))
    (tmp_path / "model").mkdir()
    return tmp_path


@pytest.mark.parametrize("extra, flag", [
    (["--chunk", "16"], "--chunk"),
    (["--chunk", "4", "32"], "--chunk"),
    (["--cache-lengths", "16"], "--cache-lengths"),
])
def test_compile_decoder_refuses_lengths_beyond_max_len_naming_the_option(no_loading, capsys, extra, flag):
    code, err = exit_code_and_error(["compile-decoder", str(no_loading / "model"), str(no_loading / "out"),
                                      "--max-len", "8", *extra], capsys)
    line = next(x for x in err.splitlines() if "error:" in x)
    assert code == 2 and line.startswith("medquant compile-decoder: error: ") and flag in line and "--max-len 8" in line
    assert not (no_loading / "out").exists()


@pytest.mark.parametrize("seed", [str(2**64), str(-2**63 - 1)])
@pytest.mark.parametrize("command", ["generate", "demo"])
def test_a_seed_torch_cannot_take_is_refused_naming_seed(no_loading, capsys, monkeypatch, seed, command):
    import torch

    with pytest.raises((ValueError, RuntimeError)):  # the reference: torch's own seeding refuses it
        torch.Generator().manual_seed(int(seed))
    import medquant.cli.demo

    monkeypatch.setattr(medquant.cli.demo, "_train", lambda *a, **k: pytest.fail("trained before the check"))
    argv = (["generate", str(no_loading / "model"), "--max-len", "8", "--prompt", "x", f"--seed={seed}"]
            if command == "generate" else ["demo", "--plot", "", "--epochs", "1", f"--seed={seed}"])
    code, err = exit_code_and_error(argv, capsys)
    assert code == 2 and "--seed" in err


@pytest.mark.parametrize("seed", [str(2**64 - 1), str(-2**63), "0"])
def test_seeds_torch_takes_are_accepted(seed):
    from medquant.cli import build_parser

    parser = build_parser()
    assert parser.parse_args(["demo", f"--seed={seed}"]).seed == int(seed)
    assert parser.parse_args(["generate", ".", "--max-len", "8", "--prompt", "x", f"--seed={seed}"]).seed == int(seed)
