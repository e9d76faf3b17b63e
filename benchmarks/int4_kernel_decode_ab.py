"""Decode speed of one quantized model on medquant's native 4-bit kernel against aten's int4 kernel, paired.

Single-process rows of ``benchmarks/cpu_inference.py`` move by 15-25% between runs on this shared 2-core machine,
more than the difference between the two 4-bit kernels. This holds one model (``cpu_inference``'s variants, head
quantized) and decodes with ``set_cpu_int4_kernel("auto")`` (native4) and ``"aten"`` (int4) alternately, the
order swapped every round (``clear_cpu_cache()`` before each: the other kernel's plans are dropped), greedy
single-token steps after a 32-token prompt (``benchmarks.common.lm.time_decode``, 4 warm-up steps). The ratio of
each round is native4 tok/s / int4 tok/s; medians over rounds.

Run: ``python -m benchmarks.int4_kernel_decode_ab [--models smollm2] [--variants W4g128,W4g128@bf16]
[--rounds 6] [--steps 48] [--out int4_kernel_decode_ab]``; writes ``benchmarks/results/<out>.{json,md}``.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
from datetime import datetime, timezone
from pathlib import Path

import torch

from benchmarks.common.env import hardware, save_results, versions
from benchmarks.common.lm import time_decode
from benchmarks.cpu_inference import _make
from medquant.kernels import clear_cpu_cache, set_cpu_int4_kernel

RESULTS = Path(__file__).resolve().parent / "results"
SEED = 0


def pair(model, ids: torch.Tensor, rounds: int, steps: int) -> dict:
    """tok/s per round for each kernel choice, alternating; ratios native4 / int4 per round."""
    tok_s: dict[str, list[float]] = {"auto": [], "aten": []}
    with torch.no_grad():
        for rnd in range(rounds):
            for choice in (("auto", "aten") if rnd % 2 == 0 else ("aten", "auto")):
                set_cpu_int4_kernel(choice)
                clear_cpu_cache()
                time_decode(model, ids, 4)  # plans, prepared calls
                tok_s[choice].append(time_decode(model, ids, steps))
    set_cpu_int4_kernel(None)
    clear_cpu_cache()
    ratios = [a / b for a, b in zip(tok_s["auto"], tok_s["aten"])]
    return {"native4_tok_s": tok_s["auto"], "int4_tok_s": tok_s["aten"], "ratios": ratios,
            "median_ratio": statistics.median(ratios),
            "native4_median": statistics.median(tok_s["auto"]), "int4_median": statistics.median(tok_s["aten"])}


def markdown(result: dict) -> str:
    lines = [f"# Decode, native4 vs int4, paired (benchmarks/int4_kernel_decode_ab.py, {result['date']})", "",
             (f"{result['rounds']} alternating rounds of {result['steps']} greedy steps after a 32-token prompt, "
              f"batch 1, {result['threads']} threads, head quantized; load average "
              f"{result['loadavg_before'][0]:.2f} before / {result['loadavg_after'][0]:.2f} after."), "",
             "| model | variant | native4 tok/s (median) | int4 tok/s (median) | median of paired ratios | ratios |",
             "|---|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['model']} | {r['variant']} | {r['native4_median']:.1f} | {r['int4_median']:.1f} | "
                     f"{r['median_ratio']:.3f} | {', '.join(f'{x:.2f}' for x in r['ratios'])} |")
    lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
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
            rows.append({"model": model_name, "variant": variant, **pair(model, ids, args.rounds, args.steps)})
            print(json.dumps(rows[-1]), flush=True)
            del model
    result = {"benchmark": "int4_kernel_decode_ab", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "seed": SEED, "rounds": args.rounds, "steps": args.steps, "threads": torch.get_num_threads(),
              "loadavg_before": load_before, "loadavg_after": list(os.getloadavg()), "hardware": hardware(),
              "versions": versions(), "rows": rows}
    save_results(RESULTS, args.out, result, markdown(result))
    return result


if __name__ == "__main__":
    main()
