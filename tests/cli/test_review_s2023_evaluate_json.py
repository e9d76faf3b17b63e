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


@pytest.fixture(scope="module")
def word_llama(tmp_path_factory):
    """The zoo's tiny Llama with a word-level tokenizer (an unknown character is a token of its own)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from medquant.testing.zoo import ZOO_BY_NAME

    path = tmp_path_factory.mktemp("word_llama")
    words = ["the", "heart", "is", "normal", "no", "effusion"]
    vocab = {"<pad>": 0, "</s>": 1, "<s>": 2, "<unk>": 3, **{w: 4 + i for i, w in enumerate(words)}}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="</s>", bos_token="<s>",
                                  unk_token="<unk>")
    ZOO_BY_NAME["llama"].build().eval().save_pretrained(path)
    tok.save_pretrained(path)
    return path


def test_eval_reads_a_utf8_file_with_a_byte_order_mark_as_its_text(word_llama, capsys):
    """A UTF-8 file saved with a byte order mark (Windows editors) used to keep U+FEFF at the start of its first
    text, an extra (unknown) token scored as part of the text: the perplexity differed from the same file
    without the mark."""
    text = "the heart is normal\nno effusion\n"
    plain, marked = word_llama / "plain.txt", word_llama / "bom.txt"
    plain.write_text(text, encoding="utf-8")
    marked.write_bytes(b"\xef\xbb\xbf" + text.encode("utf-8"))
    got = []
    for f in (plain, marked):
        assert main(["eval", str(word_llama), "--text", str(f), "--json"]) == 0
        got.append(_strict(capsys.readouterr().out)["perplexity"])
    assert got[1] == pytest.approx(got[0], rel=1e-9)
