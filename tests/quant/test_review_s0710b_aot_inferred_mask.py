"""``AOTDecoder.generate`` without an ``attention_mask`` on a left-padded batch, as transformers' ``generate`` takes it.

Given no ``attention_mask``, transformers' ``generate`` infers one when the (resolved) pad token occurs in
``input_ids`` and is not an end token: ``attention_mask = input_ids != pad_token_id``. The decoder treated every
prompt token as real, so the same call gave other tokens than ``model.generate``. The reference is transformers' own
``generate`` on an independently built copy of the same quantized model; the decoder's programs are the eager modules
``compile_decoder`` exports (no compiling).
"""
from __future__ import annotations

import pytest
import torch

from tests.quant.test_decode_edges import _eager_decoder, _llama, _padded


def test_left_padding_without_a_mask_is_inferred_from_the_pad_token_as_generate_does():
    ref, dec = _llama(), _eager_decoder(_llama(), 2, 24)
    ids, mask = _padded(2, 9, [0, 3], 7)  # row 1 starts with three pad tokens (0)
    with torch.no_grad():
        expected = ref.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=0)
        masked = ref.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0)
        unmasked = ref.generate(ids, attention_mask=torch.ones_like(mask), max_new_tokens=8, do_sample=False,
                                pad_token_id=0)
    assert torch.equal(expected, masked) and not torch.equal(expected, unmasked)  # generate inferred the mask
    assert torch.equal(dec.generate(ids, 8, pad_token_id=0), expected)
    # the repetition penalty then skips the inferred left padding too, as generate's
    with torch.no_grad():
        expected = ref.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=0, repetition_penalty=1.5)
    assert torch.equal(dec.generate(ids, 8, pad_token_id=0, repetition_penalty=1.5), expected)


def test_the_pad_token_of_the_generation_config_is_inferred_from_too():
    ref, model = _llama(), _llama()
    for m in (ref, model):
        m.generation_config.pad_token_id = 0
    dec = _eager_decoder(model, 2, 24)
    ids, _ = _padded(2, 9, [0, 4], 3)
    with torch.no_grad():
        expected = ref.generate(ids, max_new_tokens=6, do_sample=False)
    assert torch.equal(dec.generate(ids, 6), expected)


def test_no_mask_is_inferred_where_generate_infers_none():
    """The pad token an end token (here the default: the first end token, 2), or not in the ids: every token real."""
    ref, dec = _llama(), _eager_decoder(_llama(), 2, 24)
    ids, _ = _padded(2, 9, [0, 3], 7)
    ids[1, :3] = 2  # the end token as padding: generate cannot tell it from a token, takes every token as real
    with torch.no_grad():
        expected = ref.generate(ids, max_new_tokens=6, do_sample=False)
    assert torch.equal(dec.generate(ids, 6), expected)
    with torch.no_grad():
        expected = ref.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=5)  # 5 not in ids
    assert torch.equal(dec.generate(ids, 6, pad_token_id=5), expected)


def test_a_row_ending_in_the_pad_token_without_a_mask_is_refused_with_the_way_out():
    """A row whose last token is the pad token would be right padding (the decoder returns the last position's
    logits): refused, naming the inference and the ``attention_mask`` that keeps every token."""
    dec = _eager_decoder(_llama(), 2, 24)
    ids, _ = _padded(2, 9, [0, 0], 7)
    ids[1, -1] = 0
    with pytest.raises(ValueError, match=r"pad token 0.*attention_mask"):
        dec.generate(ids, 4, pad_token_id=0)
    ref = _llama()
    with torch.no_grad():
        expected = ref.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False,
                                pad_token_id=0)
    assert torch.equal(dec.generate(ids, 4, pad_token_id=0, attention_mask=torch.ones_like(ids)), expected)
