"""Classifiers on a CPU with ONNX Runtime: medquant's int8 / W4 ONNX export against ORT's own quantize_static.

Variants of each network (same weights, same calibration batches):
  * ``pytorch_fp32``  - the float model in PyTorch;
  * ``ort_fp32``      - the float model exported by medquant (BatchNorm folded) and run by ONNX Runtime;
  * ``ort_qs_int8``   - ORT's own ``quantize_static`` of ``ort_fp32`` (QDQ, per-channel int8 weights, uint8
    activations, min-max calibration): the reference int8 model;
  * ``mq_int8``       - ``quantize_`` 8-bit per channel + ``calibrate_activations`` (min-max) + ``export``;
  * ``mq_w4``         - ``quantize_`` 4-bit group 32 + ``export`` (weight-only: MatMulNBits / int4 blocks + float
    convolutions).

Speed: images/s at batch 1 and 32 (median of timed runs after warm-up; 2 intra-op threads), for ResNet-18 at
224 px with random weights and for the trained networks at their evaluation resolution. Accuracy: test accuracy and
worst-group accuracy with paired bootstrap 95% intervals of the difference to ``pytorch_fp32`` (1000 resamples of
the test images), file size, and for ``mq_int8`` the agreement of ONNX Runtime with medquant's PyTorch simulation
(the accuracy a user measures in PyTorch before deploying).

Reduced protocol (a 2-core CPU shared with other jobs; stated in the JSON): training and evaluation at 64 px, not
224 px. ResNet-18 trained on Kermany pediatric chest X-rays (kermany_cxr_64.npz, gray, normal vs pneumonia; groups
= the two classes, so worst-group = worst-class accuracy; Kermany has no demographic groups); SmallCNN and the
CLS-token ViT (benchmarks.common.nets) on HAM10000 with sex groups (64 px). ``--quick`` trains on subsets for one
epoch and times fewer runs.

    python -m benchmarks.onnx_classifiers --quick
    python -m benchmarks.onnx_classifiers
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from benchmarks.common.datasets import data_dir, load_ham10000_sex
from benchmarks.common.env import hardware, versions
from benchmarks.common.nets import CLSTokenViT, SmallCNN, train_classifier
from benchmarks.common.resnet import ResNet18
from medquant import QuantConfig, quantize_
from medquant.deploy import export
from medquant.deploy.onnx import calibrate_activations, optimized_op_counts, session_options

VARIANTS = ["pytorch_fp32", "ort_fp32", "ort_qs_int8", "mq_int8", "mq_w4"]
RESULTS = Path(__file__).resolve().parent / "results"
THREADS = 2


def settings(quick: bool) -> dict:
    if quick:
        return {"train_subset": 1024, "epochs": {"resnet18": 1, "cnn": 2, "vit": 2}, "reps": {1: 10, 32: 3},
                "calib": 8, "boot": 300, "test_subset": None}
    return {"train_subset": None, "epochs": {"resnet18": 3, "cnn": 8, "vit": 10}, "reps": {1: 30, 32: 8},
            "calib": 16, "boot": 1000, "test_subset": None}


# ------------------------------------------------------------------------------------------------------ data
def load_kermany(root: Path) -> dict:
    z = np.load(root / "kermany_pediatric_cxr_224" / "kermany_cxr_64.npz")
    out = {}
    for split in ("train", "test"):
        x = torch.from_numpy(z[f"{split}_images"]).float().div(255.0).unsqueeze(1)
        y = torch.from_numpy(z[f"{split}_labels"].reshape(-1)).long()
        out[split] = ((x - 0.5) / 0.25, y, y.clone())  # groups = classes
    out["info"] = {"name": "kermany_cxr_64", "classes": 2, "groups": "class (normal / pneumonia)"}
    return out


def load_ham(root: Path) -> dict:
    d = load_ham10000_sex(root, size=64)
    out = {s: ((d[s][0] - 0.5) / 0.25, d[s][1], d[s][2]) for s in ("train", "val", "test")}
    out["info"] = {"name": "ham10000_64", "classes": 7, "groups": "sex (female / male)"}
    return out


# --------------------------------------------------------------------------------------------------- models
def ort_session(path: Path):
    """2 intra-op threads; a weight-only export has its int4 weights dequantized once at session creation
    (``medquant.deploy.onnx.session_options``), the others run as written."""
    import onnxruntime as ort

    so = session_options(path, THREADS)
    so.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


class _Reader:
    def __init__(self, name: str, batches: list[torch.Tensor]) -> None:
        self.it = iter([{name: b.numpy()} for b in batches])

    def get_next(self):
        return next(self.it, None)


def _runner(sess):
    return lambda x: sess.run(None, {"pixel_values": x.numpy()})[0]


def build_variants(model: torch.nn.Module, calib: list[torch.Tensor], example: torch.Tensor, folder: Path) -> dict:
    """Every variant: a callable ``x -> logits (numpy)``, its file and size, and the ORT op counts."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    out: dict = {}
    model = model.eval()

    def torch_fn(x):
        with torch.no_grad():
            return model(x).numpy()

    out["pytorch_fp32"] = {"fn": torch_fn, "file": None}
    f32 = folder / "fp32.onnx"
    export(model, f32, format="onnx", example_inputs=example)
    qs = folder / "qs_int8.onnx"
    quantize_static(str(f32), str(qs), _Reader("pixel_values", calib), quant_format=QuantFormat.QDQ,
                    per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                    calibrate_method=CalibrationMethod.MinMax)
    q8 = copy.deepcopy(model)
    quantize_(q8, QuantConfig(bits=8, scope="channel"))
    sim = calibrate_activations(q8, calib, method="minmax")
    mq8 = folder / "mq_int8.onnx"
    rep8 = export(sim, mq8, format="onnx", example_inputs=example)
    q4 = copy.deepcopy(model)
    quantize_(q4, QuantConfig(bits=4, scope="group", group_size=32))
    mq4 = folder / "mq_w4.onnx"
    export(q4, mq4, format="onnx", example_inputs=example)
    for name, path in (("ort_fp32", f32), ("ort_qs_int8", qs), ("mq_int8", mq8), ("mq_w4", mq4)):
        sess = ort_session(path)
        out[name] = {"fn": _runner(sess), "file": path, "ops": dict(optimized_op_counts(path))}
    for v in out.values():
        v["bytes"] = os.path.getsize(v["file"]) if v["file"] else None
    out["mq_int8"]["sim"] = sim
    out["mq_int8"]["report_counts"] = rep8.counts()
    return out


# ------------------------------------------------------------------------------------------------ measuring
def speed(variants: dict, shape: tuple, reps: dict) -> dict:
    """images/s per variant and batch size: two warm-up calls each, then ``reps`` rounds that time every variant
    once (interleaved, so load from other jobs on the shared CPU falls on all variants alike); the median."""
    g = torch.Generator().manual_seed(0)
    res = {}
    for bs in (1, 32):
        x = torch.randn(bs, *shape, generator=g)
        for v in variants.values():
            v["fn"](x)
            v["fn"](x)
        times: dict[str, list[float]] = {name: [] for name in variants}
        loads = []
        for _ in range(reps[bs]):
            for name, v in variants.items():
                t = time.perf_counter()
                v["fn"](x)
                times[name].append(time.perf_counter() - t)
            loads.append(os.getloadavg()[0])
        res[bs] = {name: {"images_per_s": bs / statistics.median(ts), "median_s": statistics.median(ts),
                          "reps": reps[bs], "loadavg_1m_mean": sum(loads) / len(loads)}
                   for name, ts in times.items()}
    return res


def predict(fn, x: torch.Tensor, bs: int = 64) -> np.ndarray:
    return np.concatenate([fn(x[i:i + bs]) for i in range(0, len(x), bs)])


def group_acc(correct: np.ndarray, groups: np.ndarray) -> float:
    return min(float(correct[groups == g].mean()) for g in np.unique(groups))


def bootstrap(correct_a: np.ndarray, correct_f: np.ndarray, groups: np.ndarray, n: int, seed: int = 0) -> dict:
    """Paired bootstrap (same resampled images for both models) of accuracy and worst-group differences."""
    rng = np.random.default_rng(seed)
    da, dw = [], []
    for _ in range(n):
        idx = rng.integers(0, len(groups), len(groups))
        a, f, g = correct_a[idx], correct_f[idx], groups[idx]
        da.append(a.mean() - f.mean())
        dw.append(group_acc(a, g) - group_acc(f, g))

    def ci(v):
        return [float(np.percentile(v, 2.5)), float(np.percentile(v, 97.5))]

    return {"acc_diff_ci95": ci(da), "worst_group_diff_ci95": ci(dw)}


def accuracy(variants: dict, x: torch.Tensor, y: torch.Tensor, g: torch.Tensor, boot: int) -> dict:
    yn, gn = y.numpy(), g.numpy()
    logits = {name: predict(v["fn"], x) for name, v in variants.items()}
    correct = {name: (lg.argmax(1) == yn) for name, lg in logits.items()}
    res = {}
    for name in variants:
        c = correct[name]
        row = {"acc": float(c.mean()), "worst_group_acc": group_acc(c, gn),
               "per_group": {int(k): float(c[gn == k].mean()) for k in np.unique(gn)},
               "group_counts": {int(k): int((gn == k).sum()) for k in np.unique(gn)}}
        if name != "pytorch_fp32":
            row.update(bootstrap(c, correct["pytorch_fp32"], gn, boot))
            row["agree_with_float"] = float((logits[name].argmax(1) == logits["pytorch_fp32"].argmax(1)).mean())
            lo, hi = row["acc_diff_ci95"]
            row["acc_target_met"] = bool(lo <= 0 <= hi or (lo >= -0.01 and hi <= 0.01))
            lo, hi = row["worst_group_diff_ci95"]
            row["worst_group_target_met"] = bool(lo <= 0 <= hi or (lo >= -0.01 and hi <= 0.01))
        res[name] = row
    sim = variants["mq_int8"]["sim"]
    with torch.no_grad():
        sim_logits = predict(lambda t: sim(t).numpy(), x)
    res["mq_int8"]["pytorch_simulation_acc"] = float((sim_logits.argmax(1) == yn).mean())
    res["mq_int8"]["ort_vs_simulation_agreement"] = float((sim_logits.argmax(1) == logits["mq_int8"].argmax(1))
                                                          .mean())
    res["mq_int8"]["ort_vs_simulation_max_abs_logit_diff"] = float(np.abs(sim_logits - logits["mq_int8"]).max())
    return res


def sizes(variants: dict) -> dict:
    f32 = variants["ort_fp32"]["bytes"]
    return {name: {"bytes": v["bytes"], "ratio_to_fp32": v["bytes"] / f32} for name, v in variants.items()
            if v["bytes"]}


def subset(t: tuple, n: int | None, seed: int = 0) -> tuple:
    if n is None or n >= len(t[0]):
        return t
    idx = torch.randperm(len(t[0]), generator=torch.Generator().manual_seed(seed))[:n]
    return tuple(a[idx] for a in t)


# ---------------------------------------------------------------------------------------------------- runs
def run_trained(arch: str, data: dict, st: dict, folder: Path) -> dict:
    torch.manual_seed(0)
    info = data["info"]
    x_tr, y_tr, _ = subset(data["train"], st["train_subset"])
    cin = x_tr.shape[1]
    model = {"resnet18": lambda: ResNet18(cin, info["classes"]), "cnn": lambda: SmallCNN(cin, info["classes"]),
             "vit": lambda: CLSTokenViT(cin, info["classes"], image=64)}[arch]()
    t0 = time.time()
    train_classifier(model, x_tr, y_tr, epochs=st["epochs"][arch], num_classes=info["classes"], desc=arch)
    train_s = time.time() - t0
    calib = list(data["train"][0][torch.randperm(len(data["train"][0]),
                                                 generator=torch.Generator().manual_seed(1))[:32 * st["calib"]]]
                 .split(32))
    variants = build_variants(model, calib, data["test"][0][:2], folder / f"{arch}_{info['name']}")
    x_te, y_te, g_te = data["test"]
    return {"arch": arch, "dataset": info, "train_images": len(x_tr), "epochs": st["epochs"][arch],
            "train_s": train_s, "accuracy": accuracy(variants, x_te, y_te, g_te, st["boot"]),
            "speed": speed(variants, tuple(x_te.shape[1:]), st["reps"]), "size": sizes(variants),
            "ort_ops": {k: v.get("ops") for k, v in variants.items() if v.get("ops")},
            "mq_int8_export_counts": variants["mq_int8"]["report_counts"]}


def run_resnet224(st: dict, folder: Path) -> dict:
    torch.manual_seed(0)
    model = ResNet18(3, 2).eval()
    for m in model.modules():  # random but non-trivial BatchNorm statistics
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_var.uniform_(0.5, 2.0)
            m.running_mean.uniform_(-0.1, 0.1)
    g = torch.Generator().manual_seed(2)
    calib = [torch.randn(8, 3, 224, 224, generator=g) for _ in range(4)]
    variants = build_variants(model, calib, calib[0][:2], folder / "resnet18_224")
    return {"arch": "resnet18", "resolution": 224, "weights": "random (speed only)",
            "speed": speed(variants, (3, 224, 224), st["reps"]), "size": sizes(variants),
            "ort_ops": {k: v.get("ops") for k, v in variants.items() if v.get("ops")}}


def targets(r224: dict, trained: list[dict]) -> list[dict]:
    s32 = r224["speed"][32]
    out = [
        {"target": "ResNet-18 224px batch 32: mq_int8 >= 0.9x ort_qs_int8",
         "value": s32["mq_int8"]["images_per_s"] / s32["ort_qs_int8"]["images_per_s"]},
        {"target": "ResNet-18 224px batch 32: mq_int8 >= 2x pytorch_fp32",
         "value": s32["mq_int8"]["images_per_s"] / s32["pytorch_fp32"]["images_per_s"]},
        {"target": "ResNet-18 file: mq_int8 <= 0.3x ort_fp32", "value": r224["size"]["mq_int8"]["ratio_to_fp32"]},
    ]
    out[0]["met"] = out[0]["value"] >= 0.9
    out[1]["met"] = out[1]["value"] >= 2.0
    out[2]["met"] = out[2]["value"] <= 0.3
    for r in trained:
        a = r["accuracy"]["mq_int8"]
        out.append({"target": f"{r['arch']} {r['dataset']['name']}: int8 accuracy diff CI contains 0 or within 1 pt",
                    "value": a["acc_diff_ci95"], "met": a["acc_target_met"]})
        out.append({"target": f"{r['arch']} {r['dataset']['name']}: int8 worst-group diff CI contains 0 or within "
                              f"1 pt", "value": a["worst_group_diff_ci95"], "met": a["worst_group_target_met"]})
        out.append({"target": f"{r['arch']} {r['dataset']['name']}: ORT int8 predictions = PyTorch simulation on "
                              f">= 99% of the test set", "value": a["ort_vs_simulation_agreement"],
                    "met": a["ort_vs_simulation_agreement"] >= 0.99})
    return out


def table(result: dict) -> str:
    lines = []
    r = result["resnet18_224"]
    lines.append("ResNet-18 224 px (random weights): images/s (batch 1 | batch 32), file MB")
    for v in VARIANTS:
        size = r["size"].get(v, {}).get("bytes")
        lines.append(f"  {v:13s} {r['speed'][1][v]['images_per_s']:8.1f} | {r['speed'][32][v]['images_per_s']:8.1f}"
                     + (f"   {size / 1e6:7.2f} MB" if size else ""))
    for t in result["trained"]:
        lines.append(f"{t['arch']} on {t['dataset']['name']} (64 px, {t['train_images']} train images, "
                     f"{t['epochs']} epochs): acc / worst-group, diff-to-float 95% CI, images/s b1 | b32")
        for v in VARIANTS:
            a, s = t["accuracy"][v], t["speed"]
            ci = "" if v == "pytorch_fp32" else (f"  dAcc [{a['acc_diff_ci95'][0]:+.3f}, {a['acc_diff_ci95'][1]:+.3f}]"
                                                 f" dWorst [{a['worst_group_diff_ci95'][0]:+.3f}, "
                                                 f"{a['worst_group_diff_ci95'][1]:+.3f}]")
            lines.append(f"  {v:13s} {a['acc']:.3f} / {a['worst_group_acc']:.3f}{ci}  "
                         f"{s[1][v]['images_per_s']:8.1f} | {s[32][v]['images_per_s']:8.1f}")
        a = t["accuracy"]["mq_int8"]
        lines.append(f"  mq_int8: PyTorch simulation acc {a['pytorch_simulation_acc']:.3f}, ORT agrees with it on "
                     f"{a['ort_vs_simulation_agreement']:.4f} of the images")
    lines.append("Targets:")
    for tg in result["targets"]:
        val = tg["value"]
        val = f"{val:.3f}" if isinstance(val, float) else str([round(v, 3) for v in val])
        lines.append(f"  [{'met' if tg['met'] else 'NOT met'}] {tg['target']}: {val}")
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [("ResNet-18 224", result["resnet18_224"])] + [(f"{t['arch']} {t['dataset']['name']}", t)
                                                           for t in result["trained"]]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    w = 0.8 / len(VARIANTS)
    for ax, bs in zip(axes, (1, 32)):
        for i, v in enumerate(VARIANTS):
            base = [r["speed"][bs]["pytorch_fp32"]["images_per_s"] for _, r in runs]
            vals = [r["speed"][bs][v]["images_per_s"] / b for (_, r), b in zip(runs, base)]
            ax.bar(np.arange(len(runs)) + i * w, vals, w, label=v)
        ax.set_xticks(np.arange(len(runs)) + 0.4 - w / 2)
        ax.set_xticklabels([n for n, _ in runs], rotation=15, fontsize=8)
        ax.set_ylabel("images/s relative to PyTorch fp32")
        ax.set_title(f"batch {bs} (2 threads, shared CPU)")
        ax.axhline(1.0, color="k", lw=0.5)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="training subsets, 1-2 epochs, fewer timing runs")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--archs", default="resnet18,cnn,vit", help="comma-separated subset of resnet18,cnn,vit")
    p.add_argument("--out", default=None, help="output stem under benchmarks/results/")
    args = p.parse_args(argv)
    torch.set_num_threads(THREADS)
    st = settings(args.quick)
    root = data_dir(args.data_dir)
    archs = [a.strip() for a in args.archs.split(",") if a.strip()]
    bad = sorted(set(archs) - {"resnet18", "cnn", "vit"})
    if bad:
        p.error(f"unknown --archs {bad}; accepted: resnet18, cnn, vit")
    started = datetime.now(timezone.utc).isoformat(timespec="seconds")
    load_start = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        r224 = run_resnet224(st, folder)
        print(f"ResNet-18 224 done (load {os.getloadavg()[0]:.1f})", file=sys.stderr)
        trained = []
        ham = load_ham(root) if ("cnn" in archs or "vit" in archs) else None
        if "resnet18" in archs:
            trained.append(run_trained("resnet18", load_kermany(root), st, folder))
        for arch in ("cnn", "vit"):
            if arch in archs:
                trained.append(run_trained(arch, ham, st, folder))
            print(f"{arch} done (load {os.getloadavg()[0]:.1f})", file=sys.stderr)
    result = {
        "benchmark": "onnx_classifiers", "quick": args.quick, "started": started,
        "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "hardware": hardware(note="shared 2-core CPU: other jobs ran during the measurement; loadavg recorded at "
                                  "start, end and next to every timing"),
        "loadavg_start": list(load_start), "loadavg_end": list(os.getloadavg()),
        "versions": versions("onnx", "onnxruntime", "onnxscript"),
        "seeds": {"torch": 0, "subset": 0, "calibration": 1, "bootstrap": 0},
        "protocol": {"reduced": True, "why": "2-core CPU shared with other sessions: training at 224 px is out of "
                     "reach; accuracy at 64 px, speed also at 224 px (random weights)",
                     "threads": THREADS, **{k: v for k, v in st.items()}},
        "resnet18_224": r224, "trained": trained,
    }
    result["targets"] = targets(r224, trained)
    stem = args.out or ("onnx_classifiers_quick" if args.quick else "onnx_classifiers")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{stem}.json").write_text(json.dumps(result, indent=1, default=str))
    text = table(result)
    (RESULTS / f"{stem}.md").write_text("```\n" + text + "\n```\n")
    plot(result, RESULTS / f"{stem}.png")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
