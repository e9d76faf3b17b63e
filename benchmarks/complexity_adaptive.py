"""Complexity-adaptive activation quantization on real chest X-rays: adaptive bits vs the same bits at random.

Trains a compact CNN (or ViT) per data set and seed on the CPU, then compares full precision, int8 weights, uniform
2/4/8-bit activations, complexity-adaptive bits (quartile levels -> 2/4/8/32), the same bit histogram assigned at
random (the control), complexity reversed, a learned policy and its control (the policy's own bits at random),
and a test-label oracle; at the head input and at every block output
(:mod:`benchmarks.common.adaptive_experiment`). Writes the JSON and a PNG and prints the table.

    python -m benchmarks.complexity_adaptive                  # Kermany 64 px + NIH sample, seeds 0 1 2
    python -m benchmarks.complexity_adaptive --quick          # NIH, seed 0, 1 epoch, 1 random draw (~1 min)
    python -m benchmarks.complexity_adaptive --datasets pneumoniamnist --seeds 0 1 2 --out /tmp/x.json

``--datasets`` takes kermany, nih, pneumoniamnist, breastmnist, or paths to MedMNIST-style .npz files.
Data directory: --data-dir, else $MEDQUANT_DATA_DIR, else <repo>/../shared/data.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from benchmarks.common.adaptive_experiment import (
    SITE_CONFIGS,
    format_table,
    load_dataset,
    run_benchmark,
    save_result,
)

RESULTS = Path(__file__).resolve().parent / "results"
# --quick: the reduced run recorded before and after moving the experiment out of the library
QUICK = {"datasets": ["nih"], "seeds": [0], "epochs": 1, "random_draws": 1, "threads": 1}


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.complexity_adaptive",
                                 description=__doc__.splitlines()[0])
    ap.add_argument("--datasets", nargs="+", default=["kermany", "nih"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--epochs", type=int, default=None, help="default: 4 (Kermany), 12 (NIH)")
    ap.add_argument("--arch", choices=["cnn", "vit"], default="cnn")
    ap.add_argument("--sites", nargs="+", choices=list(SITE_CONFIGS), default=list(SITE_CONFIGS))
    ap.add_argument("--random-draws", type=int, default=5, help="random permutations per seed for the control")
    ap.add_argument("--epsilon", type=float, default=0.02, help="policy label tolerance (loss units)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--overhead-repeats", type=int, default=30, help="timed forwards for the overhead ratio")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--quick", action="store_true",
                    help="reduced run: --datasets nih --seeds 0 --epochs 1 --random-draws 1 --threads 1")
    ap.add_argument("--out", default=str(RESULTS / "complexity_adaptive.json"))
    ap.add_argument("--png", default=None, help="plot path (default: --out with .png; 'none' for no plot)")
    return ap


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.quick:
        for k, v in QUICK.items():
            setattr(args, k, v)
    if args.epochs is not None and args.epochs < 1:
        raise SystemExit("--epochs must be >= 1")
    if args.random_draws < 1 or args.overhead_repeats < 1:
        raise SystemExit("--random-draws and --overhead-repeats must be >= 1")
    if not args.seeds:
        raise SystemExit("give at least one seed")
    if args.threads:
        torch.set_num_threads(args.threads)
    try:  # fail fast on a bad data set name / file, before any training
        for ds in args.datasets:
            load_dataset(ds, args.data_dir)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"complexity_adaptive: {e}") from None
    result = run_benchmark(datasets=args.datasets, seeds=args.seeds, arch=args.arch, epochs=args.epochs,
                           data_dir=args.data_dir, n_random=args.random_draws, epsilon=args.epsilon,
                           site_configs=args.sites, overhead_repeats=args.overhead_repeats)
    png = None if (args.png or "").lower() == "none" else (args.png or str(Path(args.out).with_suffix(".png")))
    save_result(result, args.out, png)
    print(format_table(result["aggregate"]))
    for p in result["paired"]:
        print(f"{p['dataset']:>8} {p['sites']:>6} {p['a']} - {p['b']}: accuracy {p['accuracy_mean']:+.4f} "
              f"± {p['accuracy_std']:.4f}, AUC {p['auc_mean']:+.4f} ± {p['auc_std']:.4f}, "
              f"MAE {p['mae_mean']:+.4f} ± {p['mae_std']:.4f}")
    for o in result["overhead"]:
        print(f"overhead {o['dataset']} {o['weights']} sites={o['sites']}: {o['base_ms']:.2f} -> "
              f"{o['adaptive_ms']:.2f} ms at batch {o['batch']} ({100 * o['overhead_ratio']:+.1f}%)")
    print(f"wall {result['wall_s']:.0f} s; wrote {args.out}" + (f" and {png}" if png else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
