"""Review 5 of checkpoint writing (medquant.io.atomic): what an interrupted or unprivileged save leaves behind.

* a save interrupted (``KeyboardInterrupt``) just after its complete new folder was renamed to its version name
  ``.{name}.mq-v-*`` (the link fallback, and every save over a version link) removed its temporary link but kept
  that folder: a full-size copy that no later save removed, each one warning ``UnreferencedVersionWarning``;
* when a save over a version link could not remove the old version (a file of it held open on NFS, a folder the
  user may not write), it still dropped its record of it (the ``.{name}.mq-drop-*`` link): no later save removed
  that complete copy, and each one warned that it kept "a version no link points to";
* a save to an absolute path raised ``FileNotFoundError`` when the current folder had been removed (a notebook or
  job whose working folder was deleted), where ``torch.save`` works: the check that refuses the current folder asked
  for it;
* the old folder of a save was not removed when it held a read-only sub-folder (a tokenizer folder copied from a
  read-only place, carried from save to save): every save left one more ``.{name}.mq-tmp-*`` folder;
* the save lock ``.{name}.mq-lock`` was opened for writing, so a save to a checkpoint path whose lock file another
  user had made (a shared, group-writable folder) failed with ``PermissionError``, though a lock needs no write
  access.

Checked and sound, kept as a regression test: a model whose tensors safetensors' ``load_file`` maps from the
checkpoint's own file, saved over that folder (exchange and link fallback), writes those tensors and keeps them
readable.

The permission cases run in a child process without the capabilities that let root bypass file permissions
(``setpriv``), as an ordinary user would. References: ``safetensors.torch.load_file`` of the saved weights compared
with the model's tensors (``torch.equal``), ``os.listdir`` / ``os.stat``.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import medquant as mq
from medquant.io import atomic


def _net(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 4))


def _holds(path: Path, model: nn.Module) -> bool:
    """Whether the weights file at ``path`` holds exactly ``model``'s tensors (safetensors' own reader)."""
    got = load_file(str(path / "model.safetensors"))
    want = model.state_dict()
    return set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)


def _leftovers(path: Path) -> list[str]:
    """medquant's hidden entries beside ``path`` other than its lock and the version a version link points to."""
    current = os.readlink(path) if path.is_symlink() else None
    return sorted(e for e in os.listdir(path.parent)
                  if e.startswith(f".{path.name}.mq-") and e not in (f".{path.name}.mq-lock", current))


# --------------------------------------------------------------- (1) interrupted after the version folder's rename
@pytest.mark.parametrize("over", ["version link", "real folder without exchange"])
def test_a_save_interrupted_right_after_naming_its_version_folder_leaves_no_orphan(tmp_path, monkeypatch, over):
    a, b, c = _net(0), _net(1), _net(2)
    p = tmp_path / "ck"
    monkeypatch.setattr(atomic, "_EXCHANGE", None)
    mq.save(a, p)
    if over == "version link":
        mq.save(a, p)
        assert atomic.is_version_link(p)
    real_rename = os.rename

    def rename_then_interrupt(src, dst, *args, **kwargs):
        real_rename(src, dst, *args, **kwargs)
        if ".mq-v-" in os.fspath(dst):  # the complete new folder now has its version name; Ctrl-C arrives
            raise KeyboardInterrupt

    monkeypatch.setattr(os, "rename", rename_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        mq.save(b, p)
    monkeypatch.setattr(os, "rename", real_rename)
    assert _holds(p, a)  # the old checkpoint, intact
    assert mq.load(p, _net(9)) is not None
    assert _leftovers(p) == []  # the unpublished new version is removed with its temporary link
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no UnreferencedVersionWarning about a folder of this save
        mq.save(c, p)
    assert _holds(p, c) and _leftovers(p) == []


# ------------------------------------------------------------------- (2) an old version whose removal failed
@pytest.mark.parametrize("over", ["version link", "real folder", "real folder without exchange"])
def test_an_old_version_that_could_not_be_removed_is_removed_by_the_next_save(tmp_path, monkeypatch, over):
    # the old folder's removal fails quietly (a file held open on NFS becomes .nfsXXXX and the folder stays, a
    # folder the user cannot write): the next save removes it, and does not take it for someone else's version
    a, b, c = _net(0), _net(1), _net(2)
    p = tmp_path / "ck"
    if over != "real folder":
        monkeypatch.setattr(atomic, "_EXCHANGE", None)
    mq.save(a, p)
    if over == "version link":
        mq.save(a, p)
        assert atomic.is_version_link(p)
    monkeypatch.setattr(atomic.shutil, "rmtree", lambda *args, **kwargs: None)  # the removal fails
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the version it could not remove is its own, not someone else's
        mq.save(b, p)
        mq.save(b, p)  # and fails again, also for what the first one left
    monkeypatch.undo()
    if over != "real folder":
        monkeypatch.setattr(atomic, "_EXCHANGE", None)
    assert _holds(p, b)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no UnreferencedVersionWarning about the old version of this path
        mq.save(c, p)
    assert _holds(p, c) and _leftovers(p) == []


# ---------------------------------------------------------------- (3) the current folder was removed meanwhile
def test_a_save_to_an_absolute_path_works_when_the_current_folder_was_removed(tmp_path, monkeypatch):
    # a notebook or job whose working folder was deleted: torch.save to an absolute path works, so must a save
    from transformers import PreTrainedModel  # noqa: F401  (save asks it; importing it first needs the folder)

    gone = tmp_path / "gone"
    gone.mkdir()
    monkeypatch.chdir(gone)
    gone.rmdir()
    a, b = _net(0), _net(1)
    p = tmp_path / "ck"
    mq.save(a, p)
    mq.save(b, p)  # over a real folder (the exchange), as well as a first save
    assert _holds(p, b)
    got = mq.load(p, _net(9))
    assert all(torch.equal(t, b.state_dict()[k]) for k, t in got.state_dict().items())
    with pytest.raises(ValueError, match="file system root"):
        mq.save(a, "/")  # a root is still refused


# ------------------------------------------------- (4) saved over the folder its tensors are memory-mapped from
@pytest.mark.parametrize("exchange", [True, False])
def test_tensors_loaded_lazily_from_the_folder_are_saved_over_it_intact(tmp_path, monkeypatch, exchange):
    # safetensors' load_file maps the file; the model's tensors are those views, and the save replaces that file
    a = _net(0)
    p = tmp_path / "ck"
    mq.save(a, p)
    if not exchange:
        monkeypatch.setattr(atomic, "_EXCHANGE", None)
    b = _net(5)
    b.load_state_dict(load_file(str(p / "model.safetensors")), assign=True)
    mq.save(b, p)
    mq.save(b, p)  # twice: the first save's files, which b's tensors are not from, are replaced too
    assert _holds(p, a)  # the saved file holds the tensors that were loaded
    assert all(torch.equal(t, a.state_dict()[k]) for k, t in b.state_dict().items())  # still readable, unchanged


# ------------------------------------------------------------------------------------------ (5) as an ordinary user
def _unprivileged(code: str, cwd: Path) -> dict:
    """Run ``code`` (which prints one JSON line last) in a child Python; as root, without the capabilities that
    bypass file permissions, so permission bits apply as to an ordinary user."""
    cmd = [sys.executable, "-c", textwrap.dedent(code)]
    if os.geteuid() == 0:
        setpriv = shutil.which("setpriv")
        if setpriv is None:
            pytest.skip("running as root without setpriv: permission bits cannot be made to apply")
        cmd = [setpriv, "--bounding-set", "-dac_override,-dac_read_search,-fowner", *cmd]
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2]))
    r = subprocess.run(cmd, check=False, cwd=cwd, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


_PRELUDE = """
import json, os, warnings
from pathlib import Path
import torch
from torch import nn
import medquant as mq
from safetensors.torch import load_file

def net(seed):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 4))

def holds(path, model):
    got = load_file(str(path / "model.safetensors"))
    return all(torch.equal(got[k], v) for k, v in model.state_dict().items())
"""


@pytest.fixture(scope="module")
def unprivileged(tmp_path_factory) -> dict:
    """Both permission cases, run in one child process (its start-up, importing torch and medquant, is most of the
    time): a read-only sub-folder carried by three saves, and two saves with a lock file only readable."""
    ro, lock = tmp_path_factory.mktemp("read_only"), tmp_path_factory.mktemp("lock")
    (lock / ".ck.mq-lock").touch()
    os.chmod(lock / ".ck.mq-lock", 0o444)  # made by another user: readable, not writable, by this one
    return _unprivileged(_PRELUDE + f"""
os.chdir({str(ro)!r})
p = Path("ck").absolute()
mq.save(net(0), p)
(p / "tokenizer").mkdir()
(p / "tokenizer" / "vocab.txt").write_text("a b c")
os.chmod(p / "tokenizer", 0o555)  # read-only, as copied from a read-only place
listings = []
for seed in (1, 2, 3):
    mq.save(net(seed), p)
    listings.append(sorted(os.listdir(p.parent)))
out = {{"listings": listings, "vocab": (p / "tokenizer" / "vocab.txt").read_text(), "holds": holds(p, net(3)),
        "mode": os.stat(p / "tokenizer").st_mode & 0o777}}
os.chdir({str(lock)!r})
p = Path("ck").absolute()
try:
    mq.save(net(0), p)
    mq.save(net(1), p)
    out["lock"] = {{"holds": holds(p, net(1)), "listing": sorted(os.listdir(p.parent))}}
except OSError as e:
    out["lock"] = {{"error": repr(e)}}
print(json.dumps(out))
""", tmp_path_factory.mktemp("cwd"))


def test_a_read_only_sub_folder_does_not_leave_an_old_folder_behind_each_save(unprivileged):
    assert unprivileged["listings"] == [[".ck.mq-lock", "ck"]] * 3  # no .ck.mq-tmp-* left by any save
    assert unprivileged["vocab"] == "a b c" and unprivileged["mode"] == 0o555 and unprivileged["holds"]


def test_a_save_works_with_a_lock_file_it_cannot_write(unprivileged):
    assert unprivileged["lock"] == {"holds": True, "listing": [".ck.mq-lock", "ck"]}
