"""Learnable mixed-precision bit-widths (FairQuant BAQ) of a small classifier on data with patient groups.

The same data and model as ``python -m benchmarks.fairquant_allocate``, then BAQ (:mod:`medquant.fairquant.baq`):
every output channel's bit-width ``b = round(b_min + (b_max - b_min) tanh|theta|)`` is learned with the weights,
warm-started from the FairQuant allocation (unless ``--no-warm-start``), trained with the bitrate regulariser
(weight ``--lambda-bit``, hinge at ``--target-bits``) and the fairness penalty (``--lambda-fair``), exported to an
ordinary mixed-precision model (projected onto the budget) and saved.

    python -m benchmarks.fairquant_baq --dataset nih --target-bits 4 --out baq_model
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from benchmarks.common.fairquant_setup import (
    add_data_args,
    json_rows,
    load_data_and_model,
    print_rows,
    summary,
)


def build_parser() -> argparse.ArgumentParser:
    b = argparse.ArgumentParser(prog="python -m benchmarks.fairquant_baq", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_data_args(b)
    b.add_argument("--bit-range", type=int, nargs=2, default=[2, 8], metavar=("B_MIN", "B_MAX"))
    b.add_argument("--target-bits", type=float, default=4.0,
                   help="average-bit budget: hinge regulariser and final projection (default 4.0; 0 = none)")
    b.add_argument("--lambda-bit", type=float, default=1.0, help="bitrate regulariser weight (default 1.0)")
    b.add_argument("--lambda-fair", type=float, default=0.5, help="fairness penalty weight (default 0.5)")
    b.add_argument("--no-warm-start", action="store_true", help="start every scope at ~b_max instead of FairQuant")
    b.add_argument("--calib-batches", type=int, default=50)
    b.add_argument("--baq-epochs", type=int, default=1)
    b.add_argument("--weight-lr", type=float, default=3e-5)
    b.add_argument("--logit-lr", type=float, default=3e-3)
    b.add_argument("--out", default="baq_model", help="output directory (default ./baq_model)")
    b.add_argument("--json", action="store_true")
    return b


def main(argv=None) -> int:
    import torch

    from benchmarks.common.nets import batches
    from medquant import save
    from medquant.fairquant import BAQWrapper, FairQuantAllocator

    args = build_parser().parse_args(argv)
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    lo, hi = args.bit_range
    if not (isinstance(lo, int) and isinstance(hi, int) and 1 <= lo < hi <= 8):
        raise SystemExit(f"--bit-range must be two integers 1 <= MIN < MAX <= 8, got {lo} {hi}")
    target = args.target_bits if args.target_bits > 0 else None
    if target is not None and not lo <= target <= hi:
        raise SystemExit(f"--target-bits {target} lies outside --bit-range {lo} {hi}")
    init = None
    if not args.no_warm_start:  # built first: it checks the palette and the target before any training
        init = FairQuantAllocator(bits=sorted({lo, 4, hi}), target_bits=target if target is not None else 4.0,
                                  max_batches=args.calib_batches, seed=args.seed)
    data, model = load_data_and_model(args)
    rows = [summary("float32", model, data)]
    x, y, g = data["train"]
    if init is not None:
        init.fit(model, batches(x, y, g, args.batch_size, seed=args.seed))
        print(init.format_table())
    baq = BAQWrapper(model, bit_range=tuple(args.bit_range), init_bits=init, lambda_bit=args.lambda_bit,
                     lambda_fair=args.lambda_fair, target_bits=target)
    hist = baq.fit(batches(x, y, g, args.batch_size, seed=args.seed + 1, augment=True), epochs=args.baq_epochs,
                   weight_lr=args.weight_lr, logit_lr=args.logit_lr)
    bit_map = baq.bit_map()
    print(f"BAQ: {len(hist)} steps; continuous average bits {hist[-1]['avg_bits_cont']:.3f}; "
          f"rounded {baq.average_bits(project=False):.3f}; exported {baq.average_bits():.3f}")
    baq.export()
    for name, bs in bit_map.items():
        counts = {b: bs.count(b) for b in sorted(set(bs))}
        print(f"  {name:<28} " + ", ".join(f"{b}b x{c}" for b, c in counts.items()))
    rows.append(summary("FQ-BAQ", model, data))
    print_rows(rows, data["info"]["groups"])
    out = Path(args.out)
    save(model, out, extras={"baq": {"bit_map": {k: list(v) for k, v in bit_map.items()}, "lambda_bit": args.lambda_bit,
                                     "lambda_fair": args.lambda_fair, "target_bits": target,
                                     "bit_range": list(args.bit_range)},
                             "dataset": data["info"], "arch": args.arch, "metrics": json_rows(rows)})
    print(f"saved mixed-precision model to {out}")
    if args.json:
        print(json.dumps(rows, default=str, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
