"""Where the data sets are: an explicit argument, else ``$MEDQUANT_DATA_DIR``; never a guess next to the package."""
from __future__ import annotations

import os
from pathlib import Path

__all__ = ["DataDirNotSet", "default_data_dir"]


class DataDirNotSet(FileNotFoundError):
    """Neither a ``data_dir`` argument nor ``$MEDQUANT_DATA_DIR`` says where the data sets are."""


def default_data_dir(data_dir: str | os.PathLike | None = None) -> Path:
    """The data directory: ``data_dir`` if given, else ``$MEDQUANT_DATA_DIR``.

    Raises:
        DataDirNotSet: neither is given (the message names both).

    Args:
        data_dir: an explicit folder, or None.

    Returns:
        The folder as a ``Path``.
    """
    if data_dir is not None:
        return Path(data_dir).expanduser()
    env = os.environ.get("MEDQUANT_DATA_DIR")
    if env:
        return Path(env).expanduser()
    raise DataDirNotSet("no data directory: pass data_dir=... (the command line's --data-dir) or set the "
                        "environment variable MEDQUANT_DATA_DIR to the folder that holds the data sets")
