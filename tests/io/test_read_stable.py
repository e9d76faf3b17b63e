"""Readers of a checkpoint that a save switches while they read it: they read again, never a mix of two versions.

A first save publishes a real folder at the path, read at the path itself; the next save exchanges it with the new
real folder (Linux ``renameat2(RENAME_EXCHANGE)``; the path stays a real folder, so only the folder's identity
tells the switch), so a reader that had read some files of the old version would take the rest from the new one.
The switch is made deterministic here: the reader's first read is wrapped so that a save of a *different* model to the same path
runs right after it. Reference: the second model in memory (``torch.equal`` of every tensor, its config and shape
table), ``json`` of the files it saved, and the saves' own version links.
"""
from __future__ import annotations

import copy
import json

import pytest
import torch

import medquant as mq
from medquant.io import (
    META_NAME,
    CheckpointError,
    atomic,
    checkpoint,
    read_metadata,
    verify,
    verify_pretrained,
)
from medquant.prune import StructuredPruner, load_pruned, save_pruned, shape_table
from medquant.prune import io as prune_io
from medquant.testing.zoo import ZOO_BY_NAME, tiny_cnn
from tests.hf._helpers import state_equal
from tests.io._helpers import without_exchange


def _pruned(heads, ffn):
    model = ZOO_BY_NAME["qwen2"].build()
    StructuredPruner(heads, ffn, progress=False).prune(model)
    return model


def _other_values(model, eps: float):
    """The same shapes, other tensors and another config value: a mix of the two would go unnoticed by shapes."""
    other = copy.deepcopy(model)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in other.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype))
    other.config.rms_norm_eps = eps
    return other


def _switch_after_first(monkeypatch, module, name, save):
    """Wrap ``module.name`` so that ``save()`` runs after its first call returned (another process saving)."""
    real = getattr(module, name)
    calls = []

    def wrapped(*args, **kwargs):
        out = real(*args, **kwargs)
        calls.append(args[0] if args else None)
        if len(calls) == 1:  # recorded first: a save that reads through the wrapped function does not save again
            save()
        return out

    monkeypatch.setattr(module, name, wrapped)
    return calls


def _assert_is(back, b):
    state_equal(back, b)
    assert back.config.rms_norm_eps == b.config.rms_norm_eps
    assert shape_table(back) == shape_table(b)


def test_load_pruned_of_a_folder_switched_after_its_header_was_read_reads_the_new_version(tmp_path, monkeypatch):
    # the config and the shape table are read before the switch, the tensors after it: same shapes, so only a
    # re-read keeps the old config away from the new tensors
    a = _pruned([0.5, 0.0], [0.3, 0.1])
    b = _other_values(a, 1e-3)
    p = tmp_path / "ck"
    save_pruned(a, p)
    assert p.is_dir() and not p.is_symlink()  # a first save: a real folder, read at its own path
    calls = _switch_after_first(monkeypatch, prune_io, "read_header", lambda: save_pruned(b, p))
    back = load_pruned(p)
    assert p.is_dir() and not p.is_symlink() and len(calls) == 2  # exchanged: still a real folder
    _assert_is(back, b)


def test_load_pruned_of_a_folder_switched_to_other_shapes_after_verify_reads_the_new_version(tmp_path, monkeypatch):
    a, b = _pruned([0.5, 0.0], [0.3, 0.1]), _pruned([0.0, 0.5], [0.2, 0.4])
    b.config.rms_norm_eps = 1e-3
    assert shape_table(a) != shape_table(b)
    p = tmp_path / "ck"
    save_pruned(a, p)
    calls = _switch_after_first(monkeypatch, prune_io, "verify", lambda: save_pruned(b, p))
    back = load_pruned(p)
    assert p.is_dir() and not p.is_symlink() and len(calls) == 2  # exchanged: still a real folder
    _assert_is(back, b)


def test_load_pruned_into_a_given_model_starts_again_from_the_model_as_given(tmp_path, monkeypatch):
    # a plain module is resized by the first read's table: the re-read resizes the model as it was given
    x = torch.randn(2, 3, 16, 16)
    a, b = tiny_cnn(seed=0), tiny_cnn(seed=2)
    # b is the larger: the first read shrinks the given model below it, so only the model as given fits b
    StructuredPruner(channel_ratio=0.5, progress=False).prune(a, calib=[x])
    StructuredPruner(channel_ratio=0.25, progress=False).prune(b, calib=[x])
    assert shape_table(a) != shape_table(b)
    p = tmp_path / "ck"
    save_pruned(a, p)
    calls = _switch_after_first(monkeypatch, prune_io, "read_header", lambda: save_pruned(b, p))
    given = tiny_cnn(seed=1)
    back = load_pruned(p, model=given)
    assert back is given and len(calls) == 2
    state_equal(back, b)
    assert shape_table(back) == shape_table(b)
    assert torch.equal(back.eval()(x), b.eval()(x))


def test_verify_of_a_folder_switched_after_its_manifest_was_read_checks_the_new_version(tmp_path, monkeypatch):
    a = _pruned([0.5, 0.0], [0.3, 0.1])
    b = _other_values(a, 1e-3)
    p = tmp_path / "ck"
    mq.save(a, p)
    calls = _switch_after_first(monkeypatch, checkpoint, "read_manifest", lambda: mq.save(b, p))
    meta = verify(p)
    assert not p.is_symlink() and len(calls) == 2
    assert meta == json.loads((p / META_NAME).read_text())  # the new version's, read after the switch


def test_verify_pretrained_of_a_folder_switched_after_its_manifest_was_read_checks_the_new_version(
        tmp_path, monkeypatch):
    a = _pruned([0.0, 0.0], [0.0, 0.0])
    mq.quantize_(a, mq.QuantConfig(4, group_size=32), skip=["lm_head"])
    b = _other_values(a, 1e-3)
    p = tmp_path / "ck"
    a.save_pretrained(p)
    modules = json.loads((p / "config.json").read_text())["quantization_config"]["modules"]
    calls = _switch_after_first(monkeypatch, checkpoint, "read_manifest", lambda: b.save_pretrained(p))
    verify_pretrained(p, modules)  # the old manifest against the new files would be "corrupted"
    assert not p.is_symlink() and len(calls) == 2


def test_read_metadata_whose_version_was_removed_after_it_was_resolved_reads_the_new_one(tmp_path, monkeypatch):
    a = _pruned([0.5, 0.0], [0.3, 0.1])
    b = _other_values(a, 1e-3)
    p = tmp_path / "ck"
    mq.save(a, p)
    with without_exchange():
        mq.save(a, p)  # a version link (the fallback): the next save removes the version the reader resolved
    old = atomic.resolve(p)
    calls = _switch_after_first(monkeypatch, checkpoint, "_regular", lambda: mq.save(b, p))
    meta = read_metadata(p)
    assert not old.exists() and len(calls) == 2
    assert meta == json.loads((p / META_NAME).read_text())


# ------------------------------------------------------------------------------------------------ the helper itself
def _switching(tmp_path):
    """A path and a function that publishes a new version of it (a file ``n`` holding its number)."""
    p = tmp_path / "ck"
    n = [0]

    def publish() -> None:
        n[0] += 1
        with atomic.replace_directory(p) as folder:
            (folder / "n").write_text(str(n[0]))

    publish()
    return p, publish


def test_read_stable_reads_once_when_nothing_switches(tmp_path):
    p, _ = _switching(tmp_path)
    roots = []
    assert atomic.read_stable(p, lambda root: roots.append(root) or (root / "n").read_text()) == "1"
    assert roots == [p]  # a first save: the real folder at the path


def test_read_stable_reads_the_new_version_when_the_path_switched_during_the_read(tmp_path):
    p, publish = _switching(tmp_path)
    seen = []

    def read(root):
        first = (root / "n").read_text()
        if not seen:
            publish()
        seen.append(root)
        return first, (root / "n").read_text()

    assert atomic.read_stable(p, read) == ("2", "2")  # never ("1", "2")
    # the real folder at the path was exchanged with the new one: the same name, another folder
    assert seen == [p, p] and p.is_dir() and not p.is_symlink()


def test_read_stable_gives_up_with_the_given_error_chaining_the_last_one_when_the_path_keeps_switching(tmp_path):
    """A path switched during every read ends in the caller's error (a load's CheckpointError), not in the file
    error of a version that vanished (a FileNotFoundError escaped mq.load under concurrent saves)."""
    p, publish = _switching(tmp_path)
    calls = []

    def read(root):
        calls.append((root, (root / "n").read_text()))
        publish()
        raise FileNotFoundError(f"read {len(calls)} failed")

    with pytest.raises(CheckpointError, match="switched") as info:
        atomic.read_stable(p, read, error=CheckpointError)
    assert isinstance(info.value.__cause__, FileNotFoundError) and "read 3 failed" in str(info.value.__cause__)
    # each attempt read the folder a save had just exchanged in at the path (the same name: a real folder)
    assert calls == [(p, "1"), (p, "2"), (p, "3")]
    with pytest.raises(RuntimeError, match="read 5 failed"):
        atomic.read_stable(p, read, attempts=2)


def test_load_warnings_point_at_the_callers_line(tmp_path):
    """A warning of mq.load names the line that called it, not a frame inside medquant (read_stable's re-read
    wrapper added frames that a fixed stacklevel attributed the warning to)."""
    model = torch.nn.Sequential(torch.nn.Linear(8, 8))
    mq.quantize_(model, mq.QuantConfig(4, group_size=8))
    mq.save(model, tmp_path / "ck")

    class Other(torch.nn.Sequential):
        pass

    with pytest.warns(UserWarning, match="was saved from") as record:
        mq.load(tmp_path / "ck", model=Other(torch.nn.Linear(8, 8)))
    assert [w.filename for w in record if "was saved from" in str(w.message)] == [__file__]


def test_read_stable_refuses_a_read_switched_every_time_with_the_given_error(tmp_path):
    p, publish = _switching(tmp_path)
    calls = []

    def read(root):
        calls.append(root)
        publish()
        return "mixed"

    with pytest.raises(CheckpointError, match="switched"):
        atomic.read_stable(p, read, error=CheckpointError)
    assert len(calls) == 3


def test_read_stable_raises_at_once_when_the_path_did_not_switch(tmp_path):
    p, _ = _switching(tmp_path)
    calls = []

    def read(root):
        calls.append(root)
        raise CheckpointError("broken")

    with pytest.raises(CheckpointError, match="broken"):
        atomic.read_stable(p, read)
    assert len(calls) == 1
    with pytest.raises(ValueError, match="attempts"):
        atomic.read_stable(p, read, attempts=0)
