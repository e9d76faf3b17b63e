"""Findings -> impression fine-tuning data from the IU reports, for causal LMs with a chat template (used by
``python -m benchmarks.qlora_radiology`` and ``python -m benchmarks.qlora_reports``).

``impression_batches`` builds padded training batches (prompt tokens masked with -100 in ``labels``);
``generate_impressions`` writes impressions with greedy decoding, left padding, in batches.
"""
from __future__ import annotations

import random
import time
from collections.abc import Iterator, Sequence

import torch

__all__ = ["PROMPT", "chat_prompt", "generate_impressions", "impression_batches"]

PROMPT = ("You are a radiologist. Write the IMPRESSION section of this chest X-ray report, in one or two short "
          "sentences.\nFINDINGS: {findings}")


def chat_prompt(tok, findings: str) -> str:
    """The user turn asking for the impression, rendered with the tokenizer's chat template."""
    msgs = [{"role": "user", "content": PROMPT.format(findings=findings)}]
    return tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)


def impression_batches(tok, reports: Sequence, batch: int, max_len: int, steps: int,
                       seed: int = 0) -> Iterator[dict[str, torch.Tensor]]:
    """``steps`` batches of ``batch`` (prompt + impression + eos) sequences, truncated to ``max_len`` tokens;
    reports are visited in seeded random order, epoch after epoch."""
    if batch < 1 or max_len < 8 or steps < 1:
        raise ValueError(f"need batch >= 1, max_len >= 8, steps >= 1 (got {batch}, {max_len}, {steps})")
    rows = []
    for r in reports:
        p = tok(chat_prompt(tok, r.findings), add_special_tokens=False)["input_ids"]
        t = tok(r.impression + tok.eos_token, add_special_tokens=False)["input_ids"]
        ids = (p + t)[:max_len]
        labels = ([-100] * len(p) + t)[:max_len]
        if any(v != -100 for v in labels):
            rows.append((ids, labels))
    if not rows:
        raise ValueError("no usable reports (each needs findings and an impression that fits in max_len)")
    rng = random.Random(seed)
    order: list[int] = []
    while len(order) < steps * batch:
        perm = list(range(len(rows)))
        rng.shuffle(perm)
        order.extend(perm)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    for s in range(steps):
        chunk = [rows[i] for i in order[s * batch:(s + 1) * batch]]
        width = max(len(ids) for ids, _ in chunk)
        ids = torch.full((len(chunk), width), pad)
        lab = torch.full((len(chunk), width), -100)
        att = torch.zeros((len(chunk), width), dtype=torch.long)
        for i, (a, b) in enumerate(chunk):
            ids[i, :len(a)] = torch.tensor(a)
            lab[i, :len(b)] = torch.tensor(b)
            att[i, :len(a)] = 1
        yield {"input_ids": ids, "attention_mask": att, "labels": lab}


def generate_impressions(model, tok, reports: Sequence, new_tokens: int = 40, batch: int = 8,
                         progress: bool = True) -> tuple[list[str], float]:
    """Greedy impressions for ``reports`` and the seconds it took."""
    from tqdm.auto import tqdm

    tok.padding_side = "left"
    model.eval()
    if hasattr(model, "config"):
        model.config.use_cache = True
    outs: list[str] = []
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    t0 = time.perf_counter()
    for i in tqdm(range(0, len(reports), batch), desc="generate", disable=not progress, leave=False):
        prompts = [chat_prompt(tok, r.findings) for r in reports[i:i + batch]]
        enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.no_grad():
            gen = model.generate(**enc, max_new_tokens=new_tokens, do_sample=False, pad_token_id=pad)
        outs.extend(tok.decode(row, skip_special_tokens=True).strip() for row in gen[:, enc["input_ids"].shape[1]:])
    return outs, time.perf_counter() - t0
