"""medquant's native 4-bit kernel (``native4``) against aten's int4 CPU kernel, per layer, in one run.

For each layer shape (SmolLM2-135M's and a 1.1B LLaMA-style model's projections, and SmolLM2's 49152 x 576 head)
one W4 g128 layer's prepared matmul (``prepare_packed_linear``: what a ``QuantLinear``'s eager no-grad call runs)
is built per kernel, each while its choice is in force (``set_cpu_int4_kernel("auto")`` -> native4, ``"aten"`` ->
int4), then timed at ``M`` = 1 and 8, bfloat16 activations and compute, the two kernels alternating call by call:

* **warm**: calls back to back (the weight stays in cache when it fits);
* **cold**: a 64 MB pass over a buffer before each call, so the weight comes from DRAM and the interpreter's own
  data are evicted, as in a decode step where each layer follows others.

Medians of ``--repeats`` calls in microseconds, and the ratio native4 / int4 (< 1: native4 faster). The
physical limit is the time to read the layer's codes once at the measured bandwidth (``--bandwidth``, GB/s,
from ``benchmarks/results/cpu_inference_*.json``, else not reported). Random weights, seed 0.

``--activations`` times something else: native4 on float32 activations with a bfloat16 compute dtype, taken as
16-bit integers per 32 columns (``set_cpu_native4_activations("int16")``, the default) against split into two
bfloat16 halves (``"split"``), on W4 layers of the group sizes and lengths in :data:`ACT_LAYERS` (``N x K g G``):
rows whose padded length is a multiple of 64 with groups of 32, 64 or a multiple of 128 (the int16 form's rows
before 5 December 2026: the control) and rows ending in a block of 32 columns or with groups of 96 / 160 (the
rows it covers since). Each row's two prepared matmuls alternate call by call at ``M = 1`` and 4 (warm); the ratio
is int16 / split (< 1: int16 faster), and ``differs`` says whether the two outputs differ (the int16 form ran).

Run: ``python -m benchmarks.native_gemv [--repeats 25] [--activations] [--out native_gemv]``; prints a table and
writes ``benchmarks/results/<out>.{json,md}`` (``--activations``: default stem ``native_gemv_activations``).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch
from torch import nn

from benchmarks.common.env import run_record, save_results
from medquant.kernels import (
    clear_cpu_cache,
    cpu_path,
    get_cpu_compute_dtype,
    prepare_packed_linear,
    set_cpu_compute_dtype,
    set_cpu_int4_kernel,
    set_cpu_native4_activations,
)
from medquant.quant import QuantConfig, QuantLinear

RESULTS = Path(__file__).resolve().parent / "results"
SEED = 0
SHAPES = [(576, 576), (192, 576), (1536, 576), (576, 1536), (49152, 576),
          (2048, 2048), (256, 2048), (5632, 2048), (2048, 5632)]
MS = (1, 8)
FLUSH_BYTES = 64 << 20
#: --activations: (N, K, group) of W4 layers, and whether the int16 form took them before 5 December 2026
ACT_LAYERS = [(1536, 576, 32, True), (5632, 2048, 128, True), (576, 1536, 96, False), (1536, 608, 32, False),
              (1536, 672, 96, False), (5632, 2080, 32, False), (2048, 1920, 160, False)]
ACT_MS = (1, 4)


def _prepared(n: int, k: int, gen: torch.Generator) -> dict:
    """kernel name -> the prepared matmul of one W4 g128 layer (what its eager no-grad call runs), each built
    while its kernel choice is in force (the choice is global: a closure keeps what it was built with)."""
    lin = nn.Linear(k, n, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(n, k, generator=gen) * 0.02)
    out = {}
    x1 = torch.randn(1, k).to(torch.bfloat16)
    for choice in ("auto", "aten"):
        set_cpu_int4_kernel(choice)
        w = QuantLinear.from_float(lin, QuantConfig(4, group_size=128)).packed_weight(4)
        fn = prepare_packed_linear(x1, w)
        fn(x1)
        out[cpu_path(x1, w)] = fn
    set_cpu_int4_kernel(None)
    return out


def measure(n: int, k: int, repeats: int, gen: torch.Generator, flush: torch.Tensor) -> dict:
    """Median microseconds per call for each kernel, warm and cold, at each M of ``MS``."""
    layers = _prepared(n, k, gen)
    row: dict = {"n": n, "k": k, "kernels": sorted(layers), "codes_bytes": n * k // 2}
    for m in MS:
        x = torch.randn(m, k, generator=gen).to(torch.bfloat16)
        for mode in ("warm", "cold"):
            times: dict[str, list[float]] = {kind: [] for kind in layers}
            with torch.no_grad():
                for _ in range(repeats):
                    for kind, fn in layers.items():
                        if mode == "cold":
                            flush.add_(1)
                        t = time.perf_counter()
                        fn(x)
                        times[kind].append(time.perf_counter() - t)
            for kind, ts in times.items():
                row[f"{kind}_{mode}_m{m}_us"] = statistics.median(ts) * 1e6
    return row


def measure_activations(n: int, k: int, group: int, repeats: int, gen: torch.Generator) -> dict:
    """Median microseconds per call of one W4 layer's prepared matmul on float32 ``x`` with int16 and with split
    activations (each built while its setting is in force), alternating, at each ``M`` of :data:`ACT_MS`."""
    lin = nn.Linear(k, n, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(n, k, generator=gen) * 0.02)
    w = QuantLinear.from_float(lin, QuantConfig(4, group_size=group)).packed_weight(4)
    row: dict = {"n": n, "k": k, "group": group, "k_pad": w.k_pad}
    fns = {}
    x1 = torch.randn(1, k, generator=gen)
    for mode in ("int16", "split"):
        set_cpu_native4_activations(mode)
        fns[mode] = prepare_packed_linear(x1, w)
        row[f"{mode}_path"] = cpu_path(x1, w)
    set_cpu_native4_activations(None)
    with torch.no_grad():
        row["differs"] = not torch.equal(fns["int16"](x1), fns["split"](x1))
        for m in ACT_MS:
            x = torch.randn(m, k, generator=gen)
            times: dict[str, list[float]] = {mode: [] for mode in fns}
            for _ in range(repeats):
                for mode, fn in fns.items():
                    t = time.perf_counter()
                    fn(x)
                    times[mode].append(time.perf_counter() - t)
            for mode, ts in times.items():
                row[f"{mode}_m{m}_us"] = statistics.median(ts) * 1e6
    return row


def markdown_activations(result: dict) -> str:
    lines = [(f"# native4: float32 activations as 16-bit integers against split (benchmarks/native_gemv.py "
              f"--activations, {result['date']})"), "",
             (f"W4, bfloat16 compute, float32 x, {result['threads']} threads, median of {result['repeats']} "
              f"alternating calls in microseconds (warm); load average {result['loadavg_before'][0]:.2f} before / "
              f"{result['loadavg_after'][0]:.2f} after. Ratio: int16 / split (< 1: int16 faster). \"before\": "
              "whether the int16 form took the row before 5 December 2026 (the control rows)."), "",
             "| layer | k_pad | before | differs | M | int16 | split | ratio |", "|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        for m in ACT_MS:
            a, b = r[f"int16_m{m}_us"], r[f"split_m{m}_us"]
            lines.append(f"| {r['n']}x{r['k']} g{r['group']} | {r['k_pad']} | {'yes' if r['before'] else 'no'} | "
                         f"{'yes' if r['differs'] else 'no'} | {m} | {a:.1f} | {b:.1f} | {a / b:.2f} |")
    lines.append("")
    return "\n".join(lines)


def markdown(result: dict) -> str:
    bw = result.get("bandwidth_gbs")
    lines = [f"# native4 vs int4 per layer (benchmarks/native_gemv.py, {result['date']})", "",
             (f"W4 g128, bfloat16, {result['threads']} threads, median of {result['repeats']} alternating calls in "
              f"microseconds; load average {result['loadavg_before'][0]:.2f} before / "
              f"{result['loadavg_after'][0]:.2f} after. Ratio: native4 / int4 (< 1: native4 faster)."
              + (f" Limit: the codes read once at {bw:.1f} GB/s." if bw else "")), "",
             "| shape | M | warm native4 | warm int4 | ratio | cold native4 | cold int4 | ratio |"
             + (" limit |" if bw else ""),
             "|---|---|---|---|---|---|---|---|" + ("---|" if bw else "")]
    for r in result["rows"]:
        if "native4_warm_m1_us" not in r:
            continue
        for m in MS:
            w4, wa = r[f"native4_warm_m{m}_us"], r[f"int4_warm_m{m}_us"]
            c4, ca = r[f"native4_cold_m{m}_us"], r[f"int4_cold_m{m}_us"]
            limit = f" {r['codes_bytes'] / (bw * 1e9) * 1e6:.0f} |" if bw else ""
            lines.append(f"| {r['n']}x{r['k']} | {m} | {w4:.0f} | {wa:.0f} | {w4 / wa:.2f} | {c4:.0f} | {ca:.0f} | "
                         f"{c4 / ca:.2f} |" + limit)
    lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=25)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--bandwidth", type=float, default=None, help="measured read bandwidth, GB/s")
    ap.add_argument("--shapes", default=None, help="comma list NxK (default: all)")
    ap.add_argument("--activations", action="store_true",
                    help="int16 against split float32 activations on W4 layers of several groups (module docstring)")
    ap.add_argument("--out", default=None, help="output stem in benchmarks/results (default native_gemv, "
                                                 "native_gemv_activations with --activations)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.activations:
        return _main_activations(args)
    shapes = SHAPES if not args.shapes else [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    torch.manual_seed(SEED)
    gen = torch.Generator().manual_seed(SEED)
    set_cpu_compute_dtype("bfloat16")
    clear_cpu_cache()
    flush = torch.zeros(FLUSH_BYTES, dtype=torch.uint8)
    load_before = list(os.getloadavg())
    rows = []
    for n, k in shapes:
        rows.append(measure(n, k, args.repeats, gen, flush))
        clear_cpu_cache()
        print(json.dumps(rows[-1]), flush=True)
    result = run_record("native_gemv", SEED, load_before, rows, repeats=args.repeats, ms=list(MS),
                        compute_dtype="bfloat16", config={"bits": 4, "group_size": 128}, bandwidth_gbs=args.bandwidth)
    save_results(RESULTS, args.out or "native_gemv", result, markdown(result))
    return result


def _main_activations(args) -> dict:
    torch.manual_seed(SEED)
    gen = torch.Generator().manual_seed(SEED)
    before = get_cpu_compute_dtype()
    set_cpu_compute_dtype("bfloat16")
    clear_cpu_cache()
    load_before = list(os.getloadavg())
    rows = []
    for n, k, group, before in ACT_LAYERS:
        rows.append({**measure_activations(n, k, group, args.repeats, gen), "before": before})
        clear_cpu_cache()
        print(json.dumps(rows[-1]), flush=True)
    set_cpu_compute_dtype(before)
    result = run_record("native_gemv_activations", SEED, load_before, rows, repeats=args.repeats, ms=list(ACT_MS),
                        compute_dtype="bfloat16", x_dtype="float32", bits=4)
    save_results(RESULTS, args.out or "native_gemv_activations", result, markdown_activations(result))
    return result


if __name__ == "__main__":
    main()
