"""``medquant generate`` / ``eval`` as a user runs them on a tiny LLaMA folder (MiniLM's real tokenizer): the end
tokens ``generate`` stops at are those transformers' ``generate`` stops at, and a text file that is not UTF-8 is a
one-line error naming ``--text``."""
from __future__ import annotations

import json

import pytest
import torch

from medquant.cli import main
from tests.cli.tiny_folder import tiny_llama_folder

PROMPT = "no acute cardiopulmonary"


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    return tiny_llama_folder(tmp_path_factory.mktemp("review") / "src")


def _use_eager_decoder(monkeypatch) -> None:
    """``compile_decoder`` replaced by the very modules it exports, run eagerly (tests/quant/test_decode_edges.py;
    their tokens against the compiled programs': tests/quant/test_aot.py)."""
    import medquant.quant.aot
    from tests.quant.test_decode_edges import _eager_decoder

    monkeypatch.setattr(medquant.quant.aot, "compile_decoder",
                        lambda model, max_len, batch_size=1, **k: _eager_decoder(model, batch_size, max_len))


def test_generate_stops_at_the_end_tokens_of_the_generation_config_as_transformers_does(src, tmp_path, capsys,
                                                                                        monkeypatch):
    """A model whose ``generation_config`` names an end token its tokenizer does not (as instruct models list
    several: Llama 3's ``<|eot_id|>``, Qwen's ``<|endoftext|>``): transformers' ``generate`` stops there, and so
    must ``medquant generate``, not run on to ``--max-new-tokens``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer


    tok = AutoTokenizer.from_pretrained(src)
    model = AutoModelForCausalLM.from_pretrained(src).eval()
    ids = torch.tensor([tok(PROMPT, add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        free = model.generate(ids, max_new_tokens=8, do_sample=False, eos_token_id=None,
                              pad_token_id=0)[0, ids.shape[1]:].tolist()
    end = free[3]  # the fourth greedy token becomes an end token of the model's generation config
    assert end not in free[:3] and tok.eos_token_id is None
    folder = tmp_path / "eos"
    model.generation_config.eos_token_id = [end]
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    reloaded = AutoModelForCausalLM.from_pretrained(folder).eval()
    with torch.no_grad():  # transformers' generate with the folder's own settings
        expected = reloaded.generate(ids, max_new_tokens=8, do_sample=False)[0, ids.shape[1]:].tolist()
    assert expected == free[:4]

    _use_eager_decoder(monkeypatch)
    assert main(["generate", str(folder), "--max-len", "32", "--prompt", PROMPT, "--max-new-tokens", "8",
                 "--json"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["tokens"] == [expected]


def test_generate_pads_finished_rows_with_the_generation_configs_pad_token_as_transformers_does(src, tmp_path, capsys,
                                                                                                 monkeypatch):
    """A batch of two prompts where row 0 gives an end token of the model's ``generation_config`` early and row 1
    runs on: row 0's ``tokens`` go on with the generation config's pad token (5), not the tokenizer's (``[PAD]``, 0),
    as transformers' ``generate`` pads them; the texts end at the end token. The decoder is the very module
    ``compile_decoder`` exports, run eagerly (its tokens against the compiled ones: tests/quant/test_aot.py)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer


    prompts = ["no acute", "no acute cardiopulmonary process"]
    tok = AutoTokenizer.from_pretrained(src)
    tok.padding_side = "left"
    batch = tok(prompts, add_special_tokens=False, padding=True, return_tensors="pt")
    model = AutoModelForCausalLM.from_pretrained(src).eval()
    with torch.no_grad():
        free = model.generate(batch.input_ids, attention_mask=batch.attention_mask, max_new_tokens=6,
                              do_sample=False, eos_token_id=None, pad_token_id=0)[:, batch.input_ids.shape[1]:]
    end = int(free[0, 1])  # row 0's 2nd greedy token becomes the end token; row 1 never gives it
    assert end not in free[0, :1].tolist() + free[1].tolist() and tok.eos_token_id is None
    folder = tmp_path / "pad"
    model.generation_config.eos_token_id, model.generation_config.pad_token_id = [end], 5
    assert tok.pad_token_id == 0  # the tokenizer's pad token, not the generation config's
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    reloaded = AutoModelForCausalLM.from_pretrained(folder).eval()
    with torch.no_grad():  # transformers' generate with the folder's own settings
        expected = reloaded.generate(batch.input_ids, attention_mask=batch.attention_mask, max_new_tokens=6,
                                     do_sample=False)[:, batch.input_ids.shape[1]:].tolist()
    assert expected[0] == [*free[0, :2].tolist(), 5, 5, 5, 5] and expected[1] == free[1].tolist()

    _use_eager_decoder(monkeypatch)
    assert main(["generate", str(folder), "--max-len", "16", "--prompt", prompts[0], "--prompt", prompts[1],
                 "--max-new-tokens", "6", "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["tokens"] == expected
    assert result["texts"] == [tok.decode(expected[0][:2], skip_special_tokens=True),
                               tok.decode(expected[1], skip_special_tokens=True)]


def test_eval_refuses_a_text_file_that_is_not_utf8_in_one_line_naming_it(src, tmp_path, capsys):
    text = tmp_path / "latin1.txt"
    text.write_bytes("épanchement pleural\n".encode("latin-1"))
    assert main(["eval", str(src), "--text", str(text)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert err.startswith(f"medquant eval: error: --text: {text} is not UTF-8 text")


def test_generate_starts_the_prompt_with_the_tokenizers_bos_token_as_transformers_usage_does(src, tmp_path, capsys,
                                                                                              monkeypatch):
    """A tokenizer that begins every text with its BOS token (LLaMA's, Gemma's): the prompt is what
    ``tok(prompt, return_tensors="pt")`` gives ``model.generate``, BOS first (a model trained with it degrades
    without it), but no end-of-text marker appended (MiniLM's ``[SEP]``: its ``[CLS]`` is no BOS)."""
    import copy

    from tokenizers.processors import TemplateProcessing
    from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast


    raw = copy.deepcopy(AutoTokenizer.from_pretrained(src)._tokenizer)
    raw.post_processor = TemplateProcessing(single="[CLS] $A", pair="[CLS] $A $B", special_tokens=[("[CLS]", 101)])
    folder = tmp_path / "bos"
    AutoModelForCausalLM.from_pretrained(src).save_pretrained(folder)
    PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="[CLS]", pad_token="[PAD]",
                            unk_token="[UNK]").save_pretrained(folder)
    tok = AutoTokenizer.from_pretrained(folder)
    inputs = tok(PROMPT, return_tensors="pt")
    assert inputs.input_ids[0, 0] == tok.bos_token_id == 101 and inputs.input_ids[0, -1] != 102
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    with torch.no_grad():
        expected = model.generate(**inputs, max_new_tokens=6, do_sample=False, eos_token_id=None,
                                  pad_token_id=0)[0, inputs.input_ids.shape[1]:].tolist()

    _use_eager_decoder(monkeypatch)
    assert main(["generate", str(folder), "--max-len", "32", "--prompt", PROMPT, "--max-new-tokens", "6",
                 "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["prompt_tokens"] == inputs.input_ids.shape[1] and result["tokens"] == [expected]


def test_generate_chat_wraps_the_prompt_in_the_tokenizers_chat_template(src, tmp_path, capsys, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer


    folder = tmp_path / "chat"
    AutoModelForCausalLM.from_pretrained(src).save_pretrained(folder)
    tok = AutoTokenizer.from_pretrained(src)
    _use_eager_decoder(monkeypatch)
    tok.save_pretrained(folder)  # no chat template: --chat is refused naming it
    assert main(["generate", str(folder), "--max-len", "64", "--prompt", PROMPT, "--chat"]) == 2
    assert "--chat: the model folder's tokenizer has no chat template" in capsys.readouterr().err
    tok.chat_template = ("{% for m in messages %}[unused1] {{ m['content'] }} [unused2]{% endfor %}"
                         "{% if add_generation_prompt %} answer:{% endif %}")
    tok.save_pretrained(folder)
    want = tok.apply_chat_template([{"role": "user", "content": PROMPT}], add_generation_prompt=True, tokenize=True)
    want = list(want["input_ids"] if hasattr(want, "keys") else want)
    text = tok.apply_chat_template([{"role": "user", "content": PROMPT}], add_generation_prompt=True, tokenize=False)
    assert text == f"[unused1] {PROMPT} [unused2] answer:"  # the template rendered, the assistant's turn opened
    assert want == tok(text, add_special_tokens=False)["input_ids"]
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    with torch.no_grad():
        expected = model.generate(torch.tensor([want]), max_new_tokens=5, do_sample=False, eos_token_id=None,
                                  pad_token_id=0)[0, len(want):].tolist()
    assert main(["generate", str(folder), "--max-len", "64", "--prompt", PROMPT, "--chat", "--max-new-tokens", "5",
                 "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["prompt_tokens"] == len(want) and result["tokens"] == [expected]
