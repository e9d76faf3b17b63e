"""benchmarks.int4_kernel_decode_ab: paired rounds on both 4-bit kernels, the setting restored, the table."""
from __future__ import annotations

import torch

from benchmarks import int4_kernel_decode_ab as ab
from benchmarks.cpu_inference import _make
from medquant.kernels import cpu_path, get_cpu_int4_kernel
from medquant.kernels.native import native_status
from medquant.quant import QuantLinear


def test_pair_alternates_the_kernels_and_restores_the_default():
    model, _ = _make("llama_small", "W4g128", True)
    ids = torch.randint(100, 1000, (1, 8), generator=torch.Generator().manual_seed(0))
    row = ab.pair(model, ids, rounds=2, steps=2)
    assert row["labels"] == ["native", "aten"]
    assert len(row["native_tok_s"]) == len(row["aten_tok_s"]) == len(row["ratios"]) == 2
    assert all(t > 0 for t in row["native_tok_s"] + row["aten_tok_s"])
    assert row["ratios"] == [a / b for a, b in zip(row["native_tok_s"], row["aten_tok_s"])]
    assert get_cpu_int4_kernel() == "auto"
    q = next(m for m in model.modules() if isinstance(m, QuantLinear))
    want = "native4" if native_status()["gemv4"] else "int4"
    assert cpu_path(torch.randn(1, q.in_features), q.packed_weight(4)) == want
    result = {"date": "d", "rounds": 2, "steps": 2, "threads": 1, "loadavg_before": [0.0], "loadavg_after": [0.0],
              "rows": [{"model": "llama_small", "variant": "W4g128", **row}]}
    assert "| llama_small | W4g128 |" in ab.markdown(result)


def test_pair_of_native4_activation_modes_restores_the_default():
    from medquant.kernels import get_cpu_native4_activations

    model, _ = _make("llama_small", "W4g128", True)
    ids = torch.randint(100, 1000, (1, 8), generator=torch.Generator().manual_seed(0))
    row = ab.pair(model, ids, rounds=2, steps=2, ab="activations")
    assert row["labels"] == ["split", "round"]
    assert row["ratios"] == [a / b for a, b in zip(row["split_tok_s"], row["round_tok_s"])]
    assert get_cpu_native4_activations() == "int16"
    row16 = ab.pair(model, ids, rounds=2, steps=2, ab="int16")
    assert row16["labels"] == ["int16", "split"] and len(row16["int16_tok_s"]) == 2
    assert get_cpu_native4_activations() == "int16"
    result = {"date": "d", "rounds": 2, "steps": 2, "threads": 1, "loadavg_before": [0.0], "loadavg_after": [0.0],
              "rows": [{"model": "llama_small", "variant": "W4g128", **row}]}
    assert "split tok/s (median)" in ab.markdown(result)
