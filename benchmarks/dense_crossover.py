"""Where the CPU dense path overtakes the weight-only kernels: the ``M`` behind the dense-path thresholds.

On CPU a quantized layer with bfloat16 compute runs, for ``M`` activation rows, either a weight-only kernel on the
packed codes (``int4``: ``aten._weight_int4pack_mm_for_cpu``; ``int8``: ``aten._weight_int8pack_mm``), whose time
grows about linearly with ``M``, or the *dense* path (dequantize the weight once per call with the native kernel,
then ``F.linear``), whose cost is mostly fixed per call. ``medquant.kernels.cpu`` switches to the dense path from
``M = DEFAULT_DENSE_MIN_M_INT4`` (int4) / ``DEFAULT_DENSE_MIN_M`` (int8) on (``set_cpu_dense_min_m`` changes both). This times, per layer shape and bit-width, the
whole ``QuantLinear`` call at each ``M`` of ``--ms`` with the path forced each way (``set_cpu_dense_min_m`` to a
huge value: the kernel; to 2: dense), variants interleaved (which goes first alternates per repeat: the second
call finds the weights the first one read in cache), ``--repeats`` times, minima of wall time (the machine
may be shared; the load averages are recorded).

The crossover of a row is the smallest swept ``M`` from which the dense path is faster at every larger swept
``M`` (``None`` when the kernel wins everywhere, the first ``M`` when dense wins everywhere). The suggested default
is the median crossover over the shapes of a bit-width, rounded up to the sweep.

Shapes (N x K): SmolLM2-135M's 576x576, 192x576, 1536x576, 576x1536 and a 1.1B LLaMA-style model's 2048x2048,
256x2048, 5632x2048, 2048x5632. Bit-widths: 4 (group 128: medquant's native kernel ``native4`` and/or aten's
``int4``, ``--int4-kernel``), 3 (group 128, the dense layout: ``native3`` and/or ``int4``) and 8 (per channel:
``native8``). With ``--int4-kernel both`` each 4-bit shape
is measured on both kernels in the same run, so their times compare directly (``M = 1`` is the decode step).
Random weights (speed does not depend on the values), seed 0.

For row groups on medquant's native kernels with a bfloat16 compute dtype, what runs from the threshold on is
medquant's blocked integer matmul (``gemm``, ``set_cpu_prefill_kernel``) rather than the dense path, unless
``--prefill-kernel dense``; each row records which (``large_path``), and the "dense" columns then time it.

Run: ``python -m benchmarks.dense_crossover [--quick] [--repeats 7] [--bits 4,8] [--int4-kernel both]
[--prefill-kernel gemm] [--out STEM]``; prints a table and writes ``benchmarks/results/<STEM>.{json,md,png}`` (default
``dense_crossover``, ``dense_crossover_quick`` with ``--quick``).
"""
from __future__ import annotations

import argparse
import itertools
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
    set_cpu_compute_dtype,
    set_cpu_dense_min_m,
    set_cpu_int4_kernel,
    set_cpu_prefill_kernel,
)
from medquant.kernels.cpu import dense_min_m
from medquant.quant import QuantConfig, QuantLinear

RESULTS = Path(__file__).resolve().parent / "results"
SEED = 0
SHAPES = {"smollm2": [(576, 576), (192, 576), (1536, 576), (576, 1536)],
          "llama1b": [(2048, 2048), (256, 2048), (5632, 2048), (2048, 5632)]}
MS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192)
CONFIGS = {3: {"bits": 3, "group_size": 128}, 4: {"bits": 4, "group_size": 128}, 8: {"bits": 8, "scope": "channel"}}
NEVER = 10 ** 9


def _threshold(kernel: str) -> int:
    """The dense threshold in force for a row measured on ``kernel`` (native4 / native8 follow the int4 one)."""
    return dense_min_m("int8" if kernel == "int8" else "int4")


def crossover(ms: list[int], kernel_ms: list[float], dense_ms: list[float]) -> int | None:
    """The smallest ``M`` of ``ms`` (ascending) from which ``dense_ms < kernel_ms`` at that ``M`` and every larger
    one; ``None`` when the kernel is at least as fast at the largest ``M``.

    Raises:
        ValueError: lists of different lengths, or ``ms`` not strictly ascending.
    """
    if not len(ms) == len(kernel_ms) == len(dense_ms):
        raise ValueError(f"ms, kernel_ms and dense_ms must have one entry per M, got {len(ms)}, {len(kernel_ms)}, "
                         f"{len(dense_ms)}")
    if any(b <= a for a, b in itertools.pairwise(ms)):
        raise ValueError(f"ms must be strictly ascending, got {ms}")
    found = None
    for m, tk, td in reversed(list(zip(ms, kernel_ms, dense_ms))):
        if td < tk:
            found = m
        else:
            break
    return found


def suggest(crossovers: list[int | None], ms: list[int]) -> int | None:
    """Median of the crossovers (a row where the kernel always won counts as above the sweep), rounded up to the
    next swept ``M``; ``None`` when the median row's kernel always won."""
    vals = sorted(ms[-1] * 2 if c is None else c for c in crossovers)
    if not vals:
        return None
    med = statistics.median(vals)
    return next((m for m in ms if m >= med), None)


def measure(n: int, k: int, bits: int, ms: list[int], repeats: int, gen: torch.Generator,
            int4_kernel: str = "auto") -> dict:
    set_cpu_int4_kernel(int4_kernel)
    lin = nn.Linear(k, n, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(n, k, generator=gen) * 0.02)
    layer = QuantLinear.from_float(lin, QuantConfig(**CONFIGS[bits], compute_dtype="bfloat16"))
    xs = {m: torch.randn(m, k, generator=gen).to(torch.bfloat16) for m in ms}
    w = layer.packed_weight(bits)
    set_cpu_dense_min_m(NEVER)
    kind = cpu_path(xs[ms[-1]], w)
    set_cpu_dense_min_m(2)
    large = cpu_path(xs[ms[-1]], w)  # what runs from the threshold on: "dense", or "gemm" for native row groups
    times: dict[str, dict[int, list[float]]] = {"kernel": {m: [] for m in ms}, "dense": {m: [] for m in ms}}
    settings = {"kernel": NEVER, "dense": 2}
    with torch.no_grad():
        for name, dm in settings.items():  # warm-up: repack, native build, first allocations
            set_cpu_dense_min_m(dm)
            for m in ms:
                layer(xs[m])
        for rep in range(repeats):
            for m in ms:  # the order alternates per repeat: the second call finds the first's weights in cache
                for name, dm in (list(settings.items()) if rep % 2 == 0 else list(settings.items())[::-1]):
                    set_cpu_dense_min_m(dm)
                    t = time.perf_counter()
                    layer(xs[m])
                    times[name][m].append(time.perf_counter() - t)
    set_cpu_dense_min_m(None)
    set_cpu_int4_kernel(None)
    kern = [min(times["kernel"][m]) * 1e3 for m in ms]
    dense = [min(times["dense"][m]) * 1e3 for m in ms]
    return {"n": n, "k": k, "bits": bits, "config": CONFIGS[bits], "kernel": kind, "large_path": large, "ms": list(ms),
            "kernel_min_ms": kern, "dense_min_ms": dense,
            "kernel_median_ms": [statistics.median(times["kernel"][m]) * 1e3 for m in ms],
            "dense_median_ms": [statistics.median(times["dense"][m]) * 1e3 for m in ms],
            "crossover": crossover(list(ms), kern, dense)}


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bits_list = sorted({r["bits"] for r in rows})
    fig, axes = plt.subplots(1, len(bits_list), figsize=(6 * len(bits_list), 4), squeeze=False)
    for ax, bits in zip(axes[0], bits_list):
        for r in (r for r in rows if r["bits"] == bits):
            ratio = [d / kt for d, kt in zip(r["dense_min_ms"], r["kernel_min_ms"])]
            ax.plot(r["ms"], ratio, marker="o", ms=3, ls="-" if r["kernel"] != "int4" or bits != 4 else ":",
                    label=f"{r['n']}x{r['k']} {r['kernel']}")
        ax.axhline(1.0, color="k", lw=0.8)
        for default in sorted({_threshold(r["kernel"]) for r in rows if r["bits"] == bits}):
            ax.axvline(default, color="grey", ls="--", lw=1, label=f"default {default}")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("M (activation rows)")
        ax.set_ylabel("dense time / kernel time (< 1: dense faster)")
        ax.set_title(f"W{bits}: dense path vs weight-only kernel, bf16")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def markdown(result: dict) -> str:
    ms = result["ms"]
    lines = [f"# Dense path vs weight-only kernel (benchmarks/dense_crossover.py, {result['date']})", "",
             (f"Minimum wall ms of {result['repeats']} interleaved repeats, bfloat16 compute, "
             f"{result['threads']} threads, load average {result['loadavg_before'][0]:.2f} before / "
             f"{result['loadavg_after'][0]:.2f} after. Cell: large-M path time / kernel time (< 1: the large-M path "
             "is faster); the large-M path is the dense one, or medquant's blocked matmul (gemm) for native rows "
             f"(prefill kernel setting: {result.get('prefill_kernel', 'dense')})."), "",
             "| shape | W | kernel | large-M path | " + " | ".join(f"M={m}" for m in ms) + " | crossover |",
             "|---|---|---|---|" + "---|" * len(ms) + "---|"]
    for r in result["rows"]:
        cells = [f"{d / kt:.2f}" for d, kt in zip(r["dense_min_ms"], r["kernel_min_ms"])]
        lines.append(f"| {r['n']}x{r['k']} | {r['bits']} | {r['kernel']} | {r.get('large_path', 'dense')} | "
                     + " | ".join(cells)
                     + f" | {r['crossover']} |")
    lines += ["", f"Defaults when this ran (per bit-width and kernel): {result['current_default']}; suggested from this run "
              "(median crossover per bit-width and kernel, rounded up to the sweep): "
              + ", ".join(f"{key}: {v}" for key, v in result["suggested"].items()), ""]
    pairs = _kernel_pairs(result["rows"])
    if pairs:
        lines += ["## native vs int4 (3- and 4-bit rows, same run)", "",
                  "Cell: native ms / int4 ms, minimum wall time (< 1: the native kernel is faster).", "",
                  "| shape | W | " + " | ".join(f"M={m}" for m in ms) + " |", "|---|---|" + "---|" * len(ms)]
        for (b, n, k), (nat, a4) in pairs.items():
            lines.append(f"| {n}x{k} | {b} | " + " | ".join(f"{x / y:.2f}" for x, y in
                                                             zip(nat["kernel_min_ms"], a4["kernel_min_ms"])) + " |")
        lines.append("")
    return "\n".join(lines)


def _kernel_pairs(rows: list[dict]) -> dict:
    """(bits, n, k) -> (native row, int4 row) for the 3- and 4-bit shapes measured on both kernels (native4 for
    4-bit containers, native3 for the dense 3-bit layout)."""
    by = {(r["bits"], r["n"], r["k"], r["kernel"]): r for r in rows if r["bits"] <= 4}
    return {(b, n, k): (row, by[(b, n, k, "int4")]) for (b, n, k, kind), row in by.items()
            if kind.startswith("native") and (b, n, k, "int4") in by}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="two SmolLM2 shapes, W4, M up to 96, 2 repeats")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--bits", default="4,8", help="comma list of 3, 4 and/or 8 (3: the dense 3-bit layout, group 128)")
    ap.add_argument("--int4-kernel", choices=("auto", "aten", "both"), default="both",
                    help="kernel(s) for the 4-bit rows: medquant's native one where it runs (auto), aten's int4, "
                         "or both in the same run (default)")
    ap.add_argument("--prefill-kernel", choices=("gemm", "dense"), default="gemm",
                    help="what the native kernels' rows run from the threshold on (set_cpu_prefill_kernel): "
                         "medquant's blocked matmul (default) or the dense bfloat16 path")
    ap.add_argument("--out", default=None, help="output stem in benchmarks/results")
    args = ap.parse_args(argv)
    set_cpu_prefill_kernel(args.prefill_kernel)
    wanted = sorted({int(b) for b in args.bits.split(",")})
    if not set(wanted) <= set(CONFIGS):
        ap.error(f"--bits takes 3, 4 and/or 8, got {args.bits!r}")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(SEED)
    gen = torch.Generator().manual_seed(SEED)
    set_cpu_compute_dtype("bfloat16")
    clear_cpu_cache()
    shapes, bits_list, ms, repeats = SHAPES["smollm2"] + SHAPES["llama1b"], wanted, list(MS), args.repeats
    if args.quick:
        shapes, bits_list, ms, repeats = SHAPES["smollm2"][:2], [4], [m for m in MS if m <= 96], 2
    kernels4 = ["auto", "aten"] if args.int4_kernel == "both" else [args.int4_kernel]
    load_before = list(os.getloadavg())
    rows = []
    for bits in bits_list:
        for n, k in shapes:
            for choice in (kernels4 if bits <= 4 else ["auto"]):
                rows.append(measure(n, k, bits, ms, repeats, gen, choice))
                clear_cpu_cache()
                r = rows[-1]
                print(f"{n:>5}x{k:<5} W{bits} {r['kernel']:<7} vs {r['large_path']:<5} crossover {r['crossover']}  "
                      "large/kernel "
                      + " ".join(f"{m}:{d / kt:.2f}" for m, d, kt in
                                 zip(ms, r["dense_min_ms"], r["kernel_min_ms"])), flush=True)
    result = run_record(
        "dense_crossover", SEED, load_before, rows, quick=args.quick, repeats=repeats, ms=ms, compute_dtype="bfloat16",
        prefill_kernel=args.prefill_kernel,
        current_default={f"W{r['bits']} {r['kernel']}": _threshold(r["kernel"]) for r in rows},
        suggested={f"W{r['bits']} {r['kernel']}": suggest([q["crossover"] for q in rows if q["bits"] == r["bits"]
                                                         and q["kernel"] == r["kernel"]], ms) for r in rows},
        note="ratios within this run only; minima of wall time (the machine may be shared)")
    stem = args.out or ("dense_crossover_quick" if args.quick else "dense_crossover")
    save_results(RESULTS, stem, result, markdown(result))
    plot(rows, RESULTS / f"{stem}.png")
    return result


if __name__ == "__main__":
    main()
