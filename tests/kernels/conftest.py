"""Kernel tests run the real Triton kernels on CPU through the Triton interpreter.

``TRITON_INTERPRET`` must be set before Triton is first imported. ``tests/conftest.py`` sets it (other packages,
e.g. compressed-tensors, import Triton while their test modules are collected); it is set here too for runs of
this folder alone. If something imported Triton before either, the ``kernel_device`` fixture fails loudly.
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch


@pytest.fixture(scope="session")
def kernel_device() -> str:
    """Device on which the Triton kernels run: CUDA if present and not interpreting, else CPU (interpreter)."""
    pytest.importorskip("triton")
    from medquant.kernels import interpreting, triton_available

    if interpreting():
        return "cpu"
    if torch.cuda.is_available() and triton_available("cuda"):
        return "cuda"
    pytest.fail("TRITON_INTERPRET=1 was not honoured (triton was imported before tests/kernels/conftest.py?) "
                "and there is no CUDA device: the Triton kernels cannot run")


@pytest.fixture
def cpu_settings():
    """The CPU backend's plans cleared before the test, and after it the suite's settings back (float32 compute,
    as ``tests/conftest.py`` sets; default dense threshold, 4-bit kernel and native4 activations) with the plans cleared again."""
    from medquant.kernels import (
        clear_cpu_cache,
        set_cpu_compute_dtype,
        set_cpu_dense_min_m,
        set_cpu_int4_kernel,
        set_cpu_native4_activations,
        set_cpu_prefill_kernel,
    )

    clear_cpu_cache()
    yield
    set_cpu_compute_dtype("float32")
    set_cpu_dense_min_m(None)
    set_cpu_int4_kernel(None)
    set_cpu_native4_activations(None)
    set_cpu_prefill_kernel(None)
    clear_cpu_cache()
