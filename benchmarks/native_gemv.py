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

``--compute`` pairs the compute dtypes instead, on float32 activations and W4 g128 layers of SmolLM2 and the 1.1B
model (:data:`COMPUTE_SHAPES`) at ``M`` = 1, 4 and 256: ``set_cpu_compute_dtype("float32")`` (native4 on ``x``
itself, codes widened to float32 for FMA; the dense float32 GEMM at large ``M``) against ``"bfloat16"`` (the
integer forms: ``x`` as 16-bit integers, and the gemm at large ``M``). Those need AVX512-VNNI and no bfloat16
arithmetic, so the ratio float32 / bfloat16 is what a CPU with AVX512-VNNI but without AVX512-BF16 (whose default
compute dtype is float32) gains by choosing bfloat16, as far as this CPU's timing of the same instructions tells.
On a CPU with AVX2 and no AVX512 the pair is the AVX2 form's float32 FMA against its 16-bit integers
(``vpmaddwd``) at small ``M``, and at 256 rows the dense path in float32 against bfloat16 (software bfloat16
there: no gemm).

``--int8`` pairs the activations instead, on float32 activations, a bfloat16 compute dtype and the same W4 g128
layers at ``M`` = 1, 4 and 8: ``set_cpu_native4_activations("int8")`` (the AVX2 form's 8-bit integers per 128
columns, ``vpmaddubsw``) against ``"int16"`` (16-bit integers per 32 columns, ``vpmaddwd``); ratio int8 / int16
(< 1: int8 faster); with ``--bandwidth``, the limit (the codes read once at that rate). On a library without the
int8 form both run int16 (``differs`` false).

``--float32`` runs the default mode with float32 activations and compute dtype (the default on a CPU without bfloat16
arithmetic: there aten's int4 kernel runs float32 activations only at ``M = 1``, the dense path above). Every row of
the default modes also times the control, ``F.linear`` on the float weight in the activations' dtype.

Run: ``python -m benchmarks.native_gemv [--repeats 25] [--float32 | --activations | --compute | --int8] [--out
native_gemv]``; prints a table and writes ``benchmarks/results/<out>.{json,md}`` (default stems
``native_gemv_activations``, ``native_gemv_compute``, ``native_gemv_int8``, ``native_gemv_float32`` for those
modes).
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

from benchmarks.common.args import shapes as parse_shapes
from benchmarks.common.env import native_record, run_record, save_results
from medquant.kernels import (
    clear_cpu_cache,
    cpu_path,
    get_cpu_compute_dtype,
    get_cpu_native4_activations,
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
#: --compute: W4 g128 layers (SmolLM2's and the 1.1B model's) and the M of decode, a small batch and prefill
COMPUTE_SHAPES = [(1536, 576), (576, 1536), (5632, 2048), (2048, 5632)]
COMPUTE_MS = (1, 4, 256)
#: --int8: the M of decode and of a batch of 8 sequences
INT8_MS = (1, 4, 8)


def _prepared(n: int, k: int, gen: torch.Generator, dtype: torch.dtype = torch.bfloat16) -> dict:
    """kernel name -> the prepared matmul of one W4 g128 layer (what its eager no-grad call runs), each built
    while its kernel choice is in force (the choice is global: a closure keeps what it was built with), and
    ``"linear"``: the control, ``F.linear`` on the float weight in ``dtype`` (the activations' dtype)."""
    lin = nn.Linear(k, n, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(n, k, generator=gen) * 0.02)
    out = {}
    x1 = torch.randn(1, k).to(dtype)
    for choice in ("auto", "aten"):
        set_cpu_int4_kernel(choice)
        w = QuantLinear.from_float(lin, QuantConfig(4, group_size=128)).packed_weight(4)
        fn = prepare_packed_linear(x1, w)
        fn(x1)
        out[cpu_path(x1, w)] = fn
    set_cpu_int4_kernel(None)
    wf = lin.weight.detach().to(dtype).contiguous()
    out["linear"] = lambda x: torch.nn.functional.linear(x, wf)
    return out


def measure(n: int, k: int, repeats: int, gen: torch.Generator, flush: torch.Tensor,
            dtype: torch.dtype = torch.bfloat16) -> dict:
    """Median microseconds per call for each kernel and the ``F.linear`` control, warm and cold, at each M of
    ``MS``, activations in ``dtype``; the path each kernel's matmul takes at each M."""
    layers = _prepared(n, k, gen, dtype)
    row: dict = {"n": n, "k": k, "kernels": sorted(layers), "codes_bytes": n * k // 2}
    for m in MS:
        x = torch.randn(m, k, generator=gen).to(dtype)
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


def _w4(n: int, k: int, group: int, gen: torch.Generator):
    """One W4 layer's packed row group (random weights)."""
    lin = nn.Linear(k, n, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(n, k, generator=gen) * 0.02)
    return QuantLinear.from_float(lin, QuantConfig(4, group_size=group)).packed_weight(4)


def _pair(w, setting: tuple, values: tuple[str, str], ms: tuple[int, ...], repeats: int,
          gen: torch.Generator) -> dict:
    """Median microseconds per call of ``w``'s prepared matmul on float32 ``x`` built under each of two values of
    a setting (``setting``: its setter and getter; the closure keeps what it was built with), alternating, at each
    ``M`` of ``ms``; each value's path at every ``M`` and whether the two outputs differ at ``M = 1``. The
    setting is restored after."""
    setter, getter = setting
    before = getter()
    row: dict = {}
    fns = {}
    try:
        for m in ms:
            xm = torch.randn(m, w.k, generator=gen)
            for v in values:
                setter(v)
                fns[v, m] = prepare_packed_linear(xm, w)
                row[f"{v}_path_m{m}"] = cpu_path(xm, w)
    finally:
        setter(before)
    with torch.no_grad():
        x1 = torch.randn(1, w.k, generator=gen)
        row["differs"] = not torch.equal(fns[values[0], 1](x1), fns[values[1], 1](x1))
        for m in ms:
            x = torch.randn(m, w.k, generator=gen)
            times: dict[str, list[float]] = {v: [] for v in values}
            for _ in range(repeats):
                for v in values:
                    t = time.perf_counter()
                    fns[v, m](x)
                    times[v].append(time.perf_counter() - t)
            for v, ts in times.items():
                row[f"{v}_m{m}_us"] = statistics.median(ts) * 1e6
    return row


def measure_activations(n: int, k: int, group: int, repeats: int, gen: torch.Generator) -> dict:
    """Median microseconds per call of one W4 layer's prepared matmul on float32 ``x`` with int16 and with split
    activations (each built while its setting is in force), alternating, at each ``M`` of :data:`ACT_MS`."""
    w = _w4(n, k, group, gen)
    row = _pair(w, (set_cpu_native4_activations, get_cpu_native4_activations), ("int16", "split"), ACT_MS, repeats,
                gen)
    return {"n": n, "k": k, "group": group, "k_pad": w.k_pad, **row,
            "int16_path": row["int16_path_m1"], "split_path": row["split_path_m1"]}


def measure_compute(n: int, k: int, repeats: int, gen: torch.Generator) -> dict:
    """Median microseconds per call of one W4 g128 layer's prepared matmul on float32 ``x`` under the float32 and
    the bfloat16 compute dtype (the integer forms for float32 ``x``: 16-bit integers at small ``M``, the gemm at
    large), alternating, at each ``M`` of :data:`COMPUTE_MS`."""
    w = _w4(n, k, 128, gen)
    return {"n": n, "k": k, "group": 128,
            **_pair(w, (set_cpu_compute_dtype, get_cpu_compute_dtype), ("float32", "bfloat16"), COMPUTE_MS,
                    repeats, gen)}


def measure_int8(n: int, k: int, repeats: int, gen: torch.Generator) -> dict:
    """Median microseconds per call of one W4 g128 layer's prepared matmul on float32 ``x`` (bfloat16 compute)
    with int8 and with int16 activations, alternating, at each ``M`` of :data:`INT8_MS`."""
    w = _w4(n, k, 128, gen)
    return {"n": n, "k": k, "group": 128, "codes_bytes": n * k // 2,
            **_pair(w, (set_cpu_native4_activations, get_cpu_native4_activations), ("int8", "int16"), INT8_MS,
                    repeats, gen)}


def _pairs_markdown(result: dict, title: str, setup: str, note: str, columns: list[str], ms: tuple[int, ...],
                    cells) -> str:
    """The table of a pair mode: ``# title``, the run's settings (``setup``, threads, repeats, load averages) and
    ``note``, then one line per row of ``result`` and ``M`` of ``ms`` holding ``cells(row, m)``."""
    lines = [title, "",
             (f"{setup}, {result['threads']} threads, median of {result['repeats']} alternating calls in "
              f"microseconds (warm); load average {result['loadavg_before'][0]:.2f} before / "
              f"{result['loadavg_after'][0]:.2f} after. {note}"), "",
             "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cells(r, m)) + " |" for r in result["rows"] for m in ms]
    lines.append("")
    return "\n".join(lines)


def markdown_compute(result: dict) -> str:
    def cells(r: dict, m: int) -> list[str]:
        a, b = r[f"float32_m{m}_us"], r[f"bfloat16_m{m}_us"]
        return [f"{r['n']}x{r['k']}", str(m), r[f"float32_path_m{m}"], f"{a:.0f}", r[f"bfloat16_path_m{m}"],
                f"{b:.0f}", f"{a / b:.2f}"]

    return _pairs_markdown(
        result, (f"# native4: float32 against bfloat16 compute on float32 activations (benchmarks/native_gemv.py "
                 f"--compute, {result['date']})"),
        "W4 g128, float32 x", ("Ratio: float32 / bfloat16 (> 1: the bfloat16 compute dtype's integer forms faster). "
                               "The integer forms need AVX512-VNNI (or the AVX2 form, at small M), not "
                               "AVX512-BF16."),
        ["layer", "M", "float32 path", "us", "bfloat16 path", "us", "ratio"], COMPUTE_MS, cells)


def markdown_int8(result: dict) -> str:
    bw = result.get("bandwidth_gbs")

    def cells(r: dict, m: int) -> list[str]:
        a, b = r[f"int8_m{m}_us"], r[f"int16_m{m}_us"]
        limit = f"{r['codes_bytes'] / (bw * 1e9) * 1e6:.0f}" if bw else "-"
        return [f"{r['n']}x{r['k']}", str(m), r[f"int8_path_m{m}"], "yes" if r["differs"] else "no", f"{a:.0f}",
                f"{b:.0f}", f"{a / b:.2f}", limit]

    return _pairs_markdown(
        result, (f"# native4: float32 activations as 8-bit against 16-bit integers (benchmarks/native_gemv.py "
                 f"--int8, {result['date']})"),
        "W4 g128, bfloat16 compute, float32 x", ("Ratio: int8 / int16 (< 1: int8 faster). \"differs\": the two "
                                                 "outputs differ (the int8 form ran). Limit: the codes read once"
                                                 + (f" at {bw:.1f} GB/s." if bw else " (no --bandwidth given).")),
        ["layer", "M", "path", "differs", "int8", "int16", "ratio", "limit"], INT8_MS, cells)


def markdown_activations(result: dict) -> str:
    def cells(r: dict, m: int) -> list[str]:
        a, b = r[f"int16_m{m}_us"], r[f"split_m{m}_us"]
        return [f"{r['n']}x{r['k']} g{r['group']}", str(r["k_pad"]), "yes" if r["before"] else "no",
                "yes" if r["differs"] else "no", str(m), f"{a:.1f}", f"{b:.1f}", f"{a / b:.2f}"]

    return _pairs_markdown(
        result, (f"# native4: float32 activations as 16-bit integers against split (benchmarks/native_gemv.py "
                 f"--activations, {result['date']})"),
        "W4, bfloat16 compute, float32 x", ("Ratio: int16 / split (< 1: int16 faster). \"before\": whether the int16 "
                                            "form took the row before 5 December 2026 (the control rows)."),
        ["layer", "k_pad", "before", "differs", "M", "int16", "split", "ratio"], ACT_MS, cells)


def markdown(result: dict) -> str:
    bw = result.get("bandwidth_gbs")
    dt = result.get("x_dtype", "bfloat16")
    ctl = all("linear_warm_m1_us" in r for r in result["rows"])  # runs before the control have no such column
    lines = [f"# native4 vs int4 per layer (benchmarks/native_gemv.py, {result['date']})", "",
             (f"W4 g128, {dt} activations and compute, {result['threads']} threads, median of {result['repeats']} "
              f"alternating calls in microseconds; load average {result['loadavg_before'][0]:.2f} before / "
              f"{result['loadavg_after'][0]:.2f} after. Ratio: native4 / int4 (< 1: native4 faster)."
              + (f" Control: {dt} `F.linear` on the float weight; x: its time / native4's (> 1: native4 faster)."
                 if ctl else "")
              + (f" Limit: the codes read once at {bw:.1f} GB/s." if bw else "")
              + (" With float32 activations aten's int4 kernel runs at M = 1 only: the int4 column's larger M is the "
                 "dense path." if dt == "float32" else "")), "",
             "| shape | M | warm native4 | warm int4 | ratio |" + (" warm linear | x |" if ctl else "")
             + " cold native4 | cold int4 | ratio |" + (" cold linear | x |" if ctl else "") + (" limit |" if bw else ""),
             "|---|---|---|---|---|---|---|---|" + ("---|" * 4 if ctl else "") + ("---|" if bw else "")]
    for r in result["rows"]:
        if "native4_warm_m1_us" not in r:
            continue
        for m in MS:
            cells = [f"{r['n']}x{r['k']}", str(m)]
            for mode in ("warm", "cold"):
                n4, a4 = r[f"native4_{mode}_m{m}_us"], r[f"int4_{mode}_m{m}_us"]
                cells += [f"{n4:.0f}", f"{a4:.0f}", f"{n4 / a4:.2f}"]
                if ctl:
                    lin = r[f"linear_{mode}_m{m}_us"]
                    cells += [f"{lin:.0f}", f"{lin / n4:.2f}"]
            if bw:
                cells.append(f"{r['codes_bytes'] / (bw * 1e9) * 1e6:.0f}")
            lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=25)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--bandwidth", type=float, default=None, help="measured read bandwidth, GB/s")
    ap.add_argument("--shapes", default=None, help="comma list NxK (default: all; with --compute: its four)")
    ap.add_argument("--activations", action="store_true",
                    help="int16 against split float32 activations on W4 layers of several groups (module docstring)")
    ap.add_argument("--float32", action="store_true",
                    help="the default mode with float32 activations and compute (a CPU without bf16 arithmetic)")
    ap.add_argument("--compute", action="store_true",
                    help="float32 against bfloat16 compute on float32 activations, W4 g128 (module docstring)")
    ap.add_argument("--int8", action="store_true",
                    help="int8 against int16 float32 activations, bfloat16 compute, W4 g128 (module docstring)")
    ap.add_argument("--out", default=None, help="output stem in benchmarks/results (default native_gemv, "
                                                 "native_gemv_activations / native_gemv_compute with those modes)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.activations or args.compute or args.int8:
        return _main_pairs(args)
    shapes = parse_shapes(args.shapes, SHAPES)
    torch.manual_seed(SEED)
    gen = torch.Generator().manual_seed(SEED)
    dtype = torch.float32 if args.float32 else torch.bfloat16
    cd_before = get_cpu_compute_dtype()
    set_cpu_compute_dtype(dtype)
    clear_cpu_cache()
    flush = torch.zeros(FLUSH_BYTES, dtype=torch.uint8)
    load_before = list(os.getloadavg())
    rows = []
    for n, k in shapes:
        rows.append(measure(n, k, args.repeats, gen, flush, dtype))
        clear_cpu_cache()
        print(json.dumps(rows[-1]), flush=True)
    set_cpu_compute_dtype(cd_before)
    name = str(dtype).removeprefix("torch.")
    result = run_record("native_gemv", SEED, load_before, rows, repeats=args.repeats, ms=list(MS),
                        compute_dtype=name, x_dtype=name, config={"bits": 4, "group_size": 128},
                        bandwidth_gbs=args.bandwidth,
                        native=native_record())
    save_results(RESULTS, args.out or ("native_gemv_float32" if args.float32 else "native_gemv"), result,
                 markdown(result))
    return result


def _main_pairs(args) -> dict:
    """``--activations`` or ``--compute``: every layer of the mode measured in pairs, the settings restored."""
    torch.manual_seed(SEED)
    gen = torch.Generator().manual_seed(SEED)
    cd_before = get_cpu_compute_dtype()
    clear_cpu_cache()
    load_before = list(os.getloadavg())
    rows = []
    if args.activations and args.shapes:
        raise SystemExit("--shapes does not apply to --activations (its layers come with their group sizes)")
    jobs = ([(measure_activations, (n, k, g), {"before": b}) for n, k, g, b in ACT_LAYERS] if args.activations
            else [(measure_int8 if args.int8 else measure_compute, (n, k), {})
                  for n, k in parse_shapes(args.shapes, COMPUTE_SHAPES)])
    for fn, shape, extra in jobs:
        set_cpu_compute_dtype("bfloat16")
        rows.append({**fn(*shape, args.repeats, gen), **extra})
        clear_cpu_cache()
        print(json.dumps(rows[-1]), flush=True)
    set_cpu_compute_dtype(cd_before)
    if args.activations:
        result = run_record("native_gemv_activations", SEED, load_before, rows, repeats=args.repeats,
                            ms=list(ACT_MS), compute_dtype="bfloat16", x_dtype="float32", bits=4)
        save_results(RESULTS, args.out or "native_gemv_activations", result, markdown_activations(result))
    elif args.int8:
        result = run_record("native_gemv_int8", SEED, load_before, rows, repeats=args.repeats, ms=list(INT8_MS),
                            compute_dtype="bfloat16", x_dtype="float32", bits=4, group_size=128,
                            bandwidth_gbs=args.bandwidth, native=native_record())
        save_results(RESULTS, args.out or "native_gemv_int8", result, markdown_int8(result))
    else:
        result = run_record("native_gemv_compute", SEED, load_before, rows, repeats=args.repeats,
                            ms=list(COMPUTE_MS), x_dtype="float32", bits=4, group_size=128)
        save_results(RESULTS, args.out or "native_gemv_compute", result, markdown_compute(result))
    return result


if __name__ == "__main__":
    main()
