"""Prefill on CPU, one layer at a time: the dense path's dequantization, native kernel against eager torch.

At large ``M`` (prefill) a quantized layer on CPU dequantizes its codes to the compute dtype (bfloat16) and runs
``F.linear`` (the *dense* path of ``medquant.kernels.cpu``). This measures, per layer shape at ``M`` = 256
activation rows, bfloat16 compute, random weights (speed only):

* ``eager dq`` - the eager torch dequantization (``dequantize_eager``: unpack, cast, subtract, multiply);
* ``native dq`` - ``dequantize_fast``: the native one-pass kernel (``medquant.kernels.native``, bit-identical
  to the eager code; the eager code itself where the kernel is unavailable, as the printed note then says);
* ``bf16 GEMM`` - ``F.linear`` on the float weight in bfloat16 (the baseline: an unquantized bfloat16 layer);
* ``dense`` / ``dense eager`` - the whole quantized layer call (``QuantLinear`` forward on bfloat16 input, the
  dense path) with the native kernel, and with it disabled (``MEDQUANT_NATIVE=0``: the control, what ran before).

Ratios are speeds against the bf16 GEMM measured in the same run (``bf16 / dense``; the prefill target is
>= 0.8), from the minima of wall time and from the medians of process CPU time (threads summed; not inflated
while other processes hold the cores); the JSON keeps medians of wall time too. Shapes (N x K): SmolLM2-135M's 576x576, 192x576, 1536x576, 576x1536 and a 1.1B LLaMA-style model's
2048x2048, 256x2048, 5632x2048, 2048x5632. Variants are timed interleaved, ``--repeats`` times each; the table
gives minima (the JSON medians too) because the machine may be shared: the load averages are recorded
before and after.

Run: ``python -m benchmarks.prefill_dequant [--quick] [--bits 4,3] [--repeats 9]``; prints a table and writes
``benchmarks/results/prefill_dequant.json`` and ``.png`` (``prefill_dequant_quick.*`` with ``--quick``).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.common.env import hardware, versions
from medquant.kernels import clear_cpu_cache, cpu_path, set_cpu_compute_dtype
from medquant.kernels.cpu import dequantize_eager, dequantize_fast
from medquant.kernels.native import ENV_NATIVE, native_status
from medquant.quant import QuantConfig, QuantLinear

RESULTS = Path(__file__).resolve().parent / "results"
SEED = 0
M = 256
SHAPES = {"smollm2": [(576, 576), (192, 576), (1536, 576), (576, 1536)],
          "llama1b": [(2048, 2048), (256, 2048), (5632, 2048), (2048, 5632)]}
TARGET = 0.8


def _set_native(on: bool) -> None:
    if on:
        os.environ.pop(ENV_NATIVE, None)
    else:
        os.environ[ENV_NATIVE] = "0"


def measure(n: int, k: int, bits: int, repeats: int, gen: torch.Generator) -> dict:
    lin = nn.Linear(k, n, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(n, k, generator=gen) * 0.02)
    layer = QuantLinear.from_float(lin, QuantConfig(bits=bits, group_size=128, compute_dtype="bfloat16"))
    w = layer.packed_weight(bits)
    wb = lin.weight.detach().to(torch.bfloat16)
    x = torch.randn(M, k, generator=gen).to(torch.bfloat16)
    path = cpu_path(x, w)
    same = torch.equal(dequantize_fast(w, torch.bfloat16).view(torch.int16),
                       dequantize_eager(w, torch.bfloat16).contiguous().view(torch.int16))

    def dense(native: bool):
        def run():
            _set_native(native)
            try:
                return layer(x)
            finally:
                _set_native(True)
        return run

    variants = {"eager_dq": lambda: dequantize_eager(w, torch.bfloat16),
                "native_dq": lambda: dequantize_fast(w, torch.bfloat16),
                "bf16_gemm": lambda: F.linear(x, wb),
                "dense": dense(True),
                "dense_eager": dense(False)}
    times: dict[str, list[float]] = {name: [] for name in variants}
    cpu: dict[str, list[float]] = {name: [] for name in variants}
    with torch.no_grad():
        for fn in variants.values():  # warm-up (repack, first allocations)
            fn()
        for _ in range(repeats):
            for name, fn in variants.items():
                c, t = time.process_time(), time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t)
                cpu[name].append(time.process_time() - c)
    med = {name: statistics.median(ts) * 1e3 for name, ts in times.items()}
    low = {name: min(ts) * 1e3 for name, ts in times.items()}
    cpu_med = {name: statistics.median(ts) * 1e3 for name, ts in cpu.items()}
    return {"n": n, "k": k, "bits": bits, "group_size": 128, "m": M, "path": path, "bit_identical": same,
            "median_ms": med, "min_ms": low, "cpu_median_ms": cpu_med,
            "speed_vs_bf16": {"dense": med["bf16_gemm"] / med["dense"],
                              "dense_eager": med["bf16_gemm"] / med["dense_eager"]},
            "speed_vs_bf16_min": {"dense": low["bf16_gemm"] / low["dense"],
                                  "dense_eager": low["bf16_gemm"] / low["dense_eager"]},
            "speed_vs_bf16_cpu": {"dense": cpu_med["bf16_gemm"] / max(cpu_med["dense"], 1e-9),
                                  "dense_eager": cpu_med["bf16_gemm"] / max(cpu_med["dense_eager"], 1e-9)},
            "dequant_speedup": med["eager_dq"] / med["native_dq"],
            "dequant_speedup_min": low["eager_dq"] / low["native_dq"],
            "native_dq_over_gemm_min": low["native_dq"] / low["bf16_gemm"],
            "dequant_share_of_dense": med["native_dq"] / med["dense"]}


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{r['n']}x{r['k']} W{r['bits']}" for r in rows]
    xs = range(len(rows))
    fig, ax = plt.subplots(figsize=(max(6.0, 0.7 * len(rows)), 4))
    ax.bar([i - 0.2 for i in xs], [r["speed_vs_bf16"]["dense_eager"] for r in rows], 0.4, label="eager dequant")
    ax.bar([i + 0.2 for i in xs], [r["speed_vs_bf16"]["dense"] for r in rows], 0.4, label="native dequant")
    ax.axhline(TARGET, color="k", ls="--", lw=1, label=f"target {TARGET}")
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set_xticks(list(xs), labels, rotation=45, ha="right", fontsize=8)
    ax.set_ylabel("speed vs bf16 F.linear (M=256)")
    ax.set_title("CPU dense path per layer, W g128, bfloat16 compute")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="SmolLM2 shapes and one 1.1B shape, 3 repeats, W4")
    ap.add_argument("--bits", default="4,3,2", help="comma-separated bit-widths (group 128)")
    ap.add_argument("--repeats", type=int, default=9)
    args = ap.parse_args(argv)
    torch.manual_seed(SEED)
    gen = torch.Generator().manual_seed(SEED)
    set_cpu_compute_dtype("bfloat16")
    clear_cpu_cache()
    status = native_status()
    if not status["active"]:
        print(f"note: the native kernel is not active ({status['reason']}): 'native' rows run eager torch")
    shapes = SHAPES["smollm2"] + SHAPES["llama1b"]
    bits_list = [int(b) for b in args.bits.split(",")]
    repeats = args.repeats
    if args.quick:
        shapes, bits_list, repeats = SHAPES["smollm2"] + [(5632, 2048)], [4], 3
    load_before = list(os.getloadavg())
    rows = []
    for bits in bits_list:
        for n, k in shapes:
            rows.append(measure(n, k, bits, repeats, gen))
            clear_cpu_cache()
    load_after = list(os.getloadavg())

    head = (f"{'shape NxK':>10} {'W':>2} {'eager dq':>9} {'native dq':>9} {'bf16 GEMM':>9} {'dense':>8} "
            f"{'dense eager':>11} {'dq x':>6} {'dq/GEMM':>7} {'vs bf16':>7} {'cpu':>5} {'eager vs bf16':>13} "
            f"{'cpu':>5}")
    print(f"M = {M}, bfloat16 compute, group 128, minimum wall ms of {repeats} interleaved repeats; 'vs bf16' = "
          "bf16 GEMM time / quantized layer time from the minima, 'cpu' the same from median process CPU time; "
          f"load average {load_before[0]:.2f} before, {load_after[0]:.2f} after (shared machine: ratios only)")
    print(head)
    for r in rows:
        lo, sm, sc = r["min_ms"], r["speed_vs_bf16_min"], r["speed_vs_bf16_cpu"]
        print(f"{r['n']:>5}x{r['k']:<4} {r['bits']:>2} {lo['eager_dq']:>9.2f} {lo['native_dq']:>9.2f} "
              f"{lo['bf16_gemm']:>9.2f} {lo['dense']:>8.2f} {lo['dense_eager']:>11.2f} "
              f"{r['dequant_speedup_min']:>6.1f} {r['native_dq_over_gemm_min']:>7.2f} {sm['dense']:>7.2f} "
              f"{sc['dense']:>5.2f} {sm['dense_eager']:>13.2f} {sc['dense_eager']:>5.2f}")
    result = {
        "benchmark": "prefill_dequant",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "seed": SEED, "quick": args.quick, "m": M, "repeats": repeats, "compute_dtype": "bfloat16",
        "target_speed_vs_bf16": TARGET,
        "note": ("shared 2-core machine: absolute times are unreliable, compare ratios within this run; "
                 "speed_vs_bf16 = bf16 F.linear time / quantized layer time (medians of wall time; *_min from "
                 "minima of wall time; *_cpu from medians of process CPU time, which preemption by other "
                 "processes does not inflate)"),
        "loadavg_before": load_before, "loadavg_after": load_after,
        "native": status, "hardware": hardware(), "versions": versions(), "rows": rows,
    }
    RESULTS.mkdir(exist_ok=True)
    stem = "prefill_dequant_quick" if args.quick else "prefill_dequant"
    (RESULTS / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    plot(rows, RESULTS / f"{stem}.png")
    print(f"wrote {RESULTS / (stem + '.json')} and .png")
    return result


if __name__ == "__main__":
    main()
