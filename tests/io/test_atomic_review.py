"""Review of the save paths (medquant.io.atomic, write_checkpoint): a stale generation config carried into a save
of another model, user links followed lexically instead of as the kernel does, a link to the current folder or a
folder above it, and a failed fallback switch that left the checkpoint path absent."""
import json
import os
import shutil
import sys

import pytest
import torch

import medquant as mq
from medquant.io import MANIFEST_NAME, atomic
from medquant.io.manifest import read_manifest
from medquant.testing.zoo import ZOO_BY_NAME
from tests.io.test_fuzz_regressions import net


def same(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return set(sa) == set(sb) and all(sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]) for k in sa)


def hidden(parent, name):
    return sorted(e for e in os.listdir(parent) if e.startswith(f".{name}.mq-") and not e.endswith("-lock"))


# ------------------------------------------------------------------------------ stale files of an earlier checkpoint
def test_the_generation_config_of_an_hf_save_is_dropped_by_a_save_that_writes_none(tmp_path):
    p = tmp_path / "ck"
    mq.save(ZOO_BY_NAME["llama"].build(), p)  # a generating transformers model: config + generation config
    assert {"config.json", "generation_config.json"} <= set(os.listdir(p))
    (p / "README.md").write_text("notes")
    mq.save(net(0), p)  # a plain module: neither file is its own, and both belonged to the previous model
    assert sorted(os.listdir(p)) == sorted(["README.md", MANIFEST_NAME, "medquant.json", "model.safetensors"])
    assert set(read_manifest(p)["files"]) == {"README.md", "medquant.json", "model.safetensors"}
    assert same(mq.load(p, model=net(5, quantize=False)), net(0))


def test_a_user_s_generation_config_beside_a_plain_checkpoint_is_kept(tmp_path):
    p = tmp_path / "ck"
    mq.save(net(0), p)
    (p / "generation_config.json").write_text(json.dumps({"max_length": 7}))  # not written by the save: the user's
    mq.save(net(1), p)
    assert json.loads((p / "generation_config.json").read_text()) == {"max_length": 7}


# ------------------------------------------------------------------------------------------------ the user's links
def test_a_user_link_is_followed_as_the_kernel_follows_it(tmp_path):
    # base/alias -> real/sub, and base/alias/ck -> ../target: the kernel resolves it in real/sub, so to
    # base/real/target; resolving "alias/.." lexically gave base/target, a folder the link does not name
    base = tmp_path / "base"
    (base / "real" / "sub").mkdir(parents=True)
    os.symlink("real/sub", base / "alias")
    link = base / "alias" / "ck"
    os.symlink("../target", link)
    expected = os.path.realpath(link)
    assert expected == str(base / "real" / "target")
    mq.save(net(0), link)
    assert os.path.isdir(expected) and not os.path.islink(expected)  # a first save: a real folder at the target
    assert not os.path.lexists(base / "target")
    assert link.is_symlink() and os.readlink(link) == "../target"  # the user's link is left as it was
    assert same(mq.load(link, model=net(5, quantize=False)), net(0))
    mq.save(net(1), str(link))  # again, through a str path: the folder at the target is exchanged with the new one
    assert os.path.isdir(expected) and not os.path.islink(expected) and not os.path.lexists(base / "target")
    assert sorted(os.listdir(base / "real")) == sorted(["sub", "target", ".target.mq-lock"])
    assert link.is_symlink() and os.readlink(link) == "../target"
    assert same(mq.load(link, model=net(5, quantize=False)), net(1))


@pytest.mark.parametrize("target", [".", "ancestor", "parent link"])
def test_a_link_to_the_current_folder_or_one_above_it_is_refused(tmp_path, monkeypatch, target):
    work = tmp_path / "a" / "work"
    work.mkdir(parents=True)
    (work / "notes.txt").write_text("mine")
    monkeypatch.chdir(work)
    if target == "parent link":  # tmp/alias -> a: tmp/alias/work is the current folder, spelled another way
        os.symlink("a", tmp_path / "alias")
        link = tmp_path / "alias" / "work"
    else:  # a link to the current folder, or to a folder above it
        link = work / "out" if target == "." else tmp_path / "out"
        os.symlink("." if target == "." else "a", link)
    before = sorted(os.listdir(tmp_path)), sorted(os.listdir(tmp_path / "a")), sorted(os.listdir(work))
    with pytest.raises(ValueError, match="current folder"):
        mq.save(net(0), link)
    assert not work.is_symlink() and not (tmp_path / "a").is_symlink()
    assert os.getcwd() == str(work) and (work / "notes.txt").read_text() == "mine"
    assert (sorted(os.listdir(tmp_path)), sorted(os.listdir(tmp_path / "a")), sorted(os.listdir(work))) == before


# ------------------------------------------------------------------------------------------- a switch that raises
@pytest.mark.skipif(sys.platform == "win32", reason="POSIX renames")
def test_a_fallback_switch_that_raises_leaves_the_real_folder_in_place(tmp_path, monkeypatch):
    src = tmp_path / "src"
    mq.save(net(0), src)
    p = tmp_path / "ck"
    shutil.copytree(src, p)  # a real folder (cp -rL of a checkpoint)
    (p / "README.md").write_text("notes")
    monkeypatch.setattr(atomic, "_EXCHANGE", None)  # no renameat2: rename aside, then the link into place
    real_replace = os.replace

    def failing(a, b, *args, **kwargs):
        if os.fspath(b) == str(p):
            raise OSError(5, "injected I/O error")
        return real_replace(a, b, *args, **kwargs)

    monkeypatch.setattr(atomic.os, "replace", failing)
    with pytest.raises(OSError, match="injected"):
        mq.save(net(1), p)
    # the save failed: the folder is where it was, as it was, and nothing of the failed save is left
    assert p.is_dir() and not p.is_symlink() and (p / "README.md").read_text() == "notes"
    assert hidden(tmp_path, "ck") == [] and atomic.pending(p) is None
    assert same(mq.load(p, model=net(5, quantize=False)), net(0))
    monkeypatch.setattr(atomic.os, "replace", real_replace)
    mq.save(net(1), p)  # and the next save goes through
    assert atomic.is_version_link(p) and (p / "README.md").read_text() == "notes"
    assert same(mq.load(p, model=net(5, quantize=False)), net(1))
