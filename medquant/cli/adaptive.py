"""``medquant adaptive``: seed 000's experiment - complexity-adaptive activation bits vs the same bits at random.

Trains a compact classifier per data set and seed on the CPU (progress bars), evaluates full precision, int8
weights, uniform 2/4/8-bit activations, complexity-adaptive bits, the random-assignment control, complexity
reversed, the learned policy and a test-label oracle, prints the table and writes JSON (and a PNG).
"""
from __future__ import annotations

from pathlib import Path


def register(subparsers) -> None:
    p = subparsers.add_parser("adaptive", help="complexity-adaptive quantization benchmark (seed 000)",
                              description=__doc__)
    p.add_argument("--datasets", nargs="+", default=["kermany", "nih"],
                   help="kermany, nih, pneumoniamnist, breastmnist, or paths to MedMNIST-style .npz files")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--epochs", type=int, default=None, help="training epochs (default per data set)")
    p.add_argument("--arch", choices=["cnn", "vit"], default="cnn")
    p.add_argument("--sites", nargs="+", choices=["head", "blocks"], default=["head", "blocks"])
    p.add_argument("--random-draws", type=int, default=5, help="random permutations per seed for the control")
    p.add_argument("--epsilon", type=float, default=0.02, help="policy label tolerance (loss units)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--overhead-repeats", type=int, default=30, help="timed forwards for the overhead ratio")
    p.add_argument("--data-dir", default=None, help="default: $MEDQUANT_DATA_DIR or <repo>/../shared/data")
    p.add_argument("--out", default="complexity_adaptive.json", help="JSON result path")
    p.add_argument("--png", default=None, help="plot path (default: --out with .png; 'none' for no plot)")
    p.set_defaults(func=run)


def run(args) -> int:
    import torch

    from ..adaptive.experiment import format_table, run_benchmark, save_result

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.epochs is not None and args.epochs < 1:
        raise SystemExit("--epochs must be >= 1")
    if args.random_draws < 1 or args.overhead_repeats < 1:
        raise SystemExit("--random-draws and --overhead-repeats must be >= 1")
    if not args.seeds:
        raise SystemExit("give at least one seed")
    from ..adaptive.experiment import load_dataset

    try:  # fail fast on a bad data set name / file, before any training
        for ds in args.datasets:
            load_dataset(ds, args.data_dir)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"medquant adaptive: {e}") from None
    result = run_benchmark(datasets=args.datasets, seeds=args.seeds, arch=args.arch, epochs=args.epochs,
                           data_dir=args.data_dir, n_random=args.random_draws, epsilon=args.epsilon,
                           site_configs=args.sites, overhead_repeats=args.overhead_repeats)
    png = None if (args.png or "").lower() == "none" else (args.png or str(Path(args.out).with_suffix(".png")))
    save_result(result, args.out, png)
    print(format_table(result["aggregate"]))
    for p in result["paired"]:
        print(f"{p['dataset']} {p['sites']}: {p['a']} - {p['b']}: accuracy {p['accuracy_mean']:+.4f} ± "
              f"{p['accuracy_std']:.4f}, AUC {p['auc_mean']:+.4f} ± {p['auc_std']:.4f}")
    for o in result["overhead"]:
        print(f"overhead {o['dataset']} {o['weights']} sites={o['sites']}: {100 * o['overhead_ratio']:+.1f}% "
              f"of the forward at batch {o['batch']}")
    print(f"wrote {args.out}" + (f" and {png}" if png else ""))
    return 0
