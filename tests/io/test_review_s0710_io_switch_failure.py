"""A save whose switch to a version link fails at its first step (the temporary link cannot be made: a file system
without symlinks, a full disk) removes its new folder before it raises, as every other failed save does.

The staging folder ``.{name}.mq-tmp-*`` was left beside the checkpoint (only the next save removed it).
Reference: the folder's entries and every file's bytes before and after the failed save.
"""
from __future__ import annotations

import errno
import os

import pytest
from torch import nn

import medquant as mq
from medquant.io import atomic

from ._helpers import without_exchange


def _tree(p):
    return {os.path.relpath(os.path.join(d, f), p): open(os.path.join(d, f), "rb").read()
            for d, _, files in os.walk(p) for f in files}


@pytest.mark.parametrize("where", ["real folder", "version link"])
def test_a_failed_link_leaves_no_staging_folder(where, tmp_path, monkeypatch):
    p = tmp_path / "ck"
    with without_exchange():
        mq.save(nn.Linear(4, 4), p)
        if where == "version link":
            mq.save(nn.Linear(4, 4), p)
    (p / "README.md").write_text("mine")
    before, entries = _tree(p), sorted(os.listdir(tmp_path))
    assert os.path.islink(p) == (where == "version link")

    def no_symlink(*args, **kwargs):
        raise OSError(errno.EIO, "injected: symlink")

    monkeypatch.setattr(atomic.os, "symlink", no_symlink)
    with without_exchange(), pytest.raises(OSError, match="injected"):
        mq.save(nn.Linear(4, 4), p)
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path)) == entries  # no .ck.mq-tmp-* left
    assert _tree(p) == before
