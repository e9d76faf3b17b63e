"""``python -m benchmarks.complexity_adaptive``: the learned policy's control spends the policy's own bits.

The ``random`` control carries the *adaptive* histogram; the policy's budget is only a ceiling, and it lands far
below it (committed Kermany run: 3.4 average bits against random's 10.5), so ``policy - random`` compares two
bit budgets, not two assignments. The control that could prove the policy useless is its own per-sample bits
permuted at random over the test samples."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from benchmarks.complexity_adaptive import main


def test_policy_has_a_same_bits_random_control(tmp_path):
    rng = np.random.default_rng(0)

    def split(n):
        y = rng.integers(0, 2, size=(n, 1)).astype(np.uint8)
        x = rng.integers(0, 60, size=(n, 16, 16)).astype(np.uint8)
        x[y[:, 0] == 1, 4:12, 4:12] += 150
        return x, y

    arrays = {}
    for name, n in (("train", 32), ("val", 16), ("test", 16)):
        arrays[f"{name}_images"], arrays[f"{name}_labels"] = split(n)
    path = tmp_path / "toy.npz"
    np.savez(path, **arrays)
    out = tmp_path / "res.json"
    threads = torch.get_num_threads()
    try:
        assert main(["--datasets", str(path), "--seeds", "0", "--epochs", "1", "--random-draws", "2",
                     "--overhead-repeats", "1", "--threads", "1", "--sites", "head", "--out", str(out),
                     "--png", "none"]) == 0
    finally:
        torch.set_num_threads(threads)
    res = json.loads(out.read_text())
    rows = {r["method"]: r for r in res["rows"]}
    assert "policy-random" in rows
    ctrl, policy = rows["policy-random"], rows["policy"]
    assert ctrl["avg_bits"] == pytest.approx(policy["avg_bits"])  # the policy's own bits, not adaptive's
    assert len(ctrl["draws"]) == 2
    pairs = {(p["a"], p["b"]) for p in res["paired"]}
    assert ("policy", "policy-random") in pairs
