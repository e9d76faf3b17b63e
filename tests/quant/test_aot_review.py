"""A user's review of :mod:`medquant.quant.aot`, without compiling a program.

The decoder's Python is driven with the eager programs of ``tests/quant/test_decode_edges.py`` (each ``(tokens, cache
length)`` program the very module ``compile_decoder`` exports, called in Python); the reference is transformers' own
``generate`` on an independently built copy of the same quantized model. The loader's checks run before any program
is read, so they are tested on a folder saved from such a decoder (its program files stand-ins).
"""
from __future__ import annotations

import json

import pytest
import torch

import medquant as mq
from medquant.quant import aot
from tests.quant.test_decode_edges import _eager_decoder, _llama, _padded


@pytest.mark.parametrize("kwargs", [{"temperature": 0.7, "top_k": 20, "top_p": 0.9},
                                    {"temperature": 1.3, "top_k": 256, "top_p": 1.0},
                                    {"top_k": 5, "repetition_penalty": 1.3}])
def test_sampling_draws_generates_tokens_under_the_same_seed(kwargs):
    """Sampling end to end: with the global generator seeded alike, the decoder's draws are ``generate``'s, token for
    token, on a left-padded batch (``top_k`` always given: ``generate`` defaults to 50). The model's end token (2)
    stops a row and the pad token follows it, as in ``generate``."""
    ref, dec = _llama(), _eager_decoder(_llama(), 2, 24)
    ids, mask = _padded(2, 9, [0, 3], 7)
    torch.manual_seed(11)
    with torch.no_grad():
        expected = ref.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=True, pad_token_id=0, **kwargs)
    torch.manual_seed(11)
    got = dec.generate(ids, 8, attention_mask=mask, do_sample=True, pad_token_id=0, **kwargs)
    assert torch.equal(got, expected)
    with torch.no_grad():
        greedy = ref.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert not torch.equal(got, greedy)  # the draws are not the argmax: the comparison covers the sampling


def test_a_closed_decoder_says_so():
    """After ``close()`` the programs are gone: ``feed``, ``prefill`` and ``generate`` said ``KeyError: (4, 8)``."""
    dec = _eager_decoder(_llama(), 2, 16)
    ids = torch.randint(3, 256, (2, 5), generator=torch.Generator().manual_seed(1))
    assert dec.generate(ids, 2).shape == (2, 7)
    dec.close()
    for call in (lambda: dec.generate(ids, 2), lambda: dec.feed(ids), lambda: dec.prefill(ids)):
        with pytest.raises(ValueError, match="this decoder was closed"):
            call()


def test_cache_lengths_given_as_one_int_is_refused_by_name():
    """``chunk`` takes one int; ``cache_lengths=8`` said ``'int' object is not iterable``. Refused before any
    compiling, naming the argument."""
    for bad in (8, "8", 8.0):
        with pytest.raises(ValueError, match=r"cache_lengths must be .*got"):
            aot.compile_decoder(_llama(), 16, cache_lengths=bad, progress=False)
    assert aot._cache_lengths([8], 16) == [8, 16]


def test_token_ids_of_another_integer_dtype_are_refused_with_the_dtypes_taken():
    """int16 / uint8 ids are integers: the message said "must be a CPU integer tensor"; it names int64 / int32."""
    dec = _eager_decoder(_llama(), 1, 8, chunks=(), cache_lengths=())
    ids = torch.tensor([[5, 6, 7]])
    for dtype in (torch.int16, torch.uint8):
        with pytest.raises(ValueError, match=r"int64 or int32; .*got torch\.(int16|uint8)"):
            dec.generate(ids.to(dtype), 2)
    assert torch.equal(dec.generate(ids.int(), 2), dec.generate(ids, 2))


@pytest.fixture
def saved(tmp_path):
    dec = _eager_decoder(_llama(), 1, 8, chunks=(), cache_lengths=(), folder=tmp_path / "programs")
    folder = dec.save(tmp_path / "dec")
    return folder, json.loads((folder / "decoder.json").read_text())


@pytest.mark.parametrize("edit, match", [
    (lambda m: m["model"].pop("model_type"), r"field 'model' has 'model_type'"),
    (lambda m: m["model"].__setitem__("model_type", 3), r"field 'model' has 'model_type' 3"),
    (lambda m: m.__setitem__("ops", [1]), r"field 'ops' is \[1\]")])
def test_a_manifest_field_the_loader_reads_is_checked_by_name(saved, edit, match):
    """``model.model_type`` and ``ops`` are read by ``load_decoder``: missing or of another type, they gave a
    ``KeyError`` / ``AttributeError`` instead of the documented ``ValueError`` naming the field."""
    folder, manifest = saved
    edit(manifest)
    (folder / "decoder.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match=match):
        aot.read_decoder_manifest(folder)
    with pytest.raises(ValueError, match=match):
        mq.load_decoder(folder, _llama(), progress=False)


def test_a_manifest_without_a_model_type_as_saved_for_a_config_without_one_still_reads(saved):
    folder, manifest = saved
    manifest["model"]["model_type"] = None  # getattr(config, "model_type", None) of a config without one
    (folder / "decoder.json").write_text(json.dumps(manifest))
    assert aot.read_decoder_manifest(folder)["model"]["model_type"] is None
