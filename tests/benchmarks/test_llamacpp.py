"""benchmarks.llamacpp: the speed comparison's bookkeeping (per-round ratios, medians, the table)."""
from __future__ import annotations

import pytest

from benchmarks import llamacpp as lc


def _runs() -> dict:
    return {"W4 g32 sym": {
        "llamacpp": [{"decode_tokens_per_s": 100.0, "prefill_tokens_per_s": 500.0},
                     {"decode_tokens_per_s": 200.0, "prefill_tokens_per_s": 700.0}],
        "medquant": [{"decode_tokens_per_s": 40.0, "prefill_tokens_per_s": 300.0},
                     {"decode_tokens_per_s": 100.0, "prefill_tokens_per_s": 400.0}],
        "medquant_compiled": [{"decode_tokens_per_s": 50.0}, {"decode_tokens_per_s": 120.0}]}}


def test_speed_rows_pair_each_round_with_llamacpps_own_round():
    (row,) = lc.speed_rows(_runs(), ("medquant", "medquant_compiled"))
    assert row["llamacpp_decode_tokens_per_s"] == pytest.approx(150.0)
    assert row["medquant_prefill_tokens_per_s"] == pytest.approx(350.0)
    # rounds 0.4 and 0.5: median 0.45, not the ratio of medians (70 / 150 = 0.467)
    assert row["medquant_over_llamacpp_decode"] == pytest.approx(0.45)
    assert row["medquant_compiled_over_llamacpp_decode"] == pytest.approx(0.55)  # 0.5 and 0.6
    assert "medquant_compiled_prefill_tokens_per_s" not in row  # the compiled side times decode only


def test_speed_table_has_a_column_pair_per_medquant_side():
    sides = ["medquant", "medquant_compiled"]
    result = {"threads": 2, "prompt_tokens": 128, "repeats": 2, "medquant_path": "default", "sides": sides,
              "medquant_compiled_path": "static_decode_", "variants": lc.speed_rows(_runs(), tuple(sides))}
    lines = lc.speed_table(result).splitlines()
    header, rule, row = lines[2], lines[3], lines[4]
    assert "medquant compiled step decode tok/s" in header and "per-round ratio" in lines[0]
    assert header.count("|") == rule.count("|") == row.count("|")
    assert "| 85.0 | 0.55x |" in row and "| 70.0 | 0.45x |" in row
    old = dict(result, sides=None)  # a result written before the compiled side existed: one medquant column
    del old["sides"], old["medquant_compiled_path"]
    assert "compiled" not in lc.speed_table(old)
