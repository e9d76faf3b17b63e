"""``upgrade`` of a legacy checkpoint (no manifest) that a save switches while upgrade reads it: it reads again,
never publishing a mix of two versions nor the old version over the new one.

As in test_read_stable.py the switch is made deterministic: upgrade's first manifest read (the first file it reads)
is wrapped so that a save of a *different* model to the same path runs right after it. Each case runs on a real
folder (a save exchanges it with its new folder: the name stays, only the folder's identity tells the switch) and
on a version link (the fallback without ``renameat2(RENAME_EXCHANGE)``: a save switches the link to a new version
folder and removes the old one). Reference: the second model in memory (``torch.equal`` of every tensor) and the
saves' own manifest.
"""
from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import medquant as mq
from medquant.io import MANIFEST_NAME, atomic, checkpoint
from medquant.io.manifest import read_manifest
from tests.io._helpers import without_exchange
from tests.io.test_read_stable import _switch_after_first


def _tiny(seed):
    torch.manual_seed(seed)
    m = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 8, bias=False))
    mq.quantize_(m, {"re:.*": mq.QuantConfig(4, group_size=16)})
    return m


def _same_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return set(sa) == set(sb) and all(sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]) for k in sa)


def _legacy(p, model, kind):
    """A checkpoint at ``p`` (a real folder, or a version link) whose current version has no manifest (written
    before manifests)."""
    mq.save(model, p)
    if kind == "link":
        with without_exchange():
            mq.save(model, p)  # a version link: a later save removes the version it replaces
    assert atomic.is_version_link(p) == (kind == "link")
    (p / MANIFEST_NAME).unlink()


def _assert_is(p, b):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a manifest, and every file it lists intact
        back = mq.load(p, model=_tiny(7))
    assert _same_state(back, b)
    assert _same_state(mq.load(p, model=_tiny(8)), b)


@pytest.mark.parametrize("kind", ["real", "link"])
def test_upgrade_of_a_legacy_folder_switched_after_its_first_read_keeps_the_new_version(tmp_path, monkeypatch, kind):
    a, b = _tiny(0), _tiny(1)
    assert not _same_state(a, b)
    p = tmp_path / "ck"
    _legacy(p, a, kind)
    old = atomic.identity(p)  # the folder read (its name, and st_dev / st_ino)
    calls = _switch_after_first(monkeypatch, checkpoint, "read_manifest", lambda: mq.save(b, p))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", mq.io.CheckpointWarning)
        assert checkpoint.upgrade(p) == p
    assert len(calls) >= 2 and calls[0] == old[0]  # the first read was of the old version, the rest of the new
    assert atomic.identity(p) != old and atomic.is_version_link(p) == (kind == "link")
    _assert_is(p, b)
    assert read_manifest(p) is not None


@pytest.mark.parametrize("kind", ["real", "link"])
def test_upgrade_of_a_legacy_folder_switched_before_its_rewrite_keeps_the_new_version(tmp_path, monkeypatch, kind):
    # the switch falls after every check passed, before the rewrite takes the save lock: the rewrite must not copy
    # the old version over the new one (nor an empty folder, once the old version is removed). It sees the switch
    # (the name of a version link, the identity of a real folder exchanged at the path), publishes nothing and
    # checks again: the new version has a manifest, so it is left as the save published it
    a, b = _tiny(0), _tiny(1)
    p = tmp_path / "ck"
    _legacy(p, a, kind)
    real = checkpoint.write_checkpoint
    saved = []

    def wrapped(directory, **kwargs):
        if not saved:
            saved.append(None)  # first: the save below goes through this wrapper too
            mq.save(b, p)
            saved[0] = (atomic.identity(p), (p / MANIFEST_NAME).read_bytes())
        return real(directory, **kwargs)

    monkeypatch.setattr(checkpoint, "write_checkpoint", wrapped)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", mq.io.CheckpointWarning)
        checkpoint.upgrade(p)
    assert saved
    # the folder b's save published, untouched by the upgrade (its rewrite abandoned)
    assert (atomic.identity(p), (p / MANIFEST_NAME).read_bytes()) == saved[0]
    _assert_is(p, b)
