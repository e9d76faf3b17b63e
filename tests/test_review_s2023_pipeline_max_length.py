"""``medquant pipeline --max-length N`` with ``N`` no more than the special tokens its tokenizer adds to every text
(MiniLM's ``[CLS]`` / ``[SEP]``: 2): ``--max-length 2`` cut every text to ``[CLS] [SEP]``, and ``--max-length 1`` was
below what the tokenizer can truncate to, so it truncated nothing and the texts ran whole; either way the command ran
to the end and saved a model calibrated and trained on something else than asked. ``N < 2`` is refused while parsing
(as ``medquant quantize --seq-len 1``), ``N`` up to the tokenizer's special tokens once it is loaded, before any stage
runs; exit code 2, one line naming ``--max-length``."""
from __future__ import annotations

import pytest

import medquant.cli.pipeline
import medquant.cli.prune
import medquant.pipeline
from medquant.cli import main
from tests.cli.refusals import refuse_loading
from tests.cli.tiny_folder import report_text_file, tiny_llama_folder


def test_max_length_1_is_refused_while_parsing(monkeypatch, tmp_path, capsys):
    refuse_loading(monkeypatch, (medquant.cli.prune, "_load"), (medquant.cli.pipeline, "_texts"))
    (tmp_path / "model").mkdir()
    with pytest.raises(SystemExit) as e:
        main(["pipeline", str(tmp_path / "model"), "--out", str(tmp_path / "out"), "--max-length", "1"])
    lines = [x for x in capsys.readouterr().err.splitlines() if "error:" in x]
    assert e.value.code == 2 and len(lines) == 1 and "--max-length" in lines[0]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("maxlen")
    tiny_llama_folder(root / "src")
    return root, report_text_file(root)


def test_max_length_leaving_no_text_is_refused_before_any_stage(folder, tmp_path, capsys, monkeypatch):
    from transformers import AutoTokenizer

    root, text = folder
    tok = AutoTokenizer.from_pretrained(root / "src")
    special = tok.num_special_tokens_to_add(pair=False)
    assert special == 2 and tok(["no acute disease"], truncation=True, max_length=2)["input_ids"] == [[101, 102]]

    def refuse(*args, **kwargs):
        raise AssertionError("a stage ran")

    monkeypatch.setattr(medquant.pipeline, "compress", refuse)
    assert main(["pipeline", str(root / "src"), "--out", str(tmp_path / "out"), "--text", str(text),
                 "--max-length", str(special), "--calib-samples", "4", "--batch", "2", "--steps", "1"]) == 2
    lines = [x for x in capsys.readouterr().err.splitlines() if "error:" in x]
    assert len(lines) == 1 and "--max-length 2" in lines[0]
    assert not (tmp_path / "out").exists()


def test_max_length_with_room_for_text_runs(folder, tmp_path):
    root, text = folder
    assert main(["pipeline", str(root / "src"), "--out", str(tmp_path / "out"), "--text", str(text),
                 "--max-length", "3", "--calib-samples", "4", "--heads", "0", "--ffn", "0.25", "--train", "none",
                 "--quant", "none"]) == 0
