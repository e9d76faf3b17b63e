"""The checkpoint manifest: the SHA-256 and size of every file of a checkpoint, with its own digest.

``medquant.manifest.json`` (written last into a new checkpoint version, see :mod:`medquant.io.atomic`)::

    {"digest": "<sha256>", "files": {"<name>": {"bytes": <int>, "sha256": "<hex>"}, ...}, "manifest_version": 1}

``files`` lists every regular file of the checkpoint folder except the manifest itself (weights, ``medquant.json``,
``config.json``, tokenizer files, extras; files in sub-folders as ``dir/name``). ``digest`` is the SHA-256 of the
canonical form of the rest, ``json.dumps({"files": ..., "manifest_version": 1}, sort_keys=True,
separators=(",", ":"), ensure_ascii=True)`` in UTF-8, so a flipped bit anywhere in the manifest is found before any
of its numbers is used. The file itself is written with sorted keys, so the same checkpoint gives the same bytes.
It is an integrity check against corruption and accidents, not a signature: whoever can write the folder can write
a matching manifest.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import stat
from pathlib import Path
from typing import Any

from medquant.digest import sha256_file

__all__ = ["MANIFEST_NAME", "MANIFEST_VERSION", "ManifestError", "check_plain_name", "check_relative_name",
           "no_duplicates", "read_manifest", "sha256_file", "verify_files", "write_manifest"]

MANIFEST_NAME = "medquant.manifest.json"
MANIFEST_VERSION = 1
_HEX64 = re.compile(r"[0-9a-f]{64}")
_BAD_CHARS = ("/", "\\", "\x00")


class ManifestError(ValueError):
    """The manifest or a file it lists does not check out (the message names the file and what differs)."""


def no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """``json.loads(object_pairs_hook=...)``: refuse objects with a key given twice (the last one would win).

    Args:
        pairs: the ``(key, value)`` pairs of one JSON object, in order.

    Returns:
        The object as a dict.

    Raises:
        ValueError: a key is given twice.
    """
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"the key {k!r} is given twice")
        out[k] = v
    return out


def check_plain_name(name: Any, what: str) -> str:
    """``name`` must be a plain file name inside the checkpoint folder.

    No separators, not ``.`` / ``..``, not absolute, not empty.

    Args:
        name: the name to check.
        what: what the name is, for the error message.

    Returns:
        ``name``.

    Raises:
        ValueError: ``name`` is not a plain file name.
    """
    if not isinstance(name, str) or not name or name in (".", "..") or any(c in name for c in _BAD_CHARS) \
            or os.path.isabs(name):
        raise ValueError(f"{what} must be a plain file name inside the checkpoint folder (no separators, no '..', "
                         f"not absolute), got {name!r}")
    return name


def check_relative_name(name: Any, what: str) -> str:
    """A ``/``-separated path of plain names (manifest entries of files in sub-folders).

    Args:
        name: the name to check.
        what: what the name is, for the error message.

    Returns:
        ``name``.

    Raises:
        ValueError: ``name`` is empty, not a string, or a part of it is not a plain name.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"{what} must be a relative file name, got {name!r}")
    for part in name.split("/"):
        check_plain_name(part, what)
    return name


def _canonical(body: dict[str, Any]) -> bytes:
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode("utf-8")


def _list_files(root: Path) -> list[str]:
    out = []
    for dirpath, dirs, files in os.walk(root):
        dirs.sort()
        rel = Path(dirpath).relative_to(root)
        for f in sorted(files):
            name = f if rel == Path(".") else (rel / f).as_posix()
            if name == MANIFEST_NAME or os.path.islink(os.path.join(dirpath, f)):
                continue
            out.append(name)
    return sorted(out)


def write_manifest(root: str | os.PathLike) -> dict[str, Any]:
    """Hash every regular file under ``root`` and write ``root/medquant.manifest.json`` (fsynced).

    Args:
        root: the checkpoint folder (symlinks and the manifest itself are not listed).

    Returns:
        The manifest written.
    """
    root = Path(root)
    files = {}
    for name in _list_files(root):
        p = root / name
        files[name] = {"bytes": p.stat().st_size, "sha256": sha256_file(p)}
    body = {"files": files, "manifest_version": MANIFEST_VERSION}
    manifest = dict(body, digest=hashlib.sha256(_canonical(body)).hexdigest())
    with open(root / MANIFEST_NAME, "w", encoding="utf-8") as f:
        f.write(json.dumps(manifest, sort_keys=True, indent=1) + "\n")
        f.flush()
        os.fsync(f.fileno())
    return manifest


def read_manifest(root: str | os.PathLike) -> dict[str, Any] | None:
    """The parsed and self-checked manifest of ``root``, or ``None`` when the folder has none.

    Args:
        root: the checkpoint folder.

    Returns:
        The manifest (its digest, entries and version checked), or ``None``.

    Raises:
        ManifestError: the manifest is not a regular file, not valid JSON, edited (digest mismatch), of an
            unsupported version, or has malformed entries.
    """
    path = Path(root) / MANIFEST_NAME
    if not os.path.lexists(path):
        return None
    if not stat.S_ISREG(os.lstat(path).st_mode):
        raise ManifestError(f"{path} is not a regular file")
    try:
        m = json.loads(path.read_bytes().decode("utf-8"), object_pairs_hook=no_duplicates)
    except (UnicodeDecodeError, ValueError) as e:
        raise ManifestError(f"{path} is corrupted (not valid JSON: {e})") from None
    except RecursionError:
        raise ManifestError(f"{path} is corrupted (not a manifest: JSON nested too deeply to parse)") from None
    if not isinstance(m, dict) or set(m) != {"digest", "files", "manifest_version"}:
        raise ManifestError(f"{path} is corrupted: expected the keys digest, files, manifest_version, got "
                            f"{sorted(m) if isinstance(m, dict) else type(m).__name__}")
    body = {"files": m["files"], "manifest_version": m["manifest_version"]}
    if not isinstance(m["digest"], str) or hashlib.sha256(_canonical(body)).hexdigest() != m["digest"]:
        raise ManifestError(f"{path} is corrupted or was edited: its digest does not match its content")
    if m["manifest_version"] != MANIFEST_VERSION or isinstance(m["manifest_version"], bool):
        raise ManifestError(f"{path}: manifest_version {m['manifest_version']!r} is not supported (this medquant "
                            f"reads version {MANIFEST_VERSION})")
    if not isinstance(m["files"], dict):
        raise ManifestError(f"{path}: 'files' must be an object name -> {{bytes, sha256}}")
    for name, entry in m["files"].items():
        try:
            check_relative_name(name, f"{MANIFEST_NAME} entry")
        except ValueError as err:
            raise ManifestError(str(err)) from None
        if not isinstance(entry, dict) or set(entry) != {"bytes", "sha256"} or isinstance(entry["bytes"], bool) \
                or not isinstance(entry["bytes"], int) or entry["bytes"] < 0 \
                or not isinstance(entry["sha256"], str) or not _HEX64.fullmatch(entry["sha256"]):
            raise ManifestError(f"{path}: files[{name!r}] must be {{\"bytes\": int >= 0, \"sha256\": 64 hex}}, "
                                f"got {entry!r}")
    return m


def verify_files(root: str | os.PathLike, manifest: dict[str, Any], *, follow_symlinks: bool = False) -> None:
    """Check every file the manifest lists: a regular file inside ``root`` of the listed size and SHA-256.

    Args:
        root: the checkpoint folder.
        manifest: the manifest (:func:`read_manifest`).
        follow_symlinks: accept symlinks to regular files (the Hugging Face hub cache holds symlinks to blobs).

    Raises:
        ManifestError: naming the first file that is missing, not a regular file, outside ``root``, or of another
            size or SHA-256.
    """
    root = Path(root)
    real_root = os.path.realpath(root)
    for name, e in manifest["files"].items():
        p = root / name
        if not os.path.lexists(p):
            raise ManifestError(f"{p} is missing (listed in {MANIFEST_NAME})")
        st = os.stat(p) if follow_symlinks else os.lstat(p)
        if not stat.S_ISREG(st.st_mode):
            raise ManifestError(f"{p} is not a regular file (a symlink or folder where {MANIFEST_NAME} lists a file)")
        if not follow_symlinks and os.path.commonpath([real_root, os.path.realpath(p)]) != real_root:
            raise ManifestError(f"{p} lies outside the checkpoint folder")
        if st.st_size != e["bytes"]:
            raise ManifestError(f"{p} is truncated or altered: {st.st_size} bytes on disk, {e['bytes']} bytes were "
                                "saved")
        if sha256_file(p) != e["sha256"]:
            raise ManifestError(f"{p} is corrupted or was modified after saving: SHA-256 mismatch")
