"""SHA-256 of a file, streamed: a leaf module, so every layer that writes or checks a file's digest (the native
kernels' build cache, saved decoders, checkpoint manifests) uses one helper."""

from __future__ import annotations

import hashlib
import os

__all__ = ["sha256_file"]

#: bytes read at a time
_BLOCK = 1 << 20


def sha256_file(path: str | os.PathLike) -> str:
    """The SHA-256 of a file, read in 1 MiB chunks (the file is never held whole in memory).

    Args:
        path: the file.

    Returns:
        The hex digest (64 lowercase hex digits).
    """
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_BLOCK), b""):
            h.update(chunk)
    return h.hexdigest()
