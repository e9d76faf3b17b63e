"""A first save to a fresh path publishes a real folder, so transformers' ``Trainer`` can rotate its checkpoints.

``Trainer._rotate_checkpoints`` (``save_total_limit``) removes an old ``checkpoint-N`` with
``shutil.rmtree(path, ignore_errors=True)``, which refuses a symlink: when every save made ``checkpoint-N`` a link
to a hidden version folder, nothing was removed and the checkpoints (links and their version folders) piled up
silently. A later save to the same path exchanges the real folder with the new one (Linux ``renameat2``), so the
path stays a real folder (test_atomic_real_folder.py); only where that call is missing does it become a version
link. Reference: the files and tensors of a save through the link scheme (a second save without
``RENAME_EXCHANGE``), the in-memory model (``torch.equal`` of every tensor), transformers' own ``from_pretrained``
and ``Trainer``.
"""
from __future__ import annotations

import os
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

import medquant as mq
from medquant.io import MANIFEST_NAME, atomic, checkpoint
from medquant.io.manifest import read_manifest, verify_files
from medquant.testing.zoo import text_kwargs
from tests.hf._helpers import state_equal
from tests.io._helpers import without_exchange


def _llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**text_kwargs())).eval()
    mq.quantize_(model, mq.QuantConfig(4, group_size=32), skip=["lm_head"])
    return model


def _hidden(parent, name):
    return sorted(e for e in os.listdir(parent) if e.startswith(f".{name}.mq-") and e != f".{name}.mq-lock")


@pytest.mark.parametrize("writer", ["save", "save_pretrained"])
def test_a_first_save_publishes_a_real_folder_with_the_files_a_linked_save_has(tmp_path, writer):
    model = _llama()
    p = tmp_path / "ck"

    def save() -> None:  # model.save_pretrained is medquant's, bound by quantize_
        mq.save(model, p) if writer == "save" else model.save_pretrained(p)

    save()
    assert p.is_dir() and not p.is_symlink() and not atomic.is_version_link(p)
    assert _hidden(tmp_path, "ck") == []  # no version folder, no staging folder left beside it
    first = {n: (p / n).read_bytes() for n in os.listdir(p)}
    assert MANIFEST_NAME in first and "config.json" in first
    if writer == "save":
        state_equal(mq.load(p), model)
    state_equal(AutoModelForCausalLM.from_pretrained(p).eval(), model)
    # a second save of the same model through the link scheme (the fallback without RENAME_EXCHANGE): same files
    with without_exchange():
        save()
    assert atomic.is_version_link(p) and _hidden(tmp_path, "ck") == [os.readlink(p)]
    assert {n: (p / n).read_bytes() for n in os.listdir(p)} == first


def test_a_later_save_over_a_first_saved_folder_replaces_it(tmp_path):
    a, b = _llama(0), _llama(1)
    p = tmp_path / "ck"
    mq.save(a, p)
    (p / "README.md").write_text("notes")  # a file of the user's: carried into the new version
    mq.save(b, p)  # the real folder is exchanged with the new one: still a real folder, nothing left beside it
    assert p.is_dir() and not p.is_symlink() and _hidden(tmp_path, "ck") == []
    assert (p / "README.md").read_text() == "notes"
    state_equal(mq.load(p), b)
    state_equal(AutoModelForCausalLM.from_pretrained(p).eval(), b)


def test_an_empty_folder_is_replaced_as_a_missing_path_is(tmp_path):
    # Trainer makes checkpoint-N (os.makedirs) before it calls save_pretrained
    model = _llama()
    p = tmp_path / "ck"
    p.mkdir()
    model.save_pretrained(p)
    assert p.is_dir() and not p.is_symlink() and _hidden(tmp_path, "ck") == []
    state_equal(AutoModelForCausalLM.from_pretrained(p).eval(), model)
    shutil.rmtree(p)  # what Trainer's rotation does: the whole checkpoint is gone
    assert os.listdir(tmp_path) == [".ck.mq-lock"]


def test_a_first_save_killed_before_its_rename_publishes_nothing_and_the_next_save_cleans_up(tmp_path, monkeypatch):
    a, b = _llama(0), _llama(1)
    p = tmp_path / "ck"

    def killed(src, dst):  # the staging folder is complete, the rename never happens
        raise KeyboardInterrupt

    monkeypatch.setattr(atomic, "_remove", lambda path: None)  # a killed process removes nothing
    monkeypatch.setattr(atomic.os, "rename", killed)
    with pytest.raises(KeyboardInterrupt):
        mq.save(a, p)
    monkeypatch.undo()
    assert not os.path.lexists(p) and atomic.pending(p) is None
    assert [e.split(".mq-")[1][:4] for e in _hidden(tmp_path, "ck")] == ["tmp-"]  # the staging folder only
    with pytest.raises(mq.io.CheckpointError, match="does not exist"):
        mq.load(p)
    mq.save(b, p)
    assert p.is_dir() and not p.is_symlink() and _hidden(tmp_path, "ck") == []  # the staging folder removed
    state_equal(mq.load(p), b)


def test_a_load_of_a_first_saved_folder_replaced_while_it_is_read_reads_the_new_version(tmp_path, monkeypatch):
    # a first-saved folder is read at its own path, at which the next save exchanges the folder for the new one: a
    # load that had read the old config and recipe must not take the new tensors with them
    a, b = _llama(0), _llama(1)
    b.config.rms_norm_eps = 1e-3  # a config-only difference: the tensor shapes agree
    p = tmp_path / "ck"
    mq.save(a, p)
    real_load_model = checkpoint.load_model
    calls = []

    def switched_meanwhile(model, filename, **kwargs):
        if not calls:  # the first read: another process saves b over the folder now
            mq.save(b, p)
        calls.append(filename)
        return real_load_model(model, filename, **kwargs)

    monkeypatch.setattr(checkpoint, "load_model", switched_meanwhile)
    back = mq.load(p)
    assert len(calls) == 2 and p.is_dir() and not p.is_symlink()
    assert back.config.rms_norm_eps == 1e-3
    state_equal(back, b)


class _Tokens(torch.utils.data.Dataset):
    def __init__(self, n: int, vocab: int) -> None:
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(0, vocab, (n, 8), generator=g)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def test_trainer_save_total_limit_rotates_medquant_checkpoints(tmp_path):
    model = _llama()
    model.train()
    out = tmp_path / "run"
    args = TrainingArguments(output_dir=str(out), max_steps=4, save_steps=1, save_total_limit=2,
                             per_device_train_batch_size=2, learning_rate=1e-3, use_cpu=True, report_to=[],
                             logging_strategy="no", save_only_model=True, dataloader_num_workers=0)
    Trainer(model=model, args=args, train_dataset=_Tokens(4, model.config.vocab_size)).train()
    entries = sorted(os.listdir(out))
    assert sorted(e for e in entries if e.startswith("checkpoint-")) == ["checkpoint-3", "checkpoint-4"]
    assert [e for e in entries if ".mq-v-" in e or ".mq-tmp-" in e or ".mq-link-" in e] == []
    for e in ("checkpoint-3", "checkpoint-4"):
        assert (out / e).is_dir() and not (out / e).is_symlink()
        verify_files(out / e, read_manifest(out / e))  # complete: every file of the manifest, its size and SHA-256
    state_equal(AutoModelForCausalLM.from_pretrained(out / "checkpoint-4").eval(), model)  # the trained model
