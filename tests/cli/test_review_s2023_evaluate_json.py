"""``medquant eval --json`` prints strict JSON: a perplexity that is no number (NaN, from NaN / inf logits of a
broken model) used to be printed as the bare token ``NaN``, which JSON parsers other than Python's refuse."""
from __future__ import annotations

import json

import pytest
import torch

from medquant.cli import main
from tests.cli.tiny_folder import report_text_file, tiny_llama_folder


def _strict(text: str):
    def refuse(token):
        raise ValueError(f"not JSON: {token}")

    return json.loads(text, parse_constant=refuse)


@pytest.fixture(scope="module")
def nan_llama(tmp_path_factory):
    from transformers import AutoModelForCausalLM

    path = tiny_llama_folder(tmp_path_factory.mktemp("nan_llama"))
    model = AutoModelForCausalLM.from_pretrained(path)
    with torch.no_grad():
        model.lm_head.weight[0, 0] = float("nan")  # every logit of token 0 is NaN: so is every token's loss
    model.save_pretrained(path)
    return path


def test_eval_json_of_a_nan_model_is_strict_json_or_a_clear_error(nan_llama, capsys):
    text = report_text_file(nan_llama)
    code = main(["eval", str(nan_llama), "--text", str(text), "--max-length", "16", "--json"])
    out, err = capsys.readouterr()
    if code == 0:
        _strict(out)  # a result must be parseable by any JSON reader
    else:
        assert code == 2 and "nan" in err.lower() and out == ""
