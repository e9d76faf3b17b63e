"""``medquant demo``: train a small CNN on real chest X-rays (PneumoniaMNIST) until it is a fair baseline, quantize
it at 8, 4, 3 and 2 bits, and show what that costs: size, test accuracy with bootstrap 95% intervals, the
difference to the float model with its own interval, agreement with the float model's predictions, and a PNG of
accuracy and size against bits. About 20 seconds on an idle 2-core CPU."""
from __future__ import annotations

import copy
import json
import os
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .args import output_folder_message, positive_int, seed_value

SCHEMES = [("int8 per-channel", 8, "channel"), ("int4 group-32", 4, "group"), ("int3 group-32", 3, "group"),
           ("int2 group-32", 2, "group")]



def _default_data_dir() -> Path:
    """``$MEDQUANT_DATA_DIR``, else ``../shared/data`` relative to the working directory (a source checkout next
    to the data); ``run`` falls back to a synthetic task when PneumoniaMNIST is not there."""
    env = os.environ.get("MEDQUANT_DATA_DIR")
    if env:
        return Path(env)
    return Path.cwd().parent / "shared" / "data"


def tiny_cnn(in_ch: int = 1, n_classes: int = 2) -> nn.Module:
    """The demo's classifier: two conv blocks (16 and 32 channels, batch norm, max-pool) and a 2-layer head.

    Args:
        in_ch: input channels (1 for gray X-rays).
        n_classes: output classes.

    Returns:
        An ``nn.Sequential`` for 28 x 28 inputs (about 105 k parameters).
    """
    return nn.Sequential(
        nn.Conv2d(in_ch, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(32 * 7 * 7, 64), nn.ReLU(), nn.Dropout(0.3), nn.Linear(64, n_classes),
    )


def _load_pneumoniamnist(data_dir: Path, allow_leakage: bool = False):
    """Train, val and test of ``data_dir/pneumoniamnist/pneumoniamnist.npz`` as tensors (None when absent), each
    checked for leakage by :func:`medquant.data.load_npz_split` unless ``allow_leakage``: the official file loads,
    with a ``DuplicateImageWarning`` for its train and val splits (8 val images are byte-identical to train ones;
    the test split shares none)."""
    path = data_dir / "pneumoniamnist" / "pneumoniamnist.npz"
    if not path.is_file():
        return None
    from ..data import load_npz_split

    def split(name):
        x, y = load_npz_split(path, name, with_labels=True, allow_leakage=allow_leakage)
        return torch.from_numpy(x).float().div(255).unsqueeze(1), torch.from_numpy(y).long().flatten()

    return split("train"), split("val"), split("test"), f"PneumoniaMNIST ({path})", ("normal", "pneumonia")


def _synthetic(seed: int):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(3000, 1, 28, 28, generator=g)
    y = (x[:, :, 7:21, 7:21].mean(dim=(1, 2, 3)) > x.mean(dim=(1, 2, 3))).long()
    return ((x[:2000], y[:2000]), (x[2000:2400], y[2000:2400]), (x[2400:], y[2400:]),
            "synthetic (no PneumoniaMNIST found: set MEDQUANT_DATA_DIR or --data-dir)", ("class 0", "class 1"))


@torch.no_grad()
def _predict(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    model.eval()
    return torch.cat([model(x[i:i + 512]).argmax(1) for i in range(0, len(x), 512)])


def bootstrap_accuracy(correct: torch.Tensor, n_resamples: int = 1000, seed: int = 0,
                       level: float = 0.95) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Percentile-bootstrap intervals of accuracy for several models on the same test set (paired resamples).

    Every resample draws ``n`` test images with replacement (the same draw for every model), so the interval of a
    difference between two models accounts for their correlation.

    Args:
        correct: ``(models, n)`` booleans, ``correct[m, i]`` = model ``m`` classifies test image ``i`` correctly.
        n_resamples: number of bootstrap resamples.
        seed: seed of the resampling.
        level: coverage of the intervals.

    Returns:
        ``(acc_ci, diff_ci, resampled)``: ``acc_ci`` ``(models, 2)`` interval of each model's accuracy,
        ``diff_ci`` ``(models, 2)`` interval of ``accuracy[m] - accuracy[0]`` (row 0 is the reference),
        ``resampled`` ``(models, n_resamples)`` the resampled accuracies.

    Raises:
        ValueError: ``correct`` is not 2-D with at least one image, or ``n_resamples`` < 1.
    """
    if correct.dim() != 2 or correct.shape[1] == 0 or n_resamples < 1:
        raise ValueError(f"bootstrap_accuracy needs (models, n >= 1) outcomes and n_resamples >= 1, got shape "
                         f"{tuple(correct.shape)} and {n_resamples}")
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, correct.shape[1], (n_resamples, correct.shape[1]), generator=g)
    resampled = correct.float()[:, idx].mean(-1)                     # (models, n_resamples)
    q = torch.tensor([(1 - level) / 2, 1 - (1 - level) / 2], dtype=torch.float32)
    acc_ci = torch.quantile(resampled, q, dim=1).T
    diff_ci = torch.quantile(resampled - resampled[:1], q, dim=1).T
    return acc_ci, diff_ci, resampled


@dataclass
class Row:
    """One line of the demo's table."""

    weights: str
    bits: float
    bytes: int
    smaller: float
    test_acc: float
    ci_low: float
    ci_high: float
    diff: float
    diff_low: float
    diff_high: float
    agreement: float


def _train(model: nn.Module, xtr, ytr, xva, yva, epochs: int, seed: int) -> list[dict]:
    """AdamW with a one-cycle learning rate, class-balanced cross-entropy, random shifts of up to 2 pixels."""
    counts = torch.bincount(ytr, minlength=2).clamp(min=1).float()
    loss_fn = nn.CrossEntropyLoss(weight=counts.sum() / (len(counts) * counts))
    batch = 128
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=epochs * -(-len(xtr) // batch))
    g = torch.Generator().manual_seed(seed)
    history = []
    for epoch in range(epochs):
        t0 = time.time()
        model.train()
        total = 0.0
        for idx in torch.randperm(len(xtr), generator=g).split(batch):
            dx, dy = torch.randint(-2, 3, (2,), generator=g).tolist()
            loss = loss_fn(model(torch.roll(xtr[idx], (dx, dy), (2, 3))), ytr[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss.detach()) * len(idx)
        val_acc = float((_predict(model, xva) == yva).float().mean())
        history.append({"epoch": epoch + 1, "loss": total / len(xtr), "val_acc": val_acc, "seconds": time.time() - t0})
        print(f"  epoch {epoch + 1}/{epochs}: train loss {total / len(xtr):.3f}, validation accuracy {val_acc:.3f} "
              f"({time.time() - t0:.1f} s)", flush=True)
    return history


def _plot(rows: list[Row], majority: float, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    quant = rows[1:]
    labels = [r.weights.split()[0] for r in quant]
    x = np.arange(len(quant))
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    fp = rows[0]
    ax1.axhspan(fp.ci_low, fp.ci_high, color="tab:blue", alpha=0.15, label="float32, 95% interval")
    ax1.axhline(fp.test_acc, color="tab:blue")
    ax1.axhline(majority, color="gray", ls=":", label="always the majority class")
    acc = np.array([r.test_acc for r in quant])
    err = np.array([[r.test_acc - r.ci_low for r in quant], [r.ci_high - r.test_acc for r in quant]])
    ax1.errorbar(x, acc, yerr=err, fmt="o", color="tab:red", capsize=4, label="quantized, 95% interval")
    ax1.set_xticks(x, labels)
    ax1.set_xlabel("weights")
    ax1.set_ylabel("test accuracy")
    ax1.set_title("accuracy against bits (bootstrap 95% intervals)")
    ax1.legend(fontsize=8, loc="lower left")
    sizes = [r.bytes / 1024 for r in rows]
    ax2.bar(np.arange(len(rows)), sizes, color=["tab:blue"] + ["tab:red"] * len(quant))
    for i, (s, r) in enumerate(zip(sizes, rows)):
        ax2.text(i, s, f"{s:.0f} KiB\n{r.smaller:.1f}x", ha="center", va="bottom", fontsize=8)
    ax2.set_xticks(np.arange(len(rows)), ["float32"] + labels)
    ax2.set_ylabel("stored size (KiB, medquant.model_size)")
    ax2.set_ylim(0, max(sizes) * 1.25)
    ax2.set_title("size against bits")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _explain(rows: list[Row], n_test: int, n_resamples: int, majority: float,
             flips: list[tuple[int, int]]) -> list[str]:
    fp = rows[0]
    lines = [
        "What the numbers mean:",
        (f"* test acc: fraction of the {n_test} test images classified correctly; [95% interval] from "
        f"{n_resamples} bootstrap resamples of the test images. With this few images, accuracies whose "
        "intervals overlap are not distinguishable."),
        ("* vs float: the quantized model's accuracy minus the float model's, with a paired-bootstrap 95% "
        "interval (both models scored on the same resamples). An interval containing 0 means no measurable "
        "loss; a quantized model that looks slightly better than float is noise, not an improvement."),
        "* agree: fraction of test images on which the quantized model predicts what the float model predicts.",
        ("* bytes: everything stored (packed weight codes, scales, zero points, batch-norm and bias tensors, "
        "metadata), from medquant.model_size; smaller = float bytes / bytes; bits = the bits of the weight codes "
        "per parameter (medquant.model_size's effective bits), without the scales and zero points, whose bytes "
        "are in bytes."),
        f"* the float model scores {fp.test_acc:.3f}; always answering the majority class scores {majority:.3f}.",
    ]
    same = [r for r in rows[1:] if r.diff_low <= 0 <= r.diff_high]
    worse = [r for r in rows[1:] if r.diff_high < 0]
    better = [r for r in rows[1:] if r.diff_low > 0]
    if same:
        lines.append("Here: " + ", ".join(f"{r.weights.split()[0]} ({r.smaller:.1f}x smaller)" for r in same)
                     + " lose nothing measurable.")
    if worse:
        lines.append("Here: " + ", ".join(f"{r.weights.split()[0]} ({r.diff:+.3f})" for r in worse)
                     + " lose accuracy beyond the noise.")
    if better:
        lines.append("Note: " + ", ".join(r.weights.split()[0] for r in better) + " scored above float beyond "
                     "the interval; with one training run that can still be chance (another --seed shows it).")
    for r, (fixed, broke) in zip(rows[1:], flips):
        if r.diff > 0 and fixed + broke:
            lines.append(f"{r.weights.split()[0]} changed {fixed + broke} prediction(s) ({fixed} became right, {broke} "
                         "became wrong): rounding moved the decision boundary, it did not teach the model anything.")
    return lines


def _prepare_outputs(args) -> None:
    """Before any work: create the missing parent folders of ``--json`` and ``--plot`` (as ``medquant score`` does
    for its outputs), and refuse, in one line naming the option (``SystemExit``), a path that is a folder or whose
    folder cannot be created (a file in the way, no permission), and a ``--save`` path that is a file (the
    checkpoint is a folder)."""
    not_folder = output_folder_message(args.save, "--save") if args.save else None
    if not_folder:  # the checkpoint is a folder: refused before the training
        raise SystemExit(not_folder)
    for flag, path in (("--json", args.json), ("--plot", args.plot)):
        if not path:
            continue
        p = Path(path)
        if p.is_dir():
            raise SystemExit(f"{flag} {path} is a folder; give a file path")
        try:
            p.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise SystemExit(f"{flag} {path}: cannot create its folder {p.parent} ({e.strerror or e})") from None


def run(args) -> int:
    """Train, quantize, evaluate and report (the ``medquant demo`` command).

    The parent folders of ``--json`` / ``--plot`` are created first (an unusable path is refused before training).

    Args:
        args: the parsed command line (``data_dir``, ``allow_leakage``, ``epochs``, ``seed``, ``bootstrap``,
            ``save``, ``json``, ``plot``).

    Returns:
        The exit code, 0.
    """
    from .. import QuantConfig, model_size, quantize_, save

    _prepare_outputs(args)
    torch.manual_seed(args.seed)
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    loaded = (_load_pneumoniamnist(Path(args.data_dir), getattr(args, "allow_leakage", False)) if args.data_dir
              else None)
    (xtr, ytr), (xva, yva), (xte, yte), source, classes = loaded if loaded else _synthetic(args.seed)
    n_per = torch.bincount(yte, minlength=2).tolist()
    majority = max(n_per) / len(yte)
    print(f"data: {source}\n  train {len(xtr)}, validation {len(xva)}, test {len(xte)} "
          f"({n_per[0]} {classes[0]} / {n_per[1]} {classes[1]})")
    print(f"training the float model: {args.epochs} epochs, one-cycle learning rate, class-balanced loss, "
          "random shifts")
    model = tiny_cnn()
    t0 = time.time()
    history = _train(model, xtr, ytr, xva, yva, args.epochs, args.seed)
    train_seconds = time.time() - t0

    fp_pred = _predict(model, xte)
    fp_bytes = model_size(model).total_bytes
    preds, sizes, bits = [fp_pred], [fp_bytes], [32.0]
    for label, b, scope in SCHEMES:
        cfg = QuantConfig(b, scope="channel") if scope == "channel" else QuantConfig(b, group_size=32)
        q = quantize_(copy.deepcopy(model), cfg)
        with warnings.catch_warnings():  # small layers run the reference kernel; that is expected here
            warnings.filterwarnings("ignore", message="medquant CPU kernels")
            preds.append(_predict(q, xte))
        rep = model_size(q)  # the stored size as medquant counts it (dense sub-byte storage included)
        sizes.append(rep.total_bytes)
        bits.append(rep.effective_bits)
        if args.save and b == 4:
            save(q, args.save)
    correct = torch.stack([p == yte for p in preds])
    acc_ci, diff_ci, _ = bootstrap_accuracy(correct, args.bootstrap, seed=args.seed)
    acc = correct.float().mean(1)
    rows = [Row(name, float(bits[i]), int(sizes[i]), fp_bytes / sizes[i], float(acc[i]), float(acc_ci[i, 0]),
                float(acc_ci[i, 1]), float(acc[i] - acc[0]), float(diff_ci[i, 0]), float(diff_ci[i, 1]),
                float((preds[i] == fp_pred).float().mean()))
            for i, name in enumerate(["float32"] + [s[0] for s in SCHEMES])]
    print(f"float model trained in {train_seconds:.0f} s: test accuracy {rows[0].test_acc:.3f} "
          f"[{rows[0].ci_low:.3f}, {rows[0].ci_high:.3f}] (validation {history[-1]['val_acc']:.3f}; "
          f"majority class {majority:.3f})\n")
    hdr = (f"{'weights':<18}{'bits':>6}{'bytes':>9}{'smaller':>9}   {'test acc [95% interval]':<25}"
           f"{'vs float [95% interval]':<27}{'agree':>6}")
    print(hdr)
    print("-" * len(hdr))
    for r in rows:
        diff = "" if r is rows[0] else f"{r.diff:+.3f} [{r.diff_low:+.3f}, {r.diff_high:+.3f}]"
        print(f"{r.weights:<18}{r.bits:>6.2f}{r.bytes:>9d}{r.smaller:>8.2f}x   "
              f"{r.test_acc:.3f} [{r.ci_low:.3f}, {r.ci_high:.3f}]{'':<7}{diff:<27}{r.agreement:>6.3f}")
    print()
    flips = [(int((c & ~correct[0]).sum()), int((~c & correct[0]).sum())) for c in correct[1:]]
    print("\n".join(_explain(rows, len(yte), args.bootstrap, majority, flips)))
    if args.save:
        print(f"saved the int4 model to {args.save} (medquant.load(dir, model=tiny_cnn()))")
    if args.plot:
        _plot(rows, majority, args.plot)
        print(f"wrote {args.plot} (accuracy and size against bits)")
    if args.json:
        import datetime
        import platform

        from .. import __version__
        from ..kernels.cpu import cpu_features

        Path(args.json).write_text(json.dumps({
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "hardware": {"cpu": cpu_features(), "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads()},
            "versions": {"python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__,
                         "medquant": __version__},
            "data": source, "n_test": len(yte), "test_counts": n_per, "majority_acc": majority,
            "epochs": args.epochs, "seed": args.seed, "bootstrap_resamples": args.bootstrap,
            "train_seconds": train_seconds, "history": history, "rows": [asdict(r) for r in rows]}, indent=1))
    return 0


def register(sub) -> None:
    """Add the ``demo`` subcommand to the ``medquant`` parser.

    Args:
        sub: the subparsers object of the ``medquant`` parser.
    """
    p = sub.add_parser("demo", help="train a small CNN on chest X-rays, quantize it, and show size / accuracy with "
                                    "95%% intervals", description=__doc__)
    p.add_argument("--data-dir", default=str(_default_data_dir()),
                   help="folder holding pneumoniamnist/pneumoniamnist.npz (default: $MEDQUANT_DATA_DIR, else "
                        "../shared/data relative to the working directory); without it a synthetic task is used")
    p.add_argument("--allow-leakage", action="store_true",
                   help="load the PneumoniaMNIST splits without the split-leakage check (images byte-identical "
                        "across splits are otherwise reported as a warning)")
    p.add_argument("--epochs", type=positive_int, default=6, help="training epochs of the float model (default 6)")
    p.add_argument("--seed", type=seed_value, default=0)
    p.add_argument("--bootstrap", type=positive_int, default=1000, help="bootstrap resamples for the intervals")
    p.add_argument("--save", default=None, help="directory to save the int4 model to")
    p.add_argument("--json", default=None, help="write the table (and the training history) as JSON to this file "
                                                "(missing folders are created)")
    p.add_argument("--plot", default="medquant_demo.png",
                   help="PNG of accuracy and size against bits (default medquant_demo.png; '' for none; missing "
                        "folders are created)")
    p.set_defaults(func=run)
