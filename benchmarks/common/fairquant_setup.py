"""Data, float model and group metrics shared by ``benchmarks.fairquant_allocate`` and ``benchmarks.fairquant_baq``.

Both runners take the same data arguments (:func:`add_data_args`), train the built-in small CNN / ViT on the CPU
(or reload one saved with ``--save-float``) with :func:`load_data_and_model`, and report the float and the
mixed-precision model with :func:`summary` / :func:`print_rows` (average bits, MB, GBOPs, AvgAcc, WorstAcc, Gap,
EOpp0, EOdd, balanced accuracy, per-group accuracy).
"""
from __future__ import annotations

import argparse
import time

from . import datasets

__all__ = ["add_data_args", "load_data_and_model", "print_rows", "summary"]


def add_data_args(p: argparse.ArgumentParser) -> None:
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


def load_data_and_model(args):
    """(data dict, float model) for the parsed arguments; trains the built-in model unless ``--float-model``."""
    import torch

    from medquant import load, save

    from .nets import build, train_classifier

    torch.manual_seed(args.seed)
    data = datasets.DATASETS[args.dataset](args.data_dir)
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


def summary(name, model, data) -> dict:
    """Size, cost and group metrics of ``model`` on the test split."""
    from medquant.eval import fairness_report, model_size_summary

    from .nets import predict

    xt, yt, gt = data["test"]
    r = fairness_report(yt, predict(model, xt), gt)
    return {"model": name, **model_size_summary(model, xt[:1]), "avg_acc": r.avg_acc, "worst_acc": r.worst_acc,
            "gap": r.gap, "eopp0": r.eopp0, "eodd": r.eodd, "balanced_acc": r.balanced_acc,
            "acc_by_group": r.acc, "n_by_group": r.counts}


def json_rows(rows) -> list[dict]:
    """``rows`` with the per-group dicts keyed by strings (JSON keys are strings: ``medquant.save`` extras refuse
    int keys, which would come back as strings)."""
    return [{k: ({str(g): x for g, x in v.items()} if isinstance(v, dict) else v) for k, v in r.items()}
            for r in rows]


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
