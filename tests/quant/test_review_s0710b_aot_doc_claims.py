"""What the decoder's docstrings now say, checked against what it runs (eager programs, no compiling).

* The remainder ``r`` of a prompt, below the shortest chunk ``C_1``, takes a padded chunk when
  ``r > max(C_1 // 8, 1)`` (the docstrings said ``r > C_1 // 8``: for ``C_1 < 16`` that promised a padded chunk
  for ``r = 1``, which runs a step).
* After ``generate``, the last token returned is not in the cache: ``position`` is ``P + generated - 1`` and a
  continuation fed from there gives the logits of the model's forward over the whole sequence (reference: the
  eager forward of an independently built copy).
"""
from __future__ import annotations

import torch

from tests.quant.test_decode_edges import _eager_decoder, _llama


def _calls(dec):
    calls = []
    for key, program in list(dec._programs.items()):
        def wrapped(*args, key=key, program=program):
            calls.append(key[0])
            return program(*args)
        dec._programs[key] = wrapped
    return calls


def test_a_remainder_takes_a_padded_chunk_above_max_of_an_eighth_and_one():
    dec = _eager_decoder(_llama(), 1, 24, chunks=(4,), cache_lengths=())
    calls = _calls(dec)
    ids = torch.randint(3, 256, (1, 6), generator=torch.Generator().manual_seed(0))
    dec.prefill(ids[:, :5])  # 4 + r = 1: 4 // 8 = 0 < 1, but one token is a step
    assert calls == [4, 1]
    calls.clear()
    dec.prefill(ids)  # 4 + r = 2 > max(0, 1): a padded chunk of 4
    assert calls == [4, 4]


def test_after_generate_the_last_token_is_fed_first_to_continue():
    ref, dec = _llama(), _eager_decoder(_llama(), 1, 24)
    ids = torch.randint(3, 256, (1, 7), generator=torch.Generator().manual_seed(1))
    out = dec.generate(ids, 4, eos_token_id=[])
    assert dec.position == out.shape[1] - 1
    more = torch.tensor([[9, 10]])
    got = dec.feed(torch.cat([out[:, -1:], more], dim=1))
    with torch.no_grad():
        expected = ref(torch.cat([out, more], dim=1)).logits[:, -1]
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
