"""Causal-LM helpers shared by the pruning / distillation benchmarks (prune_speed, prune_distill, kd_settings).

* :func:`report_texts` - IU X-ray report texts (findings + impression) of one split, longer than 40 characters;
* :func:`training_split` - calibration batches and the rest of the training reports in a seeded order;
* :func:`train_student` - a copy of a model distilled from (or, with ``alpha=0``, fine-tuned beside) a teacher;
* :func:`prompt_ids`, :func:`time_prefill`, :func:`time_decode` - a fixed prompt of real report text and CPU
  latency of one prefill and of greedy decoding with the KV cache;
* :func:`cached_step` - one forward with a KV cache, in the keyword the installed transformers takes (``cache``
  from 5.x, ``past_key_values`` before; the old name is deprecated there), returning the output and its cache.

Perplexity and token batches are library API: :func:`medquant.eval.perplexity`, :func:`medquant.eval.token_batches`.
"""
from __future__ import annotations

import copy
import functools
import inspect
import time

import torch

from medquant.eval import token_batches

__all__ = ["cached_step", "prompt_ids", "report_texts", "time_decode", "time_prefill", "train_student",
           "training_split"]


def report_texts(split: str, n: int | None = None) -> list[str]:
    """The first ``n`` (all when ``None``) report texts of ``split`` with findings and more than 40 characters."""
    from medquant.data.reports import load_iu_reports

    txt = [r.text for r in load_iu_reports(split=split, require=("findings",)) if len(r.text) > 40]
    return txt if n is None else txt[:n]


def training_split(tok, seed: int, calib_reports: int, max_len: int) -> tuple[list[dict], list[str]]:
    """Calibration batches (the first ``calib_reports`` train reports, batch 4, an incomplete last batch dropped)
    and the other train reports in the order drawn by ``seed``: training takes them from the front
    (``kd_settings`` its dev split from the back)."""
    txt = report_texts("train")
    calib = token_batches(tok, txt[:calib_reports], 4, max_len, drop_last=True)
    rest = txt[calib_reports:]
    order = torch.randperm(len(rest), generator=torch.Generator().manual_seed(seed)).tolist()
    return calib, [rest[i] for i in order]


def train_student(src, teacher, data: list[dict], *, alpha: float, steps: int, lr: float, seed: int,
                  temperature: float = 2.0, **distiller_kw):
    """A trainable copy of ``src`` distilled from ``teacher`` (alpha 0: fine-tuned on the task loss only);
    returns ``(model in eval mode, per-step losses)``."""
    from medquant.distill import Distiller

    m = copy.deepcopy(src)
    for prm in m.parameters():  # copies of a (frozen) teacher must train
        prm.requires_grad_(True)
    torch.manual_seed(seed)
    losses = Distiller(teacher, m, alpha=alpha, temperature=temperature, **distiller_kw).fit(data, steps=steps, lr=lr)
    return m.eval(), losses


def prompt_ids(tok, n_tokens: int) -> torch.Tensor:
    """The first ``n_tokens`` tokens of the first 200 train reports joined by spaces, shape ``(1, n_tokens)``."""
    text = " ".join(report_texts("train", 200))
    ids = tok(text, return_tensors="pt")["input_ids"][:, :n_tokens]
    if ids.shape[1] < n_tokens:
        raise RuntimeError("not enough report text for the prompt")
    return ids


@torch.no_grad()
def time_prefill(model, ids: torch.Tensor, logits_to_keep: int | None = None) -> float:
    """Seconds of one forward over ``ids`` (``logits_to_keep=1``: the output head runs on the last position only,
    as ``generate`` does when it prefills a prompt)."""
    kwargs = {} if logits_to_keep is None else {"logits_to_keep": logits_to_keep}
    t = time.perf_counter()
    model(input_ids=ids, attention_mask=torch.ones_like(ids), **kwargs)
    return time.perf_counter() - t


@functools.cache
def _cache_keyword(forward_type: type) -> str:
    """``"cache"`` where the model class's forward takes it (transformers 5.x), else ``"past_key_values"``."""
    return "cache" if "cache" in inspect.signature(forward_type.forward).parameters else "past_key_values"


def cached_step(model, ids: torch.Tensor, cache=None):
    """One forward of ``ids`` with the KV cache ``cache`` (None: a fresh one), passed under the keyword the
    installed transformers takes; returns ``(output, cache after the step)``."""
    out = model(input_ids=ids, use_cache=True, **({} if cache is None else {_cache_keyword(type(model)): cache}))
    new = out.get("cache")
    return out, (new if new is not None else out.get("past_key_values"))


@torch.no_grad()
def time_decode(model, ids: torch.Tensor, steps: int) -> float:
    """Tokens per second over ``steps`` greedy single-token steps after prefilling ``ids``."""
    out, past = cached_step(model, ids)
    nxt = out.logits[:, -1:].argmax(-1)
    t = time.perf_counter()
    for _ in range(steps):
        out, past = cached_step(model, nxt, past)
        nxt = out.logits[:, -1:].argmax(-1)
    return steps / (time.perf_counter() - t)
