"""The complexity-adaptive experiment on real chest X-rays: is complexity-adaptive activation quantization better
than the same bit budget spent at random? Run by ``python -m benchmarks.complexity_adaptive``.

Per data set and seed: train a compact classifier in float (BCE), then evaluate on the test split

* ``fp32``: float weights and activations;
* ``w8``: int8 per-channel weights (``quantize_``), float activations - every other row shares these weights;
* ``uniform-2/4/8``: every sample's activations at 2 / 4 / 8 bits;
* ``adaptive``: complexity quartile levels -> {0: 2, 1: 4, 2: 8, 3: 32} bits (scorer fitted on the calibration
  split, applied to the test images the model is fed);
* ``random``: the *same* per-sample bit-widths permuted at random over the test samples (the control: same
  histogram, no complexity information), averaged over several permutations per seed;
* ``reversed``: level l -> bits of level 3-l (complex images get the fewest bits), a second control;
* ``policy``: :class:`LearnedPolicy` trained on the calibration split (labels: lowest width within epsilon of
  float loss), budget = the adaptive average bits on the calibration split (a ceiling: the policy may spend far
  fewer bits than ``random``);
* ``policy-random``: the policy's own per-sample bit-widths permuted at random over the test samples, averaged over
  the same number of permutations (the policy's control: same bits, no learned assignment);
* ``oracle``: the adaptive histogram given to test samples ordered by how much their own loss rises at 2 bits -
  it reads the test labels, so it is an upper bound on what any per-sample assignment could gain, not a method.

at two kinds of sites: ``head`` (the input of the MLP head, where a VLM classifier has its fused image-text
embedding) and ``blocks`` (the output
of every convolutional block). Activation quantization is simulated (fake quant): it changes accuracy, not speed.
"""
from __future__ import annotations

import copy
import datetime as _dt
import json
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from medquant.adaptive import (
    DEFAULT_BIT_MAP,
    AdaptiveQuantizer,
    CompactCNN,
    LearnedPolicy,
    SmallViT,
    block_output_sites,
    per_sample_losses,
    policy_labels,
)

from .datasets import data_dir as _data_dir
from .datasets import nih_patient_split
from .env import hardware, versions

DATASETS = ("kermany", "nih", "pneumoniamnist", "breastmnist")
SITE_CONFIGS = ("head", "blocks")
METHODS = ("fp32", "w8", "uniform-2", "uniform-4", "uniform-8", "adaptive", "random", "reversed", "policy",
           "policy-random",
           "oracle")


def _tqdm(it=None, **kw):
    from tqdm.auto import tqdm

    return tqdm(it, **kw)


# ---------------------------------------------------------------------------------------------- data
def _split_stratified(y: np.ndarray, frac: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    key = y[:, 0] if y.ndim == 2 else y
    a, b = [], []
    for c in np.unique(key):
        idx = rng.permutation(np.flatnonzero(key == c))
        k = round(frac * len(idx))
        b.append(idx[:k])
        a.append(idx[k:])
    return np.sort(np.concatenate(a)), np.sort(np.concatenate(b))


def load_dataset(name: str, data_dir=None, split_seed: int = 0) -> dict:
    """Raw uint8 images ``(N, H, W)`` and float targets ``(N, L)`` for ``train`` / ``calib`` / ``test``.

    ``kermany``: Kermany 64x64 (train -> 85% train / 15% calibration, stratified; official test).
    ``nih``: NIH ChestX-ray14 sample, 14 labels, split 60/20/20 **by patient_id** (the file's own split puts 30
    patients in two splits; :func:`benchmarks.common.datasets.nih_patient_split`, its validation part is the
    calibration split). ``pneumoniamnist`` / ``breastmnist``: MedMNIST train / val (calibration) / test.
    ``name`` may also be a path to a MedMNIST-style ``.npz``.
    """
    root = _data_dir(data_dir)
    files = {
        "kermany": root / "kermany_pediatric_cxr_224" / "kermany_cxr_64.npz",
        "nih": root / "nih_cxr14_sample1000_64" / "nih_cxr14_sample1000_64.npz",
        "pneumoniamnist": root / "pneumoniamnist" / "pneumoniamnist.npz",
        "breastmnist": root / "breastmnist" / "breastmnist.npz",
    }
    path = files.get(name, Path(name))
    if not path.is_file():
        raise FileNotFoundError(f"data set {name!r}: {path} not found (known names: {', '.join(DATASETS)}, or a "
                                "MedMNIST-style .npz path; set MEDQUANT_DATA_DIR or --data-dir)")
    d = np.load(path, allow_pickle=False)
    out: dict = {"name": name, "path": str(path)}
    if "multilabel" in d.files:  # NIH sample
        x, y, pid = d["images"], d["multilabel"].astype(np.float32), d["patient_id"]
        split = nih_patient_split(pid, split_seed)
        for k, part in (("train", "train"), ("calib", "val"), ("test", "test")):
            m = split == part
            out[k] = (x[m], y[m])
        out["task"] = "multilabel"
    elif "train_images" in d.files:
        def lab(k):
            v = d[k].astype(np.float32)
            return v.reshape(len(v), -1)

        xtr, ytr = d["train_images"], lab("train_labels")
        if ytr.shape[1] == 1 and len(np.unique(ytr)) > 2:
            raise ValueError(f"{path}: multi-class labels are not supported (binary or multi-label only)")
        if "val_images" in d.files:
            out["train"], out["calib"] = (xtr, ytr), (d["val_images"], lab("val_labels"))
        else:
            a, b = _split_stratified(ytr, 0.15, split_seed)
            out["train"], out["calib"] = (xtr[a], ytr[a]), (xtr[b], ytr[b])
        out["test"] = (d["test_images"], lab("test_labels"))
        out["task"] = "binary" if ytr.shape[1] == 1 else "multilabel"
    else:
        raise ValueError(f"{path}: expected MedMNIST keys (train_images, ...) or the NIH sample keys")
    for k in ("train", "calib", "test"):
        xi = out[k][0]
        if xi.ndim == 4 and xi.shape[-1] == 3:  # RGB -> gray: 0.2125 R + 0.7154 G + 0.0721 B (skimage rgb2gray)
            xi = np.round(xi @ np.array([0.2125, 0.7154, 0.0721])).clip(0, 255).astype(np.uint8)
        if xi.ndim != 3 or xi.dtype != np.uint8:
            raise ValueError(f"{path}: expected uint8 (N, H, W) images, got {xi.dtype} {xi.shape}")
        out[k] = (xi, out[k][1])
    out["n_labels"] = int(out["train"][1].shape[1])
    return out


def _to_input(u8: np.ndarray, mean: float, std: float) -> torch.Tensor:
    return ((torch.from_numpy(u8).float() / 255.0 - mean) / std).unsqueeze(1)


# ---------------------------------------------------------------------------------------------- model
def build_model(arch: str, n_labels: int, image_size: int) -> nn.Module:
    if arch == "cnn":
        return CompactCNN(n_labels, in_channels=1, widths=(8, 16, 32, 64), hidden=64)
    if arch == "vit":
        return SmallViT(n_labels, image_size=image_size, patch=max(image_size // 8, 1), in_channels=1, dim=64,
                        depth=4, heads=4, hidden=64)
    raise ValueError(f"arch must be 'cnn' or 'vit', got {arch!r}")


def train_model(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int, seed: int, batch: int = 64,
                lr: float = 3e-3, desc: str = "train") -> list[float]:
    """AdamW + cosine schedule, BCE with logits; returns the mean loss of each epoch."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    steps = epochs * ((len(x) + batch - 1) // batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=max(steps, 1), pct_start=0.15)
    lossf = nn.BCEWithLogitsLoss()
    hist = []
    model.train()
    bar = _tqdm(total=steps, desc=desc, leave=False)
    for _ in range(epochs):
        perm = torch.randperm(len(x), generator=g)
        tot = 0.0
        for i in range(0, len(x), batch):
            idx = perm[i:i + batch]
            loss = lossf(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            tot += loss.item() * len(idx)
            bar.update(1)
        hist.append(tot / len(x))
    bar.close()
    model.eval()
    return hist


# ---------------------------------------------------------------------------------------------- metrics
def classification_metrics(probs: np.ndarray, y: np.ndarray) -> dict:
    """accuracy (element-wise at p >= 0.5; for one label the usual accuracy), MAE of probabilities vs labels,
    AUC (mean over labels with both classes present, scikit-learn's ``roc_auc_score``)."""
    from sklearn.metrics import roc_auc_score

    pred = probs >= 0.5
    aucs = [roc_auc_score(y[:, j], probs[:, j]) for j in range(y.shape[1]) if 0 < y[:, j].sum() < len(y)]
    return {"accuracy": float((pred == (y >= 0.5)).mean()), "mae": float(np.abs(probs - y).mean()),
            "auc": float(np.mean(aucs)) if aucs else float("nan")}


@torch.no_grad()
def predict(fn, x: torch.Tensor, bits: torch.Tensor | None, batch: int = 32) -> tuple[np.ndarray, float]:
    """Probabilities and ms/image (forward only, batches of ``batch``)."""
    outs, t = [], 0.0
    for i in range(0, len(x), batch):
        xb = x[i:i + batch]
        t0 = time.perf_counter()
        logits = fn(xb) if bits is None else fn(xb, bits=bits[i:i + batch])
        t += time.perf_counter() - t0
        outs.append(torch.sigmoid(logits.float()))
    return torch.cat(outs).numpy(), 1000.0 * t / len(x)


def _bce_per_sample(logits, y):
    return nn.functional.binary_cross_entropy_with_logits(logits.float(), y, reduction="none").sum(dim=1)


# ---------------------------------------------------------------------------------------------- timing
@torch.no_grad()
def measure_overhead(model: nn.Module, x: torch.Tensor, bits: torch.Tensor, sites, repeats: int = 30) -> dict:
    """Forward time at one batch with and without the adaptive activation quantization (same weights).

    Baseline: ``model`` (hooks absent); adaptive: a deep copy wrapped by ``AdaptiveQuantizer`` with the same
    weights (``weight_config=None``: the copy's weights are already what the baseline uses) and mixed ``bits``.
    Runs interleaved, medians reported; overhead = (t_adaptive - t_base) / t_base.
    """
    base = model.eval()
    aq = AdaptiveQuantizer(copy.deepcopy(model), sites=sites, weight_config=None).eval()
    for _ in range(3):
        base(x)
        aq(x, bits=bits)
    tb, ta = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        base(x)
        tb.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        aq(x, bits=bits)
        ta.append(time.perf_counter() - t0)
    mb, ma = statistics.median(tb), statistics.median(ta)
    return {"batch": int(x.shape[0]), "base_ms": 1000 * mb, "adaptive_ms": 1000 * ma,
            "overhead_ratio": (ma - mb) / mb, "repeats": repeats}


# ---------------------------------------------------------------------------------------------- one run
def _sites_for(model: nn.Module, kind: str):
    return [("head", "input")] if kind == "head" else block_output_sites(model)


def _spearman(a, b) -> float:
    ra = np.argsort(np.argsort(np.asarray(a, dtype=np.float64))).astype(np.float64)
    rb = np.argsort(np.argsort(np.asarray(b, dtype=np.float64))).astype(np.float64)
    return float(np.corrcoef(ra, rb)[0, 1])


def run_seed(data: dict, seed: int, arch: str, epochs: int, levels_test: torch.Tensor, metrics_calib,
             metrics_test, levels_calib: torch.Tensor, n_random: int = 5, epsilon: float = 0.02,
             site_configs=SITE_CONFIGS, score_test=None) -> tuple[list[dict], nn.Module, dict]:
    """Train one model and evaluate every method at every site configuration; returns result rows."""
    from medquant import QuantConfig, model_size

    xtr_u8, ytr = data["train"]
    mean, std = float(xtr_u8.mean() / 255.0), float(xtr_u8.std() / 255.0)
    xtr, xca, xte = (_to_input(data[k][0], mean, std) for k in ("train", "calib", "test"))
    ytr_t = torch.from_numpy(ytr)
    yca, yte = torch.from_numpy(data["calib"][1]), data["test"][1]
    torch.manual_seed(seed)
    model = build_model(arch, data["n_labels"], xtr.shape[-1])
    hist = train_model(model, xtr, ytr_t, epochs, seed, desc=f"{data['name']} seed {seed}")
    rows = []

    def add(method, sites, probs, ms, size_mb, bits):
        rows.append({"dataset": data["name"], "seed": seed, "sites": sites, "method": method,
                     **classification_metrics(probs, yte), "ms_per_image": ms, "size_mb": size_mb,
                     "avg_bits": bits})

    probs, ms = predict(model, xte, None)
    fp_size = model_size(model).total_bytes / 1e6
    for s in site_configs:
        add("fp32", s, probs, ms, fp_size, 32.0)
    bit_of = lambda lv: torch.tensor([DEFAULT_BIT_MAP[int(v)] for v in lv], dtype=torch.int64)
    adaptive_bits = bit_of(levels_test)
    rev_bits = bit_of(3 - levels_test)
    rng = torch.Generator().manual_seed(1000 + seed)
    rng_policy = torch.Generator().manual_seed(2000 + seed)  # its own stream: the other draws stay as they were
    n = len(xte)
    extras = {"train_loss": hist}
    for s in site_configs:
        aq = AdaptiveQuantizer(copy.deepcopy(model), sites=_sites_for(model, s),
                               weight_config=QuantConfig(8, scope="channel")).eval()
        size = model_size(aq.model).total_bytes / 1e6

        def run_bits(b, aq=aq):
            return predict(aq, xte, b)

        for name, b in [("w8", torch.full((n,), 32)), ("uniform-2", torch.full((n,), 2)),
                        ("uniform-4", torch.full((n,), 4)), ("uniform-8", torch.full((n,), 8)),
                        ("adaptive", adaptive_bits), ("reversed", rev_bits)]:
            p, t = run_bits(b)
            add(name, s, p, t, size, float(b.float().mean()))
        # random control: the adaptive histogram permuted, several draws, metrics averaged
        draws = []
        for _ in range(n_random):
            b = adaptive_bits[torch.randperm(n, generator=rng)]
            p, t = run_bits(b)
            draws.append({**classification_metrics(p, yte), "ms_per_image": t})
        rows.append({"dataset": data["name"], "seed": seed, "sites": s, "method": "random",
                     **{k: float(np.mean([d[k] for d in draws])) for k in draws[0]},
                     "size_mb": size, "avg_bits": float(adaptive_bits.float().mean()), "draws": draws})
        # learned policy: labels on the calibration split, budget = adaptive average bits there
        losses, fp_loss = per_sample_losses(aq, xca, yca, _bce_per_sample)
        labels = policy_labels(losses, fp_loss, epsilon)
        budget = float(bit_of(levels_calib).float().mean())
        pol = LearnedPolicy(DEFAULT_BIT_MAP).fit(metrics_calib, labels, budget=budget, seed=seed)
        pol_bits = bit_of(pol.levels(metrics=metrics_test))
        p, t = run_bits(pol_bits)
        add("policy", s, p, t, size, float(pol_bits.float().mean()))
        rows[-1]["label_histogram"] = {int(k): int(v) for k, v in zip(*np.unique(labels.numpy(),
                                                                                 return_counts=True))}
        # the policy's control: its own bit-widths permuted, several draws, metrics averaged
        draws = []
        for _ in range(n_random):
            p, t = run_bits(pol_bits[torch.randperm(n, generator=rng_policy)])
            draws.append({**classification_metrics(p, yte), "ms_per_image": t})
        rows.append({"dataset": data["name"], "seed": seed, "sites": s, "method": "policy-random",
                     **{k: float(np.mean([d[k] for d in draws])) for k in draws[0]},
                     "size_mb": size, "avg_bits": float(pol_bits.float().mean()), "draws": draws})
        # oracle: adaptive histogram, samples ordered by their own loss increase at 2 bits (reads test labels)
        tl, tfp = per_sample_losses(aq, xte, torch.from_numpy(yte), _bce_per_sample, bits_list=[2])
        order = torch.argsort(tl[2] - tfp, stable=True)
        ob = torch.empty(n, dtype=torch.int64)
        ob[order] = torch.sort(adaptive_bits).values
        p, t = run_bits(ob)
        add("oracle", s, p, t, size, float(ob.float().mean()))
        # does complexity predict sensitivity? mean loss increase at 2 bits per level, and the rank correlation
        # between the complexity score and that increase on the test split
        sens = (tl[2] - tfp).numpy()
        extras[f"sensitivity_by_level_{s}"] = {
            int(lv): float(sens[(levels_test == lv).numpy()].mean()) for lv in range(4)}
        extras[f"spearman_score_vs_sensitivity_{s}"] = _spearman(score_test, sens)
    return rows, model, {"mean": mean, "std": std, **extras}


def aggregate(rows: list[dict]) -> list[dict]:
    """Mean and standard deviation over seeds for each (dataset, sites, method)."""
    keys = sorted({(r["dataset"], r["sites"], r["method"]) for r in rows},
                  key=lambda k: (k[0], k[1], METHODS.index(k[2])))
    out = []
    for key in keys:
        rs = [r for r in rows if (r["dataset"], r["sites"], r["method"]) == key]
        agg = {"dataset": key[0], "sites": key[1], "method": key[2], "n_seeds": len(rs)}
        for m in ("accuracy", "mae", "auc", "ms_per_image", "size_mb", "avg_bits"):
            v = [r[m] for r in rs]
            agg[m] = float(np.mean(v))
            agg[m + "_std"] = float(np.std(v, ddof=1)) if len(v) > 1 else 0.0
        out.append(agg)
    return out


def paired(rows: list[dict], a: str, b: str) -> list[dict]:
    """Per-seed differences a - b (accuracy, AUC, MAE) for each (dataset, sites)."""
    out = []
    for ds, s in sorted({(r["dataset"], r["sites"]) for r in rows}):
        by = {(r["method"], r["seed"]): r for r in rows if r["dataset"] == ds and r["sites"] == s}
        seeds = sorted({sd for (m, sd) in by if m == a} & {sd for (m, sd) in by if m == b})
        d = {"dataset": ds, "sites": s, "a": a, "b": b, "seeds": seeds}
        for m in ("accuracy", "auc", "mae"):
            v = [by[(a, sd)][m] - by[(b, sd)][m] for sd in seeds]
            d[m] = v
            d[m + "_mean"] = float(np.mean(v)) if v else float("nan")
            d[m + "_std"] = float(np.std(v, ddof=1)) if len(v) > 1 else 0.0
        out.append(d)
    return out


def format_table(agg: list[dict]) -> str:
    lines = []
    hdr = ("| dataset | sites | method | accuracy | MAE | AUC | ms/image | size MB | avg bits |\n"
           "|---|---|---|---|---|---|---|---|---|")
    lines.append(hdr)
    for r in agg:
        lines.append(
            f"| {r['dataset']} | {r['sites']} | {r['method']} | {r['accuracy']:.4f} ± {r['accuracy_std']:.4f} | "
            f"{r['mae']:.4f} ± {r['mae_std']:.4f} | {r['auc']:.4f} ± {r['auc_std']:.4f} | "
            f"{r['ms_per_image']:.3f} | {r['size_mb']:.4f} | {r['avg_bits']:.2f} |")
    return "\n".join(lines)


def plot(agg: list[dict], path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets = sorted({r["dataset"] for r in agg})
    sites = [s for s in SITE_CONFIGS if any(r["sites"] == s for r in agg)]
    fig, axes = plt.subplots(len(datasets), 2 * len(sites), figsize=(5 * 2 * len(sites), 4 * len(datasets)),
                             squeeze=False)
    markers = dict(zip(METHODS, "o*sssDXv^xP"))
    for i, ds in enumerate(datasets):
        for j, (metric, s) in enumerate([(m, s) for m in ("accuracy", "auc") for s in sites]):
            ax = axes[i][j]
            for r in agg:
                if r["dataset"] != ds or r["sites"] != s:
                    continue
                ax.errorbar(r["avg_bits"], r[metric], yerr=r[metric + "_std"], marker=markers[r["method"]],
                            ls="none", capsize=3, label=r["method"])
            ax.set_xscale("log", base=2)
            ax.set_xlabel("average activation bits")
            ax.set_ylabel(metric)
            ax.set_title(f"{ds} - {metric} - sites: {s}")
            ax.grid(alpha=0.3)
            if i == 0 and j == 0:
                ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def environment() -> dict:
    return {"date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "platform": platform.platform(), **hardware(), "versions": versions("sklearn")}


def run_benchmark(datasets=("kermany", "nih"), seeds=(0, 1, 2), arch: str = "cnn", epochs=None, data_dir=None,
                  n_random: int = 5, epsilon: float = 0.02, site_configs=SITE_CONFIGS, log=print,
                  overhead_repeats: int = 30) -> dict:
    """The whole experiment; returns a JSON-serialisable dict (rows, aggregate, paired, overhead, environment)."""
    from medquant.complexity import ComplexityScorer

    t_start = time.perf_counter()
    default_epochs = {"kermany": 4, "nih": 12, "pneumoniamnist": 4, "breastmnist": 15}
    result = {"environment": environment(), "config": {
        "datasets": list(datasets), "seeds": list(seeds), "arch": arch, "epochs": epochs, "n_random": n_random,
        "epsilon": epsilon, "bit_map": DEFAULT_BIT_MAP, "site_configs": list(site_configs),
        "weights": "int8 per output channel (quantize_) for every row except fp32",
        "activation_quantization": "per-sample dynamic asymmetric fake quantization, range widened to 0"},
        "rows": [], "overhead": [], "complexity": {}}
    for ds in datasets:
        data = load_dataset(ds, data_dir)
        log(f"[{ds}] train {len(data['train'][0])}, calibration {len(data['calib'][0])}, "
            f"test {len(data['test'][0])}, {data['n_labels']} label(s), images {data['test'][0].shape[1:]}")
        scorer = ComplexityScorer(n_levels=4)
        t0 = time.perf_counter()
        m_cal = scorer.metrics(data["calib"][0])
        m_test = scorer.metrics(data["test"][0])
        score_ms = 1000 * (time.perf_counter() - t0) / (len(m_cal) + len(m_test))
        scorer.fit(metrics=m_cal)
        lv_cal, lv_test = scorer.levels(metrics=m_cal), scorer.levels(metrics=m_test)
        result["complexity"][ds] = {
            "scoring_ms_per_image": score_ms, "thresholds": scorer.thresholds.tolist(),
            "test_level_counts": torch.bincount(lv_test, minlength=4).tolist(),
            "test_positive_rate_by_level": [float(data["test"][1][(lv_test == k).numpy()].mean())
                                            for k in range(4)]}
        ep = epochs if epochs is not None else default_epochs.get(ds, 6)
        first_model = None
        for seed in _tqdm(list(seeds), desc=f"{ds} seeds"):
            rows, model, extras = run_seed(data, seed, arch, ep, lv_test, m_cal.float(), m_test.float(), lv_cal,
                                           n_random=n_random, epsilon=epsilon, site_configs=site_configs,
                                           score_test=scorer.score(metrics=m_test).numpy())
            result["rows"] += rows
            result.setdefault("training", []).append({"dataset": ds, "seed": seed, "epochs": ep, **extras})
            if first_model is None:
                first_model = (model, extras)
        # overhead of the adaptive activation quantization at batch 32 (float weights and int8 weights)
        model, ex = first_model
        xb = _to_input(data["test"][0][:32], ex["mean"], ex["std"])
        bb = torch.tensor([DEFAULT_BIT_MAP[int(v)] for v in lv_test[:32]])
        from medquant import QuantConfig, quantize_

        w8 = quantize_(copy.deepcopy(model), QuantConfig(8, scope="channel"))
        for wname, mdl in (("fp32 weights", model), ("int8 weights", w8)):
            for s in site_configs:
                o = measure_overhead(mdl, xb, bb, _sites_for(mdl, s), repeats=overhead_repeats)
                result["overhead"].append({"dataset": ds, "weights": wname, "sites": s, **o})
                log(f"[{ds}] overhead {wname}, sites {s}: base {o['base_ms']:.2f} ms, adaptive "
                    f"{o['adaptive_ms']:.2f} ms, ratio {o['overhead_ratio']:+.3f}")
    result["aggregate"] = aggregate(result["rows"])
    result["paired"] = (paired(result["rows"], "adaptive", "random") + paired(result["rows"], "adaptive", "reversed")
                        + paired(result["rows"], "policy", "random") + paired(result["rows"], "policy", "policy-random")
                        + paired(result["rows"], "oracle", "random"))
    result["wall_s"] = time.perf_counter() - t_start
    return result


def save_result(result: dict, json_path, png_path=None) -> None:
    json_path = Path(json_path)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(result, indent=1, default=float) + "\n")
    if png_path is not None:
        plot(result["aggregate"], png_path)
