"""How FairQuant reads calibration and training batches: per-sample losses and group ids.

A *batch* is whatever your data loader yields; FairQuant needs two things from it:

* per-sample losses ``(N,)`` - from ``loss_fn(model, batch)``. The function may return either a 1-D tensor of
  per-sample losses, or a pair ``(outputs, targets)`` that :func:`per_sample_loss` turns into per-sample
  cross-entropy (integer targets) or mean binary cross-entropy over labels (float multi-label targets).
* group ids ``(N,)`` - an integer tensor, one id per sample - from ``groups_fn(batch)``.

Defaults (:func:`default_loss`, :func:`default_groups`) cover the two common layouts:

* a tuple/list ``(inputs, targets, groups)``: ``model(inputs)`` (``model(**inputs)`` when ``inputs`` is a dict);
* a dict with ``"groups"`` and ``"labels"`` (or ``"targets"``) keys: the remaining keys are the model's keyword
  inputs (Hugging Face style).

Outputs with a ``.logits`` attribute (Hugging Face) or tuples (first element) are unwrapped.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..models.runner import main_output, run_model

LossFn = Callable[[nn.Module, Any], Any]
GroupsFn = Callable[[Any], torch.Tensor]
_TARGET_KEYS = ("labels", "targets")


def per_sample_loss(outputs: Any, targets: torch.Tensor) -> torch.Tensor:
    """Per-sample loss ``(N,)``.

    Cross-entropy for integer targets ``(N,)``; for float targets of the logits' shape (multi-label), the mean
    over labels of binary cross-entropy with logits, computed in the wider of the logits' and the targets' dtypes.

    Args:
        outputs: the model's output (``.logits``, a tuple, or the logits tensor).
        targets: the targets.

    Returns:
        ``(N,)`` losses.

    Raises:
        TypeError: ``targets`` is not a tensor.
        ValueError: float targets not shaped like the logits, or logits / integer targets not ``(N, C)`` / ``(N,)``.
    """
    logits = main_output(outputs, hidden_state=False)  # the tensor, .logits or the first tuple element
    if not isinstance(targets, torch.Tensor):
        raise TypeError(f"targets must be a tensor, got {type(targets).__name__}")
    if targets.dtype.is_floating_point and targets.shape == logits.shape:
        dt = torch.promote_types(logits.dtype, targets.dtype)  # float16 labels must not lower float32 logits
        bce = F.binary_cross_entropy_with_logits(logits.to(dt), targets.to(dt), reduction="none")
        return bce.reshape(bce.shape[0], -1).mean(1)
    if targets.dtype.is_floating_point:
        raise ValueError(
            f"float targets of shape {tuple(targets.shape)} do not match the logits {tuple(logits.shape)}: use "
            f"integer class ids (N,) for single-label tasks or 0/1 floats shaped like the logits for multi-label"
        )
    if logits.dim() != 2 or targets.dim() != 1 or targets.shape[0] != logits.shape[0]:
        raise ValueError(
            f"cross-entropy needs logits (N, C) and integer targets (N,), got {tuple(logits.shape)} and "
            f"{tuple(targets.shape)}; pass a loss_fn returning per-sample losses for other outputs"
        )
    return F.cross_entropy(logits, targets.long(), reduction="none")


def default_loss(model: nn.Module, batch: Any) -> torch.Tensor:
    """Per-sample loss for ``(inputs, targets, groups)`` tuples or dicts with ``labels``/``targets`` + ``groups``.

    Args:
        model: the model (called as ``model(inputs)`` or ``model(**inputs)``).
        batch: the batch.

    Returns:
        Per-sample losses ``(N,)`` (see :func:`per_sample_loss`).

    Raises:
        KeyError: a dict batch without ``labels`` / ``targets``.
        TypeError: a batch that is neither a dict nor a tuple / list.
    """
    if isinstance(batch, Mapping):
        key = next((k for k in _TARGET_KEYS if k in batch), None)
        if key is None:
            raise KeyError(f"batch dict has no 'labels' or 'targets' key (keys: {sorted(batch)}); pass loss_fn")
        inputs = {k: v for k, v in batch.items() if k not in ("groups", key)}
        return per_sample_loss(model(**inputs), batch[key])
    if isinstance(batch, (tuple, list)) and len(batch) >= 3:
        return per_sample_loss(run_model(model, batch[0], unpack_sequences=False), batch[1])
    raise TypeError(
        f"default_loss expects (inputs, targets, groups) tuples or dicts with 'labels' and 'groups'; got "
        f"{type(batch).__name__}. Pass loss_fn(model, batch) -> per-sample losses (N,) or (outputs, targets)"
    )


def default_groups(batch: Any) -> torch.Tensor:
    """Group ids of a batch: ``batch["groups"]`` for dicts, the last element of tuples/lists.

    Args:
        batch: a dict or a tuple / list batch.

    Returns:
        The group ids ``(N,)``.

    Raises:
        KeyError: a dict batch without ``groups``.
        TypeError: a batch that is neither a dict nor a tuple / list.
    """
    if isinstance(batch, Mapping):
        if "groups" not in batch:
            raise KeyError(f"batch dict has no 'groups' key (keys: {sorted(batch)}); pass groups_fn")
        return batch["groups"]
    if isinstance(batch, (tuple, list)) and len(batch) >= 2:
        return batch[-1]
    raise TypeError(f"cannot find group ids in a batch of type {type(batch).__name__}; pass groups_fn")


def check_groups(groups: Any, n: int) -> torch.Tensor:
    """Validate group ids: a 1-D integer tensor (or a list of ints) with one entry per sample (a column ``(N, 1)``
    and, for one sample, a scalar are read as such). An empty batch's ids (``[]``, ``torch.tensor([])``, of any dtype)
    are an empty int64 tensor: the batch adds nothing to any group.

    Args:
        groups: the group ids.
        n: the number of samples.

    Returns:
        The ids as int64.

    Raises:
        TypeError: the ids are not integers (floats, bools, strings...).
        ValueError: not a 1-D sequence of one id per sample.
    """
    if not isinstance(groups, torch.Tensor):
        try:
            groups = torch.as_tensor(groups)
        except (TypeError, ValueError, RuntimeError) as e:
            raise TypeError(f"group ids must be integers (a 1-D integer tensor or a list of ints, one per sample), "
                            f"got {type(groups).__name__} that is not convertible to a tensor ({e}); map labels "
                            f"such as strings to integer ids first") from None
    if groups.numel() == 0 and n == 0:  # an empty batch: [] and torch.tensor([]) get torch's default float dtype
        return torch.zeros(0, dtype=torch.long, device=groups.device)
    if groups.dtype.is_floating_point or groups.dtype == torch.bool or groups.is_complex():
        raise TypeError(f"group ids must be an integer tensor, got dtype {groups.dtype}")
    if groups.dim() == 0 or (groups.dim() == 2 and groups.shape[1] == 1):  # a scalar (one sample), a column (N, 1)
        groups = groups.reshape(-1)
    if groups.dim() != 1:
        raise ValueError(f"group ids must be 1-D with one id per sample, got shape {tuple(groups.shape)} for a batch "
                         f"of {n} per-sample losses")
    if groups.numel() != n:
        raise ValueError(f"got {groups.numel()} group ids for a batch of {n} per-sample losses: give one per sample")
    return groups.long()


def batch_losses(model: nn.Module, batch: Any, loss_fn: LossFn | None, groups_fn: GroupsFn | None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(per-sample losses (N,), group ids (N,))`` for one batch, validated.

    Args:
        model: the model.
        batch: the batch.
        loss_fn: ``loss_fn(model, batch)`` -> per-sample losses or ``(outputs, targets)`` (None: :func:`default_loss`).
        groups_fn: ``groups_fn(batch)`` -> group ids (None: :func:`default_groups`).

    Returns:
        ``(losses, groups)``.

    Raises:
        ValueError: the losses are not ``(N,)`` or contain NaN / inf, ``loss_fn`` returned something else, or the
            group ids are not 1-D with one id per sample.
        TypeError: the group ids are not integers.
    """
    out = (loss_fn or default_loss)(model, batch)
    if isinstance(out, (tuple, list)):
        if len(out) != 2:
            raise ValueError("loss_fn must return per-sample losses (N,) or a pair (outputs, targets)")
        out = per_sample_loss(*out)
    if not isinstance(out, torch.Tensor) or out.dim() != 1:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(f"loss_fn must return per-sample losses of shape (N,), got {shape}")
    if not torch.isfinite(out).all():
        raise ValueError("the per-sample losses contain NaN/inf")
    groups = check_groups((groups_fn or default_groups)(batch), out.shape[0]).to(out.device)
    return out, groups


def group_mean_losses(losses: torch.Tensor, groups: torch.Tensor) -> dict[int, torch.Tensor]:
    """``{g: mean loss over the batch's samples of group g}`` for every group present.

    This is the per-group loss ``L_g`` of the importance and of the fairness penalty ``max_g L_g - min_g L_g``.

    Args:
        losses: per-sample losses ``(N,)``.
        groups: group ids ``(N,)``.

    Returns:
        Group id -> mean loss (a differentiable scalar tensor).
    """
    return {int(g): losses[groups == g].mean() for g in torch.unique(groups).tolist()}


def fairness_penalty(losses: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
    """``max_g L_g - min_g L_g`` over the groups present in the batch (0 with fewer than two groups).

    Args:
        losses: per-sample losses ``(N,)``.
        groups: per-sample group ids ``(N,)``.

    Returns:
        The scalar penalty (differentiable in ``losses``).
    """
    lg = list(group_mean_losses(losses, groups).values())
    if len(lg) < 2:
        return losses.sum() * 0
    stacked = torch.stack(lg)
    return stacked.max() - stacked.min()
