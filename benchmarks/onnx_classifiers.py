"""Classifiers on a CPU with ONNX Runtime: medquant's int8 / W4 ONNX export against ORT's own quantize_static.

Variants of each network (same weights, same calibration batches):
  * ``pytorch_fp32``  - the float model in PyTorch;
  * ``ort_fp32``      - the float model exported by medquant (BatchNorm folded) and run by ONNX Runtime;
  * ``ort_qs_int8``   - ORT's own ``quantize_static`` of ``ort_fp32`` (QDQ, per-channel int8 weights, uint8
    activations, min-max calibration): the reference int8 model;
  * ``mq_int8``       - ``quantize_`` 8-bit per channel + ``calibrate_activations`` (min-max) + ``export``;
  * ``mq_w4``         - ``quantize_`` 4-bit group 32 + ``export`` (weight-only: MatMulNBits / int4 blocks + float
    convolutions);
  * ``ort_qs_int8_again`` (speed only) - a second session of the ``ort_qs_int8`` file: the A/A control, whose
    ratio to ``ort_qs_int8`` is the timing noise of the run.

Two parts, runnable separately (``--speed-only`` / ``--accuracy-only``, each writing its own JSON) or together:

* **Speed** on random weights (speed does not depend on the weight values): ResNet-18 at 224 px (3 channels) and
  the three evaluated networks (those named by ``--archs``; ResNet-18 224 px comes with ``resnet18``) at their
  evaluation shape (ResNet-18 64 px gray, SmallCNN and the CLS-token ViT at
  64 px RGB). images/s at batch 1 and 32, 2 intra-op threads; blocks of calls interleaved over rounds (see
  :func:`speed`); the ONNX Runtime profiler's kernel time per op type of ``ort_qs_int8`` and ``mq_int8`` (what runs
  as an integer kernel in each, and where the time goes); ORT's optimized op counts of every file.
* **Accuracy** of trained networks: ResNet-18 on Kermany pediatric chest X-rays (``kermany_cxr_64.npz``, gray,
  normal vs pneumonia; groups = the two classes, so worst-group = worst-class accuracy: Kermany has no demographic
  groups), SmallCNN and the CLS-token ViT (``benchmarks.common.nets``) on HAM10000 with sex groups. Test accuracy
  and worst-group accuracy with paired bootstrap 95% intervals of the difference to ``pytorch_fp32`` (resamples of
  the test images), file sizes, and for ``mq_int8`` the agreement of ONNX Runtime with medquant's PyTorch
  simulation (the accuracy a user measures in PyTorch before deploying).

Reduced training protocol (a 2-core CPU shared with other jobs; stated in the JSON): 64 px, not 224 px, and few
epochs (full run: ResNet-18 one epoch over the 5,216 Kermany training images, about 20 min niced on the shared
machine; SmallCNN and ViT two epochs over the HAM10000 training split); ``--epochs`` changes them. ``--quick``
trains on 1,024-image subsets and times fewer rounds.

    python -m benchmarks.onnx_classifiers --speed-only            # idle machine: about 5 min (all four nets)
    python -m benchmarks.onnx_classifiers --accuracy-only         # about 1 h niced on the shared machine
    python -m benchmarks.onnx_classifiers --quick
"""
from __future__ import annotations

import argparse
import copy
import json
import math
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
CONTROL = "ort_qs_int8_again"
RESULTS = Path(__file__).resolve().parent / "results"
THREADS = 2
ARCHS = ("resnet18", "cnn", "vit")
#: the speed networks: name -> (arch, channels, classes, pixels)
SPEED_NETS = {"resnet18_224": ("resnet18", 3, 2, 224), "resnet18_64": ("resnet18", 1, 2, 64),
              "cnn_64": ("cnn", 3, 7, 64), "vit_64": ("vit", 3, 7, 64)}


def settings(quick: bool) -> dict:
    if quick:
        return {"train_subset": 1024, "epochs": {"resnet18": 1, "cnn": 2, "vit": 2}, "calib": 8, "boot": 300,
                "rounds": 3, "block_s": 0.05, "profile_runs": 5}
    return {"train_subset": None, "epochs": {"resnet18": 1, "cnn": 2, "vit": 2}, "calib": 16, "boot": 1000,
            "rounds": 10, "block_s": 0.25, "profile_runs": 10}


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
def build_net(arch: str, channels: int, classes: int, pixels: int) -> torch.nn.Module:
    return {"resnet18": lambda: ResNet18(channels, classes), "cnn": lambda: SmallCNN(channels, classes),
            "vit": lambda: CLSTokenViT(channels, classes, image=pixels)}[arch]()


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


def build_variants(model: torch.nn.Module, calib: list[torch.Tensor], example: torch.Tensor, folder: Path,
                   control: bool = False) -> dict:
    """Every variant: a callable ``x -> logits (numpy)``, its file and size, and the ORT op counts; with
    ``control`` also the A/A control (a second session of the quantize_static file)."""
    import logging

    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    logging.getLogger().setLevel(logging.ERROR)  # quantize_static's "consider pre-processing" advice
    folder.mkdir(parents=True, exist_ok=True)
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
    files = [("ort_fp32", f32), ("ort_qs_int8", qs), ("mq_int8", mq8), ("mq_w4", mq4)]
    if control:
        files.append((CONTROL, qs))
    for name, path in files:
        sess = ort_session(path)
        out[name] = {"fn": _runner(sess), "file": path, "ops": dict(optimized_op_counts(path))}
    for v in out.values():
        v["bytes"] = os.path.getsize(v["file"]) if v["file"] else None
    out["mq_int8"]["sim"] = sim
    out["mq_int8"]["report_counts"] = rep8.counts()
    return out


# ------------------------------------------------------------------------------------------------ measuring
PAUSE_S = 0.05  # between timed blocks: the previous session's spinning worker threads go idle first


def speed(variants: dict, shape: tuple, st: dict, seed: int = 0) -> dict:
    """images/s per variant and batch size.

    Two warm-up calls per variant; then ``st["rounds"]`` rounds, each of which times every variant once on a block
    of calls lasting about ``st["block_s"]`` seconds (the block length is fixed per variant from a third warm-up
    call), in alternating order, with a ``PAUSE_S`` sleep before each block so that one ONNX Runtime session's
    spin-waiting worker threads do not take the cores from the next. The row gives the median and the best
    (highest) rate over rounds and the 1-minute load average. ``ort_qs_int8_again`` (a second session of the same
    file as ``ort_qs_int8``) is the A/A control: its ratio to ``ort_qs_int8`` is what noise alone produces."""
    g = torch.Generator().manual_seed(seed)
    names = list(variants)
    res = {}
    for bs in (1, 32):
        x = torch.randn(bs, *shape, generator=g)
        calls = {}
        for name, v in variants.items():
            v["fn"](x)
            v["fn"](x)
            t = time.perf_counter()
            v["fn"](x)
            calls[name] = max(1, min(200, math.ceil(st["block_s"] / max(time.perf_counter() - t, 1e-6))))
        rates: dict[str, list[float]] = {name: [] for name in names}
        loads = []
        for r in range(st["rounds"]):
            for name in (names if r % 2 == 0 else names[::-1]):
                fn, n = variants[name]["fn"], calls[name]
                time.sleep(PAUSE_S)
                t = time.perf_counter()
                for _ in range(n):
                    fn(x)
                rates[name].append(n * bs / (time.perf_counter() - t))
            loads.append(os.getloadavg()[0])
        res[bs] = {name: {"images_per_s": statistics.median(rs), "best_images_per_s": max(rs),
                          "rounds": len(rs), "calls_per_block": calls[name],
                          "loadavg_1m_mean": sum(loads) / len(loads), "loadavg_1m_max": max(loads)}
                   for name, rs in rates.items()}
        if "ort_qs_int8_again" in res[bs]:
            row = res[bs]
            row["aa_control_ratio"] = row["ort_qs_int8_again"]["images_per_s"] / row["ort_qs_int8"]["images_per_s"]
    return res


def profile_ops(path: Path, shape: tuple, bs: int, runs: int) -> dict:
    """ONNX Runtime's profiler on one file: per op type of the optimized graph, the median over ``runs`` calls
    of the summed kernel time (microseconds), and the number of nodes."""
    import onnxruntime as ort

    so = session_options(path, THREADS)
    so.inter_op_num_threads = 1
    so.enable_profiling = True
    with tempfile.TemporaryDirectory() as tmp:
        so.profile_file_prefix = str(Path(tmp) / "prof")
        sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        x = np.random.default_rng(0).standard_normal((bs, *shape)).astype(np.float32)
        for _ in range(2):
            sess.run(None, {"pixel_values": x})
        for _ in range(runs):
            sess.run(None, {"pixel_values": x})
        events = json.loads(Path(sess.end_profiling()).read_text())
    per_node: dict[tuple[str, str], list[float]] = {}
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            per_node.setdefault((e["name"], e["args"].get("op_name", "?")), []).append(float(e["dur"]))
    ops: dict[str, dict] = {}
    for (_, op), durs in per_node.items():
        d = ops.setdefault(op, {"us": 0.0, "nodes": 0})
        d["us"] += statistics.median(durs[-runs:])
        d["nodes"] += 1
    total = sum(d["us"] for d in ops.values())
    return {"batch": bs, "runs": runs, "total_kernel_us": total, "loadavg_1m": os.getloadavg()[0],
            "ops": dict(sorted(ops.items(), key=lambda kv: -kv[1]["us"]))}



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
            if v["bytes"] and name != CONTROL}


def subset(t: tuple, n: int | None, seed: int = 0) -> tuple:
    if n is None or n >= len(t[0]):
        return t
    idx = torch.randperm(len(t[0]), generator=torch.Generator().manual_seed(seed))[:n]
    return tuple(a[idx] for a in t)


# ---------------------------------------------------------------------------------------------------- runs
def _random_bn(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():  # random but non-trivial BatchNorm statistics
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_var.copy_(torch.rand(m.num_features, generator=g) * 1.5 + 0.5)
            m.running_mean.copy_((torch.rand(m.num_features, generator=g) - 0.5) * 0.2)
    return model.eval()


def graph_diff(ops: dict) -> dict:
    """Op types (after ORT's optimizer) that ``mq_int8`` and ``ort_qs_int8`` do not share, with their counts."""
    a, b = ops.get("ort_qs_int8", {}), ops.get("mq_int8", {})
    return {op: {"ort_qs_int8": a.get(op, 0), "mq_int8": b.get(op, 0)} for op in sorted(set(a) | set(b))
            if a.get(op, 0) != b.get(op, 0)}


def run_speed(name: str, st: dict, folder: Path) -> dict:
    """Speed, sizes, op counts and kernel profiles of one network with random weights."""
    arch, channels, classes, pixels = SPEED_NETS[name]
    torch.manual_seed(0)
    model = _random_bn(build_net(arch, channels, classes, pixels), 1)
    g = torch.Generator().manual_seed(2)
    calib = [torch.randn(8, channels, pixels, pixels, generator=g) for _ in range(4)]
    variants = build_variants(model, calib, calib[0][:2], folder / f"speed_{name}", control=True)
    shape = (channels, pixels, pixels)
    ops = {k: v.get("ops") for k, v in variants.items() if v.get("ops") and k != CONTROL}
    prof = {v: {bs: profile_ops(variants[v]["file"], shape, bs, st["profile_runs"]) for bs in (1, 32)}
            for v in ("ort_qs_int8", "mq_int8")}
    return {"net": name, "arch": arch, "in_channels": channels, "classes": classes, "resolution": pixels,
            "weights": "random (speed only)", "speed": speed(variants, shape, st), "size": sizes(variants),
            "ort_ops": ops, "graph_diff_qs_vs_mq": graph_diff(ops), "profile": prof}


def run_trained(arch: str, data: dict, st: dict, folder: Path) -> dict:
    torch.manual_seed(0)
    info = data["info"]
    x_tr, y_tr, _ = subset(data["train"], st["train_subset"])
    cin = x_tr.shape[1]
    model = build_net(arch, cin, info["classes"], 64)
    t0 = time.time()
    train_classifier(model, x_tr, y_tr, epochs=st["epochs"][arch], num_classes=info["classes"], desc=arch)
    train_s = time.time() - t0
    calib = list(data["train"][0][torch.randperm(len(data["train"][0]),
                                                 generator=torch.Generator().manual_seed(1))[:32 * st["calib"]]]
                 .split(32))
    variants = build_variants(model, calib, data["test"][0][:2], folder / f"{arch}_{info['name']}")
    x_te, y_te, g_te = data["test"]
    return {"arch": arch, "dataset": info, "train_images": len(x_tr), "epochs": st["epochs"][arch],
            "train_s": train_s, "loadavg_1m_after_training": os.getloadavg()[0],
            "accuracy": accuracy(variants, x_te, y_te, g_te, st["boot"]), "size": sizes(variants),
            "ort_ops": {k: v.get("ops") for k, v in variants.items() if v.get("ops")},
            "mq_int8_export_counts": variants["mq_int8"]["report_counts"]}


def _ratio_target(label: str, value: float, floor: float, aa: float | None) -> dict:
    row = {"target": label, "value": value, "met": value >= floor}
    if aa is not None:
        row["aa_control_ratio"] = aa
        row["noise_note"] = ("the A/A control deviates by more than 10%: timing noise dominates"
                             if abs(aa - 1.0) > 0.1 else "A/A control within 10%")
    return row


def targets(speed_rows: dict, trained: list[dict]) -> list[dict]:
    out = []
    for name, r in speed_rows.items():
        for bs in (1, 32):
            s = r["speed"][bs]
            out.append(_ratio_target(f"{name} batch {bs}: mq_int8 >= 0.9x ort_qs_int8",
                                     s["mq_int8"]["images_per_s"] / s["ort_qs_int8"]["images_per_s"], 0.9,
                                     s.get("aa_control_ratio")))
    if "resnet18_224" in speed_rows:
        r = speed_rows["resnet18_224"]
        s32 = r["speed"][32]
        out.append(_ratio_target("ResNet-18 224px batch 32: mq_int8 >= 2x pytorch_fp32",
                                 s32["mq_int8"]["images_per_s"] / s32["pytorch_fp32"]["images_per_s"], 2.0,
                                 s32.get("aa_control_ratio")))
        ratio = r["size"]["mq_int8"]["ratio_to_fp32"]
        out.append({"target": "ResNet-18 file: mq_int8 <= 0.3x ort_fp32", "value": ratio, "met": ratio <= 0.3})
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
    for name, r in result.get("speed", {}).items():
        s = r["speed"]
        lines.append(f"{name} (random weights): images/s median (best) batch 1 | batch 32, file MB; "
                     f"load {s[32]['mq_int8']['loadavg_1m_mean']:.1f}")
        for v in VARIANTS + [CONTROL]:
            size = r["size"].get(v, {}).get("bytes")
            lines.append(f"  {v:17s} {s[1][v]['images_per_s']:8.1f} ({s[1][v]['best_images_per_s']:7.1f}) | "
                         f"{s[32][v]['images_per_s']:8.1f} ({s[32][v]['best_images_per_s']:7.1f})"
                         + (f"   {size / 1e6:7.2f} MB" if size else ""))
        for bs in (1, 32):
            p = {v: r["profile"][v][bs] for v in ("ort_qs_int8", "mq_int8")}
            lines.append(f"  kernel time b{bs}: ort_qs_int8 {p['ort_qs_int8']['total_kernel_us'] / 1e3:.2f} ms, "
                         f"mq_int8 {p['mq_int8']['total_kernel_us'] / 1e3:.2f} ms")
        if r["graph_diff_qs_vs_mq"]:
            lines.append("  ops that differ (qs / mq): " + ", ".join(
                f"{op} {c['ort_qs_int8']}/{c['mq_int8']}" for op, c in r["graph_diff_qs_vs_mq"].items()))
    for t in result.get("accuracy", []):
        lines.append(f"{t['arch']} on {t['dataset']['name']} (64 px, {t['train_images']} train images, "
                     f"{t['epochs']} epochs): acc / worst-group, diff-to-float 95% CI, file MB")
        for v in VARIANTS:
            a = t["accuracy"][v]
            size = t["size"].get(v, {}).get("bytes")
            ci = "" if v == "pytorch_fp32" else (f"  dAcc [{a['acc_diff_ci95'][0]:+.3f}, {a['acc_diff_ci95'][1]:+.3f}]"
                                                 f" dWorst [{a['worst_group_diff_ci95'][0]:+.3f}, "
                                                 f"{a['worst_group_diff_ci95'][1]:+.3f}]")
            lines.append(f"  {v:13s} {a['acc']:.3f} / {a['worst_group_acc']:.3f}{ci}"
                         + (f"   {size / 1e6:6.2f} MB" if size else ""))
        a = t["accuracy"]["mq_int8"]
        lines.append(f"  mq_int8: PyTorch simulation acc {a['pytorch_simulation_acc']:.3f}, ORT agrees with it on "
                     f"{a['ort_vs_simulation_agreement']:.4f} of the images")
    lines.append("Targets:")
    for tg in result["targets"]:
        val = tg["value"]
        val = f"{val:.3f}" if isinstance(val, float) else str([round(v, 3) for v in val])
        note = f" (A/A control {tg['aa_control_ratio']:.3f})" if "aa_control_ratio" in tg else ""
        lines.append(f"  [{'met' if tg['met'] else 'NOT met'}] {tg['target']}: {val}{note}")
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = list(result.get("speed", {}).items())
    trained = result.get("accuracy", [])
    panels = (2 if runs else 0) + (1 if trained else 0)
    if not panels:
        return
    fig, axes = plt.subplots(1, panels, figsize=(6 * panels, 4), squeeze=False)
    axes = list(axes[0])
    if runs:
        names = VARIANTS + [CONTROL]
        w = 0.8 / len(names)
        for ax, bs in zip(axes[:2], (1, 32)):
            for i, v in enumerate(names):
                vals = [r["speed"][bs][v]["images_per_s"] / r["speed"][bs]["ort_qs_int8"]["images_per_s"]
                        for _, r in runs]
                ax.bar(np.arange(len(runs)) + i * w, vals, w, label=v)
            ax.set_xticks(np.arange(len(runs)) + 0.4 - w / 2)
            ax.set_xticklabels([n for n, _ in runs], rotation=15, fontsize=8)
            ax.set_ylabel("images/s relative to ORT quantize_static int8")
            ax.set_yscale("log")
            ax.set_title(f"batch {bs} ({THREADS} threads)")
            ax.axhline(1.0, color="k", lw=0.5)
            ax.axhline(0.9, color="r", lw=0.5, ls="--")
        axes[0].legend(fontsize=7)
    if trained:
        ax = axes[-1]
        for j, t in enumerate(trained):
            for i, v in enumerate(VARIANTS[1:]):
                a = t["accuracy"][v]
                lo, hi = a["acc_diff_ci95"]
                x = j + i * 0.18
                ax.errorbar([x], [(lo + hi) / 2 * 100], yerr=[[(hi - lo) / 2 * 100]], fmt="o", ms=3,
                            color=f"C{i + 1}", label=v if j == 0 else None)
        ax.set_xticks(np.arange(len(trained)) + 0.27)
        ax.set_xticklabels([f"{t['arch']} {t['dataset']['name']}" for t in trained], fontsize=8)
        ax.axhline(0, color="k", lw=0.5)
        ax.set_ylabel("accuracy - float accuracy (points, 95% CI)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _epochs(text: str | None, default: dict) -> dict:
    out = dict(default)
    if not text:
        return out
    for part in text.split(","):
        arch, _, n = part.partition("=")
        if arch.strip() not in ARCHS or not n.strip().isdigit() or int(n) < 1:
            raise ValueError(f"--epochs {text!r}: expected arch=N pairs with arch in {ARCHS} and N >= 1")
        out[arch.strip()] = int(n)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="training subsets, fewer timing rounds")
    part = p.add_mutually_exclusive_group()
    part.add_argument("--speed-only", action="store_true", help="only the speed part (random weights, no data)")
    part.add_argument("--accuracy-only", action="store_true", help="only the accuracy part (trained networks)")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--archs", default="resnet18,cnn,vit", help="comma-separated subset of resnet18,cnn,vit")
    p.add_argument("--epochs", default=None, help="training epochs per arch, e.g. resnet18=1,cnn=2,vit=2")
    p.add_argument("--out", default=None, help="output stem under benchmarks/results/")
    args = p.parse_args(argv)
    torch.set_num_threads(THREADS)
    st = settings(args.quick)
    try:
        st["epochs"] = _epochs(args.epochs, st["epochs"])
    except ValueError as e:
        p.error(str(e))
    archs = [a.strip() for a in args.archs.split(",") if a.strip()]
    bad = sorted(set(archs) - set(ARCHS))
    if bad:
        p.error(f"unknown --archs {bad}; accepted: {', '.join(ARCHS)}")
    mode = "speed" if args.speed_only else "accuracy" if args.accuracy_only else "both"
    suffix = {"speed": "_speed", "accuracy": "_accuracy", "both": ""}[mode]
    stem = args.out or f"onnx_classifiers{suffix}{'_quick' if args.quick else ''}"
    root = data_dir(args.data_dir) if mode != "speed" else None
    result = {
        "benchmark": "onnx_classifiers", "mode": mode, "quick": args.quick,
        "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "hardware": hardware(note="loadavg recorded at start, end and next to every timing; the machine may have "
                                  "been shared"),
        "loadavg_start": list(os.getloadavg()),
        "versions": versions("onnx", "onnxruntime", "onnxscript"),
        "seeds": {"torch": 0, "subset": 0, "calibration": 1, "bootstrap": 0, "speed_bn": 1, "speed_inputs": 0},
        "protocol": {"reduced": True, "why": "2-core CPU shared with other sessions: training at 224 px is out of "
                     "reach; accuracy at 64 px with few epochs, speed also at 224 px (random weights)",
                     "threads": THREADS, "pause_between_timed_blocks_s": PAUSE_S, **st},
    }
    RESULTS.mkdir(exist_ok=True)

    def write(final: bool) -> None:
        result["complete"] = final
        result["finished"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
        result["loadavg_end"] = list(os.getloadavg())
        result["targets"] = targets(result.get("speed", {}), result.get("accuracy", []))
        (RESULTS / f"{stem}.json").write_text(json.dumps(result, indent=1, default=str))

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        if mode in ("speed", "both"):
            result["speed"] = {}
            nets = [n for n, spec in SPEED_NETS.items() if spec[0] in archs]
            for name in nets:
                result["speed"][name] = run_speed(name, st, folder)
                print(f"speed {name} done (load {os.getloadavg()[0]:.1f})", file=sys.stderr)
                write(False)
        if mode in ("accuracy", "both"):
            result["accuracy"] = []
            ham = load_ham(root) if ("cnn" in archs or "vit" in archs) else None
            for arch in archs:
                data = load_kermany(root) if arch == "resnet18" else ham
                result["accuracy"].append(run_trained(arch, data, st, folder))
                print(f"accuracy {arch} done (load {os.getloadavg()[0]:.1f})", file=sys.stderr)
                write(False)
    write(True)
    text = table(result)
    (RESULTS / f"{stem}.md").write_text("```\n" + text + "\n```\n")
    plot(result, RESULTS / f"{stem}.png")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
