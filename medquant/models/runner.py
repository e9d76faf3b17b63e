"""Run a model on one batch and read its main output tensor, whatever form the batch and the output take.

Calibration (pruning importance, block influence, AWQ), distillation and FairQuant's losses all feed batches
as a data loader yields them and read the logits back; they share these two functions.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import nn

__all__ = ["eval_mode", "main_output", "placeholder_token_ids", "run_model"]

#: config fields naming a placeholder token, on the model's config or its ``vision_config`` / ``audio_config``
PLACEHOLDER_FIELDS = ("image_token_id", "image_token_index", "video_token_id", "video_token_index", "audio_token_id",
                      "audio_token_index", "visual_indicator_token_ids")


def run_model(model: nn.Module, batch: Any, /, *, unpack_sequences: bool = True, **extra: Any) -> Any:
    """Call ``model`` on one batch and return what it returns.

    Args:
        model: the model.
        batch: a mapping of keyword inputs, a tuple / list of positional inputs, or one input (a tensor).
        unpack_sequences: spread a tuple / list over positional arguments (false: pass it as one argument).
        **extra: keyword arguments added to every call.

    Returns:
        ``model(**batch, **extra)`` when ``batch`` is a mapping (a dict, a transformers ``BatchEncoding``);
        ``model(*batch, **extra)`` when it is a tuple or list and ``unpack_sequences`` is true (several
        positional inputs); ``model(batch, **extra)`` otherwise (a tensor, or a tuple/list passed whole when
        ``unpack_sequences`` is false). ``extra`` are keyword arguments added to every call (e.g. ``labels=``,
        ``output_hidden_states=True``).
    """
    if isinstance(batch, Mapping):
        return model(**batch, **extra)
    if unpack_sequences and isinstance(batch, (tuple, list)):
        return model(*batch, **extra)
    return model(batch, **extra)


def main_output(out: Any, *, hidden_state: bool = True, first_item: bool = True) -> torch.Tensor:
    """The main tensor of a model output.

    Returns, in this order: ``out`` itself when it is a tensor; ``out.logits`` when that is a tensor (Hugging Face
    outputs); ``out.last_hidden_state`` when that is a tensor and ``hidden_state`` is true (encoders without a
    head); ``out[0]`` when ``out`` is a non-empty tuple or list whose first element is a tensor and ``first_item``
    is true. Callers that need class or token logits pass ``hidden_state=False``.

    Args:
        out: what a model returned.
        hidden_state: accept ``out.last_hidden_state`` when there are no logits.
        first_item: accept the first element of a tuple / list.

    Returns:
        The main output tensor.

    Raises:
        TypeError: none of these applies.
    """
    if isinstance(out, torch.Tensor):
        return out
    keys = ("logits", "last_hidden_state") if hidden_state else ("logits",)
    for key in keys:
        val = getattr(out, key, None)
        if isinstance(val, torch.Tensor):
            return val
    if first_item and isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    wanted = " or ".join([f".{k}" for k in keys] + (["the first element of a tuple"] if first_item else []))
    raise TypeError(f"cannot find the main output tensor ({wanted}) in a {type(out).__name__}")


def placeholder_token_ids(model: nn.Module) -> list[int]:
    """The ids of a multimodal model's placeholder tokens: the ``input_ids`` whose embeddings it replaces.

    A vision-language processor puts one placeholder token in ``input_ids`` per image (video, audio) feature; the
    model scatters the features into the embeddings at those positions, so they hold no text token: as next-token
    targets they are left out (``labels = -100``), as padding is. The ids are the integer values of the fields
    :data:`PLACEHOLDER_FIELDS` of ``model.config`` and of its ``vision_config`` / ``audio_config`` (Phi-4-multimodal
    keeps its image token id in the vision config); a field may hold one id or a list of them (Ovis2's
    ``visual_indicator_token_ids``, tokens whose embeddings its visual embedding table replaces).

    Args:
        model: the model (a wrapper such as DDP is not looked through: pass the wrapped module).

    Returns:
        The sorted distinct ids; empty for a model without a config or without such fields (a text-only model).
    """
    cfg = getattr(model, "config", None)
    configs = [cfg] + [getattr(cfg, k, None) for k in ("vision_config", "audio_config")] if cfg is not None else []
    values = (getattr(c, k, None) for c in configs if c is not None for k in PLACEHOLDER_FIELDS)
    ids = (i for v in values for i in (v if isinstance(v, (list, tuple)) else [v]))
    return sorted({i for i in ids if isinstance(i, int) and not isinstance(i, bool)})


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Context manager running its body with ``model.eval()``, then restoring the previous mode.

    In eval mode dropout is off and batch norm uses its running statistics; afterwards every submodule gets its
    own previous mode back (a model with some submodules in train and some in eval mode, or a module shared with
    another model in train mode, is left exactly as it was), also when the body raises.

    Args:
        model: the model.

    Yields:
        ``model`` itself, in eval mode.
    """
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, was_training in modes:
            m.training = was_training
