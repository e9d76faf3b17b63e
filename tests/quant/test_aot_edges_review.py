"""A review of :mod:`medquant.quant.aot`'s edges, without compiling a program.

Three of them: the program ``file`` entries of a saved decoder's manifest (a path, or a name that leads out of the
folder, was loaded: only its SHA-256 was checked); ``generate``'s integer arguments given as NumPy integers or 0-d
integer tensors (refused as "not an int"); and a model whose output head is wider than its input embedding table
(a generated id the table cannot look up was fed back: an ``IndexError`` mid-generation run eagerly, a read out of
bounds in a compiled program). The decoders are the eager ones of ``tests/quant/test_decode_edges.py`` and the saved
folder that of ``tests/quant/test_aot_review.py`` (a folder ``AOTDecoder.save`` wrote, its program files
stand-ins: the loader's checks run before a program is read); the reference is transformers' ``generate``.
"""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from torch import nn

import medquant as mq
from medquant.quant import aot
from tests.quant.test_aot_review import saved  # noqa: F401  (the fixture: a folder AOTDecoder.save wrote)
from tests.quant.test_decode_edges import _eager_decoder, _llama


class _Reached(Exception):
    """Raised in place of loading a program: the loader got past every check before it."""


@pytest.fixture
def no_program_loads(monkeypatch):
    def load(path):
        raise _Reached(path)
    monkeypatch.setattr(torch._inductor, "aoti_load_package", load)


def _set_file(folder, manifest, entry: str) -> None:
    m = json.loads(json.dumps(manifest))
    m["programs"][0]["file"] = entry
    (folder / "decoder.json").write_text(json.dumps(m))


# 1. the manifest's program file entries


def test_a_plain_file_name_inside_the_folder_loads(saved, no_program_loads):  # noqa: F811
    """The folder as saved, and a program renamed to another plain name in it (the manifest edited to match):
    loaded up to reading the program."""
    folder, manifest = saved
    with pytest.raises(_Reached):
        mq.load_decoder(folder, _llama(), progress=False)
    first = manifest["programs"][0]["file"]
    (folder / first).rename(folder / "renamed.pt2")
    _set_file(folder, manifest, "renamed.pt2")
    with pytest.raises(_Reached, match="renamed.pt2"):
        mq.load_decoder(folder, _llama(), progress=False)


@pytest.mark.parametrize("where", ["parent", "absolute", "subfolder", "dot-dot inside"])
def test_a_program_entry_that_is_a_path_is_refused(saved, no_program_loads, where):  # noqa: F811
    """Each entry names a file that exists and has the recorded SHA-256 (a copy of the program): only the entry's
    form is wrong, and it is refused by name before anything is read, by ``read_decoder_manifest`` too."""
    folder, manifest = saved
    first = folder / manifest["programs"][0]["file"]
    outside = folder.parent / "outside"
    outside.mkdir()
    shutil.copyfile(first, outside / first.name)
    (folder / "sub" / "dir").mkdir(parents=True)
    shutil.copyfile(first, folder / "sub" / "dir" / first.name)
    entry = {"parent": f"../outside/{first.name}", "absolute": str(outside / first.name),
             "subfolder": f"sub/dir/{first.name}", "dot-dot inside": f"sub/../{first.name}"}[where]
    assert (folder / entry).is_file()  # what was accepted: an existing file with the recorded SHA-256
    _set_file(folder, manifest, entry)
    with pytest.raises(ValueError) as info:
        mq.load_decoder(folder, _llama(), progress=False)
    assert repr(entry) in str(info.value) and "a plain file name inside the folder" in str(info.value)
    with pytest.raises(ValueError, match="a plain file name inside the folder"):
        aot.read_decoder_manifest(folder)


@pytest.mark.parametrize("entry", ["..", ".", ""])
def test_dot_names_are_refused(saved, entry):  # noqa: F811
    folder, manifest = saved
    _set_file(folder, manifest, entry)
    with pytest.raises(ValueError, match="a plain file name inside the folder"):
        mq.load_decoder(folder, _llama(), progress=False)


def test_a_symlink_in_the_folder_to_a_file_outside_is_refused(saved, no_program_loads):  # noqa: F811
    """The entry is a plain name, but the file is a symbolic link to a copy outside the folder: refused at load.
    A link to a file inside the folder is still accepted."""
    folder, manifest = saved
    first = folder / manifest["programs"][0]["file"]
    outside = folder.parent / "outside"
    outside.mkdir()
    shutil.copyfile(first, outside / first.name)
    link = folder / "link.pt2"
    link.symlink_to(outside / first.name)
    _set_file(folder, manifest, "link.pt2")
    with pytest.raises(ValueError, match=r"'link\.pt2'.*outside the folder.*a plain file name inside the folder"):
        mq.load_decoder(folder, _llama(), progress=False)
    link.unlink()
    link.symlink_to(first.name)  # relative, inside the folder
    with pytest.raises(_Reached):
        mq.load_decoder(folder, _llama(), progress=False)


# 2. integer arguments of generate


def test_numpy_and_tensor_integers_are_taken_as_ints():
    """``max_new_tokens``, ``top_k``, ``eos_token_id`` and ``pad_token_id`` as ``np.int64`` or 0-d integer tensors
    give the tokens the Python ints give, which are ``generate``'s."""
    ref, dec = _llama(), _eager_decoder(_llama(), 1, 16)
    ids = torch.tensor([[5, 6, 7, 9]])
    with torch.no_grad():
        expected = ref.generate(ids, max_new_tokens=3, min_new_tokens=3, do_sample=False, pad_token_id=0)
    assert torch.equal(dec.generate(ids, 3), expected)
    for n in (np.int64(3), np.int32(3), torch.tensor(3), torch.tensor(3, dtype=torch.int32)):
        assert torch.equal(dec.generate(ids, n), expected), repr(n)
    eos = int(expected[0, 5])  # the 2nd new token: generation stops after it
    want = dec.generate(ids, 3, eos_token_id=eos, pad_token_id=1)
    assert want.shape[1] <= 6
    for e, p in ((np.int64(eos), np.int64(1)), ([np.int64(eos)], torch.tensor(1)), (torch.tensor(eos), 1)):
        assert torch.equal(dec.generate(ids, 3, eos_token_id=e, pad_token_id=p), want)
    torch.manual_seed(3)
    sampled = dec.generate(ids, 4, do_sample=True, top_k=5)
    torch.manual_seed(3)
    assert torch.equal(dec.generate(ids, np.int64(4), do_sample=True, top_k=np.int64(5)), sampled)


_NOT_INTEGERS = [True, np.True_, torch.tensor(True), 3.0, np.float64(3), torch.tensor(3.0), torch.tensor([3]), "3"]


@pytest.mark.parametrize("bad", [*_NOT_INTEGERS, 0, np.int64(0), torch.tensor(-1)])
def test_max_new_tokens_not_an_integer_a_bool_or_below_one_is_still_refused(bad):
    dec = _eager_decoder(_llama(), 1, 16, chunks=(), cache_lengths=())
    with pytest.raises(ValueError, match="max_new_tokens must be an int >= 1, got"):
        dec.generate(torch.tensor([[5, 6, 7]]), bad)


@pytest.mark.parametrize("bad", _NOT_INTEGERS)
def test_other_integer_arguments_not_integers_or_bools_are_still_refused(bad):
    dec = _eager_decoder(_llama(), 1, 16, chunks=(), cache_lengths=())
    ids = torch.tensor([[5, 6, 7]])
    with pytest.raises(ValueError, match="top_k must be an int"):
        dec.generate(ids, 2, do_sample=True, top_k=bad)
    with pytest.raises(ValueError, match="pad_token_id must be an int"):
        dec.generate(ids, 2, pad_token_id=bad, eos_token_id=3)
    with pytest.raises(ValueError, match="eos_token_id must be an int"):
        dec.generate(ids, 2, eos_token_id=[bad])
    with pytest.raises(ValueError, match="top_k must be an int"):
        dec.generate(ids, 2, do_sample=True, top_k=np.int64(-1))


# 3. an output head wider than the input embedding table


def _wide_head(model: nn.Module, extra: int, favour: int | None = None) -> nn.Module:
    """``model`` with its head replaced by a float ``Linear`` of ``vocab + extra`` outputs (``extra < 0``: fewer),
    the first rows the old head's weights; ``favour``: an output row whose bias makes it the argmax."""
    old = model.get_output_embeddings()
    vocab = old.out_features
    weight = old.dequantized_weight(torch.float32) if hasattr(old, "dequantized_weight") else old.weight
    head = nn.Linear(old.in_features, vocab + extra, bias=True)
    with torch.no_grad():
        head.weight.zero_()
        rows = min(vocab, vocab + extra)
        head.weight[:rows] = weight[:rows].float()
        head.bias.zero_()
        if favour is not None:
            head.bias[favour] = 1e4
    model.lm_head = head
    return model


def test_a_wider_head_was_an_index_error_mid_generation_and_is_refused_when_built():
    """The head's 264 outputs against the table's 256 rows; its row 259 made the argmax: the first token generated
    was 259, fed back at the next step (``IndexError``, eagerly; an unchecked read in a compiled program). Refused
    where the decoder is built, naming both sizes."""
    model = _wide_head(_llama(), 8, favour=259)
    with pytest.raises(ValueError, match=r"264 .*256|256 .*264") as info:
        _eager_decoder(model, 1, 16)
    assert "lm_head" in str(info.value) or "output" in str(info.value)


def test_compile_decoder_refuses_a_wider_head_before_exporting(monkeypatch):
    def export(*args, **kwargs):
        raise AssertionError("exported: the wider head was not refused first")
    monkeypatch.setattr(torch.export, "export", export)
    with pytest.raises(ValueError, match=r"264 .*256|256 .*264"):
        aot.compile_decoder(_wide_head(_llama(), 8), 16, chunk=1, cache_lengths=(), progress=False)


def test_load_decoder_refuses_a_wider_head(saved, no_program_loads):  # noqa: F811
    """A model of the saved configuration with a wider head: refused by its sizes (before any weight check)."""
    folder, _ = saved
    for check_weights in (True, False):
        with pytest.raises(ValueError, match=r"264 .*256|256 .*264"):
            mq.load_decoder(folder, _wide_head(_llama(), 8), check_weights=check_weights, progress=False)


def test_a_narrower_head_is_accepted_and_generates_generates_tokens():
    """A head of fewer outputs (248) than the table's rows only generates ids the table has: accepted, and the
    tokens are transformers' ``generate``'s on a copy."""
    ref, model = _wide_head(_llama(), -8), _wide_head(_llama(), -8)
    dec = _eager_decoder(model, 1, 16)
    ids = torch.tensor([[5, 6, 7, 9]])
    with torch.no_grad():
        expected = ref.generate(ids, max_new_tokens=5, min_new_tokens=5, do_sample=False, pad_token_id=0)
    assert torch.equal(dec.generate(ids, 5), expected)
