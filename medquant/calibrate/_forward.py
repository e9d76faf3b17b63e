"""Calibration batches through a model, with errors that name the batch (GPTQ, AWQ, AdaRound, block-by-block
capture), and the padding positions they hold.

A batch that does not fit the model fails deep inside the model's own forward with a message that names neither the
batch nor what was being calibrated; :func:`run_calibration_batch` re-raises it as a ``ValueError`` that names
both, the model's exception chained.

Padding (GPTQ's Hessians, AWQ's statistics and scale search): in a dict batch with a 2-D ``attention_mask``, the
positions with mask 0 are not calibration data. :func:`token_mask` gives the batch's mask, :func:`row_mask` applies
it to a layer input only where that input is ``(batch, tokens, K)`` with the mask's ``(batch, tokens)`` (or those
tokens flattened sample by sample, ``(batch * tokens, K)``, or an MoE expert's routed rows), and
:func:`unmasked_layers` names the layers it is never applied to (the vision tower's and the projector's, whose
inputs are image patches even when their count equals the number of tokens).
"""
from __future__ import annotations

import operator
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from ..models.introspect import model_roles
from ..models.runner import run_model


def describe_batch(batch: Any, *, shape: bool = False) -> str:
    """What a calibration batch is: ``"a dict with the keys [...]"``, ``"a tuple of 2 inputs"``, ``"a tensor"``
    (with ``shape``: ``"a tensor of shape (4, 16)"``), else its type name."""
    if isinstance(batch, Mapping):
        return f"a dict with the keys {sorted(map(str, batch))}"
    if isinstance(batch, (tuple, list)):
        return f"a {type(batch).__name__} of {len(batch)} inputs"
    if isinstance(batch, torch.Tensor):
        return f"a tensor of shape {tuple(batch.shape)}" if shape else "a tensor"
    return f"a {type(batch).__name__}"


def calibration_batches(calib: Any, method: str) -> list[Any]:
    """The calibration batches of ``calib`` as a list: one dict of keyword inputs is one batch (iterating it would
    give its keys), any other iterable gives its items.

    Args:
        calib: the ``calib`` argument of a calibration entry point.
        method: its name in the errors (``"GPTQ"``, ``"learned rounding"``).

    Returns:
        The batches (possibly empty: the caller refuses that with its own message).

    Raises:
        ValueError: ``calib`` is ``None``.
        TypeError: ``calib`` is a string or not iterable.
    """
    if calib is None:
        raise ValueError(f"{method} needs calibration data: calib is None; pass a list of batches (dicts of keyword "
                         "inputs, tuples of positional inputs or tensors)")
    if isinstance(calib, Mapping):
        return [calib]
    if isinstance(calib, (str, bytes)) or not isinstance(calib, Iterable):
        raise TypeError(f"{method}: calib must be a list (or another iterable) of calibration batches, got "
                        f"{type(calib).__name__}")
    return list(calib)


def check_seed(seed: Any) -> int:
    """``seed`` as a Python ``int`` (any integer type: ``int``, a NumPy integer...; ``bool`` refused).

    Raises:
        ValueError: ``seed`` is not an integer (``"seed must be an integer, got ..."``).
    """
    if not isinstance(seed, bool):
        try:
            return operator.index(seed)
        except TypeError:
            pass
    raise ValueError(f"seed must be an integer, got {seed!r}")


def run_calibration_batch(model: nn.Module, batch: Any, i: int, what: str, *,
                          passthrough: tuple[type[BaseException], ...] = (),
                          call: Callable[[nn.Module, Any], Any] | None = None) -> None:
    """``call(model, batch)`` (default :func:`medquant.models.run_model`) for calibration batch ``i``.

    Exceptions of the types in ``passthrough`` (the caller's early-stop signals) and ``ValueError``s of the
    calibration's own checks (their messages start with ``"layer "`` or ``"block "``) pass unchanged; any other
    ``ValueError``, ``RuntimeError``, ``TypeError`` or ``IndexError`` of the forward becomes ``ValueError:
    calibration batch i (<what the batch is>) failed in the model's forward while calibrating <what>: ...`` with
    the original chained.
    """
    try:
        (call or run_model)(model, batch)
    except passthrough:
        raise
    except ValueError as e:
        if str(e).startswith(("layer ", "block ")):
            raise
        raise ValueError(f"calibration batch {i} ({describe_batch(batch, shape=True)}) failed in the model's "
                         f"forward while calibrating {what}: {e}") from e
    except (RuntimeError, TypeError, IndexError) as e:
        raise ValueError(f"calibration batch {i} ({describe_batch(batch, shape=True)}) failed in the model's "
                         f"forward while calibrating {what}: {type(e).__name__}: {e}") from e


def short_names(names: Sequence[str]) -> str:
    """The first three of ``names``, comma-separated, ``", ..."`` after them when there are more (for messages)."""
    return ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")


def count_calls(model: nn.Module, names: Sequence[str], batches: Sequence[Any], *,
                on_call: Callable[[str, tuple, dict, int, int], None] | None = None
                ) -> tuple[list[str], dict[str, list[int]]]:
    """Run every calibration batch once, whole (:func:`run_calibration_batch`), counting the calls of the modules
    ``names``: with data-dependent control flow a later batch may call a module more often than batch 0, so a
    capture may stop a batch's forward at a module's first call only when every batch calls it exactly once.

    Args:
        model: the model.
        names: the modules to count (submodule names).
        batches: the calibration batches (a batch that fails in the forward is named with :func:`short_names` of
            ``names``).
        on_call: run at each call before it is counted, as ``on_call(name, args, kwargs, batch index, calls of
            name counted so far over all batches)`` (e.g. to check the input).

    Returns:
        ``(order, counts)``: the names called, in the order of their first call (batch 0's order, then those first
        called by a later batch), and ``counts[name]``, the calls of ``name`` by each batch (0: not called).
    """
    order: list[str] = []
    counts = {n: [0] * len(batches) for n in names}
    current = [0]

    def make(n: str):
        def hook(mod, args, kwargs):
            if on_call is not None:
                on_call(n, args, kwargs, current[0], sum(counts[n]))
            if not any(counts[n]):
                order.append(n)
            counts[n][current[0]] += 1
        return hook

    handles = []
    try:
        for n in names:
            handles.append(model.get_submodule(n).register_forward_pre_hook(make(n), with_kwargs=True))
        for i, batch in enumerate(batches):
            current[0] = i
            run_calibration_batch(model, batch, i, short_names(names))
    finally:
        for h in handles:
            h.remove()
    return order, counts


def token_mask(batch: Any) -> torch.Tensor | None:
    """The ``(batch, tokens)`` attention mask of a dict calibration batch when it marks padding (some entry 0), as
    bool (``True``: a real token); ``None`` when the batch has none or nothing is padded.

    The mask is the encoder's in an encoder-decoder batch; it is applied to every layer input of its
    ``(batch, tokens)`` shape (:func:`row_mask`). When the batch's ``decoder_input_ids`` / ``decoder_inputs_embeds``
    have that same length, the decoder's rows have that shape too and would be masked by the encoder's padding
    (``decoder_attention_mask`` is not read): a ``UserWarning`` says so (pad the two sequences to different
    lengths, or leave the encoder unpadded)."""
    mask = batch.get("attention_mask") if isinstance(batch, Mapping) else None
    if not isinstance(mask, torch.Tensor) or mask.dim() != 2:
        return None
    mask = mask != 0
    if bool(mask.all()):
        return None
    dec = batch.get("decoder_input_ids")
    dec = batch.get("decoder_inputs_embeds") if dec is None else dec
    if isinstance(dec, torch.Tensor) and dec.dim() >= 2 and tuple(dec.shape[:2]) == tuple(mask.shape):
        warnings.warn(f"an encoder-decoder calibration batch whose decoder sequence has its encoder's length "
                      f"({mask.shape[1]} tokens) and a padded attention_mask: the encoder's padding mask is applied "
                      "to every layer input of that shape, so the decoder's rows are left out where the encoder "
                      "is padded (and decoder padding is kept). Pad the encoder and decoder sequences to different "
                      "lengths, or leave the encoder unpadded", UserWarning, stacklevel=2)
    return mask


def row_mask(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor | None:
    """The mask of the rows of the layer input ``x`` when ``mask`` marks them: ``x`` is ``(batch, tokens,
    features)`` with the mask's ``(batch, tokens)``; ``(batch * tokens, features)`` with a ``(batch, tokens)`` mask
    (the tokens flattened sample by sample, as an MoE block flattens its hidden states: the mask flattened the same
    way); ``(rows, features)`` with a ``(rows,)`` mask (an MoE expert layer's routed tokens). Else ``None`` (every
    row is calibration data)."""
    if mask is None or x.dim() not in (2, 3):
        return None
    if x.dim() == 2 and mask.dim() == 2 and x.shape[0] == mask.numel():
        return mask.reshape(-1)
    if mask.dim() != x.dim() - 1 or tuple(x.shape[:-1]) != tuple(mask.shape):
        return None
    return mask


def unmasked_layers(model: nn.Module, names: Iterable[str]) -> set[str]:
    """The layers of ``names`` in the vision tower or the projector: their inputs are image patches, never the
    text tokens an attention mask marks."""
    try:
        roles = model_roles(model)
    except ValueError:  # an architecture without roles: no layer is known to read images
        return set()
    prefixes = [p for r in ("vision", "projector") for p in roles.get(r, [])]
    return {n for n in names if any(n == p or n.startswith(p + ".") for p in prefixes)}
