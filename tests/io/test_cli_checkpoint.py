"""``medquant upgrade`` / ``medquant verify`` and the command line's one-line errors (exit code 2, --debug)."""
import os
import shutil
from pathlib import Path

import pytest
import torch
from torch import nn

import medquant as mq
from medquant.cli import main
from medquant.io import MANIFEST_NAME, WEIGHTS_NAME, CheckpointError

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "v1"


def test_upgrade_and_verify(tmp_path, capsys):
    shutil.copytree(FIXTURE / "plain", tmp_path / "plain")
    shutil.copytree(FIXTURE / "llama", tmp_path / "llama")
    assert main(["verify", str(tmp_path / "plain")]) == 0
    assert "ok (" in capsys.readouterr().out  # verified, with the note that only its weights are
    assert main(["upgrade", str(tmp_path / "plain"), str(tmp_path / "llama")]) == 0
    assert MANIFEST_NAME in os.listdir(tmp_path / "plain") and MANIFEST_NAME in os.listdir(tmp_path / "llama")
    capsys.readouterr()
    assert main(["verify", str(tmp_path / "plain"), str(tmp_path / "llama")]) == 0
    assert capsys.readouterr().out.splitlines() == [f"{tmp_path / 'plain'}: ok", f"{tmp_path / 'llama'}: ok"]


def test_errors_are_one_line_with_exit_code_2_and_debug_shows_the_traceback(tmp_path, capsys):
    assert main(["upgrade", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert err.strip() == f"medquant upgrade: error: {tmp_path / 'missing'}: no such folder"
    torch.manual_seed(0)
    m = mq.quantize_(nn.Sequential(nn.Linear(16, 16)), mq.QuantConfig(4, group_size=16))
    mq.save(m, tmp_path / "ck")
    data = bytearray((tmp_path / "ck" / WEIGHTS_NAME).read_bytes())
    data[-1] ^= 1
    (tmp_path / "ck" / WEIGHTS_NAME).write_bytes(bytes(data))
    assert main(["verify", str(tmp_path / "ck")]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "model.safetensors is corrupted" in err and "--debug" in err
    with pytest.raises(CheckpointError, match="corrupted"):
        main(["--debug", "verify", str(tmp_path / "ck")])


@pytest.mark.parametrize("argv, message", [
    (["demo", "--epochs", "-1"], "--epochs: expected a positive integer, got -1"),
    (["prune", "/no/such/model", "--out", "x"], "/no/such/model: no such folder"),
    (["prune", str(FIXTURE / "llama"), "--out", "x", "--heads", "1.5"], "--heads: expected a fraction in [0, 1)"),
    (["pipeline", str(FIXTURE / "llama"), "--out", "x", "--bits", "9"], "--bits: expected a bit-width 1..8"),
    (["upgrade"], "the following arguments are required: PATH"),
])
def test_arguments_are_validated_before_any_work(argv, message, capsys):
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("files, message", [
    ({}, ("not a medquant checkpoint: expected medquant.json (written by medquant.save) or a config.json with a "
          "medquant quantization_config (written by medquant.hf.save_pretrained), and the folder has neither")),
    ({"config.json": '{"quantization_config": {"quant_method": "medquant", "modules": 5}}'},
     "config.json: quantization_config.modules must be an object module name -> recipe, got 5"),
    ({"config.json": "[1, 2]"}, "config.json: expected a JSON object (a transformers config), got a JSON list"),
    ({"config.json": "{"}, "config.json: not a valid JSON file"),
    ({"config.json": '{"model_type": "llama"}'}, "has no medquant quantization_config"),
])
def test_verify_of_a_folder_that_is_no_checkpoint_says_what_is_expected(tmp_path, capsys, files, message):
    folder = tmp_path / "f"
    folder.mkdir()
    for name, text in files.items():
        (folder / name).write_text(text)
    assert main(["verify", str(folder)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err and "Errno" not in err and "object has no" not in err
