"""``medquant demo``: train a tiny CNN on real chest X-rays (PneumoniaMNIST), quantize it at several
bit-widths and print a size / accuracy table. Runs in well under a minute on a 2-core CPU."""
from __future__ import annotations

import copy
import json
import os
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .args import positive_int


def _default_data_dir() -> Path:
    """``$MEDQUANT_DATA_DIR``, else ``../shared/data`` relative to the working directory (a source checkout next
    to the data); ``run`` falls back to a synthetic task when PneumoniaMNIST is not there."""
    env = os.environ.get("MEDQUANT_DATA_DIR")
    if env:
        return Path(env)
    return Path.cwd().parent / "shared" / "data"


def tiny_cnn(in_ch: int = 1, n_classes: int = 2) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(in_ch, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(64 * 7 * 7, 128), nn.ReLU(), nn.Linear(128, n_classes),
    )


def _load_pneumoniamnist(data_dir: Path):
    path = data_dir / "pneumoniamnist" / "pneumoniamnist.npz"
    if not path.is_file():
        return None
    d = np.load(path)

    def split(name):
        x = torch.from_numpy(d[f"{name}_images"]).float().div(255).unsqueeze(1)
        y = torch.from_numpy(d[f"{name}_labels"]).long().flatten()
        return x, y

    return split("train"), split("test"), f"PneumoniaMNIST ({path})"


def _synthetic(seed: int):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(3000, 1, 28, 28, generator=g)
    y = (x[:, :, 7:21, 7:21].mean(dim=(1, 2, 3)) > x.mean(dim=(1, 2, 3))).long()
    return (x[:2400], y[:2400]), (x[2400:], y[2400:]), "synthetic (no data directory found)"


@torch.no_grad()
def _evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, torch.Tensor]:
    model.eval()
    pred = torch.cat([model(x[i:i + 256]).argmax(1) for i in range(0, len(x), 256)])
    return float((pred == y).float().mean()), pred


def run(args) -> int:
    from .. import QuantConfig, model_size, quantize_, save

    torch.manual_seed(args.seed)
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    loaded = _load_pneumoniamnist(Path(args.data_dir)) if args.data_dir else None
    (xtr, ytr), (xte, yte), source = loaded if loaded else _synthetic(args.seed)
    print(f"data: {source}; train {len(xtr)}, test {len(xte)}")
    model = tiny_cnn()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    t0 = time.time()
    model.train()
    for _ in range(args.epochs):
        perm = torch.randperm(len(xtr))
        for i in range(0, len(xtr), 64):
            idx = perm[i:i + 64]
            loss = nn.functional.cross_entropy(model(xtr[idx]), ytr[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    print(f"trained float model for {args.epochs} epoch(s) in {time.time() - t0:.1f}s")
    fp_acc, fp_pred = _evaluate(model, xte, yte)
    fp_bytes = model_size(model).total_bytes
    rows = [("float32", "-", fp_bytes, 1.0, 32.0, fp_acc, 1.0)]
    schemes = [("int8 per-channel", QuantConfig(8, scope="channel")),
               ("int4 group-32", QuantConfig(4, group_size=32)),
               ("int3 group-32", QuantConfig(3, group_size=32)),
               ("int2 group-32", QuantConfig(2, group_size=32))]
    for label, cfg in schemes:
        q = quantize_(copy.deepcopy(model), cfg)
        acc, pred = _evaluate(q, xte, yte)
        rep = model_size(q)
        rows.append((label, "sym" if cfg.is_symmetric() else "asym", rep.total_bytes, fp_bytes / rep.total_bytes,
                     rep.effective_bits, acc, float((pred == fp_pred).float().mean())))
        if args.save and label.startswith("int4"):
            save(q, args.save)
            print(f"saved the int4 model to {args.save}")
    hdr = f"{'weights':<18}{'scheme':>7}{'bytes':>10}{'smaller':>9}{'eff.bits':>10}{'test acc':>10}{'agree':>8}"
    print(hdr)
    print("-" * len(hdr))
    for name, sch, b, ratio, bits, acc, agree in rows:
        print(f"{name:<18}{sch:>7}{b:>10d}{ratio:>8.2f}x{bits:>10.2f}{acc:>10.3f}{agree:>8.3f}")
    print("(bytes count every stored tensor and the metadata; 'agree' = fraction of test predictions equal to "
          "the float model's)")
    if args.json:
        Path(args.json).write_text(json.dumps([dict(zip(
            ["weights", "scheme", "bytes", "smaller", "effective_bits", "test_acc", "agreement"], r)) for r in rows],
            indent=1))
    return 0


def register(sub) -> None:
    p = sub.add_parser("demo", help="quantize a tiny CNN trained on chest X-rays and print a size/accuracy table",
                       description=__doc__)
    p.add_argument("--data-dir", default=str(_default_data_dir()),
                   help="folder holding pneumoniamnist/pneumoniamnist.npz (default: $MEDQUANT_DATA_DIR, else "
                        "../shared/data relative to the working directory); without it a synthetic task is used")
    p.add_argument("--epochs", type=positive_int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save", default=None, help="directory to save the int4 model to")
    p.add_argument("--json", default=None, help="write the table as JSON to this file")
    p.set_defaults(func=run)
