"""Sampling settings given to a greedy ``AOTDecoder.generate``.

With ``do_sample`` settled False (not given, and the model's ``generation_config`` does not sample), a ``temperature``,
``top_k`` or ``top_p`` passed to ``generate`` is not used: the tokens are the argmax, as transformers' ``generate``
gives them, which says so ("generation flags are not valid and may be ignored"). The decoder dropped them without a
word, so ``decoder.generate(ids, 8, temperature=0.7)`` looked like sampling and was greedy. It now warns, naming
them and ``do_sample=True``; the tokens stay ``generate``'s (eager programs, no compiling).
"""
from __future__ import annotations

import warnings

import pytest
import torch

from tests.quant.test_decode_edges import _eager_decoder, _llama

IDS = torch.tensor([[6, 7, 226, 216, 210], [211, 116, 40, 8, 167]])


@pytest.mark.parametrize("kwargs", [{"temperature": 0.7}, {"top_k": 5}, {"top_p": 0.8},
                                    {"temperature": 1.3, "top_k": 20, "top_p": 0.9}])
def test_sampling_settings_given_to_a_greedy_generate_are_named_in_a_warning(kwargs):
    ref, dec = _llama(), _eager_decoder(_llama(), 2, 24)
    with torch.no_grad():
        expected = ref.generate(IDS, max_new_tokens=6, pad_token_id=0, eos_token_id=None, **kwargs)
        greedy = ref.generate(IDS, max_new_tokens=6, do_sample=False, pad_token_id=0, eos_token_id=None)
    assert torch.equal(expected, greedy)  # generate does not use them either
    with pytest.warns(UserWarning, match=rf"{next(iter(kwargs))}.*not used.*do_sample=True"):
        got = dec.generate(IDS, 6, pad_token_id=0, eos_token_id=[], **kwargs)
    assert torch.equal(got, expected)


def test_no_warning_when_they_are_used_or_not_given():
    dec = _eager_decoder(_llama(), 2, 24)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        dec.generate(IDS, 3, eos_token_id=[])
        dec.generate(IDS, 3, eos_token_id=[], do_sample=True, temperature=0.7, top_k=5, top_p=0.9,
                     generator=torch.Generator().manual_seed(0))
        model = _llama()
        model.generation_config.temperature = 0.6  # the config's, unused when greedy, as in generate: no warning
        _eager_decoder(model, 2, 24).generate(IDS, 3, eos_token_id=[])
