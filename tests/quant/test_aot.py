"""``compile_decoder``: the AOTInductor-compiled prompt and step programs give ``generate``'s tokens."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import medquant as mq
from medquant.kernels.native import native_status
from medquant.quant.aot import compile_decoder


def _llama(seed: int = 0, **over):
    from transformers import LlamaConfig, LlamaForCausalLM

    from medquant.testing.zoo import text_kwargs

    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**text_kwargs(**over))).eval()


def _quantized():
    model = _llama()
    mq.quantize_(model, mq.QuantConfig(4, group_size=32))  # head included
    return model


@pytest.fixture(scope="module")
def decoder():
    """A W4 g32 tiny LLaMA (head quantized), batch 2, 40 positions, prompt programs of 8 and 4 tokens, programs for
    cache lengths 12 and 40 (sequences below cross from one to the other)."""
    model = _quantized()
    dec = compile_decoder(model, 40, batch_size=2, chunk=[8, 4], cache_lengths=(12,), progress=False)
    assert dec.cache_lengths == [12, 40] and dec.chunks == (4, 8) and dec.chunk == 8
    assert sorted(dec._programs) == [(1, 12), (1, 40), (4, 12), (4, 40), (8, 12), (8, 40)]
    yield dec
    dec.close()


class _Calls:
    """Records the program ``(tokens per call, cache length)`` of each call a decoder makes."""

    def __init__(self, decoder) -> None:
        self.decoder, self.calls = decoder, []
        self.saved = dict(decoder._programs)

    def __enter__(self):
        def wrap(key, program):
            def call(*args):
                self.calls.append(key)
                return program(*args)
            return call
        self.decoder._programs.update({key: wrap(key, p) for key, p in self.saved.items()})
        return self.calls

    def __exit__(self, *exc) -> None:
        self.decoder._programs.update(self.saved)


def _ids(batch: int, n: int, seed: int) -> torch.Tensor:
    return torch.randint(1, 256, (batch, n), generator=torch.Generator().manual_seed(seed))


@pytest.mark.slow
def test_compiled_decoder_generates_what_generate_does(decoder):
    """Against transformers' own ``generate`` on an independently built copy of the same quantized model: a prompt
    of full chunks of both lengths and a one-token step (13 = 8 + 4 + 1), one of a long chunk and a short padded
    one (11 = 8 + 3), then a short one through the padded chunk alone, all through the same cache (a new sequence
    needs no clearing); each call through the program of its tokens and the shortest cache length holding them."""
    ref = _quantized()
    plans = {13: [(8, 12), (4, 12), (1, 40)], 11: [(8, 12), (4, 12)], 3: [(4, 12)]}
    for n, new, seed in ((13, 9, 1), (11, 12, 2), (3, 6, 3)):
        ids = _ids(2, n, seed)
        with torch.no_grad():
            expected = ref.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0)
        with _Calls(decoder) as calls:
            assert torch.equal(decoder.generate(ids, new), expected), (n, new)
        assert calls[:len(plans[n])] == plans[n] and all(call[0] == 1 for call in calls[len(plans[n]):])
        assert len(calls) == len(plans[n]) + new - 1
        assert decoder.position == n + new - 1  # the last token is returned, not fed
        timing = decoder.last_timing
        assert timing is not None and timing["steps"] == new - 1 and timing["prefill_s"] > 0 < timing["decode_s"]
    if native_status().get("gemv4"):
        assert decoder.bound_layers == 15  # 2 layers x 7 linears + the head: no quantized weight in the programs


@pytest.mark.slow
def test_prompts_of_different_lengths_padded_on_the_left_give_generates_tokens(decoder):
    """A batch of two prompts of different lengths, the shorter padded on the left (``attention_mask``), against
    ``generate`` given the same batch and mask: through a full chunk and a padded one (11 = 8 + 3), and through a
    chunk and a one-token step (9 = 8 + 1), a row with 6 and 2 padding positions."""
    ref = _quantized()
    for n, pad, new, seed in ((11, 4, 8, 21), (9, 6, 7, 22), (11, 2, 6, 23)):
        ids = _ids(2, n, seed)
        mask = torch.ones(2, n, dtype=torch.long)
        mask[0, :pad] = 0
        ids[0, :pad] = 0  # the pad token
        with torch.no_grad():
            expected = ref.generate(ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new,
                                    do_sample=False, pad_token_id=0)
        got = decoder.generate(ids, new, attention_mask=mask)
        assert torch.equal(got, expected), (n, pad)
        # the padded row is not the same row unpadded-and-shifted by accident: its own prompt alone agrees
        with torch.no_grad():
            alone = ref.generate(ids[:1, pad:], max_new_tokens=new, min_new_tokens=new, do_sample=False,
                                 pad_token_id=0)
        assert torch.equal(got[0, pad:], alone[0])
    ids = _ids(2, 5, 24)
    for bad, match in ((torch.ones(2, 4, dtype=torch.long), "shaped like input_ids"),
                       (torch.ones(2, 5), "integer or bool"), (torch.full((2, 5), 2), "0 \\(padding\\) and 1"),
                       (torch.tensor([[1, 1, 1, 1, 0], [1] * 5]), "pad on the left")):
        with pytest.raises(ValueError, match=match):
            decoder.generate(ids, 2, attention_mask=bad)


@pytest.mark.slow
def test_feed_continues_a_sequence_and_the_programs_read_the_models_own_tensors(decoder):
    ref = _quantized()
    ids = _ids(2, 21, 4)
    with torch.no_grad():
        full = ref(ids).logits[:, -1].float()
    decoder.prefill(ids[:, :10])
    last = decoder.feed(ids[:, 10:21])  # at an unaligned position: one chunk of 8, then 3 through a padded chunk
    assert decoder.position == 21
    torch.testing.assert_close(last.float(), full, rtol=2e-2, atol=2e-2)
    assert (last.argmax(-1) == full.argmax(-1)).all()
    # user-managed constants: every tensor the programs read is the model's own storage, nothing copied
    # (and the bound layers' handles, tensors of the decoder's own that the programs read them from)
    own = {t.data_ptr() for t in (*decoder.model.parameters(), *decoder.model.buffers())}
    handles = decoder._keep_alive[0]
    held = [t for constants in decoder._keep_alive[1:] for name, t in constants.items()
            if not name.startswith("handles.")]
    assert held and all(t.data_ptr() in own for t in held)
    assert len(list(handles.buffers())) == decoder.bound_layers
    if native_status().get("gemv4"):
        assert not any("qweight" in name or "packed" in name for c in decoder._keep_alive[1:] for name in c)


@pytest.mark.slow
def test_end_tokens_sampling_and_bad_input(decoder):
    ref = _quantized()
    ids = _ids(2, 5, 5)
    with torch.no_grad():
        greedy = ref.generate(ids, max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=0)
    eos = [int(greedy[0, 7]), int(greedy[1, 9])]  # row 0 ends at its 3rd new token, row 1 (8 8 8 ...) at its 1st
    with torch.no_grad():  # padded with the generation config's pad token (0), as generate does
        expected = ref.generate(ids, max_new_tokens=8, do_sample=False, eos_token_id=eos)
    got = decoder.generate(ids, 8, eos_token_id=eos)
    assert got.shape[1] < 13 and torch.equal(got, expected)  # stopped once both rows ended, padded as generate
    assert got.shape[1] == 8 and torch.equal(got[1, 6:], torch.zeros(2, dtype=torch.long))  # config's pad: 0
    # no end token given: the model's generation_config's, as generate reads it (its pad token unset: the first
    # end token); eos_token_id=[]: none, every row runs max_new_tokens
    config = decoder.model.generation_config
    saved = config.eos_token_id, config.pad_token_id
    try:
        for c in (config, ref.generation_config):
            c.eos_token_id, c.pad_token_id = eos, None
        with torch.no_grad():
            expected = ref.generate(ids, max_new_tokens=8, do_sample=False)
        got = decoder.generate(ids, 8)
        assert got.shape[1] == 8 and torch.equal(got, expected) and (got[1, 6:] == eos[0]).all()
        assert torch.equal(decoder.generate(ids, 8, eos_token_id=[]), greedy)
    finally:
        for c in (config, ref.generation_config):
            c.eos_token_id, c.pad_token_id = saved
    # sampling from the single largest logit is greedy decoding
    g = torch.Generator().manual_seed(0)
    assert torch.equal(decoder.generate(ids, 8, do_sample=True, top_k=1, generator=g), greedy)
    with pytest.raises(ValueError, match="batch_size=2"):
        decoder.generate(ids[:1], 4)
    with pytest.raises(ValueError, match="max_len=40"):
        decoder.generate(ids, 36)
    with pytest.raises(ValueError, match="max_new_tokens"):
        decoder.generate(ids, 0)
    with pytest.raises(ValueError, match="temperature"):
        decoder.generate(ids, 2, do_sample=True, temperature=0.0)
    with pytest.raises(ValueError, match="top_k"):
        decoder.generate(ids, 2, top_k=-1)
    with pytest.raises(ValueError, match="top_p"):
        decoder.generate(ids, 2, do_sample=True, top_p=0.0)
    with pytest.raises(ValueError, match="repetition_penalty"):
        decoder.generate(ids, 2, repetition_penalty=0.0)
    # a repetition penalty changes greedy decoding as it does generate's
    with torch.no_grad():
        penalized = ref.generate(ids, max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=0,
                                 repetition_penalty=1.5)
    assert torch.equal(decoder.generate(ids, 8, repetition_penalty=1.5), penalized)
    assert not torch.equal(penalized, greedy)
    with pytest.raises(ValueError, match="CPU integer tensor"):
        decoder.feed(ids.float())
    with pytest.raises(ValueError, match=r"token ids in 0\.\.255"):
        decoder.feed(ids + 256)  # the programs index the embedding table without checking
    with pytest.raises(ValueError, match="token ids"):
        decoder.generate(torch.full_like(ids, -1), 2)
    decoder.prefill(_ids(2, 38, 6))
    with pytest.raises(ValueError, match="exceed"):
        decoder.feed(_ids(2, 3, 7))


@pytest.mark.parametrize("sample, temperature, top_k, top_p, penalty", [
    (False, 1.0, None, None, 1.3), (True, 0.7, 10, 0.8, 1.2), (True, 1.0, None, 0.3, None), (True, 1.5, 5, None, 0.8),
    (True, 1.0, None, 0.999, None)])
def test_token_picking_processes_logits_as_transformers_does(sample, temperature, top_k, top_p, penalty):
    """The logits a token is picked from, against transformers' own processors in ``generate``'s order (repetition
    penalty, then temperature, top-k, top-p when sampling): equal, ``-inf`` where a token is excluded."""
    from transformers.generation.logits_process import (
        LogitsProcessorList,
        RepetitionPenaltyLogitsProcessor,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    from medquant.quant.aot import _Picker

    g = torch.Generator().manual_seed(5)
    logits = torch.randn(3, 50, generator=g) * 3
    seq = torch.randint(0, 50, (3, 7), generator=g)
    hf = LogitsProcessorList()
    if penalty is not None:
        hf.append(RepetitionPenaltyLogitsProcessor(penalty))
    if sample:
        hf += [TemperatureLogitsWarper(temperature)] if temperature != 1.0 else []
        hf += [TopKLogitsWarper(top_k)] if top_k else []
        hf += [TopPLogitsWarper(top_p)] if top_p else []
    expected = hf(seq, logits.clone())
    got = _Picker(sample, temperature, top_k, top_p, penalty, None).scores(logits, seq)
    assert torch.equal(got, expected)
    if sample and (top_k or top_p):
        assert torch.isinf(got).any()  # something was excluded: the comparison covers the filters


def _handles(dec) -> list[int]:
    return [int(t) for t in dec._keep_alive[0].buffers()]


@pytest.mark.slow
def test_a_saved_decoder_loads_in_a_fresh_process_and_gives_the_same_tokens(decoder, tmp_path):
    """Saved, then loaded in a new Python process with the model loaded from its checkpoint (``medquant.save`` /
    ``load``; its weights checked against the saved decoder's record): the same tokens, through handles that are not
    the saved ones. That process first binds a model with *other* weights, so programs
    that still called the saved handles would reach that model (other tokens) or no layer at all (an error)."""
    folder = decoder.save(tmp_path / "dec")
    assert sorted(p.name for p in folder.iterdir()) == ["decoder.json", "prompt4-12.pt2", "prompt4-40.pt2",
                                                        "prompt8-12.pt2", "prompt8-40.pt2", "step-12.pt2", "step-40.pt2"]
    mq.save(decoder.model, tmp_path / "model")  # the weights travel in the model's own checkpoint
    ids = _ids(2, 13, 1)
    expected = decoder.generate(ids, 9)
    script = f"""
import json
import medquant as mq
from medquant.quant.aot import _bind
from tests.quant.test_aot import _handles, _ids, _llama
other = _llama(7)
mq.quantize_(other, mq.QuantConfig(4, group_size=32))
_bind(other)
dec = mq.load_decoder({str(folder)!r}, mq.load({str(tmp_path / "model")!r}), progress=False)  # weights checked
print(json.dumps({{"tokens": dec.generate(_ids(2, 13, 1), 9).tolist(), "handles": _handles(dec)}}))
"""
    # run from the repository root, where this module imports as tests.quant.test_aot
    run = subprocess.run([sys.executable, "-c", script], check=False, capture_output=True, text=True, timeout=600,
                         cwd=Path(__file__).resolve().parents[2])
    assert run.returncode == 0, run.stderr[-3000:]
    got = json.loads(run.stdout.strip().splitlines()[-1])
    assert got["tokens"] == expected.tolist()
    if native_status().get("gemv4"):
        assert len(got["handles"]) == 15 and got["handles"] != _handles(decoder)


@pytest.mark.slow
def test_a_saved_decoder_whose_program_moved_out_of_its_folder_is_refused(decoder, tmp_path):
    """The real compiled programs: a program moved out of the folder and reached through ``../`` or through a
    symbolic link left in its place (its SHA-256 still matching) is refused; moved back, it loads and generates the
    saved decoder's tokens (``max_new_tokens`` a NumPy integer)."""
    import numpy as np

    from tests.quant.test_aot_edges_review import _set_file

    folder = decoder.save(tmp_path / "dec")
    manifest = json.loads((folder / "decoder.json").read_text())
    name = manifest["programs"][0]["file"]
    (tmp_path / "outside").mkdir()
    (folder / name).rename(tmp_path / "outside" / name)
    _set_file(folder, manifest, f"../outside/{name}")
    with pytest.raises(ValueError, match="a plain file name inside the folder"):
        mq.load_decoder(folder, _quantized(), progress=False)
    _set_file(folder, manifest, name)
    (folder / name).symlink_to(tmp_path / "outside" / name)
    with pytest.raises(ValueError, match="outside the folder"):
        mq.load_decoder(folder, _quantized(), progress=False)
    (folder / name).unlink()
    (tmp_path / "outside" / name).rename(folder / name)
    ids = _ids(2, 9, 11)
    loaded = mq.load_decoder(folder, _quantized(), progress=False)
    assert torch.equal(loaded.generate(ids, np.int64(6)), decoder.generate(ids, 6))


def test_a_loaded_decoder_runs_the_model_it_is_given_and_checks_it(decoder, tmp_path):
    """In this process, next to the decoder it was saved from: with the saved model's copy the same tokens; with a
    model of other weights, refused unless ``check_weights=False``, and then that model's own ``generate`` tokens
    (the programs read the model and call its layers, nothing of the saved one); anything the generated code
    assumes and does not check (structure, strides, versions, files) is refused."""
    folder = decoder.save(tmp_path / "dec")
    ids = _ids(2, 9, 11)
    same = mq.load_decoder(folder, _quantized(), progress=False)
    assert torch.equal(same.generate(ids, 10), decoder.generate(ids, 10))
    other = _llama(3)
    mq.quantize_(other, mq.QuantConfig(4, group_size=32))
    with pytest.raises(ValueError, match="SHA-256 differs"):
        mq.load_decoder(folder, other, progress=False)
    loaded = mq.load_decoder(folder, other, check_weights=False, progress=False)
    with torch.no_grad():
        expected = other.generate(ids, max_new_tokens=10, min_new_tokens=10, do_sample=False, pad_token_id=0)
    got = loaded.generate(ids, 10)
    assert torch.equal(got, expected) and not torch.equal(got, decoder.generate(ids, 10))
    if native_status().get("gemv4"):
        assert len({*_handles(loaded), *_handles(same), *_handles(decoder)}) == 45  # each its own handles
    # the structure: a float model (no bound layers; without the native kernels no layer has a handle, and the
    # programs read the quantized layers' own tensors, which it lacks); layers bound to other kernel choices (the
    # other of the float32 / bfloat16 compute dtypes: programs compiled for one would run the other's activation form)
    structure = "bound quantized layers differ" if native_status().get("gemv4") else "which the model does not have"
    with pytest.raises(ValueError, match=structure):
        mq.load_decoder(folder, _llama(), check_weights=False, progress=False)
    if native_status().get("gemv4"):
        lane = json.loads((folder / "decoder.json").read_text())["lanes"]["model.layers.0.mlp.up_proj"]
        other_dtype = "float32" if lane[-2] else "bfloat16"  # xmode 0: float32 compute
        recast = _llama()
        mq.quantize_(recast, mq.QuantConfig(4, group_size=32, compute_dtype=other_dtype))
        with pytest.raises(ValueError, match=r"kernel choices .*here it is"):
            mq.load_decoder(folder, recast, check_weights=False, progress=False)
    # a tensor read with other strides (the programs would read it wrongly, unchecked)
    strided = _quantized()
    norm = strided.model.norm
    norm.weight = nn.Parameter(torch.stack([norm.weight.detach()] * 2, 1)[:, 0])
    with pytest.raises(ValueError, match=r"'model\.model\.norm\.weight' as \[dtype, shape, strides\]"):
        mq.load_decoder(folder, strided, check_weights=False, progress=False)
    with pytest.raises(TypeError, match="Hugging Face"):
        mq.load_decoder(folder, nn.Linear(2, 2), progress=False)
    # the files and the build
    manifest = json.loads((folder / "decoder.json").read_text())
    for key, value, match in (("torch", "0.0.1", "install the torch"), ("vec_isa", "sse", "instruction set"),
                              ("version", 99, "manifest version")):
        (folder / "decoder.json").write_text(json.dumps({**manifest, key: value}))
        with pytest.raises(ValueError, match=match):
            mq.load_decoder(folder, _quantized(), progress=False)
    # a field cut out or of another type: refused by name, before any program is read
    from medquant.quant.aot import read_decoder_manifest

    (folder / "decoder.json").write_text(json.dumps(manifest))
    assert read_decoder_manifest(folder)["batch_size"] == manifest["batch_size"]
    for key, value in (("batch_size", None), ("max_len", 0), ("chunks", True), ("lanes", [])):
        edited = {k: v for k, v in manifest.items() if k != key or value is not None}
        if value is not None:
            edited[key] = value
        (folder / "decoder.json").write_text(json.dumps(edited))
        with pytest.raises(ValueError, match=f"field '{key}' is"):
            read_decoder_manifest(folder)
        with pytest.raises(ValueError, match=f"field '{key}' is"):
            mq.load_decoder(folder, _quantized(), progress=False)
    # chunks that do not match the programs, or a program entry cut short
    for edit, match in (({"chunks": [4]}, "do not match the programs"), ({"chunks": [4, 8, 1]}, "do not match"),
                        ({"programs": [{"tokens": 1, "length": 12}]}, "a program entry is")):
        (folder / "decoder.json").write_text(json.dumps({**manifest, **edit}))
        with pytest.raises(ValueError, match=match):
            read_decoder_manifest(folder)
    (folder / "decoder.json").write_text(json.dumps(manifest))
    step = folder / "step-12.pt2"
    data = bytearray(step.read_bytes())
    data[len(data) // 2] ^= 1
    step.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="SHA-256"):
        mq.load_decoder(folder, _quantized(), progress=False)
    step.unlink()
    with pytest.raises(FileNotFoundError, match="step-12.pt2"):
        mq.load_decoder(folder, _quantized(), progress=False)
    with pytest.raises(FileNotFoundError, match="decoder.json"):
        mq.load_decoder(tmp_path, _quantized(), progress=False)
    with pytest.raises(ValueError, match="not an empty folder"):
        decoder.save(folder)
    for dec in (same, loaded):
        dec.close()


@pytest.mark.slow
def test_a_float_bfloat16_model_with_only_the_step_program(tmp_path):
    """Nothing to bind (a float model: its weights are constants the programs read in place); ``chunk=1`` compiles
    the one-token program only and feeds the prompt through it; bfloat16 weights and cache."""
    model = _llama(1).to(torch.bfloat16)
    ref = _llama(1).to(torch.bfloat16)
    dec = compile_decoder(model, 16, chunk=1, progress=False)
    try:
        assert dec.bound_layers == 0 and dec._keys[0].dtype == torch.bfloat16
        ids = _ids(1, 4, 8)
        with torch.no_grad():
            expected = ref.generate(ids, max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0)
        assert torch.equal(dec.generate(ids, 6), expected)
        # saved and loaded: no handles, a bfloat16 cache
        loaded = mq.load_decoder(dec.save(tmp_path / "dec"), ref, check_weights=True, progress=False)
        assert loaded._keys[0].dtype == torch.bfloat16 and loaded.cache_lengths == [16]
        assert torch.equal(loaded.generate(ids, 6), expected)
    finally:
        dec.close()



@pytest.mark.slow
def test_a_manifest_edited_to_other_sizes_is_refused_at_load(decoder, tmp_path):
    """The programs are compiled for one batch and one cache (batch 2, 40 positions here) and check no input
    shape: a ``decoder.json`` edited to another ``batch_size`` or ``max_len`` (a user serving more prompts, longer
    sequences) once loaded and gave row 0's continuation to row 1, or an ``IndexError`` mid-generation. Refused by
    name with both values: against the cache shapes the manifest records, and, where those were edited to match,
    against the sizes and input shapes each program's package records (covered by its SHA-256)."""
    from medquant.quant.aot import AOTDecoder, read_decoder_manifest

    folder = decoder.save(tmp_path / "dec")
    manifest = json.loads((folder / "decoder.json").read_text())
    assert manifest["batch_size"] == 2 and manifest["max_len"] == 40

    def edited(batch: int | None = None, max_len: int | None = None, dtype: str | None = None,
               relabel: bool = False) -> dict:
        m = json.loads(json.dumps(manifest))
        if batch is not None:
            m["batch_size"] = batch
        if max_len is not None:
            m["max_len"] = max_len
        for spec in (*m["cache"]["keys"], *m["cache"]["values"]):
            if batch is not None and relabel:
                spec[1][0] = batch
            if max_len is not None and relabel:  # the cache made longer, its strides with it
                spec[1][2] = max_len
                spec[2][:2] = [spec[1][1] * max_len * spec[1][3], max_len * spec[1][3]]
            if dtype is not None:
                spec[0] = dtype
        if max_len is not None and relabel:  # the programs of the whole cache claimed for the new length
            for prog in m["programs"]:
                prog["length"] = max_len if prog["length"] == 40 else prog["length"]
        return m

    # the manifest's own sizes disagree: refused before any program is read
    for m, match in ((edited(batch=1), "batch_size is 1, but the cache's key tensor of layer 0 was recorded with 2"),
                     (edited(batch=3), "batch_size is 3, but the cache's key tensor of layer 0 was recorded with 2"),
                     (edited(max_len=80), "max_len is 80, but the cache's key tensor of layer 0 was recorded with 40"),
                     (edited(max_len=20), "max_len is 20, but the cache's key tensor")):
        (folder / "decoder.json").write_text(json.dumps(m))
        for read in (read_decoder_manifest, lambda f: mq.load_decoder(f, _quantized(), progress=False)):
            with pytest.raises(ValueError, match=match):
                read(folder)
    # the manifest consistent with itself, not with the programs: refused by what each package records
    for m, match in ((edited(batch=1, relabel=True), r"step-12\.pt2 was compiled for batch_size=2, but decoder\.json"),
                     (edited(batch=4, relabel=True), r"batch_size=2, but decoder\.json records batch_size=4"),
                     (edited(max_len=80, relabel=True), r"for max_len=40, but decoder\.json records max_len=80"),
                     (edited(dtype="bfloat16"), r"its input keys\[0\] as \[dtype, shape, strides\] \['float32'")):
        (folder / "decoder.json").write_text(json.dumps(m))
        read_decoder_manifest(folder)
        with pytest.raises(ValueError, match=match):
            mq.load_decoder(folder, _quantized(), progress=False)
    # a program of the whole cache dropped from the record: its tokens per call no longer reach max_len
    (folder / "decoder.json").write_text(json.dumps({**manifest, "programs": [
        prog for prog in manifest["programs"] if prog["file"] != "step-40.pt2"]}))
    with pytest.raises(ValueError, match=r"1 tokens per call have cache lengths \[12\]"):
        read_decoder_manifest(folder)
    # the saved record itself loads, and gives the decoder's tokens
    (folder / "decoder.json").write_text(json.dumps(manifest))
    loaded = mq.load_decoder(folder, _quantized(), progress=False)
    ids = _ids(2, 9, 4)
    assert torch.equal(loaded.generate(ids, 10), decoder.generate(ids, 10))
    loaded.close()
    # a decoder whose programs do not cover its max_len (built directly): a clear error, not an IndexError
    short = AOTDecoder(decoder.model, [torch.zeros_like(k) for k in decoder._keys],
                       [torch.zeros_like(v) for v in decoder._values],
                       {key: p for key, p in decoder._programs.items() if key[1] == 12}, [], 2, 40, (4, 8), 0, 0.0,
                       0.0, None, files={}, spec={})
    with pytest.raises(ValueError, match="need a program of cache length >= 13; this decoder's programs of 1 tokens"):
        short.generate(ids, 10)


@pytest.mark.slow
def test_a_model_with_quantized_embeddings_and_a_tied_head_compiles_saves_and_loads(tmp_path):
    """The documented "tied head stored once" recipe (``quantize_`` then ``quantize_embeddings_`` at the same
    config): ``QuantEmbedding``'s index check once stopped ``torch.export`` (a data-dependent ``int(ids.min())``).
    The compiled decoder gives ``generate``'s greedy tokens, and so does the decoder saved and loaded."""
    from medquant.quant.modules import QuantEmbedding, tied_to

    def model():
        m = _llama(tie_word_embeddings=True)
        config = mq.QuantConfig(4, group_size=32)
        mq.quantize_(m, config)
        mq.quantize_embeddings_(m, config)
        assert isinstance(m.model.embed_tokens, QuantEmbedding) and tied_to(m.lm_head, m.model.embed_tokens)
        return m

    ids = _ids(2, 4, 5)
    ref = model()
    with torch.no_grad():
        expected = ref.generate(ids, max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0)
    dec = compile_decoder(model(), 10, batch_size=2, chunk=1, cache_lengths=(), progress=False)
    try:
        assert dec.vocab_size == 256
        assert torch.equal(dec.generate(ids, 6), expected)
        loaded = mq.load_decoder(dec.save(tmp_path / "dec"), model(), progress=False)
        assert torch.equal(loaded.generate(ids, 6), expected)
        loaded.close()
    finally:
        dec.close()

def test_compile_decoder_refuses_what_it_cannot_compile():
    from transformers import MistralConfig, MistralForCausalLM

    from medquant.testing.zoo import text_kwargs

    model = _llama()
    with pytest.raises(TypeError, match="Hugging Face causal LM"):
        compile_decoder(nn.Linear(2, 2), 8)
    for kwargs, match in (({"max_len": 0}, "max_len"), ({"max_len": 8, "chunk": 9}, "must not exceed"),
                          ({"max_len": 8, "batch_size": 0}, "batch_size"), ({"max_len": 8, "chunk": True}, "chunk"),
                          ({"max_len": 8, "chunk": (2, 9)}, "must not exceed"), ({"max_len": 8, "chunk": []}, "chunk"),
                          ({"max_len": 8, "chunk": (4, 0)}, "chunk"), ({"max_len": 8, "chunk": "8"}, "chunk")):
        with pytest.raises(ValueError, match=match):
            compile_decoder(model, **kwargs)
    from medquant.quant.aot import _chunks

    assert _chunks(None, 1) == () and _chunks(None, 40) == (40,) and _chunks(None, 300) == (64,)
    assert _chunks(1, 8) == () and _chunks((256, 1, 64, 64), 300) == (64, 256)
    with pytest.raises(ValueError, match="cache_lengths"):
        compile_decoder(model, 16, cache_lengths=(8, 17))
    from medquant.quant.aot import _cache_lengths

    assert _cache_lengths(None, 2048) == [256, 512, 1024, 2048] and _cache_lengths(None, 100) == [100]
    assert _cache_lengths((), 300) == [300] and _cache_lengths((64, 300, 64), 300) == [64, 300]
    window = MistralForCausalLM(MistralConfig(**text_kwargs(sliding_window=8))).eval()
    with pytest.raises(ValueError, match="StaticSlidingWindowLayer"):
        compile_decoder(window, 16, progress=False)
    assert not window.training
    meta = _llama().to("meta")
    with pytest.raises(ValueError, match="compiles for CPU"):
        compile_decoder(meta, 8)


@pytest.mark.parametrize("n, heads, kv_heads", [(1, 8, 2), (3, 6, 3), (1, 4, 4)])
def test_step_attention_equals_transformers_eager_attention(n, heads, kv_heads):
    """The step programs' attention (grouped queries against the cache's own heads) against transformers' eager
    attention (keys and values repeated per query head), with an additive mask hiding some positions."""
    from types import SimpleNamespace

    from transformers.models.llama.modeling_llama import eager_attention_forward

    from medquant.quant.aot import _grouped_attention

    g = torch.Generator().manual_seed(n + heads)
    b, d, length = 2, 16, 11
    q = torch.randn(b, heads, n, d, generator=g)
    k, v = torch.randn(b, kv_heads, length, d, generator=g), torch.randn(b, kv_heads, length, d, generator=g)
    mask = torch.zeros(b, 1, n, length)
    mask[0, :, :, :4] = torch.finfo(torch.float32).min  # row 0: the first 4 positions are padding
    mask[:, :, :, -2:] = torch.finfo(torch.float32).min  # the last 2: not written yet
    module = SimpleNamespace(num_key_value_groups=heads // kv_heads, training=False)
    ref, _ = eager_attention_forward(module, q, k, v, mask, scaling=d ** -0.5)
    got, weights = _grouped_attention(module, q, k, v, mask, scaling=d ** -0.5)
    assert weights is None and got.shape == ref.shape == (b, n, heads, d)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_the_models_attention_setting_is_restored_after_compiling(decoder):
    assert decoder.model.config._attn_implementation == "sdpa"  # the step programs were exported with their own


@pytest.mark.parametrize("existing", [False, True])
def test_a_save_that_fails_part_way_leaves_the_folder_as_it_was(decoder, tmp_path, monkeypatch, existing):
    """A save that fails after its first program (a full disk, an interrupt) removes what it wrote: a new folder
    is not left behind, an existing empty one is empty again (a rerun or another folder works; a folder of some
    programs without ``decoder.json`` was refused as not empty). The real compiled programs."""
    from medquant.quant import aot

    folder = tmp_path / "dec"
    if existing:
        folder.mkdir()
    real, calls = shutil.copyfile, []

    def failing(src, dst, *a, **k):
        calls.append(dst)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return real(src, dst, *a, **k)

    monkeypatch.setattr(aot.shutil, "copyfile", failing)
    with pytest.raises(OSError, match="No space"):
        decoder.save(folder)
    assert len(calls) == 2 and (folder.is_dir() and not any(folder.iterdir()) if existing else not folder.exists())
    monkeypatch.setattr(aot.shutil, "copyfile", real)
    assert (decoder.save(folder) / "decoder.json").is_file()  # the same folder takes a whole save afterwards
