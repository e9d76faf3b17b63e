"""Edge cases of the fast decode paths, without compiling.

:class:`~medquant.quant.aot.AOTDecoder`'s Python (chunking, masks and rotary positions of left-padded rows, end
tokens, token picking, bounds) is exercised with *eager* programs: each ``(tokens, cache length)`` program is the
very module ``compile_decoder`` exports (``_CacheStep`` over a static cache of that length), called in Python.
The reference is transformers' own ``generate(do_sample=False)`` on an independently built copy of the same
quantized model. :func:`load_decoder`'s manifest checks run before any program is read, so they are tested on a
folder saved from such a decoder, its program files stand-ins (with their recorded SHA-256).
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import medquant as mq
from medquant.quant import aot
from medquant.quant.decode import static_decode_


def _llama(seed: int = 0, dtype: torch.dtype = torch.float32, **over):
    from transformers import LlamaConfig, LlamaForCausalLM

    kwargs = {"vocab_size": 256, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2, **over}
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**kwargs)).eval().to(dtype)
    mq.quantize_(model, mq.QuantConfig(4, group_size=32))
    return model


def _eager_decoder(model, batch_size: int, max_len: int, chunks=(4,), cache_lengths=(8,),
                   folder: Path | None = None) -> aot.AOTDecoder:
    """An :class:`AOTDecoder` whose programs are the modules ``compile_decoder`` exports, run eagerly; with
    ``folder``, stand-in program files (not loadable: the loader's checks must refuse before reading them)."""
    chunks = aot._chunks(tuple(chunks) or 1, max_len)
    lengths = aot._cache_lengths(cache_lengths, max_len)
    lanes, _, _ = aot._bind(model)
    handles = aot._Handles([lane.handle for lane in lanes.values()])
    caches = {length: aot._static_cache(model, batch_size, length) for length in lengths}
    keys = [layer.keys for layer in caches[max_len].layers]
    values = [layer.values for layer in caches[max_len].layers]
    programs, files = {}, {}
    for n in (1, *chunks):
        for length in lengths:
            if n <= length:
                # the views of the whole cache, as the compiled programs take them
                programs[n, length] = aot._CacheStep(model, caches[length], handles)
                if folder is not None:
                    folder.mkdir(exist_ok=True)
                    files[n, length] = folder / aot._program_file(n, length)
                    files[n, length].write_bytes(b"a stand-in, not a program package")
    tensors = aot._module_tensors(aot._CacheStep(model, None, handles))
    spec = {"lanes": {name: list(lane.lane[1:]) for name, lane in lanes.items()},
            "ops": sorted({lane.op_name for lane in lanes.values()}),
            "constants": {fqn: aot._tensor_spec(t) for fqn, t in tensors.items()}, "foreign": [],
            "config": aot._config_record(model)}
    return aot.AOTDecoder(model, keys, values, programs, [handles], batch_size, max_len, chunks, len(lanes), 0.0, 0.0,
                          None, files=files, spec=spec)


def _padded(batch: int, n: int, pads: list[int], seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(3, 256, (batch, n), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones(batch, n, dtype=torch.long)
    for row, pad in enumerate(pads):
        mask[row, :pad] = 0
        ids[row, :pad] = 0
    return ids, mask


def test_left_padded_rows_of_different_lengths_and_an_early_end_token_give_generates_tokens():
    """Three prompts of 11, 6 and 2 tokens (padding across whole chunks of 4, a padded chunk and a step), one row
    ending well before the others: the tokens, the padding after an end and the stop are ``generate``'s."""
    ref, dec = _llama(), _eager_decoder(_llama(), 3, 24)
    ids, mask = _padded(3, 11, [0, 5, 9], 1)
    with torch.no_grad():
        greedy = ref.generate(ids, attention_mask=mask, max_new_tokens=8, min_new_tokens=8, do_sample=False,
                              pad_token_id=0)
    assert torch.equal(dec.generate(ids, 8, attention_mask=mask), greedy)
    # row 1 ends at its 2nd new token, row 0 at its 4th, row 2 at its 6th (or earlier, where one of them comes first)
    eos = [int(greedy[1, 12]), int(greedy[0, 14]), int(greedy[2, 16])]
    with torch.no_grad():
        expected = ref.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False, eos_token_id=eos,
                                pad_token_id=7)
        penalized = ref.generate(ids, attention_mask=mask, max_new_tokens=4, min_new_tokens=4, do_sample=False,
                                 pad_token_id=0, repetition_penalty=1.8)  # the prompt's pad tokens count too
    got = dec.generate(ids, 8, attention_mask=mask, eos_token_id=eos, pad_token_id=7)
    assert torch.equal(got, expected) and got.shape[1] < 19 and (got[1, 13:] == 7).all()
    assert torch.equal(dec.generate(ids, 1, attention_mask=mask), greedy[:, :12]) and dec.position == 11
    assert torch.equal(dec.generate(ids, 4, attention_mask=mask, repetition_penalty=1.8), penalized)


def test_end_and_pad_tokens_default_to_the_generation_configs_as_generate_takes_them():
    """With no ``eos_token_id`` / ``pad_token_id`` the decoder stops and pads as transformers' ``generate`` does with
    the model's ``generation_config``: its end token(s), its pad token, else the first end token. Here the config's
    end token is the one greedy decoding gives row 0 as its 2nd new token (row 1 never gives it): row 0 is padded
    from then on while row 1 runs to ``max_new_tokens``. ``eos_token_id=[]`` asks for no end token."""
    ref, model = _llama(), _llama()
    dec = _eager_decoder(model, 2, 16)
    ids, mask = _padded(2, 6, [0, 2], 11)
    with torch.no_grad():
        greedy = ref.generate(ids, attention_mask=mask, max_new_tokens=8, min_new_tokens=8, do_sample=False,
                              pad_token_id=0)
    end = int(greedy[0, 7])
    assert end not in greedy[0, 6:7].tolist() and end not in greedy[1, 6:].tolist()
    for eos, pad, fill in ((end, None, end), ([4, end], 7, 7)):
        for m in (ref, model):
            m.generation_config.eos_token_id, m.generation_config.pad_token_id = eos, pad
        with torch.no_grad():
            expected = ref.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False)
        got = dec.generate(ids, 8, attention_mask=mask)
        assert torch.equal(got, expected), (eos, pad)
        assert torch.equal(got[0, 8:], torch.full((6,), fill)) and torch.equal(got[1], greedy[1])
        # no end token: every row runs max_new_tokens, the config's end token generated like any other
        assert torch.equal(dec.generate(ids, 8, attention_mask=mask, eos_token_id=[]), greedy)


def test_sizes_the_decoder_cannot_serve_are_refused():
    dec = _eager_decoder(_llama(), 2, 16)
    ids = torch.randint(3, 256, (2, 10), generator=torch.Generator().manual_seed(2))
    for new in (0, -1, 2.0, True):
        with pytest.raises(ValueError, match="max_new_tokens must be an int >= 1"):
            dec.generate(ids, new)
    with pytest.raises(ValueError, match="max_len=16"):  # past the cache: refused, not grown
        dec.generate(ids, 7)
    with pytest.raises(ValueError, match="max_len=16"):  # a prompt longer than the cache
        dec.generate(torch.cat([ids, ids], 1), 1)
    with pytest.raises(ValueError, match="tokens >= 1"):  # an empty prompt
        dec.generate(ids[:, :0], 2)
    with pytest.raises(TypeError, match="num_beams"):  # beam search is not offered
        dec.generate(ids, 2, num_beams=2)


@pytest.mark.parametrize("pad", [-1, 256, 10_000])
def test_a_pad_token_outside_the_embedding_table_is_refused(pad):
    """A finished row is fed ``pad_token_id`` at every later step, and the compiled programs index the embedding
    table without checking: an id outside it read out of bounds (eager: an ``IndexError`` mid-generation)."""
    dec = _eager_decoder(_llama(), 2, 16)
    ids = torch.randint(3, 256, (2, 4), generator=torch.Generator().manual_seed(3))
    greedy = dec.generate(ids, 4)
    eos = int(greedy[0, 4])  # row 0 ends at its first new token
    with pytest.raises(ValueError, match=r"pad_token_id must be a token id in 0\.\.255"):
        dec.generate(ids, 4, eos_token_id=eos, pad_token_id=pad)
    assert torch.equal(dec.generate(ids, 4, eos_token_id=eos, pad_token_id=255)[0, 5:], torch.full((3,), 255))


def test_a_bfloat16_model_gives_the_eager_forwards_logits():
    """bfloat16 weights and cache, a left-padded row: the logits after the prompt and after each token fed one at a
    time are the plain eager forward's over the whole sequence (same mask, same positions). Tokens are not compared:
    this tiny model's bfloat16 logits tie often (two tokens 0.002 apart), where any reordering of a sum picks
    another."""
    ref, dec = _llama(dtype=torch.bfloat16), _eager_decoder(_llama(dtype=torch.bfloat16), 2, 24)
    ids, mask = _padded(2, 13, [6, 0], 4)
    more = torch.randint(3, 256, (2, 3), generator=torch.Generator().manual_seed(5))
    full, full_mask = torch.cat([ids, more], 1), torch.cat([mask, torch.ones(2, 3, dtype=torch.long)], 1)
    with torch.no_grad():
        expected = ref(full, attention_mask=full_mask,
                       position_ids=(full_mask.cumsum(-1) - 1).masked_fill(full_mask == 0, 1)).logits.float()
    got = [dec.prefill(ids, mask)] + [dec.feed(more[:, j:j + 1]) for j in range(3)]
    assert dec._keys[0].dtype == torch.bfloat16 and got[0].dtype == torch.bfloat16
    for j, logits in enumerate(got):
        torch.testing.assert_close(logits.float(), expected[:, 12 + j], rtol=0, atol=3e-2)


@pytest.fixture
def saved(tmp_path):
    """A decoder's folder as :meth:`AOTDecoder.save` writes it (stand-in program files), and its manifest."""
    dec = _eager_decoder(_llama(), 1, 8, chunks=(), cache_lengths=(), folder=tmp_path / "programs")
    folder = dec.save(tmp_path / "dec")
    return folder, json.loads((folder / "decoder.json").read_text())


@pytest.mark.parametrize("over", [{"rms_norm_eps": 1e-2}, {"rope_parameters": {"rope_theta": 500.0,
                                                                                "rope_type": "default"}},
                                  {"hidden_act": "gelu"}])
def test_a_model_of_another_config_is_refused_at_load(saved, over):
    """The programs compute with the configuration they were exported with (norm epsilon, rotary base, activation,
    ...): a model of the same tensors (same shapes, even the same weights) under another configuration is refused,
    with the field and both values, whether or not its weights are checked."""
    folder, _ = saved
    other = _llama(**over)
    key = next(iter(over))
    field, before, after = {"rms_norm_eps": ("rms_norm_eps", 1e-06, 0.01),
                            "rope_parameters": ("rope_parameters.rope_theta", 10000.0, 500.0),
                            "hidden_act": ("hidden_act", "silu", "gelu")}[key]
    for check_weights in (True, False):
        if key == "rope_parameters" and check_weights:
            continue  # the rotary frequencies are a buffer: refused by the weights' SHA-256 already
        with pytest.raises(ValueError, match=f"config field '{field}' is {before!r}, here it is {after!r}"):
            mq.load_decoder(folder, other, check_weights=check_weights, progress=False)


def test_fields_that_do_not_change_the_computation_do_not_refuse(saved, tmp_path):
    """Token ids, labels, the model's path, output switches: not what the programs compute with. The model's class,
    another medquant or torch version: refused before any program is read."""
    folder, manifest = saved
    model = _llama()
    config = model.config
    config.pad_token_id, config.eos_token_id, config.output_hidden_states = 0, [2, 5], True
    config._name_or_path, config.id2label = "somewhere/else", {0: "a", 1: "b", 2: "c"}
    reloaded = tmp_path / "checkpoint"  # the model saved and loaded: its config gains a quantization_config
    mq.save(_llama(), reloaded)
    for accepted in (model, mq.load(reloaded)):
        with pytest.raises(RuntimeError):  # past every check, the stand-in is read as a package
            mq.load_decoder(folder, accepted, progress=False)
    for key, value, match in (("medquant", "0.0.0", "compiled for medquant '0.0.0'.*with this medquant"),
                              ("torch", "0.0.1", "install the torch")):
        (folder / "decoder.json").write_text(json.dumps({**manifest, key: value}))
        with pytest.raises(ValueError, match=match):
            mq.load_decoder(folder, _llama(), progress=False)
    (folder / "decoder.json").write_text(json.dumps({**manifest, "model": {**manifest["model"], "class": "Other"}}))
    with pytest.raises(ValueError, match="model class"):
        mq.load_decoder(folder, _llama(), progress=False)
    (folder / "decoder.json").write_text(json.dumps({**manifest, "model": {
        k: v for k, v in manifest["model"].items() if k != "config"}}))
    with pytest.raises(ValueError, match="config"):
        aot.read_decoder_manifest(folder)


def test_static_decode_left_padded_batch_with_an_end_token_gives_generates_tokens():
    """The static cache (``compile=False``: the same cache and masks as the compiled step) against the default
    dynamic cache, on a left-padded batch where one row ends first."""
    ref, model = _llama(), _llama()
    ids, mask = _padded(3, 9, [0, 4, 7], 5)
    with torch.no_grad():
        greedy = ref.generate(ids, attention_mask=mask, max_new_tokens=12, min_new_tokens=12, do_sample=False,
                              pad_token_id=0)
        eos = int(greedy[2, 11])
        expected = ref.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False, eos_token_id=eos,
                                pad_token_id=0)
        static_decode_(model, compile=False)
        got = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False, eos_token_id=eos,
                             pad_token_id=0)
        longer = model.generate(ids, attention_mask=mask, max_new_tokens=12, min_new_tokens=12, do_sample=False,
                                pad_token_id=0)  # past the first call's cache length: a new, longer cache
    assert torch.equal(got, expected) and torch.equal(longer, greedy)
