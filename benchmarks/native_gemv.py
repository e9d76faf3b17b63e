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

Run: ``python -m benchmarks.native_gemv [--repeats 25] [--out native_gemv]``; prints a table and writes
``benchmarks/results/<out>.{json,md}``.
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
    prepare_packed_linear,
    set_cpu_compute_dtype,
    set_cpu_int4_kernel,
)
from medquant.quant import QuantConfig, QuantLinear

RESULTS = Path(__file__).resolve().parent / "results"
SEED = 0
SHAPES = [(576, 576), (192, 576), (1536, 576), (576, 1536), (49152, 576),
          (2048, 2048), (256, 2048), (5632, 2048), (2048, 5632)]
MS = (1, 8)
FLUSH_BYTES = 64 << 20


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
    ap.add_argument("--out", default="native_gemv", help="output stem in benchmarks/results")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
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
    save_results(RESULTS, args.out, result, markdown(result))
    return result


if __name__ == "__main__":
    main()
