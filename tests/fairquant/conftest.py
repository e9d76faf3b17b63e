"""FairQuant tests run on tiny tensors: one intra-op thread avoids thread start-up and contention costs that
dominate at these sizes on a shared 2-core machine. Restored after each test."""
import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
