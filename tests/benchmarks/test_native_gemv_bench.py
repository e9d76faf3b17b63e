"""benchmarks.native_gemv: one measured row per kernel and the table built from it."""
from __future__ import annotations

import pytest
import torch

from benchmarks import native_gemv as ng
from medquant.kernels import get_cpu_int4_kernel
from medquant.kernels.native import native_status
from tests.kernels.kernel_helpers import native_int16


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_measure_times_each_kernel_warm_and_cold_and_restores_the_setting(dtype):
    """One row: each kernel and the ``F.linear`` control timed warm and cold at each M, in the activations' dtype
    (``--float32``: float32); the table's control column is the control's time over native4's."""
    flush = torch.zeros(1 << 16, dtype=torch.uint8)
    row = ng.measure(64, 256, 2, torch.Generator().manual_seed(0), flush, dtype)
    want = ["int4", "linear", "native4"] if native_status()["gemv4"] else ["int4", "linear"]
    assert row["kernels"] == want
    assert row["codes_bytes"] == 64 * 256 // 2
    for kind in want:
        for mode in ("warm", "cold"):
            for m in ng.MS:
                assert row[f"{kind}_{mode}_m{m}_us"] > 0
    assert get_cpu_int4_kernel() == "auto"
    result = {"date": "d", "threads": 1, "repeats": 2, "loadavg_before": [0.0], "loadavg_after": [0.0],
              "bandwidth_gbs": 10.0, "rows": [row], "x_dtype": str(dtype).removeprefix("torch.")}
    md = ng.markdown(result)
    lines = [ln for ln in md.splitlines() if ln.startswith("| 64x256 |")]
    assert len(lines) == (len(ng.MS) if len(want) == 3 else 0)
    if lines:  # the limit column: 8192 bytes at 10 GB/s = 0.8 us, printed rounded
        assert lines[0].rstrip().endswith("| 1 |")
        cells = [c.strip() for c in lines[0].strip("|").split("|")]
        # shape, M, then per warm / cold: native4, int4, ratio, linear, linear / native4
        assert cells[6] == f"{row['linear_warm_m1_us'] / row['native4_warm_m1_us']:.2f}"
        assert ("dense path" in md) == (dtype == torch.float32)


def test_measure_activations_times_int16_against_split_and_restores_the_setting():
    """The ``--activations`` row: one W4 layer ending in a block of 32 columns (608 = 4 units + 64 + 32), both
    prepared matmuls timed at each ``M``; the two outputs differ exactly where the library has the int16 form
    (vpdpwssd, or the AVX2 form's vpmaddwd), and the activations setting is back to its default."""
    from medquant.kernels import get_cpu_compute_dtype, get_cpu_native4_activations, set_cpu_compute_dtype

    before = get_cpu_compute_dtype()  # the suite's (float32, from $MEDQUANT_CPU_COMPUTE_DTYPE), not the default
    set_cpu_compute_dtype("bfloat16")
    try:
        row = ng.measure_activations(64, 600, 32, 2, torch.Generator().manual_seed(0))
    finally:
        set_cpu_compute_dtype(before)
    assert row["k_pad"] == 608 and row["group"] == 32
    assert get_cpu_native4_activations() == "int16"
    native = native_status()["gemv4"]
    assert row["int16_path"] == row["split_path"] == ("native4" if native else "int4")
    assert row["differs"] == (native and native_int16())  # the int16 form: vpdpwssd or the AVX2 form
    for m in ng.ACT_MS:
        assert row[f"int16_m{m}_us"] > 0 and row[f"split_m{m}_us"] > 0
    result = {"date": "d", "threads": 1, "repeats": 2, "loadavg_before": [0.0], "loadavg_after": [0.0],
              "rows": [{**row, "before": False}]}
    lines = [ln for ln in ng.markdown_activations(result).splitlines() if ln.startswith("| 64x600 g32 | 608 | no |")]
    assert len(lines) == len(ng.ACT_MS)
    r = row["int16_m1_us"] / row["split_m1_us"]
    assert lines[0].rstrip().endswith(f"| {r:.2f} |")


def test_measure_compute_pairs_the_compute_dtypes_and_restores_the_setting():
    """The ``--compute`` row: float32 compute runs native4 on ``x`` itself at small ``M`` and the dense path at 256
    rows; bfloat16 compute the integer forms (native4 with 16-bit x, the gemm at 256) where the library has them;
    the compute dtype the suite had is back afterwards."""
    from medquant.kernels import get_cpu_compute_dtype

    before = get_cpu_compute_dtype()
    row = ng.measure_compute(64, 256, 2, torch.Generator().manual_seed(0))
    assert get_cpu_compute_dtype() == before
    native, gemm = native_status()["gemv4"], native_status()["gemm"]
    if native:
        assert row["float32_path_m1"] == row["bfloat16_path_m1"] == "native4"
        assert row["float32_path_m256"] == "dense"
        assert row["bfloat16_path_m256"] == ("gemm" if gemm else "dense")
        assert row["differs"] == native_int16()  # 16-bit x against x itself
    for m in ng.COMPUTE_MS:
        assert row[f"float32_m{m}_us"] > 0 and row[f"bfloat16_m{m}_us"] > 0
    result = {"date": "d", "threads": 1, "repeats": 2, "loadavg_before": [0.0], "loadavg_after": [0.0],
              "rows": [row]}
    lines = [ln for ln in ng.markdown_compute(result).splitlines() if ln.startswith("| 64x256 |")]
    assert len(lines) == len(ng.COMPUTE_MS)
    r = row["float32_m256_us"] / row["bfloat16_m256_us"]
    assert lines[-1].rstrip().endswith(f"| {r:.2f} |")


def test_measure_int8_pairs_the_activations_and_restores_the_setting():
    """The ``--int8`` row: int8 against int16 activations on one W4 g128 layer (bfloat16 compute), both on native4
    at each ``M``; the outputs differ exactly where the library has the int8 form (the AVX2 form), the setting is
    back to its default, and the table's ratio and limit come from the row."""
    from medquant.kernels import get_cpu_compute_dtype, get_cpu_native4_activations, set_cpu_compute_dtype

    before = get_cpu_compute_dtype()
    set_cpu_compute_dtype("bfloat16")
    try:
        row = ng.measure_int8(64, 256, 2, torch.Generator().manual_seed(0))
    finally:
        set_cpu_compute_dtype(before)
    assert get_cpu_native4_activations() == "int16"
    st = native_status()
    if st["gemv4"]:
        assert row["int8_path_m1"] == row["int16_path_m1"] == "native4"
    assert row["differs"] == bool(st["gemv4"] and st["gemv_avx2"])
    for m in ng.INT8_MS:
        assert row[f"int8_m{m}_us"] > 0 and row[f"int16_m{m}_us"] > 0
    result = {"date": "d", "threads": 1, "repeats": 2, "loadavg_before": [0.0], "loadavg_after": [0.0],
              "bandwidth_gbs": 10.0, "rows": [row]}
    lines = [ln for ln in ng.markdown_int8(result).splitlines() if ln.startswith("| 64x256 |")]
    assert len(lines) == len(ng.INT8_MS)
    r = row["int8_m8_us"] / row["int16_m8_us"]
    limit = 64 * 256 // 2 / 10e9 * 1e6
    assert lines[-1].rstrip().endswith(f"| {r:.2f} | {limit:.0f} |")
