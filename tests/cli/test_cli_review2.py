"""Second review of the command line: options a command would silently ignore or read wrongly are refused before any
work, in one line naming them (``score --state`` with fitting options, ``prune --spread`` out of range or without
``--layer-select``), text files that are not UTF-8 are named with their option before the model is loaded
(``quantize --calib``, ``prune --calib-text``, ``pipeline --text``), and a model folder without ``config.json`` is
named as such. References: the CSV of a plain ``--state`` run (what the refused options would have silently
given), ``ComplexityScorer`` fitted in Python."""
from __future__ import annotations

import csv

import numpy as np
import pytest

import medquant.cli.prune as cli_prune
import medquant.cli.quantize as cli_quantize
import medquant.data
from medquant.cli import main


def _scores(path) -> list[str]:
    with open(path, newline="") as f:
        return [r["score"] for r in csv.DictReader(f)]


@pytest.fixture
def scored(tmp_path, capsys):
    """An .npz of 8 random 16 x 16 images and the scorer state fitted on them by ``medquant score``."""
    np.savez(tmp_path / "x.npz", test_images=np.random.default_rng(0).integers(0, 256, (8, 16, 16), np.uint8))
    assert main(["score", str(tmp_path / "x.npz"), "--out", str(tmp_path / "a.csv"), "--save-state",
                 str(tmp_path / "s.pt"), "--no-progress"]) == 0
    capsys.readouterr()
    return tmp_path


def test_score_state_is_the_fitted_scorer(scored, capsys):
    """The plain ``--state`` run (the reference below) scores as the run that fitted the state."""
    assert main(["score", str(scored / "x.npz"), "--out", str(scored / "b.csv"), "--state", str(scored / "s.pt"),
                 "--no-progress"]) == 0
    assert _scores(scored / "b.csv") == _scores(scored / "a.csv")


@pytest.mark.parametrize("extra, named", [
    (["--weights", "1,0,0,0,0"], "--weights"),
    (["--n-levels", "2"], "--n-levels"),
    (["--edge-threshold", "0.3"], "--edge-threshold"),
    (["--fit-on", "X"], "--fit-on"),
    (["--fit-on", "X", "--fit-split", "test"], "--fit-on, --fit-split"),
])
def test_score_state_refuses_the_fitting_options_it_would_ignore(scored, capsys, monkeypatch, extra, named):
    # before the fix these ran, exit code 0, and wrote the state's scores as if the option had not been given
    extra = [str(scored / "x.npz") if a == "X" else a for a in extra]
    monkeypatch.setattr(medquant.data, "load_images", lambda *a, **k: pytest.fail("images loaded before the check"))
    with pytest.raises(SystemExit) as info:
        main(["score", str(scored / "x.npz"), "--out", str(scored / "b.csv"), "--state", str(scored / "s.pt"),
              "--no-progress", *extra])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert named in err and "--state" in err, err
    assert not (scored / "b.csv").exists()


@pytest.mark.parametrize("flag", ["--fit-split", "--fit-limit"])
def test_score_fit_split_and_limit_need_fit_on(scored, capsys, monkeypatch, flag):
    # before the fix --fit-split / --fit-limit without --fit-on were ignored: the scored images were fitted on
    monkeypatch.setattr(medquant.data, "load_images", lambda *a, **k: pytest.fail("images loaded before the check"))
    with pytest.raises(SystemExit) as info:
        main(["score", str(scored / "x.npz"), "--out", str(scored / "b.csv"), flag, "3", "--no-progress"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert flag in err and "--fit-on" in err, err


def test_score_explicit_levels_and_edge_threshold_are_used_when_fitting(scored, capsys):
    """Without ``--state`` the options are passed on: levels of a 2-level scorer fitted in Python."""
    from medquant.complexity import ComplexityScorer

    assert main(["score", str(scored / "x.npz"), "--out", str(scored / "c.csv"), "--n-levels", "2",
                 "--edge-threshold", "0.3", "--no-progress"]) == 0
    images = np.load(scored / "x.npz")["test_images"]
    ref = ComplexityScorer(n_levels=2, edge_threshold=0.3)
    metrics = ref.metrics(images)
    ref.fit(metrics=metrics)
    want = ref.levels_from_scores(ref.score(metrics=metrics)).tolist()
    with open(scored / "c.csv", newline="") as f:
        assert [int(r["level"]) for r in csv.DictReader(f)] == want


@pytest.mark.parametrize("spread", ["1.5", "-0.1", "nan"])
def test_prune_spread_out_of_range_is_an_argument_error(tmp_path, capsys, monkeypatch, spread):
    # before the fix it was read as given, and refused by allocate_ratios only after loading the model and
    # measuring block influence, without naming --spread
    monkeypatch.setattr(cli_prune, "_load", lambda *a, **k: pytest.fail("model loaded before the check"))
    with pytest.raises(SystemExit) as info:
        main(["prune", str(tmp_path), "--out", str(tmp_path / "o"), "--layer-select", "--spread", spread])
    assert info.value.code == 2
    assert "--spread" in capsys.readouterr().err


def test_prune_spread_without_layer_select_is_refused(tmp_path, capsys, monkeypatch):
    # before the fix --spread without --layer-select was accepted and did nothing (every block got --heads / --ffn)
    monkeypatch.setattr(cli_prune, "_load", lambda *a, **k: pytest.fail("model loaded before the check"))
    with pytest.raises(SystemExit) as info:
        main(["prune", str(tmp_path), "--out", str(tmp_path / "o"), "--spread", "0.8"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "--spread" in err and "--layer-select" in err, err


@pytest.mark.parametrize("argv, flag, module", [
    (["quantize", "M", "O", "--method", "gptq", "--calib", "T"], "--calib", cli_quantize),
    (["prune", "M", "--out", "O", "--calib-text", "T"], "--calib-text", cli_prune),
    (["pipeline", "M", "--out", "O", "--text", "T"], "--text", cli_prune),
])
def test_a_text_file_that_is_not_utf8_is_named_with_its_option_before_loading(tmp_path, capsys, monkeypatch,
                                                                              argv, flag, module):
    # before the fix: "'utf-8' codec can't decode byte 0xff in position 0", after loading the model (quantize,
    # prune), naming neither the file nor the option
    (tmp_path / "m").mkdir()
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("effusion\nd\xe9j\xe0 vu\n".encode("latin-1"))
    monkeypatch.setattr(module, "_load", lambda *a, **k: pytest.fail("model loaded before the text was read"))
    argv = [str(tmp_path / "m") if a == "M" else str(tmp_path / "o") if a == "O" else str(bad) if a == "T" else a
            for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{flag}: {bad} is not UTF-8" in err, err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("argv", [["quantize", "M", "O"], ["prune", "M", "--out", "O", "--importance", "magnitude"],
                                  ["eval", "M", "--text", "T"]])
def test_a_model_folder_without_config_json_is_named_as_such(tmp_path, capsys, argv):
    # before the fix: "Unrecognized model in M. Should have a `model_type` key in its config.json", as if there
    # were one
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "model.safetensors").write_bytes(b"")
    (tmp_path / "t.txt").write_text("no effusion\n", encoding="utf-8")
    argv = [str(tmp_path / "m") if a == "M" else str(tmp_path / "o") if a == "O" else str(tmp_path / "t.txt")
            if a == "T" else a for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{tmp_path / 'm'}: no config.json" in err, err


def test_quantize_into_its_earlier_output_with_another_tokenizer_stays_verifiable(tmp_path, capsys):
    """The tokenizer files are saved as part of the checkpoint (listed in its manifest), so a second run into the
    same OUT_DIR from a folder with another tokenizer gives a folder that verifies, reloads and holds the new
    tokenizer. Before the fix they were written after the manifest: the second run's ``tokenizer_config.json``
    replaced the one the manifest had recorded, and ``medquant verify`` / ``from_pretrained`` refused the folder."""
    import json

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tests.cli.tiny_folder import tiny_llama_folder

    first, second, out = tmp_path / "a", tmp_path / "b", tmp_path / "q"
    tiny_llama_folder(first)
    tiny_llama_folder(second)
    cfg = json.loads((second / "tokenizer_config.json").read_text())
    cfg["model_max_length"] = 77
    (second / "tokenizer_config.json").write_text(json.dumps(cfg))
    for src in (first, second):
        assert main(["quantize", str(src), str(out), "--group-size", "32", "--json"]) == 0
    capsys.readouterr()
    manifest = json.loads((out / "medquant.manifest.json").read_text())["files"]
    assert {"tokenizer.json", "tokenizer_config.json"} <= set(manifest)
    assert main(["verify", str(out)]) == 0
    assert AutoTokenizer.from_pretrained(str(out)).model_max_length == 77
    AutoModelForCausalLM.from_pretrained(str(out))


def test_quantize_out_dir_that_is_a_file_is_refused_before_loading(tmp_path, capsys, monkeypatch):
    # before the fix the model was loaded and quantized, then the save refused the file
    (tmp_path / "m").mkdir()
    (tmp_path / "out").write_text("notes\n")
    monkeypatch.setattr(cli_quantize, "_load", lambda *a, **k: pytest.fail("model loaded before the check"))
    with pytest.raises(SystemExit) as info:
        main(["quantize", str(tmp_path / "m"), str(tmp_path / "out")])
    assert info.value.code == 2
    assert "OUT_DIR" in capsys.readouterr().err
    assert (tmp_path / "out").read_text() == "notes\n"


@pytest.mark.parametrize("flag, value", [("--mean", "nan"), ("--mean", "0.5,inf,0.4"), ("--std", "-inf")])
def test_export_mean_and_std_must_be_finite_numbers(tmp_path, capsys, flag, value):
    # before the fix "nan" was read as a number: the export normalized the samples to NaN and was refused only
    # after loading the model, as "example_inputs: input 0 contains ... NaN/inf values", not naming the option
    np.save(tmp_path / "c.npy", np.zeros((2, 3, 4, 4), np.uint8))
    (tmp_path / "src").mkdir()
    with pytest.raises(SystemExit) as info:
        main(["export", str(tmp_path / "src"), str(tmp_path / "m.onnx"), "--format", "onnx", "--calib",
              str(tmp_path / "c.npy"), f"{flag}={value}"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {flag}" in err and "finite" in err, err
