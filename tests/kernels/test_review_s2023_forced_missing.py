"""A forced backend without a kernel for the op: the error names the backends that have one.

``fake_quantize_rows(x, 4, backend="cpu")`` said only ``backend 'cpu' has no fake_quantize_rows kernel``; the
accepted backends for the op ("auto", "torch", "triton") were not named.
"""
from __future__ import annotations

import pytest
import torch

from medquant.kernels import fake_quantize_rows, fake_quantize_static


def test_forced_backend_without_the_op_names_the_accepted_backends():
    with pytest.raises(RuntimeError) as info:
        fake_quantize_rows(torch.randn(2, 4), 4, backend="cpu")
    msg = str(info.value)
    assert "'cpu' has no fake_quantize_rows kernel" in msg
    assert "'torch'" in msg and "'triton'" in msg and "'auto'" in msg


def test_static_op_too():
    with pytest.raises(RuntimeError) as info:
        fake_quantize_static(torch.randn(2, 4), torch.ones(2, 1), None, 4, True, backend="cpu")
    assert "'torch'" in str(info.value) and "'auto'" in str(info.value)
