"""benchmarks.dense_crossover: the crossover rule, the suggested default, one measured row."""
from __future__ import annotations

import pytest
import torch

from benchmarks import dense_crossover as dc
from medquant.kernels import cpu as kcpu


def test_crossover_is_the_first_m_of_the_final_run_where_dense_wins():
    ms = [2, 4, 8, 16, 32]
    assert dc.crossover(ms, [1, 2, 6, 8, 16], [5, 5, 5, 5, 5]) == 8  # dense wins from 8 on
    assert dc.crossover(ms, [1, 2, 6, 4, 16], [5, 5, 5, 5, 5]) == 32  # a kernel win at 16 resets the run
    assert dc.crossover(ms, [1, 2, 4, 8, 16], [9, 9, 9, 9, 20]) is None  # the kernel wins at the largest M
    assert dc.crossover(ms, [9, 9, 9, 9, 9], [1, 1, 1, 1, 1]) == 2  # dense everywhere
    assert dc.crossover(ms, [1, 2, 4, 8, 5], [5, 5, 5, 5, 5]) is None  # a tie is not a dense win
    with pytest.raises(ValueError, match="one entry per M"):
        dc.crossover(ms, [1, 2], [1, 2])
    with pytest.raises(ValueError, match="strictly ascending"):
        dc.crossover([4, 2], [1, 2], [1, 2])


def test_suggest_takes_the_median_rounded_up_to_the_sweep_and_counts_never_as_above_it():
    ms = [8, 16, 32, 64, 128]
    assert dc.suggest([16, 32, 64], ms) == 32
    assert dc.suggest([16, 24], ms) == 32  # median 20 -> next swept M
    assert dc.suggest([16, None, None], ms) is None  # the median row never crossed
    assert dc.suggest([], ms) is None


def test_measure_times_both_paths_on_either_4bit_kernel_and_restores_the_defaults():
    from medquant.kernels.native import native_status

    before = kcpu._dense_min_m
    rows = [dc.measure(64, 256, 4, [1, 2, 8], 1, torch.Generator().manual_seed(0), kind) for kind in ("auto", "aten")]
    assert [r["kernel"] for r in rows] == ["native4" if native_status()["gemv4"] else "int4", "int4"]
    for row in rows:
        assert len(row["kernel_min_ms"]) == len(row["dense_min_ms"]) == 3
        assert all(t > 0 for t in row["kernel_min_ms"] + row["dense_min_ms"])
    assert kcpu._dense_min_m is before is None  # the per-kernel defaults again
    assert kcpu.get_cpu_int4_kernel() == "auto"
    pairs = dc._kernel_pairs(rows)
    assert list(pairs) == ([(4, 64, 256)] if rows[0]["kernel"] == "native4" else [])
    result = {"date": "d", "repeats": 1, "threads": 1, "loadavg_before": [0.0], "loadavg_after": [0.0],
              "ms": [1, 2, 8], "rows": rows, "current_default": {"4": 32}, "suggested": {"W4 int4": None}}
    md = dc.markdown(result)
    assert ("native vs int4" in md) == bool(pairs)


def test_dense_3bit_rows_pair_native3_with_int4():
    from medquant.kernels.native import native_status

    rows = [dc.measure(64, 256, 3, [1, 4], 1, torch.Generator().manual_seed(0), kind) for kind in ("auto", "aten")]
    stream = bool(native_status()["gemv4"] and native_status()["gemv_stream"])
    assert [r["kernel"] for r in rows] == ["native3" if stream else "int4", "int4"]
    assert list(dc._kernel_pairs(rows)) == ([(3, 64, 256)] if stream else [])
    with pytest.raises(SystemExit):
        dc.main(["--bits", "5"])
