"""Perplexity of a causal language model on texts.

For token batches ``x`` (``input_ids`` and ``attention_mask``, padding masked out) the model's logits at position
``t`` predict token ``t + 1``; with the padded targets ignored,

    NLL = - sum over batches, rows and positions t of log softmax(logits[t])[x[t + 1]]
          (attention_mask[t] = attention_mask[t + 1] = 1)
    perplexity = exp(NLL / number of predicted tokens)

The sum runs over all batches before the division, so the result is the token-weighted perplexity of the whole
set, independent of how the texts are batched (up to float rounding). Batches padded on the left (the default of
Llama and Gemma tokenizers) are moved to right padding before the model call, so every row's tokens sit at
positions ``0, 1, ...`` as when the text is scored alone, and no token is predicted from a padding position.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

__all__ = ["perplexity", "token_batches"]


def _right_padded(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``batch`` with each row's unpadded tokens moved, in order, to the start of the row (right padding).

    Every tensor of the same ``(rows, positions)`` shape as ``attention_mask`` (``input_ids``, ``token_type_ids``...)
    is reordered alike; a batch already padded on the right, or without an ``attention_mask``, is returned as is.
    """
    mask = batch.get("attention_mask")
    if mask is None or mask.dim() != 2:
        return batch
    real = mask != 0
    if bool((real[:, 1:] <= real[:, :-1]).all()):  # already right-padded (each row: ones, then zeros)
        return batch
    order = torch.sort((~real).to(torch.int8), dim=1, stable=True).indices  # real positions first, in order
    return {k: v.gather(1, order) if isinstance(v, torch.Tensor) and v.shape == mask.shape else v
            for k, v in batch.items()}


def token_batches(tokenizer, texts: Sequence[str], batch_size: int = 8, max_length: int = 128,
                  drop_last: bool = False) -> list[dict[str, torch.Tensor]]:
    """``texts`` tokenized in order, ``batch_size`` at a time, padded and truncated to ``max_length`` tokens.

    Each batch is ``tokenizer(..., padding=True, truncation=True)`` of the next ``batch_size`` texts, padded on the
    right whatever the tokenizer's ``padding_side`` (the tokenizer itself is not changed); ``drop_last`` leaves out
    a final smaller batch.

    Args:
        tokenizer: a transformers tokenizer with a pad token.
        texts: the texts.
        batch_size: texts per batch.
        max_length: tokens per text at most.
        drop_last: leave out a final batch smaller than ``batch_size``.

    Returns:
        A list of dicts with ``input_ids`` and ``attention_mask`` tensors.

    Raises:
        ValueError: ``batch_size`` < 1.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    stop = len(texts) - batch_size + 1 if drop_last else len(texts)
    return [_right_padded(dict(tokenizer(list(texts[i:i + batch_size]), return_tensors="pt", padding=True,
                                         truncation=True, max_length=max_length)))
            for i in range(0, max(stop, 0), batch_size)]


@torch.no_grad()
def perplexity(model: torch.nn.Module, batches: Iterable[dict[str, torch.Tensor]]) -> float:
    """Token-weighted perplexity (module docstring) of ``model`` on ``batches``.

    The batches are dicts with ``input_ids`` and ``attention_mask`` (e.g. from :func:`token_batches`); the model
    is called as ``model(**batch)`` and must return ``.logits`` (a transformers causal LM) or the logits tensor
    itself. A left-padded batch is first moved to right padding (module docstring), so the result does not depend
    on the padding side or on the batch size.

    Args:
        model: a causal language model.
        batches: token batches.

    Returns:
        ``exp`` of the mean next-token cross-entropy over every predicted (unpadded) token.

    Raises:
        ValueError: the batches hold no token to predict.
    """
    nll, count = 0.0, 0
    for b in batches:
        b = _right_padded(b)
        out = model(**b)
        logits = (out.logits if hasattr(out, "logits") else out)[:, :-1].float()
        real = b["attention_mask"] != 0
        tgt = b["input_ids"][:, 1:].masked_fill(~(real[:, 1:] & real[:, :-1]), -100)  # context and target both real
        nll += float(torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), tgt.reshape(-1),
                                                       ignore_index=-100, reduction="sum"))
        count += int((tgt != -100).sum())
    if count == 0:
        raise ValueError("no tokens to predict: give batches with at least two unpadded tokens per text")
    return float(torch.tensor(nll / count).exp())
