"""How the distillation settings of ``prune_distill`` were chosen: on a dev split, never on the test reports.

Same model, pruning, teacher and training batches as ``python -m benchmarks.prune_distill`` (SmolLM2-135M-Instruct, 30%
heads + 30% FFN neurons removed, teacher = the unpruned model fine-tuned on the same 240 training reports, 60 steps
x batch 4, lr 1e-4). The dev split is 64 reports of the training split that neither the teacher nor the students
train on. Each configuration ``name:alpha:T[:feature_weight[:norm]]`` trains one student; ``ctrl`` (alpha 0) is the
fine-tuning control. Feature matching pairs every decoder layer's output with the teacher's (identity-initialised
projections; ``norm``: relative squared error, ``Distiller(feature_norm=True)``). ``--test`` also reports the 64
held-out test reports that ``prune_distill`` uses (for the record; the choice is made on dev).

Run: ``python -m benchmarks.kd_settings [--test]``; writes ``benchmarks/results/kd_settings.json``.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from benchmarks.common.datasets import use_data_dir
from benchmarks.common.env import hardware, versions
from benchmarks.common.lm import report_texts, train_student, training_split
from benchmarks.common.smollm2 import load_smollm2
from medquant.eval import perplexity, token_batches

RESULTS = Path(__file__).resolve().parent / "results"
DEFAULT = "ctrl:0:2;kd_a1_T1:1:1;kd_a05_T1:0.5:1;kd_a05_T2:0.5:2;kd_a05_T2_features:0.5:2:1:norm"


def parse(spec: str) -> tuple[str, float, float, dict]:
    parts = spec.split(":")
    if len(parts) < 3:
        raise ValueError(f"configuration {spec!r}: expected name:alpha:T[:feature_weight[:norm]]")
    kw: dict = {}
    if len(parts) > 3 and parts[3]:
        kw = {"feature_weight": float(parts[3]), "feature_norm": len(parts) > 4 and parts[4] == "norm"}
    return parts[0], float(parts[1]), float(parts[2]), kw


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--configs", default=DEFAULT, help="';'-separated name:alpha:T[:feature_weight[:norm]]")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--max-len", type=int, default=128)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--dev-reports", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--test", action="store_true")
    ap.add_argument("--data-dir", default=None, help="default: $MEDQUANT_DATA_DIR, else ../shared/data")
    ap.add_argument("--out", default=str(RESULTS / "kd_settings.json"))
    args = ap.parse_args(argv)
    use_data_dir(args.data_dir)
    configs = [parse(c) for c in args.configs.split(";") if c.strip()]
    torch.set_num_threads(2)
    torch.manual_seed(args.seed)
    from medquant.prune import StructuredPruner

    t0 = time.time()
    base, tok = load_smollm2()
    calib, shuffled = training_split(tok, args.seed, 16, args.max_len)  # as prune_distill.py's defaults
    n_train = args.steps * args.batch
    if n_train + args.dev_reports > len(shuffled):
        raise ValueError(f"{n_train} training + {args.dev_reports} dev reports exceed the {len(shuffled)} available")
    train = token_batches(tok, shuffled[:n_train], args.batch, args.max_len, drop_last=True)
    dev = token_batches(tok, shuffled[-args.dev_reports:], 8, args.max_len, drop_last=True)
    test = token_batches(tok, report_texts("test", 64), 8, args.max_len, drop_last=True) if args.test else None

    def fit(src, teacher, alpha, temperature, **kw):
        if kw:  # feature matching: every decoder layer's output
            n = src.config.num_hidden_layers
            kw = {**kw, "feature_pairs": [(i, i) for i in range(1, n + 1)]}
        return train_student(src, teacher, train, alpha=alpha, steps=args.steps, lr=args.lr, seed=args.seed,
                             temperature=temperature, **kw)

    teacher, _ = fit(base, base, 0.0, 2.0)
    pruned = base  # the teacher trained a copy, so the base itself can be pruned
    StructuredPruner(0.3, 0.3, importance="activation").prune(pruned, calib=calib)
    res: dict = {"benchmark": "kd_settings", "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
                 "hardware": hardware(),
                 "versions": versions(),
                 "settings": vars(args), "teacher": {"dev_ppl": perplexity(teacher, dev)}, "configs": {}}
    if test:
        res["teacher"]["test_ppl"] = perplexity(teacher, test)
    for name, alpha, temperature, kw in configs:
        t = time.time()
        m, losses = fit(pruned, teacher, alpha, temperature, **kw)
        r = {"alpha": alpha, "temperature": temperature, **kw, "dev_ppl": perplexity(m, dev),
             "train_seconds": time.time() - t, "final_losses": losses[-5:]}
        if test:
            r["test_ppl"] = perplexity(m, test)
        res["configs"][name] = r
        print(f"{name}: dev ppl {r['dev_ppl']:.3f}" + (f", test ppl {r['test_ppl']:.3f}" if test else ""), flush=True)
        del m
    res["best_on_dev"] = min(res["configs"], key=lambda k: res["configs"][k]["dev_ppl"])
    res["wall_seconds"] = time.time() - t0
    Path(args.out).write_text(json.dumps(res, indent=1))
    print(f"\n| config | alpha | T | features | dev ppl |{' test ppl |' if test else ''}")
    print(f"|---|---|---|---|---|{'---|' if test else ''}")
    for k, r in res["configs"].items():
        feat = f"{r['feature_weight']:g}{' (norm)' if r.get('feature_norm') else ''}" if "feature_weight" in r else "-"
        print(f"| {k} | {r['alpha']:g} | {r['temperature']:g} | {feat} | {r['dev_ppl']:.2f} |"
              + (f" {r['test_ppl']:.2f} |" if test else ""))
    print(f"best on dev: {res['best_on_dev']}; teacher dev ppl {res['teacher']['dev_ppl']:.2f}; "
          f"wrote {args.out} in {res['wall_seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
