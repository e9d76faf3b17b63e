"""The calibration tests run their tiny models with one torch thread: on a shared 2-core machine, two OpenMP
threads competing with other processes made a learned-rounding run ~15x slower (27 s instead of 1.6 s)."""
import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
