"""Shared checks of the transformers-integration tests."""
from __future__ import annotations

import torch


def state_equal(a, b) -> None:
    """Assert that two models hold the same state: the same keys, and per key the same dtype and values."""
    sa, sb = a.state_dict(), b.state_dict()
    assert set(sa) == set(sb)
    for k in sa:
        assert sa[k].dtype == sb[k].dtype, k
        assert torch.equal(sa[k], sb[k]), k
