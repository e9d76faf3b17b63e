"""Complexity-adaptive activation quantization on real chest X-rays (SPEC section 3, seed 000).

Trains a compact CNN per data set and seed on the CPU, then compares full precision, int8 weights, uniform 2/4/8-bit
activations, complexity-adaptive bits (quartile levels -> 2/4/8/32), the same bit histogram assigned at random
(the control), complexity reversed, a learned policy and a test-label oracle; at the head input and at every block
output. Writes benchmarks/results/complexity_adaptive.json and .png and prints the table.

    python benchmarks/complexity_adaptive.py                  # Kermany 64 px + NIH sample, seeds 0 1 2
    python benchmarks/complexity_adaptive.py --datasets pneumoniamnist --seeds 0 1 2 --out /tmp/x.json

Data directory: --data-dir, else $MEDQUANT_DATA_DIR, else <repo>/../shared/data.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from medquant.adaptive.experiment import SITE_CONFIGS, format_table, run_benchmark, save_result

RESULTS = Path(__file__).resolve().parent / "results"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--datasets", nargs="+", default=["kermany", "nih"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--epochs", type=int, default=None, help="default: 4 (Kermany), 12 (NIH)")
    ap.add_argument("--arch", choices=["cnn", "vit"], default="cnn")
    ap.add_argument("--sites", nargs="+", choices=list(SITE_CONFIGS), default=list(SITE_CONFIGS))
    ap.add_argument("--random-draws", type=int, default=5)
    ap.add_argument("--epsilon", type=float, default=0.02)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--out", default=str(RESULTS / "complexity_adaptive.json"))
    ap.add_argument("--png", default=None, help="default: the --out path with .png")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    result = run_benchmark(datasets=args.datasets, seeds=args.seeds, arch=args.arch, epochs=args.epochs,
                           data_dir=args.data_dir, n_random=args.random_draws, epsilon=args.epsilon,
                           site_configs=args.sites)
    png = args.png or str(Path(args.out).with_suffix(".png"))
    save_result(result, args.out, png)
    print(format_table(result["aggregate"]))
    for p in result["paired"]:
        print(f"{p['dataset']:>8} {p['sites']:>6} {p['a']} - {p['b']}: accuracy {p['accuracy_mean']:+.4f} "
              f"± {p['accuracy_std']:.4f}, AUC {p['auc_mean']:+.4f} ± {p['auc_std']:.4f}, "
              f"MAE {p['mae_mean']:+.4f} ± {p['mae_std']:.4f}")
    for o in result["overhead"]:
        print(f"overhead {o['dataset']} {o['weights']} sites={o['sites']}: {o['base_ms']:.2f} -> "
              f"{o['adaptive_ms']:.2f} ms at batch {o['batch']} ({100 * o['overhead_ratio']:+.1f}%)")
    print(f"wall {result['wall_s']:.0f} s; wrote {args.out} and {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
