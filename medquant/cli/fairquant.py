"""``medquant allocate`` and ``medquant baq``.

``medquant allocate``: fairness-aware mixed-precision bit allocation (FairQuant, SPEC section 4) for a model
and a dataset with patient groups; prints the per-layer bit table, the average bits and the group metrics of the
float and the mixed-precision model, and saves the mixed-precision model (``medquant.save``; the allocation is in
the extras under ``"fairquant"``).

The model is a built-in small CNN or ViT trained on the CPU for ``--epochs`` epochs, or one saved earlier with
``--save-float`` and passed back with ``--float-model``.

``medquant baq``: the same data and model, then BAQ (learnable per-channel bit-widths, SPEC section 4) warm-started
from the FairQuant allocation, trained with the bitrate regulariser and the fairness penalty, exported to an
ordinary mixed-precision model and saved."""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def _add_data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dataset", choices=["nih", "ham10000"], default="nih",
                   help="nih: NIH CXR14 sample, normal vs abnormal, groups sex (split by patient); "
                        "ham10000: 7 classes at 64 px, groups sex (default: nih)")
    p.add_argument("--data-dir", default=None, help="data directory (default: $MEDQUANT_DATA_DIR or ../shared/data)")
    p.add_argument("--arch", choices=["cnn", "vit"], default="cnn", help="built-in model (default cnn)")
    p.add_argument("--epochs", type=int, default=4, help="float training epochs (default 4)")
    p.add_argument("--float-model", default=None, help="a directory written by --save-float (skips training)")
    p.add_argument("--save-float", default=None, help="save the trained float model to this directory")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=50, help="calibration / fine-tuning batch size (default 50)")


def register(sub) -> None:
    p = sub.add_parser("allocate", help="fairness-aware mixed-precision bit allocation (FairQuant)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_data_args(p)
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
    p.set_defaults(func=run_allocate)

    b = sub.add_parser("baq", help="learnable mixed-precision bit-widths (FairQuant BAQ)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_data_args(b)
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
    b.set_defaults(func=run_baq)


def load_data_and_model(args):
    """(data dict, float model, info) for the CLI arguments; trains the built-in model unless --float-model."""
    import torch

    from .. import load, save
    from ..fairquant.datasets import DATASETS
    from ..fairquant.nets import build, train_classifier

    torch.manual_seed(args.seed)
    data = DATASETS[args.dataset](args.data_dir)
    x, y, _ = data["train"]
    n_classes = len(data["info"]["classes"])
    model = build(args.arch, x.shape[1], n_classes, image=x.shape[-1])
    if args.float_model:
        model = load(args.float_model, model=model)
        print(f"loaded float model from {args.float_model}")
    else:
        t0 = time.time()
        train_classifier(model, x, y, epochs=args.epochs, seed=args.seed, num_classes=n_classes,
                         desc=f"training {args.arch}")
        print(f"trained {args.arch} on {data['info']['name']} for {args.epochs} epochs in {time.time() - t0:.0f}s")
        if args.save_float:
            save(model, args.save_float)
            print(f"saved float model to {args.save_float}")
    return data, model


def _summary(name, model, data) -> dict:
    from ..eval import fairness_report, model_size_summary
    from ..fairquant.nets import predict

    xt, yt, gt = data["test"]
    r = fairness_report(yt, predict(model, xt), gt)
    return {"model": name, **model_size_summary(model, xt[:1]), "avg_acc": r.avg_acc, "worst_acc": r.worst_acc,
            "gap": r.gap, "eopp0": r.eopp0, "eodd": r.eodd, "balanced_acc": r.balanced_acc,
            "acc_by_group": r.acc, "n_by_group": r.counts}


def print_rows(rows, group_names) -> None:
    head = (f"{'model':<16}{'avg bits':>9}{'MB':>8}{'GBOPs':>9}{'AvgAcc':>8}{'WorstAcc':>9}{'Gap':>7}"
            f"{'EOpp0':>7}{'EOdd':>7}{'BalAcc':>8}  per group (n)")
    print(head)
    print("-" * len(head))
    for r in rows:
        per = ", ".join(f"{group_names[g] if g < len(group_names) else g}: {a:.3f} ({r['n_by_group'][g]})"
                        for g, a in r["acc_by_group"].items())
        print(f"{r['model']:<16}{r['avg_bits']:9.2f}{r['bytes'] / 2**20:8.3f}{r['bops'] / 1e9:9.3f}"
              f"{r['avg_acc']:8.3f}{r['worst_acc']:9.3f}{r['gap']:7.3f}{r['eopp0']:7.3f}{r['eodd']:7.3f}"
              f"{r['balanced_acc']:8.3f}  {per}")


def run_allocate(args) -> int:
    import torch

    from .. import save
    from ..fairquant import FairQuantAllocator, fq_qat
    from ..fairquant.nets import batches

    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    data, model = load_data_and_model(args)
    groups = data["info"]["groups"]
    rows = [_summary("float32", model, data)]
    alloc = FairQuantAllocator(
        bits=args.bits, proportions=None if args.target_bits is not None else args.proportions,
        target_bits=args.target_bits, metric=args.metric, reducer=args.reducer, scope=args.scope,
        max_batches=args.calib_batches, seed=args.seed,
    )
    x, y, g = data["train"]
    alloc.fit(model, batches(x, y, g, args.batch_size, seed=args.seed))
    print(alloc.format_table())
    if args.qat_epochs > 0:
        fq_qat(model, alloc.to_quant_map(), batches(x, y, g, args.batch_size, seed=args.seed + 1),
               epochs=args.qat_epochs, lr=args.qat_lr, lambda_fair=args.lambda_fair)
    else:
        alloc.apply(model)
    rows.append(_summary("FQ-QAT" if args.qat_epochs > 0 else "FairQuant", model, data))
    print_rows(rows, groups)
    out = Path(args.out)
    save(model, out, extras={"fairquant": alloc.state(), "dataset": data["info"], "arch": args.arch,
                             "metrics": rows})
    print(f"saved mixed-precision model to {out} (reload: medquant.load('{out}', "
          f"model=medquant.fairquant.nets.build('{args.arch}', ...)))")
    if args.json:
        print(json.dumps(rows, default=str, indent=1))
    return 0


def run_baq(args) -> int:
    import torch

    from .. import save
    from ..fairquant import BAQWrapper, FairQuantAllocator
    from ..fairquant.nets import batches

    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    data, model = load_data_and_model(args)
    rows = [_summary("float32", model, data)]
    x, y, g = data["train"]
    target = args.target_bits if args.target_bits > 0 else None
    init = None
    if not args.no_warm_start:
        init = FairQuantAllocator(bits=sorted({args.bit_range[0], 4, args.bit_range[1]}),
                                  target_bits=target if target is not None else 4.0,
                                  max_batches=args.calib_batches, seed=args.seed)
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
    rows.append(_summary("FQ-BAQ", model, data))
    print_rows(rows, data["info"]["groups"])
    out = Path(args.out)
    save(model, out, extras={"baq": {"bit_map": {k: list(v) for k, v in bit_map.items()}, "lambda_bit": args.lambda_bit,
                                     "lambda_fair": args.lambda_fair, "target_bits": target,
                                     "bit_range": list(args.bit_range)},
                             "dataset": data["info"], "arch": args.arch, "metrics": rows})
    print(f"saved mixed-precision model to {out}")
    if args.json:
        print(json.dumps(rows, default=str, indent=1))
    return 0
