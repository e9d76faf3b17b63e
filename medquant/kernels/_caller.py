"""The ``stacklevel`` that makes a warning name the user's line: the first frame outside medquant and torch.

A fixed ``stacklevel`` names the right frame from one call path only: the kernels warn from different depths
(a module call goes through ``torch.nn.Module.__call__``, the dispatch and the backend; the environment variables
are read while ``cpu.py`` is imported by medquant's own ``__init__``). ``warnings.warn(..., skip_file_prefixes=)``
does this from Python 3.12 on; this walk works on 3.10 and 3.11 too.
"""
from __future__ import annotations

import os
import sys

import torch

#: frames in these folders are skipped: medquant's own and torch's (``Module.__call__``, autograd, compile wrappers)
SKIPPED_PREFIXES = (os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep,
                    os.path.dirname(os.path.abspath(torch.__file__)) + os.sep)


def _import_machinery(filename: str) -> bool:
    """The frames ``warnings.warn`` itself steps over without counting (``<frozen importlib._bootstrap...>``)."""
    return "importlib" in filename and "_bootstrap" in filename


def user_stacklevel() -> int:
    """The ``stacklevel`` for a ``warnings.warn`` made by the caller of this function (that very frame) so that the
    warning names the first frame outside :data:`SKIPPED_PREFIXES`.

    Counted as ``warnings.warn`` counts: 1 is the caller, each step outwards adds 1, import-machinery frames are
    stepped over without counting. When every frame is skipped, the outermost one.

    Returns:
        The level, ``>= 1``.
    """
    frame = sys._getframe(1)
    level = 1
    while frame.f_code.co_filename.startswith(SKIPPED_PREFIXES):
        outer = frame.f_back
        while outer is not None and _import_machinery(outer.f_code.co_filename):
            outer = outer.f_back
        if outer is None:
            break
        frame, level = outer, level + 1
    return level
