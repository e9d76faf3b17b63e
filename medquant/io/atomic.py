"""Replace a checkpoint folder as one unit: versioned sibling folders behind a symlink, swapped atomically.

The mechanism (POSIX; Linux for the one-time conversion of a real folder):

* the user's path ``P`` is a **symlink to a sibling folder** ``.{name}.mq-v-{16 hex}`` in the same parent folder
  (relative target, so the parent can be moved). To every reader that opens ``P/config.json``,
  ``P/model.safetensors``... by name (transformers, vLLM, llama.cpp, ``ls``) ``P`` is a plain folder;
* a save writes a **complete new version** into a fresh ``.{name}.mq-v-*`` folder (every file fsynced, then the
  folder), then creates a temporary symlink ``.{name}.mq-link-*`` to it and **renames it over** ``P``
  (``os.replace``: atomic, so ``P`` names the old version or the new one, never a mix); the parent folder is fsynced
  and the old version is removed after the switch;
* a **real folder** already at ``P`` (a checkpoint written before this scheme, an empty folder) is exchanged with the
  temporary symlink in one step by Linux ``renameat2(RENAME_EXCHANGE)``; where that call is missing or refused (other
  systems, some file systems) it is renamed aside to ``.{name}.mq-old-*`` and the symlink renamed into place (a
  crash between the two renames leaves ``P`` absent for a moment, never mixed; the next save finishes the switch);
* a symlink at ``P`` that is not such a version link (the user's own link to a folder elsewhere) is followed: the
  scheme runs at its target;
* files in the old version that the new save does not own (:func:`replace_directory`'s ``owned``: a tokenizer, a
  README written into the folder after an earlier save) are carried into the new version (hard links, copies across
  devices);
* saves to one path are serialised by an exclusive ``fcntl.flock`` on ``.{name}.mq-lock`` next to it, held for the
  whole save: the last writer wins and no two saves interleave. Orphans of killed saves (``.{name}.mq-v-*`` folders
  that ``P`` does not point to, ``.{name}.mq-link-*``, ``.{name}.mq-old-*``) are removed by the next save under the
  lock.

:func:`resolve` gives the folder a reader should read from: the version folder ``P`` points to at that moment
(medquant's loaders resolve it once and read every file there, so a save that switches ``P`` meanwhile cannot give
them a mix; the old version disappears after the switch, which they report and retry). To copy a checkpoint use
``cp -rL`` (``cp -r`` copies the symlink itself).
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
from collections.abc import Callable, Iterator
from pathlib import Path

try:  # POSIX
    import fcntl
except ImportError:  # pragma: no cover - Windows: saves are not serialised
    fcntl = None  # type: ignore[assignment]

__all__ = ["exchange_paths", "fsync_dir", "fsync_file", "is_version_link", "pending", "replace_directory", "resolve"]

_VERSION, _LINK, _OLD = "v", "link", "old"


def _artifact_re(name: str) -> re.Pattern[str]:
    return re.compile(r"\." + re.escape(name) + r"\.mq-(v|link|old)-[0-9a-f]{16}")


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


def is_version_link(path: Path) -> bool:
    """Whether ``path`` is a symlink made by this scheme: its target is a ``.{name}.mq-v-*`` sibling.

    Args:
        path: the path to test.

    Returns:
        ``True`` for such a version link.
    """
    if not path.is_symlink():
        return False
    target = os.readlink(path)
    m = _artifact_re(path.name).fullmatch(target)
    return m is not None and m.group(1) == _VERSION


def resolve(path: str | os.PathLike) -> Path:
    """The real folder a reader of ``path`` should read from.

    That is the current version folder for a version link, or the :func:`pending` version while an interrupted
    switch is unfinished.

    Args:
        path: the checkpoint path.

    Returns:
        The folder to read.
    """
    return pending(path) or Path(os.path.realpath(path))


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


def _remove(p: Path) -> None:
    try:
        if p.is_symlink() or not p.is_dir():
            p.unlink(missing_ok=True)
        else:
            shutil.rmtree(p, ignore_errors=True)
    except OSError:  # pragma: no cover - best effort
        pass


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    if fcntl is None:  # pragma: no cover
        yield
        return
    fd = os.open(lock_path(path), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _cleanup(path: Path) -> None:
    """Finish an interrupted fallback switch, then remove every orphan of earlier saves (under the lock)."""
    pattern = _artifact_re(path.name)
    entries = sorted(e for e in os.listdir(path.parent) if pattern.fullmatch(e))
    if not os.path.lexists(path):  # killed between the two renames of the fallback: finish the switch
        for e in entries:
            p = path.parent / e
            m = pattern.fullmatch(e)
            if m is not None and m.group(1) == _LINK and p.is_symlink() and p.exists():
                os.replace(p, path)
                fsync_dir(path.parent)
                break
    current = os.readlink(path) if is_version_link(path) else None
    for e in entries:
        if e != current and os.path.lexists(path.parent / e):
            _remove(path.parent / e)


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
    """Follow a user's own symlinks at ``path`` (not version links) to the path the scheme works on."""
    seen = 0
    while path.is_symlink() and not is_version_link(path):
        seen += 1
        if seen > 40:
            raise OSError(errno.ELOOP, "too many levels of symbolic links", str(path))
        path = (path.parent / os.readlink(path))
        path = Path(os.path.normpath(path))
    return path


@contextlib.contextmanager
def replace_directory(path: str | os.PathLike, *, owned: Callable[[str], bool] = lambda name: False,
                      finalize: Callable[[Path], None] | None = None) -> Iterator[Path]:
    """Context manager: yields an empty new version folder and switches ``path`` to it when the block succeeds.

    When the block ends without an exception, the files in the old version that ``owned(name)`` does not claim are
    carried over, ``finalize(folder)`` runs (it writes the manifest), everything is fsynced and ``path`` is switched
    to the new version atomically (see the module docstring). On an exception the new version is removed and
    ``path`` is untouched. Concurrent calls on one path are serialised by a lock file.

    Args:
        path: the checkpoint path.
        owned: which file names of the old version the new one replaces (the rest are carried over).
        finalize: called with the new folder before the switch.

    Yields:
        The new, empty version folder.

    Raises:
        NotADirectoryError: ``path`` exists and is not a folder.
    """
    path = _target(Path(os.path.abspath(path)))
    if os.path.lexists(path) and not path.is_dir():
        raise NotADirectoryError(f"{path} exists and is not a folder; a checkpoint is saved as a folder")
    path.parent.mkdir(parents=True, exist_ok=True)
    with _locked(path):
        _cleanup(path)
        new = _artifact(path, _VERSION)
        new.mkdir()
        try:
            yield new
            old_dir = path.resolve() if path.is_dir() else None
            if old_dir is not None:
                _carry_over(old_dir, new, owned)
            if finalize is not None:
                finalize(new)
            _fsync_tree(new)
            fsync_dir(path.parent)
        except BaseException:
            _remove(new)
            raise
        _switch(path, new)


def _switch(path: Path, new: Path) -> None:
    link = _artifact(path, _LINK)
    os.symlink(new.name, link)
    try:
        if is_version_link(path) or not os.path.lexists(path):
            old = path.parent / os.readlink(path) if path.is_symlink() else None
            os.replace(link, path)
            fsync_dir(path.parent)
            if old is not None:
                _remove(old)
            return
        # a real folder: exchange it with the link in one step, else rename it aside and the link into place
        if exchange_paths(link, path):
            fsync_dir(path.parent)
            _remove(link)  # now the old real folder
            return
        aside = _artifact(path, _OLD)
        os.rename(path, aside)
        os.replace(link, path)
        fsync_dir(path.parent)
        _remove(aside)
    except BaseException:
        if link.is_symlink() and os.path.lexists(path):  # keep it when path is absent: the next save finishes
            link.unlink(missing_ok=True)
        raise
