"""A decoder whose prompt programs were compiled for a cache length its step programs lack.

:func:`read_decoder_manifest` accepts, per tokens per call, any distinct cache lengths from the tokens up to
``max_len`` (``max_len`` among them), so a folder may hold a prompt program of a length with no step program (a step
program's entry and file removed, say). ``AOTDecoder`` made the cache views only for the step programs' lengths, so
feeding a prompt to such a decoder failed with ``KeyError: 6`` mid-call. The views now cover every program's length,
and the prompt runs; the reference is the eager forward of an independently built copy of the model (eager
programs, no compiling).
"""
from __future__ import annotations

import json

import torch

from medquant.quant import aot
from tests.quant.test_decode_edges import _eager_decoder, _llama


def test_the_manifest_reader_accepts_such_a_set_of_programs(tmp_path):
    dec = _eager_decoder(_llama(), 1, 8, chunks=(4,), cache_lengths=(6,), folder=tmp_path / "programs")
    folder = dec.save(tmp_path / "dec")
    manifest = json.loads((folder / "decoder.json").read_text())
    manifest["programs"] = [p for p in manifest["programs"] if (p["tokens"], p["length"]) != (1, 6)]
    (folder / "decoder.json").write_text(json.dumps(manifest))
    assert {(p["tokens"], p["length"]) for p in aot.read_decoder_manifest(folder)["programs"]} == \
        {(1, 8), (4, 6), (4, 8)}


def test_a_prompt_program_of_a_length_without_a_step_program_runs():
    full = _eager_decoder(_llama(), 1, 12, chunks=(4,), cache_lengths=(6,))
    programs = {key: p for key, p in full._programs.items() if key != (1, 6)}  # as loaded from such a folder
    dec = aot.AOTDecoder(full.model, full._keys, full._values, programs, [], 1, 12, (4,), full.bound_layers, 0.0,
                         0.0, None, files={}, spec=full._spec)
    assert dec.cache_lengths == [12]
    ids = torch.randint(3, 256, (1, 9), generator=torch.Generator().manual_seed(2))
    got = dec.prefill(ids)  # 4 tokens at 0 (the prompt program of length 6), 4 at 4 (length 12), then a step
    with torch.no_grad():
        expected = _llama()(ids).logits[:, -1]
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
