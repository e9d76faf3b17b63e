"""Two versions of the native kernels' C source, timed against each other per layer, paired, in one run.

A change to ``medquant/kernels/csrc/dequant.c`` that only reorders work (instruction choice, blocking) must make
the kernels faster and must not change a single output bit; this benchmark measures both. The *base* source is a
git revision's file (``--base HEAD``, the default) or a file path; the *head* source is the working tree's file
(or ``--head PATH``). Each round runs one child process per source, in alternating order (base first in even
rounds): the child points the library's build at its source (its own build key, so its own cached build), builds
one packed layer per shape and group (random weights, seed 0: every child the same codes and the same ``x``),
prepares its matmul as a ``QuantLinear``'s eager no-grad call does (``prepare_packed_linear``: at ``M`` rows of
bfloat16 ``x`` and bfloat16 compute, the path ``cpu_path`` names), and times ``--repeats`` calls after two warm
ones; the control, in the same child, is bfloat16 ``F.linear`` on the dequantized weight (the dense GEMM a
bfloat16 model runs, whose instruction ``vdpbf16ps`` does as many products per instruction as the gemm's
``vpdpwssd``). Per row: medians over rounds of each source's median time, the median (min-max) over rounds of
head / base (< 1: head faster), head / dense, and whether the two sources' outputs are bit for bit the same
(SHA-256 of the output bytes).

``--sequence L`` times instead one pass over ``L`` decoder layers' matmuls in the order a token calls them (by
default the ~1.1B LLaMA-style model's seven, q / k / v / o / gate / up / down, then its 32000 x 2048 head; with
``--shapes``, those shapes ``L`` times), each layer its own weights, so that at ``--m 1`` the codes stream from
memory as in decoding (22 layers at W4: about 500 MB, far beyond the caches) instead of the caches a repeated
layer is read from; the control is the same pass of bfloat16 ``F.linear``, and the row adds each source's rate
of weight bytes (codes and scales as the layers hold them) per second.

``--head-env KEY=VALUE`` (repeatable) sets environment variables in the head's children only: with the same
source on both sides (``--head HEAD``), an A/B of a setting instead of a change, e.g.
``THP_MEM_ALLOC_ENABLE=1`` (torch's CPU allocator then aligns allocations of 2 MB and more to 2 MB and advises
the kernel to back them with transparent huge pages).

Run: ``python -m benchmarks.native_source_ab [--base HEAD] [--head PATH] [--bits 4] [--groups 128,32] [--m 256]
[--rounds 4] [--repeats 7] [--shapes 2048x2048,...] [--sequence L] [--head-env KEY=VALUE]
[--out native_source_ab]``; prints a table and writes
``benchmarks/results/<out>.{json,md}``.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common.args import shapes as parse_shapes
from benchmarks.common.env import run_record, save_results

RESULTS = Path(__file__).resolve().parent / "results"
SEED = 0
REPO = Path(__file__).resolve().parents[1]
SOURCE_PATH = "medquant/kernels/csrc/dequant.c"
#: SmolLM2-135M's MLP projections and the 1.1B LLaMA-style model's (N x K)
SHAPES = [(1536, 576), (576, 1536), (2048, 2048), (5632, 2048), (2048, 5632)]
#: one decoder layer of the 1.1B model in call order (q, k, v, o, gate, up, down), and its head (--sequence)
SEQUENCE_SHAPES = [(2048, 2048), (256, 2048), (256, 2048), (2048, 2048), (5632, 2048), (5632, 2048), (2048, 5632)]
SEQUENCE_HEAD = (32000, 2048)


def source_text(spec: str, repo: Path = REPO) -> bytes:
    """The C source named by ``spec``: an existing file's bytes, else ``git show <spec>:<SOURCE_PATH>`` in
    ``repo`` (a revision); raises ``ValueError`` naming both readings when neither works."""
    path = Path(spec)
    if path.is_file():
        return path.read_bytes()
    proc = subprocess.run(["git", "-C", str(repo), "show", f"{spec}:{SOURCE_PATH}"], capture_output=True,
                          check=False)
    if proc.returncode:
        raise ValueError(f"--base/--head {spec!r} is neither a file nor a git revision holding {SOURCE_PATH}: "
                         f"{proc.stderr.decode(errors='replace').strip()}")
    return proc.stdout


def child(source: str, shapes: list[tuple[int, int]], groups: list[int], bits: int, m: int, repeats: int,
          threads: int | None = None, sequence: list[tuple[int, int]] | None = None) -> dict:
    """In this process: build the library from ``source`` and time each (shape, group) row, or with ``sequence``
    (the layers' shapes in call order) one pass over them per group (module docstring). Returns ``{"build":
    native_status(), "rows": {key: {"ms", "dense_ms", "path", "sha256"}}}`` (a pass's row also ``"bytes"``)."""
    import torch.nn.functional as F

    from medquant.kernels import cpu_path, native, prepare_packed_linear, set_cpu_compute_dtype

    if threads:
        torch.set_num_threads(threads)
    native.SOURCE = Path(source)  # before the first use: the build key and the compile both read it
    status = native.native_status()
    if not status["gemv4"]:
        raise RuntimeError(f"the native library did not build from {source}: {status['reason']}")
    set_cpu_compute_dtype("bfloat16")
    rows = {}
    if sequence:
        for group in groups:
            rows[f"pass of {len(sequence)} layers g{group}"] = _pass(sequence, group, bits, m, repeats)
        return {"build": {key: status[key] for key in ("library", "gemm", "flags")}, "rows": rows}
    for n, k in shapes:
        for group in groups:
            gen = torch.Generator().manual_seed(SEED)
            _, w, wd = _layer(n, k, group, bits, gen)
            x = torch.randn(m, k, generator=gen).to(torch.bfloat16)
            fn = prepare_packed_linear(x, w)
            times, dense = [], []
            with torch.no_grad():
                y = fn(x)
                F.linear(x, wd)
                for _ in range(repeats):
                    t = time.perf_counter()
                    fn(x)
                    times.append(time.perf_counter() - t)
                    t = time.perf_counter()
                    F.linear(x, wd)
                    dense.append(time.perf_counter() - t)
            rows[f"{n}x{k} g{group}"] = {
                "ms": statistics.median(times) * 1e3, "dense_ms": statistics.median(dense) * 1e3,
                "path": cpu_path(x, w), "sha256": hashlib.sha256(y.contiguous().view(torch.uint8).numpy()).hexdigest()}
    return {"build": {key: status[key] for key in ("library", "gemm", "flags")}, "rows": rows}


def _layer(n: int, k: int, group: int, bits: int, gen: torch.Generator):
    """A random ``n x k`` layer (weights ``0.02 * N(0, 1)`` drawn from ``gen``) quantized to ``bits`` in groups of
    ``group``: ``(QuantLinear, its packed weight, its dequantized weight in bfloat16)`` (the dense control's)."""
    from torch import nn

    from medquant.quant import QuantConfig, QuantLinear

    lin = nn.Linear(k, n, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(n, k, generator=gen) * 0.02)
    layer = QuantLinear.from_float(lin, QuantConfig(bits, group_size=group))
    return layer, layer.packed_weight(bits), layer.to_float(torch.float32).weight.detach().to(torch.bfloat16)


def _pass(sequence: list[tuple[int, int]], group: int, bits: int, m: int, repeats: int) -> dict:
    """One pass over layers of the shapes ``sequence`` (each its own weights), timed ``repeats`` times after a
    warm pass, against the same pass of bfloat16 ``F.linear`` on the dequantized weights."""
    import torch.nn.functional as F

    from medquant.kernels import cpu_path, prepare_packed_linear

    gen = torch.Generator().manual_seed(SEED)
    xs = {k: torch.randn(m, k, generator=gen).to(torch.bfloat16) for k in sorted({k for _, k in sequence})}
    calls, dense, paths, nbytes = [], [], set(), 0
    for n, k in sequence:
        layer, w, wd = _layer(n, k, group, bits, gen)
        calls.append((prepare_packed_linear(xs[k], w), xs[k]))
        dense.append((wd, xs[k]))
        paths.add(cpu_path(xs[k], w))
        nbytes += sum(t.numel() * t.element_size() for t in layer.buffers())
    digest = hashlib.sha256()
    times, dense_times = [], []
    with torch.no_grad():
        for fn, x in calls:
            digest.update(fn(x).contiguous().view(torch.uint8).numpy().data)
        for wd, x in dense:
            F.linear(x, wd)
        for _ in range(repeats):
            t = time.perf_counter()
            for fn, x in calls:
                fn(x)
            times.append(time.perf_counter() - t)
            t = time.perf_counter()
            for wd, x in dense:
                F.linear(x, wd)
            dense_times.append(time.perf_counter() - t)
    return {"ms": statistics.median(times) * 1e3, "dense_ms": statistics.median(dense_times) * 1e3,
            "path": "+".join(sorted(paths)), "sha256": digest.hexdigest(), "bytes": nbytes}


def run_pairs(base: bytes, head: bytes, shapes: list[tuple[int, int]], groups: list[int], bits: int, m: int,
              rounds: int, repeats: int, threads: int | None = None,
              sequence: list[tuple[int, int]] | None = None, head_env: dict[str, str] | None = None) -> list[dict]:
    """Alternate one child per source for ``rounds`` rounds; one row per (shape, group) (module docstring)."""
    runs: dict[str, list[dict]] = {"base": [], "head": []}
    with tempfile.TemporaryDirectory(prefix="mq-source-ab-") as tmp:
        files = {}
        for label, text in (("base", base), ("head", head)):
            files[label] = Path(tmp) / label / "dequant.c"
            files[label].parent.mkdir()
            files[label].write_bytes(text)
        spec = json.dumps({"shapes": shapes, "groups": groups, "bits": bits, "m": m, "repeats": repeats,
                           "threads": threads, "sequence": sequence})
        for r in range(rounds):
            for label in ("base", "head") if r % 2 == 0 else ("head", "base"):
                proc = subprocess.run([sys.executable, "-m", "benchmarks.native_source_ab", "--child",
                                       str(files[label]), spec], capture_output=True, text=True, cwd=REPO, check=False,
                                      env={**os.environ, **((head_env or {}) if label == "head" else {}),
                                           "PYTHONPATH": os.pathsep.join(
                                               [str(REPO), os.environ.get("PYTHONPATH", "")])})
                if proc.returncode:
                    raise RuntimeError(f"the {label} child failed:\n{proc.stderr[-4000:]}")
                runs[label].append(json.loads(proc.stdout.strip().splitlines()[-1]))
    rows = []
    if runs["base"][0]["build"]["library"] == runs["head"][0]["build"]["library"] and base != head:
        raise RuntimeError("the two sources loaded the same library: the build did not follow the source")
    for key in runs["base"][0]["rows"]:
        b = [run["rows"][key] for run in runs["base"]]
        h = [run["rows"][key] for run in runs["head"]]
        ratios = [hh["ms"] / bb["ms"] for bb, hh in zip(b, h)]
        base_ms, head_ms = statistics.median(v["ms"] for v in b), statistics.median(v["ms"] for v in h)
        dense_ms = statistics.median(v["dense_ms"] for v in b + h)
        rows.append({
            "layer": key, "path": h[0]["path"], "base_ms": base_ms, "head_ms": head_ms, "dense_bf16_ms": dense_ms,
            "head_over_base": statistics.median(ratios), "head_over_base_min": min(ratios),
            "head_over_base_max": max(ratios), "head_over_dense": head_ms / dense_ms,
            "base_over_dense": base_ms / dense_ms, "identical": len({v["sha256"] for v in b + h}) == 1})
        if "bytes" in b[0]:  # a pass: the weight bytes read per second, GB/s
            rows[-1].update(bytes=b[0]["bytes"], base_gbs=b[0]["bytes"] / base_ms / 1e6,
                            head_gbs=b[0]["bytes"] / head_ms / 1e6)
    return rows


def markdown(result: dict) -> str:
    setup = (f"base `{result['base']}` against head `{result['head']}`; W{result['bits']} layers at "
             f"M = {result['m']}, bfloat16 x and compute; {result['rounds']} rounds of one child per source "
             f"(alternating), {result['repeats']} calls each, {result['threads']} threads; load average before "
             f"{result['loadavg_before'][0]:.2f}, after {result['loadavg_after'][0]:.2f}"
             + "".join(f"; head children with {k}={v}" for k, v in (result.get("head_env") or {}).items()))
    columns = ["layer", "path", "base ms", "head ms", "head / base (min-max)", "dense bf16 ms", "base / dense",
               "head / dense", "outputs identical"]
    lines = [f"# Native source A/B (benchmarks/native_source_ab.py, {result['date']})", "", setup, "",
             "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in result["rows"]:
        lines.append(f"| {r['layer']} | {r['path']} | {r['base_ms']:.2f} | {r['head_ms']:.2f} | "
                     f"{r['head_over_base']:.3f} ({r['head_over_base_min']:.3f}-{r['head_over_base_max']:.3f}) | "
                     f"{r['dense_bf16_ms']:.2f} | {r['base_over_dense']:.2f} | {r['head_over_dense']:.2f} | "
                     f"{'yes' if r['identical'] else '**no**'} |")
    passes = [r for r in result["rows"] if "bytes" in r]
    if passes:
        lines.append("")
        for r in passes:
            lines.append(f"{r['layer']}: {r['bytes'] / 1e6:.0f} MB of weights (codes and scales) read at "
                         f"{r['base_gbs']:.1f} GB/s (base) / {r['head_gbs']:.1f} GB/s (head); this machine's read "
                         f"bandwidth (a float32 sum) {result['read_bandwidth_gbs']:.1f} GB/s.")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:  # a child: source path and the JSON spec
        spec = json.loads(argv[2])
        sequence = spec.get("sequence")
        print(json.dumps(child(argv[1], [tuple(s) for s in spec["shapes"]], spec["groups"], spec["bits"],
                               spec["m"], spec["repeats"], spec["threads"],
                               [tuple(s) for s in sequence] if sequence else None)))
        return {}
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", default="HEAD", help="git revision or file path of the base C source (default HEAD)")
    ap.add_argument("--head", default=None, help="file path or git revision of the head source (default: the "
                    "working tree's file)")
    ap.add_argument("--bits", type=int, default=4, choices=range(1, 9))
    ap.add_argument("--groups", default="128,32", help="comma list of group sizes (K not a multiple of one is "
                    "padded, as quantize_ does)")
    ap.add_argument("--m", type=int, default=256, help="rows of x per call (default 256: prefill)")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--shapes", default=None, help="comma list NxK (default: SmolLM2's MLP and the 1.1B model's)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--sequence", type=int, default=0, metavar="L",
                    help="time one pass over L decoder layers in call order instead (module docstring)")
    ap.add_argument("--head-env", action="append", default=[], metavar="KEY=VALUE",
                    help="an environment variable set in the head's children only (repeatable)")
    ap.add_argument("--out", default="native_source_ab")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    head_spec = args.head or str(REPO / SOURCE_PATH)
    groups = [int(g) for g in args.groups.split(",")]
    load_before = list(os.getloadavg())
    extra: dict = {}
    head_env = {}
    for item in args.head_env:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"--head-env {item!r}: expected KEY=VALUE")
        head_env[key] = value
    if args.sequence < 0:
        raise SystemExit(f"--sequence: expected a number of layers >= 0, got {args.sequence}")
    sequence = None
    if args.sequence:
        sequence = (parse_shapes(args.shapes, SEQUENCE_SHAPES) * args.sequence
                    + ([] if args.shapes else [SEQUENCE_HEAD]))
        from benchmarks.cpu_inference import _bandwidth_gbs

        extra["read_bandwidth_gbs"] = _bandwidth_gbs()
    rows = run_pairs(source_text(args.base), source_text(head_spec), parse_shapes(args.shapes, SHAPES), groups,
                     args.bits, args.m, args.rounds, args.repeats, args.threads, sequence, head_env)
    result = run_record("native_source_ab", SEED, load_before, rows, base=args.base,
                        head=args.head or "working tree", bits=args.bits, m=args.m, rounds=args.rounds,
                        repeats=args.repeats, sequence=args.sequence, head_env=head_env, **extra,
                        baseline="bfloat16 F.linear on the dequantized weight, same child")
    save_results(RESULTS, args.out, result, markdown(result))
    return result


if __name__ == "__main__":
    main()
