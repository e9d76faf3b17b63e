"""Generation config settings transformers' ``generate`` applies to a decoder-only model's prompt.

``encoder_repetition_penalty`` and ``encoder_no_repeat_ngram_size`` read "encoder" ids, which for a decoder-only model
``generate`` takes to be the prompt (``encoder_input_ids=inputs_tensor``): set on the model's ``generation_config``
they change ``generate``'s tokens. ``AOTDecoder.generate`` implements neither and ignored both silently; like the
other settings it does not implement, they are now refused by name. The reference is transformers' own ``generate``
on an independently built copy of the same quantized model (eager programs, no compiling).
"""
from __future__ import annotations

import pytest
import torch

from tests.quant.test_decode_edges import _eager_decoder, _llama

IDS = torch.tensor([[6, 7, 226, 216, 210, 210, 210, 210], [211, 116, 40, 8, 167, 167, 167, 211]])


@pytest.mark.parametrize("name, value", [("encoder_repetition_penalty", 3.0), ("encoder_no_repeat_ngram_size", 1)])
def test_a_prompt_setting_generate_applies_is_refused_not_ignored(name, value):
    ref, model = _llama(), _llama()
    with torch.no_grad():
        plain = ref.generate(IDS, max_new_tokens=6, do_sample=False, pad_token_id=0, eos_token_id=None)
        setattr(ref.generation_config, name, value)
        applied = ref.generate(IDS, max_new_tokens=6, do_sample=False, pad_token_id=0, eos_token_id=None)
    assert not torch.equal(plain, applied)  # generate applies it to a decoder-only model's prompt
    setattr(model.generation_config, name, value)
    dec = _eager_decoder(model, 2, 24)
    with pytest.raises(ValueError, match=rf"{name}={value}.*model\.generation_config\.{name} = None"):
        dec.generate(IDS, 6, pad_token_id=0, eos_token_id=[])
    setattr(model.generation_config, name, None)  # the way out the message names: generate's tokens without it
    assert torch.equal(dec.generate(IDS, 6, pad_token_id=0, eos_token_id=[]), plain)


@pytest.mark.parametrize("name, value", [("encoder_repetition_penalty", 1.0), ("encoder_no_repeat_ngram_size", 0)])
def test_the_values_generate_does_not_apply_are_accepted(name, value):
    ref, model = _llama(), _llama()
    setattr(model.generation_config, name, value)
    with torch.no_grad():
        expected = ref.generate(IDS, max_new_tokens=6, do_sample=False, pad_token_id=0, eos_token_id=None)
    assert torch.equal(_eager_decoder(model, 2, 24).generate(IDS, 6, pad_token_id=0, eos_token_id=[]), expected)
