"""``medquant score``: complexity metrics, scores and levels of a folder / npz / CSV index of images.

Example::

    medquant score ../shared/data/kermany_pediatric_cxr_224 --split test --out metrics.csv --plot hist.png
    medquant score pneumoniamnist.npz --split test --fit-on pneumoniamnist.npz --fit-split train --out m.csv

Writes a CSV (name, the five metrics, score, level) and optionally a PNG histogram of scores per level and
the fitted scorer state (``--save-state``, a torch file of plain tensors).
"""
from __future__ import annotations

import argparse
import csv
from pathlib import Path

from .args import metric_weights, positive_int


def register(subparsers) -> None:
    p = subparsers.add_parser("score", help="score image complexity of a folder, npz or CSV index of images",
                              description=__doc__.splitlines()[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("path", help="image folder (with optional index.csv), .npz file, index .csv or image file")
    p.add_argument("--out", required=True, help="output CSV path")
    p.add_argument("--plot", default=None, help="PNG histogram of scores per level")
    p.add_argument("--n-levels", type=positive_int, default=None,
                   help="complexity levels to fit (default 4; with --state: the state's)")
    p.add_argument("--split", default=None, help="split to read (npz key prefix or CSV 'split' column)")
    p.add_argument("--limit", type=positive_int, default=None, help="score at most this many images")
    p.add_argument("--fit-on", default=None, help="calibration images (default: the scored images; not with --state)")
    p.add_argument("--fit-split", default=None, help="split of --fit-on")
    p.add_argument("--fit-limit", type=positive_int, default=None, help="at most this many images of --fit-on")
    p.add_argument("--allow-leakage", action="store_true",
                   help="read a split of an index or .npz whose images or patients also appear under another "
                        "split (refused by default: split leakage; for an .npz, byte-identical images across "
                        "splits are a warning this also silences)")
    p.add_argument("--state", default=None,
                   help="load a saved scorer state instead of fitting (it brings its weights, levels and edge "
                        "threshold: --weights, --n-levels, --edge-threshold and --fit-* are refused with it)")
    p.add_argument("--save-state", default=None, help="save the fitted scorer state (torch.save of tensors)")
    p.add_argument("--normalisation", choices=["minmax", "quantile"], default=None,
                   help="per-metric scaling before weighting (default minmax; with --state: the state's)")
    p.add_argument("--weights", type=metric_weights, default=None,
                   help="5 comma-separated metric weights >= 0 (entropy, edge_density, intensity_std, "
                        "fractal_dimension, lbp_entropy; default 1 each; with --state: the state's)")
    p.add_argument("--edge-threshold", type=float, default=None,
                   help="gradient magnitude above which a pixel is an edge (default 0.1; with --state: the state's)")
    p.add_argument("--bits-stored", type=int, default=None, help="bit depth of >8-bit integer images")
    p.add_argument("--batch-size", type=positive_int, default=256)
    p.add_argument("--device", default="cpu")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run, check=lambda args: _check(args, p))


#: options that set up a scorer to fit; a loaded ``--state`` brings its own (load_state_dict adopts them)
FIT_OPTIONS = (("weights", "--weights"), ("n_levels", "--n-levels"), ("edge_threshold", "--edge-threshold"),
               ("fit_on", "--fit-on"), ("fit_split", "--fit-split"), ("fit_limit", "--fit-limit"))


def _check(args, parser: argparse.ArgumentParser) -> None:
    """Before any work: options that would be ignored are refused. A ``--state`` replaces the weights, the levels
    and the edge threshold with its own and is not fitted again; ``--fit-split`` / ``--fit-limit`` select images of
    ``--fit-on``."""
    if args.state:
        given = [flag for dest, flag in FIT_OPTIONS if getattr(args, dest) is not None]
        if given:
            parser.error(f"{', '.join(given)} with --state: a saved state brings its own weights, levels and edge "
                         "threshold and is not fitted again; drop them, or fit a new scorer without --state")
    elif args.fit_on is None:
        given = [flag for dest, flag in FIT_OPTIONS[4:] if getattr(args, dest) is not None]
        if given:
            parser.error(f"{', '.join(given)} select{'s' if len(given) == 1 else ''} the images of --fit-on; "
                         "without --fit-on the scored images are fitted on: give --fit-on or use --split / --limit")


def _metrics_with_progress(scorer, images, names, batch_size: int, progress: bool, desc: str):
    import torch
    from tqdm import tqdm

    parts = []
    n = len(images)
    with tqdm(total=n, desc=desc, unit="img", disable=not progress) as bar:
        for i in range(0, n, batch_size):
            chunk = images[i : i + batch_size]
            part = _chunk_metrics(scorer, chunk, names[i : i + batch_size]).cpu()
            if len(part) != len(chunk):  # e.g. one 2-D image stored as the array: its rows are not images
                what = (f"the image array (shape {tuple(images.shape)})" if hasattr(images, "shape") else
                        "the image list")
                raise ValueError(f"{names[i]}: the scorer read {len(chunk)} entries of {what} as {len(part)} "
                                 "image(s); every entry must be one image: an array (N, H, W), (N, H, W, 1|3) or "
                                 "(N, 1|3, H, W) of N images")
            parts.append(part)
            bar.update(len(chunk))
    return torch.cat(parts) if parts else torch.zeros(0, 5, dtype=torch.float64)


def _chunk_metrics(scorer, chunk, names):
    """The metrics of one batch of images; an image the scorer refuses is named by ``names`` (its file, or its
    place in the ``.npz``): the scorer's own message counts from the start of the batch ("image 3")."""
    try:
        return scorer.metrics(list(chunk) if isinstance(chunk, list) else chunk)
    except (ValueError, TypeError):
        for image, name in zip(chunk, names):  # find the image the batch failed on (only after a failure)
            try:
                scorer.metrics(image)
            except (ValueError, TypeError) as e:
                raise type(e)(f"{name}: {e}") from e
        raise


def _load(load_images, path, split, limit, allow_leakage=False):
    """``load_images``, with a missing split or array (a ``KeyError``) reported as the command's one-line error."""
    try:
        return load_images(path, split=split, limit=limit, allow_leakage=allow_leakage)
    except KeyError as e:
        raise SystemExit(str(e.args[0]) if e.args else f"{path}: split {split!r} not found") from e


def run(args) -> int:
    import torch

    from ..complexity import METRIC_NAMES, ComplexityScorer
    from ..data import load_images

    # an option not given is the scorer's default (or, with --state, the state's)
    given = {k: v for k, v in (("n_levels", args.n_levels), ("edge_threshold", args.edge_threshold)) if v is not None}
    scorer = ComplexityScorer(weights=args.weights, normalisation=args.normalisation, bits_stored=args.bits_stored,
                              **given).to(args.device)
    if args.state:  # before any metric: the state's edge threshold and bits_stored decide them
        # map_location: a state saved from a GPU scorer holds CUDA tensors; load_state_dict copies to --device
        scorer.load_state_dict(torch.load(args.state, map_location="cpu", weights_only=True))
    progress = not args.no_progress
    images, names = _load(load_images, args.path, args.split, args.limit, args.allow_leakage)
    if len(images) == 0:
        raise SystemExit(f"no images found in {args.path}")
    metrics = _metrics_with_progress(scorer, images, names, args.batch_size, progress, "scoring")
    if not args.state:  # a loaded state brings its own levels
        if args.fit_on:
            cal, cal_names = _load(load_images, args.fit_on, args.fit_split, args.fit_limit, args.allow_leakage)
            scorer.fit(metrics=_metrics_with_progress(scorer, cal, cal_names, args.batch_size, progress,
                                                       "calibrating"))
        else:
            scorer.fit(metrics=metrics)
    scores = scorer.score(metrics=metrics).cpu()
    levels = scorer.levels_from_scores(scores).cpu()

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["name", *METRIC_NAMES, "score", "level"])
        for name, m, s, lv in zip(names, metrics.tolist(), scores.tolist(), levels.tolist()):
            w.writerow([name, *(f"{v:.8g}" for v in m), f"{s:.8g}", lv])
    if args.save_state:
        Path(args.save_state).parent.mkdir(parents=True, exist_ok=True)  # as for --out and --plot
        torch.save({k: v.cpu() for k, v in scorer.state_dict().items()}, args.save_state)
    if args.plot:
        plot_histogram(scores.numpy(), levels.numpy(), scorer.n_levels, args.plot)
    counts = torch.bincount(levels, minlength=scorer.n_levels).tolist()
    print(f"scored {len(names)} images -> {out}; images per level: {counts}")
    return 0


def plot_histogram(scores, levels, n_levels: int, path) -> None:
    """PNG histogram of the scores, one colour per level."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, ax = plt.subplots(figsize=(6, 4))
    bins = np.histogram_bin_edges(scores, bins=40)
    for lv in range(n_levels):
        sel = scores[levels == lv]
        ax.hist(sel, bins=bins, alpha=0.8, label=f"level {lv} (n={sel.size})")
    ax.set_xlabel("complexity score")
    ax.set_ylabel("images")
    ax.set_title("Complexity scores per level")
    ax.legend()
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
