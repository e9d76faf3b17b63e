"""A save over a checkpoint that is a real folder exchanges it with the new folder: the path stays a real folder.

A second save to the same path used to turn it into a symlink to a hidden version folder (``.{name}.mq-v-*``);
transformers' ``Trainer`` rotates checkpoints with ``shutil.rmtree``, which refuses a symlink, so a ``checkpoint-N``
saved twice (a training run again into the same ``output_dir``) was never removed, and ``rm -r`` / ``cp -r`` /
``mv`` of such a checkpoint did not do what users expect. Now, where Linux ``renameat2(RENAME_EXCHANGE)`` is
available, the complete new folder is exchanged with the real folder at the path in one step (folder with folder),
and the old folder is removed after the switch. Without that call (or where it is refused) the old link fallback
stays. Readers detect an exchange during their read by the folder's identity (``st_dev``, ``st_ino``), since the
name they read from does not change.

References: the files of the same model saved once into a fresh folder (bytes), the models in memory
(``torch.equal`` of every tensor), transformers' ``from_pretrained`` and ``Trainer``, ``os.stat`` / ``os.lstat``.
"""
from __future__ import annotations

import errno
import os
import shutil
import stat

import pytest
import torch
from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

import medquant as mq
from medquant.io import MANIFEST_NAME, atomic, checkpoint, verify
from medquant.io.manifest import read_manifest, verify_files
from tests.hf._helpers import state_equal
from tests.io._helpers import without_exchange
from tests.io.test_read_stable import _switch_after_first, _switching
from tests.io.test_trainer_rotation import _hidden, _llama, _Tokens

pytestmark = pytest.mark.skipif(atomic._EXCHANGE is None, reason="needs Linux renameat2(RENAME_EXCHANGE)")


def _files(p) -> dict[str, bytes]:
    return {n: (p / n).read_bytes() for n in sorted(os.listdir(p))}


def _real(p) -> bool:
    return p.is_dir() and not p.is_symlink() and not atomic.is_version_link(p)


# ------------------------------------------------------------------------------------------------- (1) save twice
@pytest.mark.parametrize("writer", ["save", "save_pretrained"])
def test_a_second_save_keeps_the_path_a_real_folder_with_the_second_save_s_files(tmp_path, writer):
    a, b = _llama(0), _llama(1)

    def save(model, p) -> None:  # model.save_pretrained is medquant's, bound by quantize_
        mq.save(model, p) if writer == "save" else model.save_pretrained(p)

    save(b, tmp_path / "ref")  # the reference: b saved once into a fresh folder
    p = tmp_path / "ck"
    save(a, p)
    (p / "README.md").write_text("notes")  # the user's file: carried into the new folder
    before = os.stat(p)
    save(b, p)
    assert _real(p)
    assert (os.stat(p).st_dev, os.stat(p).st_ino) != (before.st_dev, before.st_ino)  # a new folder, exchanged in
    assert _hidden(tmp_path, "ck") == []  # no .mq-v-*, no staging folder, no old folder left
    got = _files(p)
    assert got.pop("README.md") == b"notes"
    ref = _files(tmp_path / "ref")
    assert set(got) == set(ref)
    for name in ref:
        if name != MANIFEST_NAME:  # the manifest also lists README.md
            assert got[name] == ref[name], name
    assert set(read_manifest(p)["files"]) == set(read_manifest(tmp_path / "ref")["files"]) | {"README.md"}
    verify_files(p, read_manifest(p))
    if writer == "save":
        state_equal(mq.load(p), b)
    state_equal(AutoModelForCausalLM.from_pretrained(p).eval(), b)
    save(a, p)  # a third save: still a real folder
    assert _real(p) and _hidden(tmp_path, "ck") == []
    state_equal(AutoModelForCausalLM.from_pretrained(p).eval(), a)
    shutil.rmtree(p)  # what Trainer's rotation and `rm -r` do: the whole checkpoint is gone
    assert sorted(e for e in os.listdir(tmp_path) if e.startswith(".ck.")) == [".ck.mq-lock"]


def test_a_save_killed_around_the_exchange_leaves_the_old_or_the_new_folder_and_the_next_save_cleans_up(
        tmp_path, monkeypatch):
    a, b, c = _llama(0), _llama(1), _llama(2)
    p = tmp_path / "ck"
    mq.save(a, p)
    # killed just before the exchange: the complete new folder is left at its staging name, the path is unchanged
    monkeypatch.setattr(atomic, "_remove", lambda path: None)  # a killed process removes nothing

    def killed(x, y):
        raise KeyboardInterrupt

    monkeypatch.setattr(atomic, "exchange_paths", killed)
    with pytest.raises(KeyboardInterrupt):
        mq.save(b, p)
    monkeypatch.undo()
    assert _real(p) and [e.split(".mq-")[1][:4] for e in _hidden(tmp_path, "ck")] == ["tmp-"]
    state_equal(mq.load(p), a)
    # killed just after the exchange: the new folder is the path, the old one is left at the staging name
    real_exchange = atomic.exchange_paths

    def exchanged_then_killed(x, y):
        assert real_exchange(x, y)
        raise KeyboardInterrupt

    monkeypatch.setattr(atomic, "_remove", lambda path: None)
    monkeypatch.setattr(atomic, "exchange_paths", exchanged_then_killed)
    with pytest.raises(KeyboardInterrupt):
        mq.save(b, p)
    monkeypatch.undo()
    assert _real(p)
    state_equal(mq.load(p), b)
    assert [e.split(".mq-")[1][:4] for e in _hidden(tmp_path, "ck")] == ["tmp-", "tmp-"]
    mq.save(c, p)  # removes both leftovers
    assert _real(p) and _hidden(tmp_path, "ck") == []
    state_equal(mq.load(p), c)


# --------------------------------------------------------------------------------------- (2) Trainer's rotation
def _train(model, out, max_steps: int) -> None:
    args = TrainingArguments(output_dir=str(out), max_steps=max_steps, save_steps=1, save_total_limit=2,
                             per_device_train_batch_size=2, learning_rate=1e-3, use_cpu=True, report_to=[],
                             logging_strategy="no", save_only_model=True, dataloader_num_workers=0)
    Trainer(model=model, args=args, train_dataset=_Tokens(4, model.config.vocab_size)).train()


def test_trainer_rotation_removes_checkpoints_saved_again_by_a_second_run(tmp_path):
    # the first run leaves checkpoint-1 and -2; the second, into the same output_dir, saves them again (a second
    # save to each path), then checkpoint-3 and -4, and rotation removes 1 and 2 with shutil.rmtree (which does
    # nothing to a symlink: ignore_errors=True)
    out = tmp_path / "run"
    first = _llama(0).train()
    _train(first, out, 2)
    assert sorted(e for e in os.listdir(out) if e.startswith("checkpoint-")) == ["checkpoint-1", "checkpoint-2"]
    second = _llama(1).train()
    _train(second, out, 4)
    entries = sorted(os.listdir(out))
    assert [e for e in entries if e.startswith("checkpoint-")] == ["checkpoint-3", "checkpoint-4"]
    assert [e for e in entries if ".mq-" in e and not e.endswith(".mq-lock")] == []
    for e in ("checkpoint-3", "checkpoint-4"):
        assert _real(out / e)
        verify_files(out / e, read_manifest(out / e))
    state_equal(AutoModelForCausalLM.from_pretrained(out / "checkpoint-4").eval(), second)


# ------------------------------------------------------------------------------------- (3) readers re-read
def test_read_stable_reads_again_when_the_real_folder_is_exchanged_with_another_real_folder(tmp_path):
    p, _ = _switching(tmp_path)
    assert _real(p)
    other = tmp_path / "other"
    other.mkdir()
    (other / "n").write_text("2")
    seen = []

    def read(root):
        first = (root / "n").read_text()
        if not seen:  # another writer exchanges a complete real folder with the path: the name stays the same
            assert atomic.exchange_paths(other, p)
            shutil.rmtree(other)  # the old folder, now at the other name
        seen.append(root)
        return first, (root / "n").read_text()

    assert atomic.read_stable(p, read) == ("2", "2")  # never ("1", "2")
    assert seen == [p, p] and _real(p)


def test_a_load_of_a_real_folder_saved_again_while_it_is_read_reads_the_new_version(tmp_path, monkeypatch):
    a, b = _llama(0), _llama(1)
    b.config.rms_norm_eps = 1e-3  # a config-only difference too: the tensor shapes agree
    p = tmp_path / "ck"
    mq.save(a, p)
    mq.save(a, p)  # saved twice: still a real folder
    calls = _switch_after_first(monkeypatch, checkpoint, "load_model", lambda: mq.save(b, p))
    back = mq.load(p)
    assert len(calls) == 2 and _real(p)
    assert back.config.rms_norm_eps == 1e-3
    state_equal(back, b)


def test_verify_of_a_real_folder_exchanged_after_its_manifest_was_read_checks_the_new_version(tmp_path, monkeypatch):
    a, b = _llama(0), _llama(1)
    p = tmp_path / "ck"
    mq.save(a, p)
    calls = _switch_after_first(monkeypatch, checkpoint, "read_manifest", lambda: mq.save(b, p))
    verify(p)  # the old manifest against the new files would be "corrupted"
    assert len(calls) >= 2 and _real(p)


# ------------------------------------------------------------------------------------------------ (4) fallback
@pytest.mark.parametrize("how", ["missing", "refused"])
def test_without_rename_exchange_a_second_save_makes_a_version_link_as_before(tmp_path, monkeypatch, how):
    a, b, c = _llama(0), _llama(1), _llama(2)
    p = tmp_path / "ck"
    mq.save(a, p)
    if how == "missing":
        with without_exchange():
            mq.save(b, p)
    else:  # the file system refuses the call (EINVAL): nothing changed, as renameat2 guarantees

        def refused(x, y):
            raise OSError(errno.EINVAL, os.strerror(errno.EINVAL), x)

        monkeypatch.setattr(atomic, "_EXCHANGE", refused)
        mq.save(b, p)
        monkeypatch.undo()
    assert atomic.is_version_link(p) and _hidden(tmp_path, "ck") == [os.readlink(p)]
    state_equal(mq.load(p), b)
    mq.save(c, p)  # a version link stays a link (switched to a new version), even with the call available
    assert atomic.is_version_link(p) and _hidden(tmp_path, "ck") == [os.readlink(p)]
    state_equal(mq.load(p), c)


# ----------------------------------------------------------------------------------------------------- (5) mode
@pytest.mark.parametrize("how", ["exchange", "link", "empty folder"])
def test_the_new_folder_takes_the_old_folder_s_permission_bits(tmp_path, monkeypatch, how):
    model = _llama(0)
    p = tmp_path / "ck"
    if how == "empty folder":  # Trainer makes checkpoint-N before it saves into it
        p.mkdir()
    else:
        mq.save(model, p)
    os.chmod(p, 0o710)  # not what any umask gives a new folder
    if how == "link":
        monkeypatch.setattr(atomic, "_EXCHANGE", None)
    mq.save(model, p)
    assert atomic.is_version_link(p) == (how == "link")
    assert stat.S_IMODE(os.stat(p).st_mode) == 0o710
    state_equal(mq.load(p), model)
    os.chmod(p, 0o750)
    mq.save(model, p)  # and again: a version link's next version, or the next exchanged folder
    assert stat.S_IMODE(os.stat(p).st_mode) == 0o750
    assert torch.equal(mq.load(p).lm_head.weight, model.lm_head.weight)
