"""Fairness-aware mixed-precision bit allocation (FairQuant) of a small classifier on data with patient groups.

Trains the built-in small CNN or ViT on the CPU for ``--epochs`` epochs (or reloads one saved earlier with
``--save-float`` via ``--float-model``), computes group-conditioned importance on calibration batches, reduces it
across groups (``--reducer``), allocates bits from the palette under the proportions or a parameter-weighted
average-bit budget, optionally fine-tunes with FQ-QAT, prints the per-layer bit table and the group metrics of the
float and the mixed-precision model, and saves the mixed-precision model (``medquant.save``; the allocation is in
the extras under ``"fairquant"``).

    python -m benchmarks.fairquant_allocate --dataset nih --target-bits 4 --out fairquant_model
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
    p = argparse.ArgumentParser(prog="python -m benchmarks.fairquant_allocate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_data_args(p)
    p.add_argument("--bits", type=int, nargs="+", default=[2, 4, 8], help="bit palette (default 2 4 8)")
    p.add_argument("--proportions", type=float, nargs="+", default=[0.2, 0.4, 0.4],
                   help="share of scopes per palette bit (default 0.2 0.4 0.4)")
    p.add_argument("--target-bits", type=float, default=None,
                   help="parameter-weighted average-bit budget instead of proportions")
    p.add_argument("--metric", choices=["grape", "gradient"], default="grape")
    p.add_argument("--reducer", choices=["balanced", "max", "mean", "cvar"], default="balanced")
    p.add_argument("--scope", choices=["channel", "tensor"], default="channel")
    p.add_argument("--calib-batches", type=int, default=50, help="calibration mini-batches (default 50)")
    p.add_argument("--qat-epochs", type=int, default=0, help="FQ-QAT fine-tuning epochs after allocation (default 0)")
    p.add_argument("--qat-lr", type=float, default=1e-4)
    p.add_argument("--lambda-fair", type=float, default=0.5, help="FQ-QAT fairness penalty weight (default 0.5)")
    p.add_argument("--out", default="fairquant_model", help="output directory (default ./fairquant_model)")
    p.add_argument("--json", action="store_true", help="also print the summary as JSON")
    return p


def main(argv=None) -> int:
    import torch

    from benchmarks.common.nets import batches
    from medquant import save
    from medquant.fairquant import FairQuantAllocator, fq_qat

    args = build_parser().parse_args(argv)
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    # the allocator checks the palette, proportions and target bits: before any data is read or model trained
    alloc = FairQuantAllocator(
        bits=args.bits, proportions=None if args.target_bits is not None else args.proportions,
        target_bits=args.target_bits, metric=args.metric, reducer=args.reducer, scope=args.scope,
        max_batches=args.calib_batches, seed=args.seed,
    )
    data, model = load_data_and_model(args)
    groups = data["info"]["groups"]
    rows = [summary("float32", model, data)]
    x, y, g = data["train"]
    alloc.fit(model, batches(x, y, g, args.batch_size, seed=args.seed))
    print(alloc.format_table())
    if args.qat_epochs > 0:
        fq_qat(model, alloc.to_quant_map(), batches(x, y, g, args.batch_size, seed=args.seed + 1),
               epochs=args.qat_epochs, lr=args.qat_lr, lambda_fair=args.lambda_fair)
    else:
        alloc.apply(model)
    rows.append(summary("FQ-QAT" if args.qat_epochs > 0 else "FairQuant", model, data))
    print_rows(rows, groups)
    out = Path(args.out)
    save(model, out, extras={"fairquant": alloc.state(), "dataset": data["info"], "arch": args.arch,
                             "metrics": json_rows(rows)})
    print(f"saved mixed-precision model to {out} (reload: medquant.load('{out}', "
          f"model=benchmarks.common.nets.build('{args.arch}', ...)))")
    if args.json:
        print(json.dumps(rows, default=str, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
