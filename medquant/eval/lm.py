"""Perplexity of a causal language model on texts.

For token batches ``x`` (``input_ids`` and ``attention_mask``, padding masked out; a batch without
``attention_mask`` has no padding, as if its mask were all ones) the model's logits at position ``t`` predict token
``t + 1``; with the padded targets ignored,

    NLL = - sum over batches, rows and positions t of log softmax(logits[t])[x[t + 1]]
          (attention_mask[t] = attention_mask[t + 1] = 1)
    perplexity = exp(NLL / number of predicted tokens)

The sum runs over all batches before the division, so the result is the token-weighted perplexity of the whole
set, independent of how the texts are batched (up to float rounding). The first token of a row is never
predicted from nothing: it is only context, and a text's first word is scored only when the tokenizer puts a
token before it (the BOS of Llama and Gemma tokenizers), as in transformers' own ``labels=`` loss. Batches
padded on the left (the default of Llama and Gemma tokenizers) are moved to right padding before the model call,
so every row's tokens sit at positions ``0, 1, ...`` as when the text is scored alone, and no token is predicted
from a padding position.
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

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
        TypeError: ``texts`` is a single ``str`` (its characters would be the texts): pass ``[text]``.
        ValueError: ``batch_size`` < 1.
    """
    if isinstance(texts, str):
        raise TypeError("texts is a single str: pass a list of texts, e.g. [text]")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    stop = len(texts) - batch_size + 1 if drop_last else len(texts)
    return [_right_padded(dict(tokenizer(list(texts[i:i + batch_size]), return_tensors="pt", padding=True,
                                         truncation=True, max_length=max_length)))
            for i in range(0, max(stop, 0), batch_size)]


def _checked_batch(b: Any, i: int) -> Mapping[str, Any]:
    """Batch number ``i`` of :func:`perplexity`, refused unless it is a mapping with 2-D ``input_ids`` and an
    ``attention_mask`` / ``labels`` (when present) of the same shape."""
    if not isinstance(b, Mapping):
        raise TypeError(f"batch {i} is a {type(b).__name__}, not a dict: give dicts with input_ids (and optionally "
                        "attention_mask), e.g. from token_batches")
    ids = b.get("input_ids")
    if ids is None:
        raise ValueError(f"batch {i} has no 'input_ids' (keys: {sorted(map(str, b))}): each batch needs the token "
                         "ids, (rows, positions)")
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2:
        what = f"shape {tuple(ids.shape)}" if isinstance(ids, torch.Tensor) else f"a {type(ids).__name__}"
        raise ValueError(f"batch {i}: input_ids must be a 2-D tensor (rows, positions), got {what}")
    for key in ("attention_mask", "labels"):
        v = b.get(key)
        if v is not None and (not isinstance(v, torch.Tensor) or v.shape != ids.shape):
            what = f"shape {tuple(v.shape)}" if isinstance(v, torch.Tensor) else f"a {type(v).__name__}"
            raise ValueError(f"batch {i}: {key} ({what}) must be a tensor of the shape of input_ids "
                             f"{tuple(ids.shape)}")
    return b


def _model_device(model: Any) -> torch.device | None:
    """Where ``model`` takes its inputs: the device of its input embedding's weight (``get_input_embeddings()``,
    the first layer a token meets, also under a multi-device ``device_map``), else of its first parameter; None
    for a model without parameters or on the ``meta`` device (offloaded weights: the model's hooks place inputs)."""
    device = None
    get = getattr(model, "get_input_embeddings", None)
    if callable(get):
        try:
            weight = getattr(get(), "weight", None)
        except (NotImplementedError, AttributeError):
            weight = None
        if isinstance(weight, torch.Tensor):
            device = weight.device
    if device is None and isinstance(model, torch.nn.Module):
        device = next((p.device for p in model.parameters()), None)
    return None if device is None or device.type == "meta" else device


def _logits(out: Any, ids: torch.Tensor) -> torch.Tensor:
    """The ``(rows, positions, vocab)`` logits in a model's output ``out`` for ``ids`` ``(rows, positions)``.

    ``out.logits`` (a transformers ``ModelOutput``), ``out["logits"]`` (a dict, e.g. a traced model), the first
    tensor of that shape in a tuple / list (``(logits, ...)`` or ``(loss, logits, ...)`` of ``return_dict=False``),
    or ``out`` itself.
    """
    if hasattr(out, "logits"):
        return out.logits
    if isinstance(out, Mapping) and "logits" in out:
        return out["logits"]
    if isinstance(out, (tuple, list)):
        for x in out:
            if isinstance(x, torch.Tensor) and x.dim() == 3 and x.shape[:2] == ids.shape:
                return x
        raise TypeError(f"the model returned a {type(out).__name__} with no (rows, positions, vocab) logits tensor "
                        f"for input_ids of shape {tuple(ids.shape)}")
    return out


@torch.no_grad()
def perplexity(model: torch.nn.Module, batches: Iterable[dict[str, torch.Tensor]]) -> float:
    """Token-weighted perplexity (module docstring) of ``model`` on ``batches``.

    The batches are dicts with ``input_ids`` ``(rows, positions)`` and, optionally, an ``attention_mask`` of the
    same shape (e.g. from :func:`token_batches`); without ``attention_mask`` every token counts (a mask of ones).
    Other entries (``labels``, ``token_type_ids``...) go to the model as they are; ``labels`` must have the shape
    of ``input_ids`` but do not change the score, which is always that of the next token of ``input_ids``. The
    model is called as ``model(**batch)`` in eval mode (dropout off; its training mode is restored afterwards) and
    must return ``.logits`` (a transformers causal LM), a dict with ``"logits"``, a tuple holding the
    ``(rows, positions, vocab)`` logits (``return_dict=False``: ``(logits, ...)`` or ``(loss, logits, ...)``) or the
    logits tensor itself. Every tensor of a batch is first moved to the model's device: that of its input
    embedding's weight (``get_input_embeddings()``), else of its first parameter (no move for a model without
    parameters or with ``meta`` weights), so CPU batches score a GPU model. A left-padded batch is then moved to
    right padding (module docstring), so the result does not depend on the padding side or on the batch size.

    Args:
        model: a causal language model.
        batches: token batches (an iterable of dicts: ``[batch]`` for a single one).

    Returns:
        ``exp`` of the mean next-token cross-entropy over every predicted (unpadded) token, in float64 (``inf`` only
        past ``exp(709)``).

    Raises:
        TypeError: ``batches`` is a single dict, or holds something other than dicts.
        ValueError: a batch without ``input_ids``, ``input_ids`` that are not a 2-D tensor, an ``attention_mask``
            or ``labels`` of another shape, or batches that hold no token to predict.
    """
    if isinstance(batches, Mapping):  # iterating one batch would give its keys
        raise TypeError("batches is a single dict: pass an iterable of batches, e.g. [batch]")
    nll, count = 0.0, 0
    was_training = getattr(model, "training", None)
    if was_training is not None:
        model.eval()  # dropout would make the score random
    device = _model_device(model)
    try:
        for i, b in enumerate(batches):
            b = dict(_checked_batch(b, i))
            if device is not None:
                b = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in b.items()}
            b = _right_padded(b)
            ids = b["input_ids"]
            logits = _logits(model(**b), ids)[:, :-1].float()
            mask = b.get("attention_mask")
            real = mask != 0 if mask is not None else torch.ones_like(ids, dtype=torch.bool)
            tgt = ids[:, 1:].long().masked_fill(~(real[:, 1:] & real[:, :-1]), -100)  # context, target both real
            tgt = tgt.to(logits.device)  # a model split over devices returns its logits on the last one
            nll += float(torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), tgt.reshape(-1),
                                                           ignore_index=-100, reduction="sum"))
            count += int((tgt != -100).sum())
    finally:
        if was_training is not None:
            model.train(was_training)
    if count == 0:
        raise ValueError("no tokens to predict: give batches with at least two unpadded tokens per text")
    try:
        return math.exp(nll / count)  # float64: a float32 exp is inf past a mean NLL of 88.7 nats
    except OverflowError:
        return math.inf
