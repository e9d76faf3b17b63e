"""``python -m benchmarks.complexity_adaptive``: the learned policy's control spends the policy's own bits.

The ``random`` control carries the *adaptive* histogram; the policy's budget is only a ceiling, and it lands far
below it (committed Kermany run: 3.4 average bits against random's 10.5), so ``policy - random`` compares two
bit budgets, not two assignments. The control that could prove the policy useless is its own per-sample bits
permuted at random over the test samples."""
from __future__ import annotations

import json

import pytest
import torch

from benchmarks.complexity_adaptive import main
from tests.benchmarks.test_complexity_adaptive import toy_npz


def test_policy_has_a_same_bits_random_control(tmp_path):
    path = toy_npz(tmp_path)
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
