"""The integer and end-token arguments of :func:`medquant.quant.aot.compile_decoder` and ``AOTDecoder.generate``,
and the output-head check for heads without ``out_features``.

* ``max_len``, ``batch_size``, ``chunk`` (and ``cache_lengths``) took Python ints only: a NumPy integer or a 0-d
  integer tensor was refused as "not an int". They are taken through ``operator.index`` now; bools, floats,
  float / bool / 1-d tensors and strings are still refused.
* ``eos_token_id`` as a NumPy integer array was refused; it is taken as transformers' ``generate`` takes it (an int,
  a list of ints, a 0-d / 1-d integer tensor), plus NumPy integers and 0-d / 1-d NumPy integer arrays. The reference
  is transformers' own greedy ``model.generate(..., eos_token_id=[...])`` on a copy of the model.
* ``_check_head`` accepted any head without ``out_features`` unchecked; such a head's width is now measured by
  calling it on one zero hidden state.

No test compiles (the compiled programs are covered by ``tests/quant/test_aot.py``): ``compile_decoder`` is stopped where it would build its first cache (after every argument check), and ``generate``
runs on the eager decoder of ``tests/quant/test_decode_edges.py`` (the modules ``compile_decoder`` exports, run
eagerly; ``generate``'s own code).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from medquant.quant import aot
from tests.quant.test_decode_edges import _eager_decoder, _llama


class _Reached(Exception):
    """Raised in place of building the first cache: every argument check passed."""


@pytest.fixture
def stop_at_cache(monkeypatch):
    """``compile_decoder`` stops where it builds its first cache; the sizes it would build it with are recorded."""
    seen: dict[str, object] = {}

    def static_cache(model, batch_size, max_len):
        seen.update(batch_size=batch_size, max_len=max_len)
        raise _Reached

    monkeypatch.setattr(aot, "_static_cache", static_cache)
    return seen


_INTEGERS = [np.int64(12), np.int32(12), np.uint8(12), torch.tensor(12), torch.tensor(12, dtype=torch.int32), 12]
_NOT_INTEGERS = [True, np.True_, torch.tensor(True), 12.0, np.float64(12), torch.tensor(12.0), torch.tensor([12]),
                 np.array([12]), "12", None]


# 1. max_len, batch_size, chunk


@pytest.mark.parametrize("value", _INTEGERS, ids=repr)
def test_compile_decoder_takes_numpy_and_tensor_integers(stop_at_cache, value):
    with pytest.raises(_Reached):
        aot.compile_decoder(_llama(), value, batch_size=value // 6, chunk=value // 3, progress=False)
    assert stop_at_cache == {"batch_size": 2, "max_len": 12}
    assert all(type(v) is int for v in stop_at_cache.values())  # plain ints reach the programs and the manifest


@pytest.mark.parametrize("value", _INTEGERS, ids=repr)
def test_chunks_and_cache_lengths_take_numpy_and_tensor_integers(value):
    for chunk, want in ((value, (12,)), ([value], (12,)), ((value, 4), (4, 12)), ([np.int64(3), value], (3, 12))):
        got = aot._chunks(chunk, 16)
        assert got == want and all(type(c) is int for c in got), (chunk, got)
    got = aot._cache_lengths([value, np.int64(8)], 16)
    assert got == [8, 12, 16] and all(type(c) is int for c in got)


@pytest.mark.parametrize("bad", _NOT_INTEGERS, ids=repr)
def test_compile_decoder_still_refuses_bools_floats_and_non_integers(stop_at_cache, bad):
    model = _llama()
    if bad is not None:  # max_len has no default: None is not "unset" for it
        with pytest.raises(ValueError, match=r"max_len must be an int >= 1, got"):
            aot.compile_decoder(model, bad, progress=False)
        with pytest.raises(ValueError, match=r"batch_size must be an int >= 1, got"):
            aot.compile_decoder(model, 16, batch_size=bad, progress=False)
        for chunk in (bad, [bad], [4, bad]):
            with pytest.raises(ValueError, match=r"chunk must be an int >= 1 or a non-empty sequence of them, got"):
                aot.compile_decoder(model, 16, chunk=chunk, progress=False)
        with pytest.raises(ValueError, match=r"cache_lengths must be ints in 1\.\.max_len=16, got"):
            aot.compile_decoder(model, 16, cache_lengths=[8, bad], progress=False)
    else:
        with pytest.raises(ValueError, match=r"max_len must be an int >= 1, got None"):
            aot.compile_decoder(model, None, progress=False)
    assert not stop_at_cache  # refused before anything was built


@pytest.mark.parametrize("bad", [0, np.int64(0), torch.tensor(-1)], ids=repr)
def test_integers_below_one_are_still_refused(stop_at_cache, bad):
    with pytest.raises(ValueError, match=r"max_len must be an int >= 1"):
        aot.compile_decoder(_llama(), bad, progress=False)
    with pytest.raises(ValueError, match=r"batch_size must be an int >= 1"):
        aot.compile_decoder(_llama(), 16, batch_size=bad, progress=False)
    with pytest.raises(ValueError, match=r"chunk must be an int >= 1"):
        aot.compile_decoder(_llama(), 16, chunk=bad, progress=False)


# 2. eos_token_id as generate takes it, and as NumPy gives it


@pytest.fixture(scope="module")
def greedy():
    """The eager decoder (batch 2), a reference copy of the model, two prompts, and two end tokens that the
    greedy continuation of the first prompt produces (its 2nd and 4th new tokens) with the second prompt's 3rd new
    token: generation stops early in each row."""
    ref, dec = _llama(), _eager_decoder(_llama(), 2, 16)
    ids = torch.tensor([[5, 6, 7, 9], [17, 3, 40, 2]])
    with torch.no_grad():
        free = ref.generate(ids, max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(dec.generate(ids, 6, eos_token_id=[]), free)  # the decoder is generate's, without ends
    ends = [int(free[0, 5]), int(free[1, 6])]
    return ref, dec, ids, ends, free


@pytest.mark.parametrize("form", ["int", "list", "numpy int", "list of numpy ints", "0-d numpy array",
                                  "1-d numpy array", "int32 numpy array", "1-d tensor", "int32 tensor", "0-d tensor",
                                  "tuple"])
def test_eos_token_id_forms_stop_as_transformers_generate(greedy, form):
    ref, dec, ids, ends, free = greedy
    one = form in ("int", "numpy int", "0-d numpy array", "0-d tensor")
    want = ends[:1] if one else ends
    given = {"int": ends[0], "list": ends, "numpy int": np.int64(ends[0]),
             "list of numpy ints": [np.int64(ends[0]), np.int32(ends[1])], "0-d numpy array": np.array(ends[0]),
             "1-d numpy array": np.array(ends), "int32 numpy array": np.array(ends, dtype=np.int32),
             "1-d tensor": torch.tensor(ends), "int32 tensor": torch.tensor(ends, dtype=torch.int32),
             "0-d tensor": torch.tensor(ends[0]), "tuple": tuple(ends)}[form]
    with torch.no_grad():
        expected = ref.generate(ids, max_new_tokens=6, do_sample=False, eos_token_id=want, pad_token_id=1)
    # the end tokens changed the output: generation stopped early, or a finished row was padded
    assert expected.shape[1] < free.shape[1] or not torch.equal(expected, free)
    got = dec.generate(ids, 6, eos_token_id=given, pad_token_id=1)
    assert torch.equal(got, expected), (form, got, expected)


def test_transformers_generate_takes_a_numpy_array_of_end_tokens_too(greedy):
    """The reference itself: transformers' ``generate`` with the NumPy array stops as with the list."""
    ref, _, ids, ends, _ = greedy
    with torch.no_grad():
        a = ref.generate(ids, max_new_tokens=6, do_sample=False, eos_token_id=np.array(ends), pad_token_id=1)
        b = ref.generate(ids, max_new_tokens=6, do_sample=False, eos_token_id=ends, pad_token_id=1)
    assert torch.equal(a, b)


@pytest.mark.parametrize("bad", [True, np.True_, 3.0, np.float64(3), "3", [3.0], [True], [torch.tensor([3])],
                                 [[3]], np.array([3.0]), np.array([True]), np.array([[3]]), torch.tensor([3.0]),
                                 torch.tensor([True]), torch.tensor([[3]]), torch.tensor(3.0), {3}], ids=repr)
def test_eos_token_id_not_integers_is_refused(greedy, bad):
    _, dec, ids, _, _ = greedy
    with pytest.raises(ValueError, match=r"eos_token_id must be an int token id, a list of them .* or a 1-d "
                                         r"integer tensor / NumPy array .*, got"):
        dec.generate(ids, 2, eos_token_id=bad)


# 3. an output head without out_features


class _Wrapped(nn.Module):
    """A custom head: a Linear inside, no ``out_features`` of its own."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x)


def _head(model: nn.Module, extra: int, favour: int | None = None) -> nn.Module:
    """``model`` with its head replaced by :class:`_Wrapped` around a float Linear of ``vocab + extra`` outputs,
    its first rows the old head's weights; ``favour``: an output row whose bias makes it the argmax."""
    old = model.get_output_embeddings()
    vocab = old.out_features
    inner = nn.Linear(old.in_features, vocab + extra, bias=True)
    with torch.no_grad():
        inner.weight.zero_()
        rows = min(vocab, vocab + extra)
        weight = old.dequantized_weight(torch.float32) if hasattr(old, "dequantized_weight") else old.weight
        inner.weight[:rows] = weight[:rows].float()
        inner.bias.zero_()
        if favour is not None:
            inner.bias[favour] = 1e4
    model.lm_head = _Wrapped(inner)
    assert not hasattr(model.get_output_embeddings(), "out_features")
    return model


def test_a_wider_head_without_out_features_is_refused(stop_at_cache):
    """The wrapped head gives 264 logits per token against the table's 256 rows (its row 259 the argmax: fed back,
    an ``IndexError`` eagerly, an unchecked read in a compiled program): refused by ``compile_decoder`` before
    anything is built (and by the decoder itself: next test)."""
    model = _head(_llama(), 8, favour=259)
    with torch.no_grad():
        assert int(model(torch.tensor([[5, 6]])).logits[0, -1].argmax()) == 259  # what generate would feed back
    with pytest.raises(ValueError, match=r"_Wrapped\) gives 264 logits per token, more than the 256 rows"):
        aot.compile_decoder(model, 16, progress=False)
    assert not stop_at_cache


def test_an_eager_decoder_with_a_wider_head_without_out_features_is_refused():
    with pytest.raises(ValueError, match=r"_Wrapped\) gives 264 logits per token, more than the 256 rows"):
        _eager_decoder(_head(_llama(), 8, favour=259), 1, 16)


def test_a_narrower_head_without_out_features_is_accepted_and_generates_generates_tokens():
    ref, model = _head(_llama(), -8), _head(_llama(), -8)
    dec = _eager_decoder(model, 1, 16)
    ids = torch.tensor([[5, 6, 7, 9]])
    with torch.no_grad():
        expected = ref.generate(ids, max_new_tokens=5, min_new_tokens=5, do_sample=False, pad_token_id=0)
    assert torch.equal(dec.generate(ids, 5), expected)


def test_a_head_that_cannot_be_called_on_a_hidden_state_is_accepted_unchecked():
    """A head whose width can be neither read nor measured (its forward needs something else) is left to the
    programs, as before: the check does not make such a model unusable."""

    class Odd(nn.Module):
        def forward(self, x, extra):  # pragma: no cover - never called with two arguments here
            return x

    model = _llama()
    model.lm_head = Odd()
    assert aot._check_head(model, "test") == 256
