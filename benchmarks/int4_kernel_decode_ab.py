"""Decode speed of one quantized model on medquant's native kernel against aten's int4 / int8 kernel, paired.

Single-process rows of ``benchmarks/cpu_inference.py`` move by 15-25% between runs on this shared 2-core machine,
more than the difference between the two 4-bit kernels. This holds one model (``cpu_inference``'s variants, head
quantized) and decodes with ``set_cpu_int4_kernel("auto")`` (native: native4 for W4, native3 for the dense W3
layout, native2 for W2, native8 for W8) and ``"aten"`` (aten's int4 kernel for <= 4 bits, int8 for W8) alternately, the
order swapped every round (``clear_cpu_cache()`` before each: the other kernel's plans are dropped), greedy
single-token steps after a 32-token prompt (``benchmarks.common.lm.time_decode``, 4 warm-up steps). The ratio of
each round is native tok/s / aten tok/s (labels ``native`` / ``aten``; results written before the stream widths
were added say ``native4`` / ``int4``); medians over rounds.

``--ab activations`` pairs two of native4's ways of taking bfloat16-compute float32 activations instead
(``set_cpu_native4_activations("split")`` against ``"round"``): the ratio is split / round, what the float32-exact
activations cost in decode speed. ``--ab int16`` pairs ``"int16"`` (the default: 16-bit integers per 32 columns
where the kernel has the form, in layers of 3 bits or more) against ``"split"``: the ratio is int16 / split, what the integer form saves.

Run: ``python -m benchmarks.int4_kernel_decode_ab [--ab kernel|activations|int16] [--models smollm2]
[--variants W4g128,W4g128@bf16] [--rounds 6] [--steps 48] [--out int4_kernel_decode_ab]``; writes
``benchmarks/results/<out>.{json,md}``.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
from pathlib import Path

import torch

from benchmarks.common.env import run_record, save_results
from benchmarks.common.lm import time_decode
from benchmarks.cpu_inference import _make
from medquant.kernels import clear_cpu_cache, set_cpu_int4_kernel, set_cpu_native4_activations

RESULTS = Path(__file__).resolve().parent / "results"
SEED = 0
#: what is paired -> (the setting, its two values (a, b), their labels in the results); ratio = a / b
ABS = {"kernel": (set_cpu_int4_kernel, ("auto", "aten"), ("native", "aten")),
       "activations": (set_cpu_native4_activations, ("split", "round"), ("split", "round")),
       "int16": (set_cpu_native4_activations, ("int16", "split"), ("int16", "split"))}


def pair(model, ids: torch.Tensor, rounds: int, steps: int, ab: str = "kernel") -> dict:
    """tok/s per round for each of the two settings of ``ab`` (:data:`ABS`), alternating, the order swapped every
    round; ratios a / b per round (kernel: native / aten; activations: split / round; int16: int16 / split); the
    setting is restored
    to its default afterwards."""
    setter, (a, b), (la, lb) = ABS[ab]
    tok_s: dict[str, list[float]] = {a: [], b: []}
    with torch.no_grad():
        for rnd in range(rounds):
            for choice in ((a, b) if rnd % 2 == 0 else (b, a)):
                setter(choice)
                clear_cpu_cache()
                time_decode(model, ids, 4)  # plans, prepared calls
                tok_s[choice].append(time_decode(model, ids, steps))
    setter(None)
    clear_cpu_cache()
    ratios = [x / y for x, y in zip(tok_s[a], tok_s[b])]
    return {"ab": ab, "labels": [la, lb], f"{la}_tok_s": tok_s[a], f"{lb}_tok_s": tok_s[b], "ratios": ratios,
            "median_ratio": statistics.median(ratios),
            f"{la}_median": statistics.median(tok_s[a]), f"{lb}_median": statistics.median(tok_s[b])}


def markdown(result: dict) -> str:
    la, lb = result["rows"][0].get("labels", ["native4", "int4"]) if result["rows"] else ("native4", "int4")
    lines = [f"# Decode, {la} vs {lb}, paired (benchmarks/int4_kernel_decode_ab.py, {result['date']})", "",
             (f"{result['rounds']} alternating rounds of {result['steps']} greedy steps after a 32-token prompt, "
              f"batch 1, {result['threads']} threads, head quantized; load average "
              f"{result['loadavg_before'][0]:.2f} before / {result['loadavg_after'][0]:.2f} after."), "",
             f"| model | variant | {la} tok/s (median) | {lb} tok/s (median) | median of paired ratios | ratios |",
             "|---|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['model']} | {r['variant']} | {r[la + '_median']:.1f} | {r[lb + '_median']:.1f} | "
                     f"{r['median_ratio']:.3f} | {', '.join(f'{x:.2f}' for x in r['ratios'])} |")
    lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ab", choices=sorted(ABS), default="kernel", help="what to pair (module docstring)")
    ap.add_argument("--models", default="smollm2")
    ap.add_argument("--variants", default="W4g128,W4g128@bf16")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--steps", type=int, default=48)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default="int4_kernel_decode_ab")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(SEED)
    load_before = list(os.getloadavg())
    rows = []
    for model_name in args.models.split(","):
        for variant in args.variants.split(","):
            model, _ = _make(model_name, variant, True)
            ids = torch.randint(100, 1000, (1, 32), generator=torch.Generator().manual_seed(SEED))
            rows.append({"model": model_name, "variant": variant, **pair(model, ids, args.rounds, args.steps, args.ab)})
            print(json.dumps(rows[-1]), flush=True)
            del model
    result = run_record("int4_kernel_decode_ab", SEED, load_before, rows, ab=args.ab, rounds=args.rounds,
                        steps=args.steps)
    save_results(RESULTS, args.out, result, markdown(result))
    return result


if __name__ == "__main__":
    main()
