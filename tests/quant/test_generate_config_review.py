"""The sampling settings of :meth:`AOTDecoder.generate` default to the model's ``generation_config``, as in
transformers' ``generate``.

Driven with the eager programs of ``tests/quant/test_decode_edges.py`` (no compile); the reference is transformers'
own ``model.generate`` on an independently built copy of the same quantized model, its global generator seeded alike.
"""
from __future__ import annotations

import json

import pytest
import torch

from tests.quant.test_decode_edges import _eager_decoder, _llama, _padded

#: a Qwen-style generation config: sampling on, every warper medquant implements set
SAMPLING = {"do_sample": True, "temperature": 0.7, "top_k": 20, "top_p": 0.8, "repetition_penalty": 1.05,
            "pad_token_id": 0}


def _pair(**config):
    """The reference model and the eager decoder of its copy, both with ``config`` in their generation config."""
    ref, model = _llama(), _llama()
    for m in (ref, model):
        for key, value in config.items():
            setattr(m.generation_config, key, value)
    return ref, _eager_decoder(model, 2, 24)


def _both(ref, dec, ids, mask, seed=11, **kwargs):
    torch.manual_seed(seed)
    with torch.no_grad():
        expected = ref.generate(ids, attention_mask=mask, max_new_tokens=8, **kwargs)
    torch.manual_seed(seed)
    return dec.generate(ids, 8, attention_mask=mask, **kwargs), expected


def test_no_sampling_arguments_take_the_generation_configs_settings():
    ref, dec = _pair(**SAMPLING)
    ids, mask = _padded(2, 9, [0, 0], 7)
    got, expected = _both(ref, dec, ids, mask)
    assert torch.equal(got, expected)
    with torch.no_grad():
        greedy = ref.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False)
    assert not torch.equal(got, greedy)  # the config's sampling was used, not the argmax
    for seed in (3, 5):  # other draws agree too
        got, expected = _both(ref, dec, ids, mask, seed=seed)
        assert torch.equal(got, expected)


def test_explicit_arguments_win_over_the_config():
    ref, dec = _pair(**SAMPLING)
    ids, mask = _padded(2, 9, [0, 0], 7)
    got, expected = _both(ref, dec, ids, mask, do_sample=False)  # greedy, the config's penalty still applied
    assert torch.equal(got, expected)
    with torch.no_grad():
        plain = ref.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False, repetition_penalty=1.0)
    assert torch.equal(dec.generate(ids, 8, attention_mask=mask, do_sample=False, repetition_penalty=1.0), plain)
    for kwargs in ({"temperature": 1.5}, {"top_k": 0, "top_p": 1.0}, {"top_p": 0.95, "repetition_penalty": 1.3}):
        got, expected = _both(ref, dec, ids, mask, **kwargs)
        assert torch.equal(got, expected), kwargs


def test_explicit_sampling_takes_generates_global_defaults():
    """A config that sets nothing: ``do_sample=True`` alone samples with ``generate``'s defaults (top_k 50)."""
    ref, dec = _pair(pad_token_id=0)
    ids, mask = _padded(2, 9, [0, 3], 7)
    got, expected = _both(ref, dec, ids, mask, do_sample=True, temperature=2.0)
    assert torch.equal(got, expected)
    got, expected = _both(ref, dec, ids, mask)  # no argument: greedy
    assert torch.equal(got, expected)


@pytest.mark.parametrize("setting, value", [("no_repeat_ngram_size", 2), ("num_beams", 2), ("min_p", 0.1),
                                            ("typical_p", 0.5), ("bad_words_ids", [[5]]),
                                            ("num_return_sequences", 2)])
def test_a_config_setting_medquant_does_not_implement_is_refused_by_name(setting, value):
    _, dec = _pair(**SAMPLING, **{setting: value})
    ids, mask = _padded(2, 9, [0, 0], 7)
    with pytest.raises(ValueError, match=setting):
        dec.generate(ids, 8, attention_mask=mask)


def test_sampling_only_settings_are_ignored_when_greedy_as_generate_ignores_them():
    """``min_p`` (not implemented) with ``do_sample=False``: ``generate`` does not apply it, nor does the decoder;
    ``min_p=0`` keeps every token, so it is accepted when sampling."""
    ref, dec = _pair(**{**SAMPLING, "do_sample": False, "min_p": 0.1})
    ids, mask = _padded(2, 9, [0, 0], 7)
    got, expected = _both(ref, dec, ids, mask)
    assert torch.equal(got, expected)
    ref, dec = _pair(**{**SAMPLING, "min_p": 0.0})
    got, expected = _both(ref, dec, ids, mask)
    assert torch.equal(got, expected)


def test_the_cli_takes_the_generation_configs_sampling_unless_told_greedy(tmp_path, capsys, monkeypatch):
    """``medquant generate`` with no sampling flag samples as the folder's ``generation_config`` says (transformers'
    ``generate`` of the reloaded folder, same seed); ``--greedy`` takes the argmax."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from medquant.cli import main
    from tests.cli.test_cli_review import PROMPT, _use_eager_decoder
    from tests.cli.tiny_folder import tiny_llama_folder

    src = tiny_llama_folder(tmp_path / "src")
    model = AutoModelForCausalLM.from_pretrained(src).eval()
    for key, value in SAMPLING.items():
        setattr(model.generation_config, key, value)
    model.generation_config.eos_token_id = None
    model.save_pretrained(tmp_path / "qwenish")
    AutoTokenizer.from_pretrained(src).save_pretrained(tmp_path / "qwenish")
    tok = AutoTokenizer.from_pretrained(tmp_path / "qwenish")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "qwenish").eval()
    ids = torch.tensor([tok(PROMPT, add_special_tokens=False)["input_ids"]])
    torch.manual_seed(4)
    with torch.no_grad():
        sampled = reloaded.generate(ids, max_new_tokens=8)[0, ids.shape[1]:].tolist()
        greedy = reloaded.generate(ids, max_new_tokens=8, do_sample=False)[0, ids.shape[1]:].tolist()
    assert sampled != greedy
    _use_eager_decoder(monkeypatch)
    argv = ["generate", str(tmp_path / "qwenish"), "--max-len", "32", "--prompt", PROMPT, "--max-new-tokens", "8",
            "--seed", "4", "--json"]
    for extra, expected in (([], sampled), (["--greedy"], greedy)):
        assert main(argv + extra) == 0
        assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["tokens"] == [expected], extra
    with pytest.raises(SystemExit):
        main(argv + ["--greedy", "--temperature", "0.5"])
    assert "--greedy and --temperature" in capsys.readouterr().err


def test_the_config_repetition_penalty_skips_left_padding_as_generate_does():
    """``generate`` does not count a row's left padding as tokens already seen (``prompt_ignore_length``): with the
    padding id the padded row's argmax, the penalty must leave that token alone, as in ``generate``."""
    ref, dec = _pair(do_sample=False, repetition_penalty=4.0, pad_token_id=0)
    ids, mask = _padded(2, 9, [0, 4], 7)
    with torch.no_grad():
        top = int(ref(ids[1:, 4:]).logits[0, -1].argmax())
    assert top not in ids[1, 4:].tolist()
    ids[1, :4] = top  # the padding holds the token the padded row picks first
    got, expected = _both(ref, dec, ids, mask)
    assert int(expected[1, 9]) == top and torch.equal(got, expected)
