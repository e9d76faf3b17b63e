"""``medquant quantize`` / ``prune`` / ``pipeline`` on folders they cannot read as a float Hugging Face model, and
``medquant prune`` failures that must leave no output behind."""
from __future__ import annotations

import json

from medquant.cli import main
from tests.cli.tiny_folder import report_text_file, tiny_llama_folder


def test_quantize_refuses_a_medquant_checkpoint_instead_of_random_weights(tmp_path, capsys):
    src = tiny_llama_folder(tmp_path / "src")
    ck = tmp_path / "ck"
    assert main(["pipeline", str(src), "--out", str(ck), "--heads", "0", "--ffn", "0", "--train", "none",
                 "--quant", "rtn", "--group-size", "32", "--text", str(report_text_file(tmp_path)),
                 "--calib-samples", "4", "--max-length", "16"]) == 0
    capsys.readouterr()
    for argv in (["quantize", str(ck), str(tmp_path / "q"), "--bits", "8", "--group-size", "32"],
                 ["prune", str(ck), "--out", str(tmp_path / "q"), "--importance", "magnitude"]):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "is a quantized (14 layers) medquant checkpoint" in err[0]
        assert "load_compressed" in err[0] and "MISSING" not in err[0]
        assert not (tmp_path / "q").exists()


def test_quantize_and_prune_refuse_an_already_quantized_folder_with_cli_advice(tmp_path, capsys):
    src = tiny_llama_folder(tmp_path / "src")
    q8 = tmp_path / "q8"
    assert main(["quantize", str(src), str(q8), "--bits", "8", "--group-size", "32", "--json"]) == 0
    assert json.loads((q8 / "config.json").read_text())["quantization_config"]["quant_method"] == "medquant"
    capsys.readouterr()
    assert main(["quantize", str(q8), str(tmp_path / "q4"), "--bits", "4", "--group-size", "32"]) == 2
    err = capsys.readouterr().err
    assert "already quantized by medquant" in err and "give the float source folder" in err
    assert "requantize=True" not in err
    for cmd in (["prune", str(q8), "--out", str(tmp_path / "p"), "--importance", "magnitude"],
                ["pipeline", str(q8), "--out", str(tmp_path / "p"), "--train", "none"]):
        assert main(cmd) == 2
        err = capsys.readouterr().err
        assert "needs a float model" in err and ".float()" not in err
    assert not (tmp_path / "q4").exists() and not (tmp_path / "p").exists()


def test_prune_layer_select_failure_leaves_no_output_and_names_the_allocated_ratio(tmp_path, capsys):
    src = tiny_llama_folder(tmp_path / "src")
    out = tmp_path / "out"
    assert main(["prune", str(src), "--out", str(out), "--heads", "0.7", "--ffn", "0.3", "--layer-select",
                 "--calib-text", str(report_text_file(tmp_path)), "--calib-samples", "4", "--max-length", "16"]) == 2
    err = capsys.readouterr().err
    assert "allocated to that block from the mean you gave (--heads 0.7" in err
    assert not out.exists()  # no block_influence.png left behind
