"""``upgrade`` of a folder written before manifests, whose files the checks read through a symlink.

The checks of a ``medquant.hf.save_pretrained`` folder (``verify_pretrained``) read the weights through a symlink
(the Hugging Face hub cache holds symlinks to blobs, a user may deduplicate files so), and so does transformers'
``from_pretrained``. The rewrite copied only regular files and dropped the files a save owns, so an upgraded folder
lost its ``model.safetensors`` and no longer loaded. Reference: transformers' ``from_pretrained`` of the folder
before and after the upgrade, and the bytes of the files.
"""
from __future__ import annotations

import os
import shutil
import warnings

import pytest
import torch

import medquant as mq
from medquant.hf import save_pretrained
from medquant.io import MANIFEST_NAME, upgrade, verify_pretrained
from medquant.io.manifest import read_manifest
from medquant.testing.zoo import ZOO_BY_NAME


@pytest.fixture()
def legacy(tmp_path):
    """A save_pretrained folder without its manifest whose weights file is a symlink to a blob outside it, and
    whose tokenizer file (the user's, not owned by a save) is a symlink too."""
    m = ZOO_BY_NAME["llama"].build()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mq.quantize_(m, mq.QuantConfig(bits=4, group_size=32))
    ck = tmp_path / "ck"
    save_pretrained(m, ck)
    os.remove(ck / MANIFEST_NAME)
    (tmp_path / "blobs").mkdir()
    shutil.move(ck / "model.safetensors", tmp_path / "blobs" / "w")
    os.symlink(tmp_path / "blobs" / "w", ck / "model.safetensors")
    (tmp_path / "blobs" / "tok").write_text("{}")
    os.symlink(tmp_path / "blobs" / "tok", ck / "tokenizer.json")
    return ck, m


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_upgrade_keeps_a_symlinked_weights_file(legacy):
    from transformers import AutoModelForCausalLM

    ck, _ = legacy
    ids = torch.arange(4, 20).reshape(2, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        before = _logits(AutoModelForCausalLM.from_pretrained(ck), ids)
        upgrade(ck)
    weights = (ck.parent / "blobs" / "w").read_bytes()
    assert (ck / "model.safetensors").read_bytes() == weights  # the checkpoint's weights, whole
    assert "model.safetensors" in read_manifest(ck)["files"]
    with warnings.catch_warnings():
        warnings.simplefilter("error", mq.io.CheckpointWarning)
        qc = AutoModelForCausalLM.from_pretrained(ck).config.quantization_config
        verify_pretrained(ck, qc["modules"] if isinstance(qc, dict) else qc.modules)
        after = _logits(AutoModelForCausalLM.from_pretrained(ck), ids)
    assert torch.equal(after, before)
    # a file the save does not own stays the user's link, as a save carries it over
    assert os.path.islink(ck / "tokenizer.json")
    assert os.readlink(ck / "tokenizer.json") == str(ck.parent / "blobs" / "tok")


def test_upgrade_keeps_symlinks_in_sub_folders(legacy):
    ck, _ = legacy
    (ck / "extra").mkdir()
    (ck / "extra" / "notes.txt").write_text("notes")
    os.symlink("notes.txt", ck / "extra" / "link.txt")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        upgrade(ck)
    assert (ck / "extra" / "notes.txt").read_text() == "notes"
    assert os.path.islink(ck / "extra" / "link.txt") and os.readlink(ck / "extra" / "link.txt") == "notes.txt"
