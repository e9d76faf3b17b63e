"""``benchmarks.common.args``: the shapes flag the kernel benchmarks share."""
from __future__ import annotations

import pytest

from benchmarks.common.args import shapes


def test_shapes_parses_nxk_lists_and_names_a_bad_value():
    default = [(3, 4)]
    assert shapes(None, default) is default and shapes("", default) is default
    assert shapes("2048x2048,5632X2048", default) == [(2048, 2048), (5632, 2048)]
    for bad in ("2048", "2048x", "axb", "0x16", "16x16,", "1x2x3"):
        with pytest.raises(SystemExit, match=f"--layers {bad!r}: expected a comma list of NxK"):
            shapes(bad, default, flag="--layers")
