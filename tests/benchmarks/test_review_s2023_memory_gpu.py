"""``benchmarks.common.memory.measure_training`` on a (simulated) GPU: ``train_overhead_mb`` is the peak above the
model as loaded, as on the CPU, not the whole peak.

No GPU here: torch.cuda's memory counters are replaced by fixed values and ``Module.to`` keeps the model on the CPU,
so only the accounting is exercised (the training itself runs on the CPU)."""
from __future__ import annotations

import torch
from torch import nn

from benchmarks.common import memory
from medquant.testing.zoo import ZOO_BY_NAME

MIB = 2**20


def test_gpu_overhead_is_peak_minus_the_loaded_model(monkeypatch):
    loaded_mb, peak_mb = 100.0, 300.0  # allocated once the model is on the GPU; the training's peak
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a, **k: None)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda *a, **k: None)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda *a, **k: int(loaded_mb * MIB))
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda *a, **k: int(peak_mb * MIB))
    entry = ZOO_BY_NAME["llama"]
    ids = entry.inputs(entry.build())["input_ids"]
    batch = {"input_ids": ids, "labels": ids.clone()}
    real_to = nn.Module.to

    def to(self, *args, **kwargs):  # "cuda" stays on the CPU; everything else as torch does it
        if args and str(args[0]).startswith("cuda"):
            return self
        return real_to(self, *args, **kwargs)

    monkeypatch.setattr(nn.Module, "to", to)
    rep, _ = memory.measure_training(entry.build, "full", [batch], steps=1, lr=1e-3, device="cuda",
                                     progress=False)
    assert rep.device == "cuda"
    assert rep.train_peak_mb == peak_mb  # max allocated, which starts from zero on the GPU
    # "the peak above the float model just after loading" (module doc): 300 MB peak - 100 MB model
    assert rep.train_overhead_mb == peak_mb - loaded_mb
