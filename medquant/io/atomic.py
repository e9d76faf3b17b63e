"""Replace a checkpoint folder as one unit: a first save renames a complete folder into place; a later save
exchanges the real folder at the path with a complete new one, or switches a symlink to versioned sibling folders
where the system cannot exchange folders.

The mechanism (POSIX; Linux ``renameat2(RENAME_EXCHANGE)`` for the exchange):

* every save writes a **complete new version** into a staging folder ``.{name}.mq-tmp-*`` in the parent folder of
  the user's path ``P`` (every file fsynced, then the folder). Where something is at ``P``, the new folder takes
  the permission bits (mode) of the folder ``P`` names, not the umask's;
* a **first save** (nothing at ``P``, or an empty real folder there, as ``Trainer`` makes ``checkpoint-N`` before it
  saves) renames the staging folder to ``P`` (``os.rename``: atomic, and it replaces only an empty folder), so ``P``
  is a **real folder**;
* a save over a **real folder** at ``P`` (an earlier save's folder, a checkpoint written before this scheme)
  exchanges the staging folder with ``P`` in one step (Linux ``renameat2(RENAME_EXCHANGE)``, folder with folder:
  atomic, so ``P`` names the old folder or the new one, never a mix), fsyncs the parent folder and removes the old
  folder, now at the staging name. ``P`` stays a real folder however often it is saved: tools that remove a
  checkpoint with ``shutil.rmtree`` (transformers' ``Trainer`` rotating ``save_total_limit`` checkpoints), which
  refuses a symlink, remove it whole, and ``rm -r``, ``cp -r`` and ``mv`` treat it as any folder. A save killed
  before the exchange leaves ``P`` as it was, one killed after it leaves the new folder at ``P``; either leaves a
  staging folder (the new or the old one), which the next save removes;
* where the exchange is missing or refused (other systems, some file systems), a save over a real folder makes
  ``P`` a **version link** (below): the real folder is renamed aside to ``.{name}.mq-old-*`` and the link renamed
  into place (a crash between the two renames leaves ``P`` absent for a moment, never mixed; the next save
  finishes the switch; a save that raises there renames the folder back, so ``P`` is left as it was);
* a save over a **version link** (made by that fallback, or by an older medquant, which made every second save one)
  keeps ``P`` a link, switched to a new version: ``P`` is a **symlink to a sibling folder** ``.{name}.mq-v-{16 hex}``
  in the same parent folder (relative target, so the parent can be moved). To every reader that opens
  ``P/config.json``, ``P/model.safetensors``... by name (transformers, vLLM, llama.cpp, ``ls``) ``P`` is a plain
  folder. The staging folder is renamed to a fresh ``.{name}.mq-v-*`` (so a ``.mq-v-*`` folder is always
  complete), then a temporary symlink ``.{name}.mq-link-*`` to it is renamed **over** ``P`` (``os.replace``:
  atomic); the parent folder is fsynced and the old version is removed after the switch, unless another symlink in
  the parent folder still points to it (a copy of the link, a renamed link). Links are not turned back into real
  folders. Remove such a checkpoint with ``rm ck && rm -r .ck.mq-v-*`` (``rmtree`` refuses it);
* a symlink at ``P`` that is not a version link (the user's own link to a folder elsewhere) is followed as the
  kernel follows it (its target is taken from the real folder the link is in, ``..`` after that folder's own
  symlinks): the scheme runs at its target. A version link is any symlink whose target is a plain
  ``.{any name}.mq-v-{16 hex}`` name, so a renamed link (``mv ck ck_best``) is still one: saving to it gives it a
  new version of its own;
* a save never replaces the current folder, a folder above it or a file system root, however the path reaches it
  (a user's link to ``.``, a path through a symlinked folder): it raises ``ValueError`` and changes nothing;
* a version link whose version folder is missing (the link was moved away from it, or the folder was removed) is
  replaced by the next save to its path (by a new version link, as any version link is); nothing else is removed;
* files in the old version that the new save does not own (:func:`replace_directory`'s ``owned``: a tokenizer, a
  README written into the folder after an earlier save) are carried into the new version (hard links, copies across
  devices);
* saves to one path are serialised by an exclusive ``fcntl.flock`` on ``.{name}.mq-lock`` next to it, held for the
  whole save: the last writer wins and no two saves interleave. The lock file is opened read-only (``flock`` needs
  no write access: a lock file another user made in a shared folder serves too). What a killed save leaves
  (staging folders ``.{name}.mq-tmp-*``, which may hold a new folder not yet exchanged in or an old one exchanged
  out, temporary links ``.{name}.mq-link-*`` and the unpublished version they point to, ``.{name}.mq-old-*``, and
  the old version recorded by a ``.{name}.mq-drop-*`` link before a switch, kept until the old version is gone: a
  removal that failed is tried again) is removed by the next save under the lock; a save that raises
  (``KeyboardInterrupt`` included) removes its own new folder, under whichever name it has by then, before it
  returns. A first save killed before its rename leaves ``P`` as it was (absent or empty) and its staging folder.
  A folder removed so goes whole even when it or a sub-folder in it is read-only (given ``u+rwx`` first).
* A save **never removes a complete version it did not replace itself**: a ``.{name}.mq-v-*`` folder that no
  symlink in the parent points to (its link was moved into another folder, or it was left by an older medquant) is
  kept, and the save warns (:class:`UnreferencedVersionWarning`) naming it and how to remove it.

:func:`resolve` gives the folder a reader should read from: ``P`` itself for a real folder, the version folder
``P`` points to at that moment for a version link. Every medquant reader of a checkpoint
(:func:`medquant.io.load`, ``verify``, ``load_extras``, ``read_metadata``, ``verify_pretrained``,
:func:`medquant.prune.load_pruned`, ``upgrade``) reads through :func:`read_stable`: it reads again, whole, when
``P`` was switched during the read. A switch is told by the folder :func:`identity`: the name ``P`` resolves to
(a version link's new version has a new name; the old one disappears after the switch, which fails a read of it)
and that folder's ``st_dev`` / ``st_ino`` (a real folder exchanged at ``P`` keeps the name ``P``, so files read
after the exchange come from the new folder; only the identity tells). A real folder is moved, renamed, copied
(``cp -r``) and removed as any folder. A version link: copy it with ``cp -rL`` (``cp -r`` copies a symlink
itself); ``mv`` of the link within its folder is safe (the link keeps pointing to its sibling version folder); to
move it into another folder, move the parent folder, or ``cp -rL`` it there and remove the original
(``rm ck && rm -r .ck.mq-v-*``): moving the link alone leaves its data behind (:func:`dangling_message`).
"""
from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import re
import secrets
import shutil
import stat
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

try:  # POSIX
    import fcntl
except ImportError:  # pragma: no cover - Windows: saves are not serialised
    fcntl = None  # type: ignore[assignment]

__all__ = ["UnreferencedVersionWarning", "current_folder", "dangling_message", "exchange_paths", "fsync_dir",
           "fsync_file", "identity", "is_current_or_above", "is_version_link", "pending", "read_stable",
           "replace_directory", "resolve"]

T = TypeVar("T")

_VERSION, _LINK, _OLD, _TMP, _DROP = "v", "link", "old", "tmp", "drop"
# the version folder of any checkpoint name (a renamed link keeps its target's name), and medquant's own
# temporary links / markers / staging folders of any name (never a user's link to a checkpoint)
_ANY_VERSION = re.compile(r"\.[^/]+\.mq-v-[0-9a-f]{16}")
_ANY_ARTIFACT = re.compile(r"\.[^/]+\.mq-(link|old|tmp|drop)-[0-9a-f]{16}")


class UnreferencedVersionWarning(UserWarning):
    """A save found complete versions of its checkpoint name that no link points to; they were kept, not removed."""


def _artifact_re(name: str) -> re.Pattern[str]:
    return re.compile(r"\." + re.escape(name) + r"\.mq-(v|link|old|tmp|drop)-[0-9a-f]{16}")


def _artifact(path: Path, kind: str) -> Path:
    return path.parent / f".{path.name}.mq-{kind}-{secrets.token_hex(8)}"


def lock_path(path: Path) -> Path:
    return path.parent / f".{path.name}.mq-lock"


def fsync_file(path: str | os.PathLike) -> None:
    """fsync a file (its data and metadata reach the disk).

    Args:
        path: the file.
    """
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: str | os.PathLike) -> None:
    """fsync a folder (its entries: names created, renamed or removed). A no-op where folders cannot be opened.

    Args:
        path: the folder.
    """
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:  # pragma: no cover
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover - some file systems refuse fsync on folders
        pass
    finally:
        os.close(fd)


def output_folder_problem(out: str | os.PathLike, saved: str) -> str | None:
    """Why ``out`` cannot become an output folder, ``None`` when it can: a path that exists and is not a folder, or a
    path beneath a file (``a_file/sub``: no folder can be created there). ``saved`` names what is saved there (``"the
    model"``, ``"a checkpoint"``) in the first message. Callers check it before the work whose save would refuse the
    path only at its end (``medquant quantize`` / ``pipeline`` / ``demo``, :func:`medquant.pipeline.compress`)."""
    path = Path(out)
    if path.exists() and not path.is_dir():
        return f"{out} exists and is not a folder; {saved} is saved as a folder: give a folder's path"
    for parent in path.absolute().parents:  # the nearest one that exists must be a folder to create ``out`` in
        if parent.exists():
            if not parent.is_dir():
                return f"{out} cannot be created: {parent} exists and is not a folder; give a path whose parents are folders"
            break
    return None


def is_version_link(path: Path) -> bool:
    """Whether ``path`` is a symlink made by this scheme: its target is a plain ``.{name}.mq-v-*`` sibling name.

    The name in the target need not be ``path``'s own: a renamed link (``mv ck ck_best``) is still a version link.

    Args:
        path: the path to test.

    Returns:
        ``True`` for such a version link (whether its version folder exists or not).
    """
    if not path.is_symlink():
        return False
    return _ANY_VERSION.fullmatch(os.readlink(path)) is not None


def dangling_message(path: str | os.PathLike) -> str | None:
    """What is wrong with a version link whose version folder is missing, and how to recover (``None`` otherwise).

    Args:
        path: the checkpoint path.

    Returns:
        The message for a dangling version link, else ``None``.
    """
    path = Path(os.path.abspath(path))
    if not path.is_symlink() or path.exists() or not is_version_link(path):
        return None
    target = os.readlink(path)
    return (f"{path} is a medquant checkpoint link to the version folder {target!r}, which is missing: the link is "
            f"relative, so the folder is expected beside it, at {path.parent / target}. A checkpoint's data lives in "
            "that hidden folder, and moving or renaming the link into another folder leaves the data where it was "
            "saved: move the link back beside its version folder. To move a checkpoint, move its parent folder, or "
            "copy it with `cp -rL` and remove the original")


def resolve(path: str | os.PathLike) -> Path:
    """The real folder a reader of ``path`` should read from.

    That is ``path`` itself (after the user's own symlinks) for a real folder, the current version folder for a
    version link, or the :func:`pending` version while an interrupted fallback switch is unfinished. A save over a
    real folder exchanges the folder at that same name, so a reader tells a switch by :func:`identity`, not by this
    name alone.

    Args:
        path: the checkpoint path.

    Returns:
        The folder to read.
    """
    return pending(path) or Path(os.path.realpath(path))


def _pin(root: Path) -> int | None:
    """A descriptor holding the folder ``root`` open (``O_PATH`` where there is one: no read permission needed), so
    its inode number is not reused meanwhile; ``None`` where it is missing or folders cannot be opened."""
    try:
        return os.open(root, getattr(os, "O_PATH", os.O_RDONLY) | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return None


def _stat_identity(root: Path, fd: int | None = None) -> tuple[int, int] | None:
    """``(st_dev, st_ino)`` of the folder open as ``fd``, else of ``root`` (``None`` where it is missing)."""
    try:
        st = os.fstat(fd) if fd is not None else os.stat(root)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def identity(path: str | os.PathLike) -> tuple[Path, tuple[int, int] | None]:
    """What a reader compares to tell whether ``path`` was switched: the folder it resolves to and that folder's
    identity (``st_dev``, ``st_ino``; ``None`` where it is missing).

    A save over a version link switches the name (a new ``.{name}.mq-v-*`` folder); a save over a real folder
    exchanges the folder at ``path`` itself, so only its identity changes.

    Args:
        path: the checkpoint path.

    Returns:
        ``(resolve(path), (st_dev, st_ino) or None)``.
    """
    root = resolve(path)
    return root, _stat_identity(root)


def read_stable(path: str | os.PathLike, read: Callable[[Path], T], *, attempts: int = 3,
                error: Callable[[str], BaseException] = RuntimeError) -> T:
    """Read a checkpoint whole from one version: ``read(resolve(path))``, read again when ``path`` was switched.

    Each attempt resolves ``path`` (:func:`resolve`) to ``root``, opens ``root`` and takes its identity
    (``st_dev``, ``st_ino``), calls ``read(root)``, and takes :func:`identity` of ``path`` again. When ``path``
    still resolves to ``root`` and ``root`` is still the folder opened, no save switched it during the read: the
    attempt's result is returned, or its exception raised. A save over a version link publishes a new folder name
    (random, never reused); a save over a real folder exchanges the folder at ``path`` itself (the name stays), which
    only the identity reveals. The folder stays open during the read, so its inode number cannot be given to a
    folder of a later save meanwhile (a removed folder's number is reused once nothing holds it): an identity that
    compares equal is the same folder. When ``path`` was switched meanwhile, what was read may come from two
    versions (a real folder is read at ``path`` itself, which the switch exchanges under the reader), or the read
    may have failed because the old version was removed: the read starts again with the new version, whether the
    attempt returned or raised (any ``Exception``; ``KeyboardInterrupt`` and the like end it at once). ``read`` may
    read from ``root`` or from ``path`` itself (resolving it again): every file it reads between the two
    identities is of one version unless a switch happened, which the second one reveals.

    Args:
        path: the checkpoint path.
        read: reads the checkpoint, given the folder ``path`` resolved to when the attempt began. It may run
            ``attempts`` times, so it must start from the same state each time (a caller that changes a model in
            place puts it back first).
        attempts: how many times ``read`` runs at most (``>= 1``).
        error: builds the exception raised when ``path`` was switched during every attempt (the last one's
            result may mix two versions, so it is not returned; its exception, a file of a removed version not
            found, is chained); given the message.

    Returns:
        What ``read`` returned in the first attempt during which ``path`` was not switched.

    Raises:
        ValueError: ``attempts < 1``.
        Exception: the exception of an attempt during which ``path`` was not switched; ``error(...)`` when
            ``path`` was switched during every attempt (whether the last one returned or raised).
    """
    if attempts < 1:
        raise ValueError(f"attempts must be at least 1, got {attempts}")
    for attempt in range(attempts):
        root = resolve(path)
        fd = _pin(root)
        try:
            before = root, _stat_identity(root, fd)
            last = attempt == attempts - 1
            try:
                value = read(root)
            except Exception as e:
                if identity(path) == before:
                    raise
                if not last:
                    continue  # a save switched the path, and may have removed the version being read: read it again
                raise error(f"{path} was switched to a new version by a save during each of {attempts} reads (the "
                            f"last read failed: {type(e).__name__}: {e}); read it again once the saves have "
                            "stopped") from e
            if identity(path) == before:
                return value
        finally:
            if fd is not None:
                os.close(fd)
    raise error(f"{path} was switched to a new version by a save during each of {attempts} reads; what was read "
                "may mix two versions: read it again once the saves have stopped")


def pending(path: str | os.PathLike) -> Path | None:
    """The complete new version of ``path`` left by a save killed between the two renames of the fallback switch.

    Such a save leaves ``path`` absent and a temporary link to the new version (the next save puts it in place).

    Args:
        path: the checkpoint path.

    Returns:
        The new version folder, or ``None`` when ``path`` exists or no such link is found.
    """
    path = Path(os.path.abspath(path))
    if os.path.lexists(path) or not path.parent.is_dir():
        return None
    pattern = _artifact_re(path.name)
    for e in sorted(os.listdir(path.parent)):
        m = pattern.fullmatch(e)
        p = path.parent / e
        if m is not None and m.group(1) == _LINK and p.is_symlink() and p.is_dir():
            return Path(os.path.realpath(p))
    return None


def _renameat2_exchange() -> Callable[[str, str], None] | None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    at_fdcwd, rename_exchange = -100, 2

    def exchange(a: str, b: str) -> None:
        if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) != 0:
            e = ctypes.get_errno()
            raise OSError(e, os.strerror(e), a)

    return exchange


_EXCHANGE = _renameat2_exchange()


def exchange_paths(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Atomically swap two paths (Linux ``renameat2(RENAME_EXCHANGE)``).

    Args:
        a: the first path.
        b: the second path.

    Returns:
        ``True`` when swapped; ``False`` where the call is not available or refused (then nothing changed).
    """
    if _EXCHANGE is None:
        return False
    try:
        _EXCHANGE(os.fspath(a), os.fspath(b))
    except OSError as e:
        if e.errno in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EXDEV, errno.EPERM):
            return False
        raise
    return True


def _empty_folder(path: Path) -> bool:
    """Whether ``path`` is a real (not linked) folder with no entries (``False`` where it cannot be listed)."""
    if path.is_symlink() or not path.is_dir():
        return False
    try:
        with os.scandir(path) as it:
            return next(it, None) is None
    except OSError:
        return False


def _publish_first(path: Path, stage: Path) -> bool:
    """Rename the complete folder ``stage`` to ``path`` when nothing, or an empty real folder, is there.

    ``os.rename`` is atomic and replaces only an empty folder: a reader of ``path`` finds nothing (or the empty
    folder), then the complete new folder. Where ``path`` holds anything else, or the rename is refused (a name or a
    file appeared since the check), nothing changes and the caller switches a version link instead.

    Returns:
        ``True`` when ``stage`` is now ``path``.
    """
    if os.path.lexists(path) and not _empty_folder(path):
        return False
    try:
        os.rename(stage, path)
    except OSError:
        return False
    return True


def _remove(p: Path) -> None:
    """Remove one of medquant's own folders or links (best effort). A folder's entries go even when its mode, or a
    sub-folder's, is read-only (a new folder takes the mode of the one it replaces, which the user may have made
    read-only; a sub-folder carried from save to save keeps its own mode): each folder is given ``u+rwx`` before
    its entries are listed and removed (the folder is removed, so its mode is not kept anywhere)."""
    try:
        if p.is_symlink() or not p.is_dir():
            p.unlink(missing_ok=True)
        else:
            with contextlib.suppress(OSError):
                os.chmod(p, stat.S_IMODE(os.lstat(p).st_mode) | stat.S_IRWXU)
            for dirpath, dirs, _files in os.walk(p):  # top-down, no symlinks followed: a folder before its entries
                for d in dirs:
                    q = os.path.join(dirpath, d)
                    with contextlib.suppress(OSError):
                        st = os.lstat(q)
                        if stat.S_ISDIR(st.st_mode) and stat.S_IMODE(st.st_mode) & stat.S_IRWXU != stat.S_IRWXU:
                            os.chmod(q, stat.S_IMODE(st.st_mode) | stat.S_IRWXU)
            shutil.rmtree(p, ignore_errors=True)
    except OSError:  # pragma: no cover - best effort
        pass


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    if fcntl is None:  # pragma: no cover
        yield
        return
    # read-only: ``flock`` needs no write access, so a lock file another user made (a shared folder) serves too
    fd = os.open(lock_path(path), os.O_RDONLY | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _referenced(parent: Path, version: Path, skip: Path | None = None) -> bool:
    """Whether a symlink in ``parent`` (other than ``skip`` and medquant's temporary links) resolves to ``version``:
    a copy or a renamed version link, or a user's own link to the folder."""
    real = os.path.realpath(version)
    for e in os.listdir(parent):
        p = parent / e
        if p == skip or _ANY_ARTIFACT.fullmatch(e) or not p.is_symlink():
            continue
        if os.path.realpath(p) == real:
            return True
    return False


def _cleanup(path: Path) -> list[Path]:
    """Finish an interrupted fallback switch, then remove what killed saves of ``path`` left (under the lock).

    Removed: staging folders (a new folder not yet published, or the old real folder an exchange left at the staging
    name), temporary links and the unpublished versions they point to, folders renamed aside, and the old version a
    switch recorded for removal (unless a link in the parent still points to
    it). Kept: every other complete version folder of this name.

    Returns:
        The complete version folders of this name that no symlink in the parent points to (kept).
    """
    parent = path.parent
    pattern = _artifact_re(path.name)

    def entries() -> list[tuple[str, Path]]:
        out = []
        for e in sorted(os.listdir(parent)):
            m = pattern.fullmatch(e)
            if m is not None and os.path.lexists(parent / e):
                out.append((m.group(1), parent / e))
        return out

    if not os.path.lexists(path):  # killed between the two renames of the fallback: finish the switch
        for kind, p in entries():
            if kind == _LINK and p.is_symlink() and p.exists():
                os.replace(p, path)
                fsync_dir(parent)
                break
        else:  # no new version to put in place: put the folder renamed aside back
            for kind, p in entries():
                if kind == _OLD and p.is_dir() and not p.is_symlink():
                    os.rename(p, path)
                    fsync_dir(parent)
                    break
    current = os.readlink(path) if is_version_link(path) else None
    retry: set[str] = set()  # versions whose removal failed: their marker stays, and they are not warned about
    for kind, p in entries():
        if kind in (_LINK, _DROP) and p.is_symlink():
            # a temporary link: the new version of a save killed before its switch (never published); a drop
            # marker: the old version of a save killed after its switch. Either is removed unless it is current or
            # a link in the parent points to it.
            target = os.readlink(p)
            removable = bool(_ANY_VERSION.fullmatch(target)) and target != current \
                and not _referenced(parent, parent / target)
            if removable:
                _remove(parent / target)
            if removable and os.path.lexists(parent / target):  # kept while the removal fails: tried again
                retry.add(target)
            else:
                p.unlink(missing_ok=True)
        elif kind != _VERSION:  # staging folders, folders renamed aside, a real folder exchanged out
            _remove(p)
    return [p for kind, p in entries()
            if kind == _VERSION and p.name != current and p.name not in retry and not _referenced(parent, p)]


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst, follow_symlinks=False)
    except OSError:
        shutil.copy2(src, dst, follow_symlinks=False)


def _carry_over(old: Path, new: Path, owned: Callable[[str], bool]) -> None:
    for entry in sorted(os.listdir(old)):
        if owned(entry) or os.path.lexists(new / entry):
            continue
        src, dst = old / entry, new / entry
        st = os.lstat(src)
        if stat.S_ISDIR(st.st_mode):
            shutil.copytree(src, dst, symlinks=True, copy_function=_link_or_copy)
        else:
            _link_or_copy(str(src), str(dst))


def _fsync_tree(root: Path) -> None:
    for dirpath, _dirs, files in os.walk(root):
        for f in files:
            p = os.path.join(dirpath, f)
            if not os.path.islink(p):
                fsync_file(p)
        fsync_dir(dirpath)


def _target(path: Path) -> Path:
    """Follow a user's own symlinks at ``path`` (not version links) to the path the scheme works on.

    Each link is followed as the kernel follows it: its target is read from the real folder the link is in, and
    ``..`` is taken after the symlinks before it (``a/link/../x`` is not ``a/x`` when ``link`` is a symlink), so the
    scheme works on the folder the link names. The last part is kept as it is (it may be a version link).
    """
    seen = 0
    while path.is_symlink() and not is_version_link(path):
        seen += 1
        if seen > 40:
            raise OSError(errno.ELOOP, "too many levels of symbolic links", str(path))
        target = Path(os.path.realpath(path.parent)) / os.readlink(path)
        if target.name in ("", ".."):  # ends in ``..`` (pathlib drops a trailing ``.``): a folder to resolve whole
            path = Path(os.path.realpath(target))
        else:
            path = Path(os.path.realpath(target.parent)) / target.name
    return path


def is_current_or_above(folder: Path, cwd: Path | None) -> bool:
    """Whether ``folder`` is ``cwd``, a folder above it or a file system root: a folder no save or export may
    replace (both absolute and resolved alike: as given, or after every symlink). ``cwd`` ``None``: the current
    folder was removed (:func:`current_folder`), so only a root is such a folder."""
    if folder == folder.parent:
        return True
    return cwd is not None and (folder == cwd or folder in cwd.parents)


def current_folder(resolved: bool = False) -> Path | None:
    """The current folder (after every symlink with ``resolved``), or ``None`` when it was removed (a process whose
    working folder was deleted still saves to absolute paths, as ``torch.save`` does)."""
    try:
        cwd = os.getcwd()
    except FileNotFoundError:
        return None
    return Path(os.path.realpath(cwd) if resolved else cwd)


def _refuse_current_folder(path: Path) -> None:
    """Refuse a ``path`` that is (really, after every symlink) the current folder, one above it or a root: the save
    would replace that folder (or turn it into a link). A version link is switched, not replaced, and is not
    checked."""
    if is_version_link(path):
        return
    real = Path(os.path.realpath(path))
    if is_current_or_above(real, current_folder(resolved=True)):
        raise ValueError(f"refusing to save into {path} ({real}): it is the current folder, a folder above it or a "
                         "file system root (reached through a symlink); give the checkpoint its own folder")


@contextlib.contextmanager
def replace_directory(path: str | os.PathLike, *,
                      owned: Callable[[Path], Callable[[str], bool]] = lambda old: lambda name: False,
                      finalize: Callable[[Path], None] | None = None) -> Iterator[Path]:
    """Context manager: yields an empty new version folder and publishes it at ``path`` when the block succeeds.

    When the block ends without an exception, the files in the old version that ``owned(name)`` does not claim are
    carried over, ``finalize(folder)`` runs (it writes the manifest), the folder takes the old folder's permission
    bits (where there is one), everything is fsynced and the folder is published atomically (see the module
    docstring): renamed to ``path`` when nothing, or an empty real folder, is there (a first save: ``path`` is a
    real folder); exchanged with the real folder at ``path`` (Linux ``renameat2(RENAME_EXCHANGE)``: ``path`` stays a
    real folder, and the old one is removed); else published as a new version that ``path`` is switched to
    (``path`` is, or becomes where the exchange is missing or refused, a version link). On an exception the new
    version is removed and ``path`` is untouched. Concurrent calls on one path are serialised by a lock file.

    Args:
        path: the checkpoint path.
        owned: called with the old version folder (under the lock), returns which of its file names the new
            version replaces or drops (the rest are carried over).
        finalize: called with the new folder before the switch.

    Yields:
        The new, empty version folder.

    Raises:
        NotADirectoryError: ``path`` exists and is not a folder.
        ValueError: ``path`` is, after its symlinks, the current folder, a folder above it or a file system root.
    """
    path = _target(Path(os.path.abspath(path)))
    _refuse_current_folder(path)
    if os.path.lexists(path) and not path.is_dir() and not is_version_link(path):  # a dangling version link is
        raise NotADirectoryError(f"{path} exists and is not a folder; a checkpoint is saved as a folder")  # replaced
    path.parent.mkdir(parents=True, exist_ok=True)
    with _locked(path):
        kept = _cleanup(path)
        if kept:
            names = " ".join(str(p) for p in kept)
            warnings.warn(f"{path}: kept {len(kept)} complete checkpoint version folder(s) of this name that no link "
                          f"in {path.parent} points to: {names}. A save never removes a version it did not replace "
                          "itself: such a folder holds the data of a checkpoint whose link was moved into another "
                          "folder, or of a save killed under an older medquant. To use it, point a link at it "
                          f"(ln -s {kept[0].name} {path.parent}/NAME); if you do not need it, remove it "
                          f"(rm -r {names})", UnreferencedVersionWarning, stacklevel=3)
        stage = _artifact(path, _TMP)
        stage.mkdir()
        try:
            yield stage
            old_dir = path.resolve() if path.is_dir() else None
            if old_dir is not None:
                _carry_over(old_dir, stage, owned(old_dir))
            if finalize is not None:
                finalize(stage)
            if old_dir is not None:  # the new folder takes the old one's permission bits, not the umask's
                with contextlib.suppress(OSError):
                    os.chmod(stage, stat.S_IMODE(os.stat(old_dir).st_mode))
            _fsync_tree(stage)
            fsync_dir(path.parent)
            # a first save (nothing, or an empty folder, at ``path``): the folder is renamed into place
            published = _publish_first(path, stage)
        except BaseException:
            _remove(stage)
            raise
        if published:
            fsync_dir(path.parent)
            return
        # ``path`` exists (or appeared meanwhile): a real folder is exchanged with the new one where the system can,
        # a version link (or a real folder where it cannot) is switched to a new version
        if not _exchange_folder(path, stage):
            _switch(path, stage)


def _exchange_folder(path: Path, stage: Path) -> bool:
    """Exchange the complete folder ``stage`` with the real folder at ``path`` in one step, then remove the old one.

    Linux ``renameat2(RENAME_EXCHANGE)`` swaps the two names atomically: a reader of ``path`` finds the old folder,
    then the new one, never a mix, and ``path`` stays a real folder. The old folder is now at the staging name
    ``.{name}.mq-tmp-*``, removed here after the parent folder is fsynced (a save killed before that leaves it, and
    the next save removes it as any staging folder).

    Returns:
        ``True`` when ``stage`` is now ``path``; ``False`` when ``path`` is not a real folder, or the exchange is
        not available or refused (nothing changed; the caller switches a version link instead).
    """
    if path.is_symlink() or not path.is_dir():
        return False
    try:
        exchanged = exchange_paths(stage, path)
    except BaseException:
        _remove(stage)  # the new folder if the exchange did not happen, the old one if it did
        raise
    if not exchanged:
        return False
    fsync_dir(path.parent)
    _remove(stage)  # now the old folder
    return True


def _switch(path: Path, stage: Path) -> None:
    """Publish the complete staging folder as a new version and switch ``path`` to it (a version link, an absent
    path, or a real folder :func:`_exchange_folder` could not exchange: it becomes a version link)."""
    new = _artifact(path, _VERSION)
    link = _artifact(path, _LINK)
    try:
        os.symlink(new.name, link)  # first: a save killed from here on leaves the link, so the next one removes ``new``
    except BaseException:  # no link (symlinks refused, disk full): the new folder is still the staging folder
        link.unlink(missing_ok=True)
        _remove(stage)
        raise
    try:
        os.rename(stage, new)
    except BaseException:  # the link goes, so its folder goes too: ``new`` when the rename happened, else ``stage``
        link.unlink(missing_ok=True)
        _remove(stage)
        _remove(new)
        raise
    fsync_dir(path.parent)
    drop: Path | None = None
    try:
        if is_version_link(path) or not os.path.lexists(path):
            old = path.parent / os.readlink(path) if path.is_symlink() else None
            if old is not None and os.path.lexists(old):  # record it: a save killed after the switch removes it
                drop = _artifact(path, _DROP)
                os.symlink(old.name, drop)
            os.replace(link, path)
            fsync_dir(path.parent)
            if old is not None and os.path.lexists(old) and not _referenced(path.parent, old, skip=path):
                _remove(old)  # only the version this save replaced, and only when no other link points to it
                if os.path.lexists(old):  # the removal failed (a file held open on NFS, a folder not writable):
                    return  # the drop link stays, so the next save removes it (not taken for another's version)
            if drop is not None:
                drop.unlink(missing_ok=True)
            return
        # a real folder the folder exchange was refused for: exchange it with the link in one step where that is
        # allowed, else rename it aside and the link into place
        if exchange_paths(link, path):
            fsync_dir(path.parent)
            _remove(link)  # now the old real folder
            return
        aside = _artifact(path, _OLD)
        try:
            os.rename(path, aside)
            os.replace(link, path)
        except BaseException:  # the save fails: put the folder back (only a killed save leaves ``path`` absent)
            if not os.path.lexists(path) and os.path.lexists(aside):
                with contextlib.suppress(OSError):
                    os.rename(aside, path)
                    fsync_dir(path.parent)
            raise
        fsync_dir(path.parent)
        _remove(aside)
    except BaseException:
        if link.is_symlink() and os.path.lexists(path):  # keep it when path is absent: the next save finishes
            link.unlink(missing_ok=True)
            _remove(new)  # never published
            if drop is not None:
                drop.unlink(missing_ok=True)
        raise
