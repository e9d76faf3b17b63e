"""Shared helpers of the checkpoint I/O tests."""
from __future__ import annotations

import contextlib
from collections.abc import Iterator
from unittest import mock

from medquant.io import atomic


@contextlib.contextmanager
def without_exchange() -> Iterator[None]:
    """No Linux ``renameat2(RENAME_EXCHANGE)`` inside: a save over a real folder takes the fallback and makes the path
    a version link (as on systems without the call, or as a checkpoint saved twice by an older medquant). With the
    call, a save over a real folder exchanges it with the new folder and the path stays a real folder."""
    with mock.patch.object(atomic, "_EXCHANGE", None):
        yield
