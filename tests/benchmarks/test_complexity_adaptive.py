"""``python -m benchmarks.complexity_adaptive`` end to end on a tiny data set, the --quick settings, bad input."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from benchmarks.complexity_adaptive import QUICK, build_parser, main


def toy_npz(tmp_path):
    """A tiny MedMNIST-style file (16 px, train 32 / val 16 / test 16, a learnable bright square), ``toy.npz``."""
    rng = np.random.default_rng(0)

    def split(n):
        y = rng.integers(0, 2, size=(n, 1)).astype(np.uint8)
        x = rng.integers(0, 60, size=(n, 16, 16)).astype(np.uint8)
        x[y[:, 0] == 1, 4:12, 4:12] += 150  # a learnable bright square
        return x, y

    arrays = {}
    for name, n in (("train", 32), ("val", 16), ("test", 16)):
        arrays[f"{name}_images"], arrays[f"{name}_labels"] = split(n)
    path = tmp_path / "toy.npz"
    np.savez(path, **arrays)
    return path


def test_end_to_end_on_a_tiny_npz(tmp_path, capsys):
    """On a tiny MedMNIST-style file: trains, evaluates every method, writes JSON + PNG."""
    path = toy_npz(tmp_path)
    out = tmp_path / "res.json"
    threads = torch.get_num_threads()
    try:  # --threads sets torch's global thread count: restore it for the rest of the session
        rc = main(["--datasets", str(path), "--seeds", "0", "--epochs", "1", "--random-draws", "2",
                   "--overhead-repeats", "2", "--threads", "1", "--out", str(out)])
    finally:
        torch.set_num_threads(threads)
    assert rc == 0
    res = json.loads(out.read_text())
    methods = {(r["sites"], r["method"]) for r in res["aggregate"]}
    for s in ("head", "blocks"):
        for m in ("fp32", "w8", "uniform-2", "uniform-4", "uniform-8", "adaptive", "random", "reversed", "policy",
                  "oracle"):
            assert (s, m) in methods
    adaptive = next(r for r in res["aggregate"] if r["method"] == "adaptive" and r["sites"] == "head")
    random = next(r for r in res["aggregate"] if r["method"] == "random" and r["sites"] == "head")
    assert adaptive["avg_bits"] == pytest.approx(random["avg_bits"])  # the control spends the same bits
    assert adaptive["n_seeds"] == 1 and len(res["overhead"]) == 4
    assert out.with_suffix(".png").stat().st_size > 1000
    assert "| dataset | sites | method |" in capsys.readouterr().out


def test_bad_dataset_fails_before_training(tmp_path):
    with pytest.raises(SystemExit, match="no_such_set.*not found"):
        main(["--datasets", str(tmp_path / "no_such_set.npz"), "--data-dir", str(tmp_path)])


def test_quick_is_the_reduced_run():
    args = build_parser().parse_args(["--quick"])
    assert args.quick and QUICK == {"datasets": ["nih"], "seeds": [0], "epochs": 1, "random_draws": 1, "threads": 1}
