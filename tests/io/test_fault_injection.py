"""Fault injection (bounded, well under a minute): saves killed with SIGKILL at random moments, single-bit flips of
the recipe and the config, crafted shapes, concurrent saves and readers, a bfloat16 model without bias. Each
asserts that the previous or the new checkpoint loads bit-exact, never a mix, and never a load that differs
without a word."""
import json
import multiprocessing
import os
import random
import resource
import shutil
import signal
import threading
import time
import warnings

import pytest
import torch
from torch import nn

import medquant as mq
import medquant.hf
from medquant.io import MANIFEST_NAME, META_NAME, CheckpointError, CheckpointWarning, atomic
from medquant.quant import quantized_modules
from medquant.quant.recipe import layer_recipe
from medquant.testing.zoo import ZOO_BY_NAME

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork (the forkserver start method)")


def tiny(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 4 * 4, 16),
                         nn.Linear(16, 8, bias=False))


def quantized(seed):
    m = tiny(seed)
    mq.quantize_(m, {"0": mq.QuantConfig(8, scope="channel"), "3": mq.QuantConfig(4, group_size=32),
                     "4": mq.QuantConfig(4, scope="channel", channel_bits=(2, 4, 8, 16, 0, 4, 4, 32))})
    return m


X = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(1))


def state(m):
    return {k: v.clone() for k, v in m.state_dict().items()}


def equal_state(a, b):
    return set(a) == set(b) and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)


def which(loaded, candidates):
    """Index of the candidate state dict ``loaded`` equals bit for bit (None: a mix or something else)."""
    s = state(loaded)
    return next((i for i, c in enumerate(candidates) if equal_state(s, c)), None)


_CONTEXT = None


def _context():
    """Processes forked from a clean single-threaded server that has torch, medquant and this module imported:
    each start costs milliseconds, and no thread of the test process (tqdm monitors, torch pools) is forked."""
    global _CONTEXT
    if _CONTEXT is None:
        _CONTEXT = multiprocessing.get_context("forkserver")
        _CONTEXT.set_forkserver_preload(["torch", "medquant", "transformers.models.llama.modeling_llama", __name__])
    return _CONTEXT


def _save_forever(models, path, start, hf, no_exchange, ready):
    """Save the two models to ``path`` in turn until killed (runs in the child)."""
    torch.set_num_threads(1)
    if no_exchange:
        atomic._EXCHANGE = None
    ready.set()
    i = start
    while True:
        i += 1
        if hf:
            medquant.hf.save_pretrained(models[i % 2], path)
        else:
            mq.save(models[i % 2], path)


def _kill_during(models, path, delay, *, start=0, hf=False, no_exchange=False):
    ctx = _context()
    ready = ctx.Event()
    proc = ctx.Process(target=_save_forever, args=(models, path, start, hf, no_exchange, ready), daemon=True)
    proc.start()
    assert ready.wait(120), "the saving process did not start"
    time.sleep(delay)
    os.kill(proc.pid, signal.SIGKILL)
    proc.join()


def test_sigkill_during_saves_leaves_the_old_or_the_new_checkpoint(tmp_path):
    rng = random.Random(0)
    models = [quantized(0), quantized(1)]
    states = [state(m) for m in models]
    p = tmp_path / "ck"
    legacy = tmp_path / "legacy"  # a checkpoint written before the folder scheme: a real folder, no manifest
    mq.save(models[0], legacy)
    legacy_files = {f: (legacy / f).read_bytes() for f in os.listdir(legacy) if f != MANIFEST_NAME}
    t0 = time.perf_counter()
    mq.save(models[1], p)
    one_save = time.perf_counter() - t0
    seen = set()
    for run in range(30):
        kind = run % 3
        if kind == 2:  # a real folder: exchanged with the new one (renameat2), or on odd runs renamed aside for a
            # version link (no RENAME_EXCHANGE); the path stays a real folder, or a link, until the next reset
            if os.path.lexists(p):
                shutil.rmtree(atomic.resolve(p))
                if p.is_symlink():
                    p.unlink()
            p.mkdir()
            for f, data in legacy_files.items():
                (p / f).write_bytes(data)
        _kill_during(models, p, rng.uniform(0.0, 3 * one_save), start=run, no_exchange=kind == 2 and run % 2 == 1)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", CheckpointWarning)  # the legacy folder, when the kill came first
            got = which(mq.load(p, model=tiny(7)), states)
        assert got is not None, f"run {run}: the checkpoint is neither the old nor the new model"
        seen.add(got)
        orphans = [e for e in os.listdir(tmp_path) if e.startswith(".ck.mq-") and e != ".ck.mq-lock"]
        # at most the current version and one killed save's leftovers: killed just before its switch, a save leaves
        # its new version, the temporary link to it and the marker naming the old version to drop after the switch
        assert len(orphans) <= 4, orphans
    assert seen == {0, 1}
    mq.save(models[0], p)  # the next save removes every orphan
    assert sorted(e for e in os.listdir(tmp_path) if e.startswith(".ck.mq-")) == sorted(
        [".ck.mq-lock"] + ([os.readlink(p)] if p.is_symlink() else []))
    assert which(mq.load(p, model=tiny(7)), states) == 0


def test_sigkill_during_save_pretrained(tmp_path):
    from transformers import AutoModelForCausalLM

    rng = random.Random(1)
    models = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        m = ZOO_BY_NAME["llama"].build()
        mq.quantize_(m, mq.QuantConfig(4, group_size=32), skip=["lm_head"])
        models.append(m)
    states = [state(m) for m in models]
    p = tmp_path / "hf"
    medquant.hf.save_pretrained(models[0], p)
    t0 = time.perf_counter()
    medquant.hf.save_pretrained(models[1], p)
    one_save = time.perf_counter() - t0
    for run in range(4):
        _kill_during(models, p, rng.uniform(0.0, 2 * one_save), start=run, hf=True)
        with warnings.catch_warnings():
            warnings.simplefilter("error", CheckpointWarning)
            got = which(AutoModelForCausalLM.from_pretrained(p), states)
        assert got is not None, f"run {run}: a mix of two saves"


# --------------------------------------------------------------------------------------------------- bit flips
def _flips(data: bytes, n: int, seed: int):
    rng = random.Random(seed)
    positions = rng.sample(range(len(data) * 8), min(n, len(data) * 8))
    for bit in positions:
        out = bytearray(data)
        out[bit // 8] ^= 1 << (bit % 8)
        yield bit, bytes(out)


def _changed_keys(a, b, path=()):
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in set(a) | set(b):
            out += _changed_keys(a.get(k), b.get(k), path + (k,)) if k in a and k in b else [path + (k,)]
        return out
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return [p for x, y in zip(a, b) for p in _changed_keys(x, y, path)]
    return [] if a == b and type(a) is type(b) else [path]


# what medquant.json records that no tensor pins down: without a manifest (older saves) a flip there cannot be
# told from an intended value (input widths are pinned only up to the layout's padding of K; such a layer then
# refuses inputs of the real width); with the manifest every flip is refused
UNVERIFIABLE_WITHOUT_MANIFEST = {"padding", "stride", "dilation", "medquant_version", "class", "module", "extras",
                                 "in_features", "in_channels"}


def _recipes(model):
    """Each layer's recipe, without what changes nothing: the group size of layers without groups, ``bits`` of
    layers whose rows all have their own (``channel_bits``)."""
    out = {}
    for n, m in quantized_modules(model).items():
        r = layer_recipe(m)
        if r["config"]["scope"] != "group":
            r["config"].pop("group_size")
        if r["config"]["channel_bits"] is not None:
            r["config"].pop("bits")
        out[n] = r
    return out


@pytest.mark.parametrize("with_manifest", [True, False])
def test_single_bit_flips_of_the_recipe(tmp_path, with_manifest):
    model = quantized(0)
    with torch.no_grad():
        y = model(X)
    p = tmp_path / "ck"
    mq.save(model, p, extras={"scorer": {"t": [0.5, 1]}})
    if not with_manifest:
        (p / MANIFEST_NAME).unlink()
    original = (p / META_NAME).read_bytes()
    meta = json.loads(original)
    recipes = _recipes(model)
    reference = state(model)
    outcomes = {"refused": 0, "same": 0, "unverifiable": 0}
    for bit, flipped in _flips(original, 400, seed=2):
        (p / META_NAME).write_bytes(flipped)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", CheckpointWarning)
                loaded = mq.load(p, model=tiny(3))
                extras = mq.load_extras(p)
        except CheckpointError:
            outcomes["refused"] += 1
            continue
        try:
            with torch.no_grad():
                same = (equal_state(state(loaded), reference) and torch.equal(loaded(X), y)
                        and extras == meta["extras"]
                        and _recipes(loaded) == recipes)
        except (RuntimeError, ValueError):  # e.g. a dilation too large for the input: a valid model, another one
            same = False
        if same:
            outcomes["same"] += 1
            continue
        assert not with_manifest, f"bit {bit}: loaded a different model despite the manifest"
        changed = _changed_keys(meta, json.loads(flipped))
        assert changed and all(set(c) & UNVERIFIABLE_WITHOUT_MANIFEST for c in changed), (bit, changed)
        outcomes["unverifiable"] += 1
    if with_manifest:
        assert outcomes["refused"] == 400
    assert outcomes["refused"] > 300


def test_single_bit_flips_of_the_config(tmp_path):
    from transformers import AutoModelForCausalLM

    model = ZOO_BY_NAME["llama"].build()
    mq.quantize_(model, mq.QuantConfig(4, group_size=32))
    p = tmp_path / "ck"
    mq.save(model, p)
    h = tmp_path / "hf"
    medquant.hf.save_pretrained(model, h)
    # transformers parses config.json itself before medquant's checks run: invalid JSON or UTF-8 is its error
    for folder, n, loader, error in ((p, 150, mq.load, CheckpointError),
                                     (h, 12, AutoModelForCausalLM.from_pretrained, (CheckpointError, OSError,
                                                                                    ValueError))):
        original = (folder / "config.json").read_bytes()
        for bit, flipped in _flips(original, n, seed=3):
            (folder / "config.json").write_bytes(flipped)
            with pytest.raises(error):
                loader(folder)
        (folder / "config.json").write_bytes(original)
        loader(folder)


# -------------------------------------------------------------------------------------------------- crafted shapes
def test_crafted_shapes_never_allocate(tmp_path):
    p = tmp_path / "ck"
    mq.save(quantized(0), p)
    (p / MANIFEST_NAME).unlink()
    original = json.loads((p / META_NAME).read_text())
    rng = random.Random(4)
    keys = [("0", "in_channels"), ("0", "out_channels"), ("0", "kernel_size"), ("0", "groups"),
            ("3", "in_features"), ("3", "out_features"), ("4", "out_features")]
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for _ in range(60):
        meta = json.loads(json.dumps(original))
        name, key = rng.choice(keys)
        value = rng.choice([0, 1, 3, 7, 9, 2**22, 2**31 - 1, 2**31, 2**40, 2**62, -1])
        meta["modules"][name][key] = [value, value] if key == "kernel_size" else value
        (p / META_NAME).write_text(json.dumps(meta))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", CheckpointWarning)
            try:
                mq.load(p, model=tiny(5))
            except CheckpointError:
                continue
        assert meta == original  # only an unchanged value may load
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss < 200_000  # KiB: nothing big was allocated


# ----------------------------------------------------------------------------------------------- concurrent saves
def test_concurrent_saves_and_readers(tmp_path):
    models = [quantized(s) for s in range(4)]
    states = [state(m) for m in models]
    p = tmp_path / "ck"
    mq.save(models[0], p)
    done = threading.Event()
    reads, errors, unexpected = [], [], []

    def writer(i):
        for _ in range(3):
            mq.save(models[i], p)

    def reader():
        while not done.is_set():
            try:
                got = which(mq.load(p, model=tiny(9)), states)
            except CheckpointError as e:  # only when the version being read vanished three times in a row
                errors.append(str(e))
                continue
            except Exception as e:  # noqa: BLE001 - a reader thread's error must fail the test, not end the thread
                unexpected.append(repr(e))
                return
            if got is None:
                unexpected.append("a reader saw a mix of two saves")
                return
            reads.append(got)

    readers = [threading.Thread(target=reader) for _ in range(2)]
    writers = [threading.Thread(target=writer, args=(i,)) for i in range(4)]
    for t in readers + writers:
        t.start()
    for t in writers:
        t.join()
    done.set()
    for t in readers:
        t.join()
    assert not unexpected
    assert reads and len(errors) <= len(reads)
    assert which(mq.load(p, model=tiny(9)), states) is not None
    # every save exchanged the real folder at the path with its new one (the readers told each exchange by the
    # folder's identity): still a real folder, and nothing left beside it
    assert p.is_dir() and not p.is_symlink()
    assert sorted(e for e in os.listdir(tmp_path) if e.startswith(".ck.mq-")) == [".ck.mq-lock"]


# -------------------------------------------------------------------------------------------------- dtypes
def test_a_bf16_model_without_bias_keeps_its_dtype(tmp_path):
    from transformers import AutoModelForCausalLM

    ZOO_BY_NAME["llama"].build().save_pretrained(tmp_path / "float")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "float", dtype=torch.bfloat16)  # no bias anywhere
    mq.quantize_(model, mq.QuantConfig(4, group_size=32))
    ids = torch.randint(0, 64, (1, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        y = model(input_ids=ids).logits
    mq.save(model, tmp_path / "a")
    medquant.hf.save_pretrained(model, tmp_path / "b")
    for again in (mq.load(tmp_path / "a"), AutoModelForCausalLM.from_pretrained(tmp_path / "b")):
        for name, m in quantized_modules(again).items():
            assert m.weight_dtype == torch.bfloat16, name
        assert equal_state(state(again), state(model))  # every tensor in its saved dtype
        with torch.no_grad():
            assert torch.equal(again(input_ids=ids).logits, y)
