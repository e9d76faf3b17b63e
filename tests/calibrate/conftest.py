"""The calibration tests run their tiny models with one torch thread: on a shared 2-core machine, two OpenMP
threads competing with other processes made a learned-rounding run ~15x slower (27 s instead of 1.6 s)."""
import pytest


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread):
    """Every test of this folder runs with one torch thread (``one_torch_thread`` in tests/conftest.py)."""
