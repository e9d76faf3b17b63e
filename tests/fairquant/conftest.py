"""FairQuant tests run on tiny tensors: one intra-op thread avoids thread start-up and contention costs that
dominate at these sizes on a shared 2-core machine. Restored after each test."""
import pytest


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread):
    """Every test of this folder runs with one torch thread (``one_torch_thread`` in tests/conftest.py)."""
