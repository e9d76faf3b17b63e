"""The calibration tests run their tiny models with one torch thread: on a shared 2-core machine, two OpenMP
threads competing with other processes made a learned-rounding run ~15x slower (27 s instead of 1.6 s)."""
import pytest
import torch

from medquant.calibrate.gptq import HessianAccumulator


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread):
    """Every test of this folder runs with one torch thread (``one_torch_thread`` in tests/conftest.py)."""


@pytest.fixture
def recorded_hessians(monkeypatch) -> dict[str, torch.Tensor]:
    """The Hessians GPTQ factorises, by layer name (``HessianAccumulator.hessian`` recorded as it returns them; for
    a layer with label groups, the stacked per-group Hessians)."""
    seen: dict[str, torch.Tensor] = {}
    hessian = HessianAccumulator.hessian

    def record(self):
        seen[self.name] = hessian(self)
        return seen[self.name]

    monkeypatch.setattr(HessianAccumulator, "hessian", record)
    return seen
