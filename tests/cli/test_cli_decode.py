"""``medquant compile-decoder`` / ``generate`` on a tiny quantized LLaMA folder (MiniLM's real tokenizer): the saved
decoder, loaded by ``generate`` in the same command line a user runs, gives the tokens of transformers' own
``generate`` on the folder reloaded with ``from_pretrained``."""
from __future__ import annotations

import json

import pytest
import torch

from medquant.cli import main
from medquant.kernels.native import native_status
from tests.cli.tiny_folder import tiny_llama_folder

PROMPT = "no acute cardiopulmonary"


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """A W4 g32 folder (``medquant quantize``) and a decoder compiled for it (``medquant compile-decoder``: the
    step program only, 24 positions)."""
    root = tmp_path_factory.mktemp("decode")
    tiny_llama_folder(root / "src")
    assert main(["quantize", str(root / "src"), str(root / "q4"), "--bits", "4", "--group-size", "32",
                 "--json"]) == 0
    return root


def _reference(folder, n_new: int, **kwargs) -> tuple[list[int], list[int]]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    ids = tok(PROMPT, add_special_tokens=False)["input_ids"]
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=n_new, do_sample=False,
                             eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id or tok.eos_token_id,
                             **kwargs)
    return ids, out[0, len(ids):].tolist()


@pytest.mark.slow
def test_compile_then_generate_gives_transformers_tokens(folders, capsys):
    q4, dec = folders / "q4", folders / "q4-decoder"
    assert main(["compile-decoder", str(q4), str(dec), "--max-len", "24", "--chunk", "1", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["cache_lengths"] == [24] and summary["chunks"] == [] and summary["bound_layers"] == (15 if native_status().get("gemv4") else 0)
    assert (dec / "decoder.json").is_file() and (dec / "step-24.pt2").is_file()
    ids, expected = _reference(q4, 8)
    assert main(["generate", str(q4), "--decoder", str(dec), "--prompt", PROMPT, "--max-new-tokens", "8",
                 "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["prompt_tokens"] == len(ids) and result["tokens"] == [expected]
    from transformers import AutoTokenizer

    assert result["texts"] == [AutoTokenizer.from_pretrained(q4).decode(expected, skip_special_tokens=True)]
    assert result["load_s"] >= 0 and result["prefill_tok_s"] > 0
    # a repetition penalty, as transformers applies it
    ids, expected = _reference(q4, 8, repetition_penalty=1.4)
    assert main(["generate", str(q4), "--decoder", str(dec), "--prompt", PROMPT, "--max-new-tokens", "8",
                 "--repetition-penalty", "1.4", "--json"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["tokens"] == [expected]
    # the plain output: the prompt followed by its continuation, then the rates
    assert main(["generate", str(q4), "--decoder", str(dec), "--prompt", PROMPT, "--max-new-tokens", "8"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0] == PROMPT + result["texts"][0] and "decoder loaded" in lines[-1]
    # a decoder saved for the quantized folder refuses the float one (other layers, other weights)
    assert main(["generate", str(folders / "src"), "--decoder", str(dec), "--prompt", PROMPT,
                 "--max-new-tokens", "8"]) == 2
    assert "differ" in capsys.readouterr().err
    # the saved sizes are checked from decoder.json before the model is loaded: an empty model folder is not reached
    empty = folders / "empty"
    empty.mkdir()
    assert main(["generate", str(empty), "--decoder", str(dec), "--prompt", PROMPT, "--prompt", PROMPT]) == 2
    assert "2 prompts given, the decoder in" in capsys.readouterr().err
    assert main(["generate", str(q4), "--decoder", str(dec), "--prompt", PROMPT, "--max-new-tokens", "24"]) == 2
    assert "exceeds the decoder's max_len 24" in capsys.readouterr().err


@pytest.mark.slow
def test_prompts_of_different_lengths_are_padded_on_the_left_as_generate_takes_them(folders, capsys):
    """Two prompts of 2 and 4 tokens, a decoder compiled by the command itself (``--max-len``): the tokens of
    transformers' ``generate`` on the left-padded batch with its attention mask."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    q4 = folders / "q4"
    prompts = ["no acute", "no acute cardiopulmonary process"]
    assert main(["generate", str(q4), "--max-len", "16", "--prompt", prompts[0], "--prompt", prompts[1],
                 "--max-new-tokens", "6", "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    tok = AutoTokenizer.from_pretrained(q4)
    tok.padding_side = "left"
    tok.pad_token = tok.pad_token or tok.eos_token
    batch = tok(prompts, add_special_tokens=False, padding=True, return_tensors="pt")
    assert batch.attention_mask[0].tolist().count(0) > 0  # the first prompt is padded
    model = AutoModelForCausalLM.from_pretrained(q4).eval()
    with torch.no_grad():
        out = model.generate(batch.input_ids, attention_mask=batch.attention_mask, max_new_tokens=6,
                             min_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id)
    assert result["tokens"] == out[:, batch.input_ids.shape[1]:].tolist() and "compile_s" in result


@pytest.mark.parametrize("argv, message", [
    (["generate", "{src}", "--prompt", "x"], "give either --decoder DIR"),
    (["generate", "{src}", "--prompt", "x", "--max-len", "8", "--decoder", "{src}"], "give either --decoder DIR"),
    (["generate", "{src}", "--prompt", "x", "--max-len", "8", "--temperature", "0"], "--temperature: expected"),
    (["generate", "{src}", "--prompt", "x", "--max-len", "8", "--top-k", "3"], "--top-k applies to sampling"),
    (["generate", "{src}", "--prompt", "x", "--max-len", "8", "--top-p", "0.5"], "--top-p applies to sampling"),
    (["generate", "{src}", "--prompt", "x", "--max-len", "8", "--temperature", "1", "--top-p", "0"],
     "--top-p: expected a value in (0, 1]"),
    (["generate", "{src}", "--prompt", "x", "--max-len", "8", "--repetition-penalty", "0"],
     "--repetition-penalty: expected"),
    (["generate", "{src}", "--prompt", "no acute cardiopulmonary", "--max-len", "8", "--max-new-tokens", "8"],
     "exceeds --max-len 8"),
    (["generate", "{src}", "--decoder", "{src}", "--prompt", "x"], "holds no saved decoder"),
    (["compile-decoder", "/no/such/model", "out", "--max-len", "8"], "/no/such/model: no such folder"),
    (["compile-decoder", "{src}", "{src}", "--max-len", "8"], "exists and is not an empty folder"),
])
def test_bad_input_is_one_line_naming_it(folders, capsys, argv, message):
    argv = [a.replace("{src}", str(folders / "src")) for a in argv]
    try:
        code = main(argv)
    except SystemExit as e:  # argparse's own errors
        code = e.code
    assert code == 2
    assert message in capsys.readouterr().err
