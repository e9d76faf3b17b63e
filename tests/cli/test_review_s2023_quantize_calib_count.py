"""``medquant quantize --calib FILE`` with a file shorter than ``--calib-samples`` x ``--seq-len`` tokens calibrates on
what the file holds: it did so silently (asked for 32 sequences of 512 tokens, a three-line file gave one sequence,
and neither the table nor ``--json`` said so). The summary now records the sequences and tokens calibrated on
(``calibration``; ``null`` for ``rtn``), and a warning names the shortfall. Reference: the file's paragraphs
tokenized by the folder's tokenizer (transformers), counted by hand."""
from __future__ import annotations

import json

import pytest

from medquant.cli import main
from tests.cli.tiny_folder import report_text_file, tiny_llama_folder


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("calibcount")
    tiny_llama_folder(root / "src")
    lines = report_text_file(root).read_text().splitlines()
    (root / "short.txt").write_text("\n".join(lines[:3]))
    return root


def test_a_short_calibration_file_is_counted_and_warned_about(folder, tmp_path, capsys):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder / "src")
    paragraphs = [p.strip() for p in (folder / "short.txt").read_text().splitlines() if p.strip()]
    total = sum(len(tok(p)["input_ids"]) for p in paragraphs)
    assert 2 <= total < 512
    with pytest.warns(UserWarning, match=r"--calib-samples 32 x --seq-len 512"):
        assert main(["quantize", str(folder / "src"), str(tmp_path / "o"), "--method", "gptq", "--calib",
                     str(folder / "short.txt"), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["calibration"] == {"sequences": 1, "tokens": total}


def test_a_long_enough_file_gives_what_was_asked_and_rtn_none(folder, tmp_path, capsys):
    text = folder / "t.txt"
    assert main(["quantize", str(folder / "src"), str(tmp_path / "o"), "--method", "awq", "--calib", str(text),
                 "--calib-samples", "3", "--seq-len", "16", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["calibration"] == {"sequences": 3, "tokens": 48}
    assert main(["quantize", str(folder / "src"), str(tmp_path / "r"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["calibration"] is None
