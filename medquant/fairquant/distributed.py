"""FairQuant over several processes: group importance summed across ranks, the global-batch objective.

**Importance.** ``I_g[w]`` is a sum over calibration batches (``grape``: ``I_g[w] = sum_batches (dL_g/dw * w)^2``;
``gradient``: ``sum_batches |dL_g/dw|``, with ``L_g`` the mean loss over the batch's samples of group ``g``), so it
can be split: every rank iterates the same calibration sequence and keeps batches ``rank, rank + world, ...`` (of
the first ``max_batches``), computes its partial ``I_g`` with
:func:`medquant.fairquant.importance.compute_group_importance`, and :func:`all_reduce_importance` sums maps, sample
counts and batch counts over ranks (``torch.distributed.all_reduce``, gloo on CPU / nccl on GPU). Every rank then
holds the same maps - equal to the single-process ones up to the order of floating-point additions - and
:func:`fit_allocator_distributed` runs the (deterministic) allocation on them, so every rank computes the
identical bit allocation. Launch with ``torchrun --nproc_per_node N script.py`` or ``accelerate launch
--num_processes N script.py``; call ``torch.distributed.init_process_group("gloo" or "nccl")`` first.

**Training** (BAQ, FQ-QAT): every rank gets its share of each global batch. :func:`global_group_objective`
all-reduces per-group loss sums and counts so the mean loss and the fairness penalty ``max_g L_g - min_g L_g`` are
those of the global batch, while each rank back-propagates only through its own samples (a surrogate whose
gradients, summed over ranks, are the global gradient). ``BAQWrapper.fit(..., distributed=True)``
(:func:`fit_baq_distributed`) uses it with :func:`medquant.distributed.all_reduce_gradients`; ``fq_qat`` uses it
with a ``DistributedDataParallel`` model. FSDP2 for FQ-QAT and BAQ (``fq_qat(..., fsdp=True)``,
``BAQWrapper.fit(..., distributed=True, fsdp=True)``): the parametrizations are attached to the plain model, then
:func:`medquant.distributed.fsdp_shard` shards it, and :func:`medquant.distributed.load_full_state` gathers the
trained weights into a :func:`medquant.distributed.meta_skeleton` for export. See docs/guides/large_models.md.
"""
from __future__ import annotations

import itertools

import torch
import torch.distributed as dist
from torch import nn

from ..distributed import is_distributed, rank, world_size
from .importance import GroupImportance, compute_group_importance

__all__ = ["all_reduce_importance", "distributed_group_importance", "fit_allocator_distributed",
           "fit_baq_distributed", "global_group_objective"]


def all_reduce_importance(importance, group=None):
    """Sum a :class:`~medquant.fairquant.importance.GroupImportance` over all ranks (in place on the maps).

    Groups seen by only some ranks count as zero maps elsewhere. No-op without a process group.

    Args:
        importance: this rank's :class:`~medquant.fairquant.importance.GroupImportance`.
        group: the process group (default the world).

    Returns:
        ``importance``, summed.

    Raises:
        RuntimeError: the ranks computed importance for different layers.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return importance
    w = dist.get_world_size(group)
    layer_lists: list = [None] * w
    dist.all_gather_object(layer_lists, list(importance.layers), group=group)
    if any(lst != layer_lists[0] for lst in layer_lists):
        raise RuntimeError("ranks computed importance for different layers: every rank must hold the same model "
                           "and the same layers/skip patterns")
    group_lists: list = [None] * w
    dist.all_gather_object(group_lists, sorted(importance.maps), group=group)
    union = sorted(set().union(*map(set, group_lists)))
    any_map = next(iter(importance.maps.values()))
    maps = {}
    for g in union:
        local = importance.maps.get(g, {})
        maps[g] = {}
        for name in importance.layers:
            t = local.get(name)
            t = torch.zeros_like(any_map[name]) if t is None else t.contiguous()
            dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
            maps[g][name] = t
    dev = any_map[importance.layers[0]].device
    counts = torch.tensor([importance.counts.get(g, 0) for g in union] + [importance.batches], dtype=torch.int64,
                          device=dev)
    dist.all_reduce(counts, op=dist.ReduceOp.SUM, group=group)
    c = counts.tolist()
    return GroupImportance(maps=maps, counts=dict(zip(union, c[:-1])), metric=importance.metric, batches=c[-1],
                           layers=list(importance.layers))


def distributed_group_importance(model: nn.Module, batches, *, max_batches: int | None = 50, group=None, **kwargs):
    """Group importance of the first ``max_batches`` calibration batches, computed across ranks and summed.

    Each rank takes its share of the batches (``rank, rank + world, ...``) and computes its partial importance
    (``compute_group_importance(model, share, **kwargs)``); the partial maps are summed over the ranks.

    Args:
        model: the model (identical on every rank).
        batches: the calibration batches (the same on every rank).
        max_batches: use at most this many.
        group: the process group (default the world).
        **kwargs: passed to ``compute_group_importance``.

    Returns:
        The global :class:`~medquant.fairquant.importance.GroupImportance`.

    Raises:
        ValueError: an invalid rank / world size, ``max_batches`` below the number of processes, or a single group
            over all ranks.
    """
    r, w = rank(), world_size()
    if w < 1 or not 0 <= r < w:
        raise ValueError(f"rank must be in [0, world_size) and world_size >= 1, got rank={r}, world_size={w}")
    if max_batches is not None and max_batches < w:
        raise ValueError(f"max_batches={max_batches} leaves some of the {w} processes without a calibration batch; "
                         f"use max_batches >= world size")
    share = itertools.islice(batches, r, max_batches, w)
    # one rank may see a single group: the check is on the groups of all ranks together
    local = compute_group_importance(model, share, max_batches=None, min_groups=1, **kwargs)
    total = all_reduce_importance(local, group=group)
    if len(total.counts) < 2:
        raise ValueError(f"calibration over all {w} processes saw a single group ({sorted(total.counts)}); "
                         f"group-conditioned importance needs at least two groups with samples")
    return total


def fit_allocator_distributed(allocator, model: nn.Module, batches, *, loss_fn=None, groups_fn=None, group=None):
    """``allocator.fit(model, batches)`` with the calibration split across ranks (module docstring).

    The fitted allocator is identical on every rank.

    Args:
        allocator: a :class:`medquant.fairquant.FairQuantAllocator`.
        model: the model.
        batches: the calibration batches (the same on every rank).
        loss_fn: per-sample loss function (default cross-entropy).
        groups_fn: group ids of a batch (default :func:`~medquant.fairquant.batches.default_groups`).
        group: the process group (default the world).

    Returns:
        The fitted allocator.

    Raises:
        ValueError: the groups seen over all ranks differ from the allocator's declared groups.
    """
    if allocator.seed is not None:
        torch.manual_seed(allocator.seed)
    imp = distributed_group_importance(
        model, batches, max_batches=allocator.max_batches, group=group, loss_fn=loss_fn, groups_fn=groups_fn,
        metric=allocator.metric, layers=allocator.layers, skip=allocator.skip, expected_groups=None,
        progress=allocator.progress and rank() == 0)
    if allocator.groups is not None:
        missing = sorted(set(allocator.groups) - set(imp.counts))
        extra = sorted(set(imp.counts) - set(allocator.groups))
        if missing or extra:
            raise ValueError(f"calibration groups over all ranks {sorted(imp.counts)} differ from the declared "
                             f"groups {sorted(allocator.groups)} (missing {missing}, undeclared {extra})")
    return allocator.fit_importance(imp)


def global_group_objective(losses: torch.Tensor, groups: torch.Tensor, *, lambda_fair: float = 0.0, group=None,
                           grad_scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mean loss and fairness penalty of the *global* batch (the union of every rank's batch).

    The global objective is ``F = sum_g S_g / N + lambda_fair * (S_a / n_a - S_b / n_b)`` with ``S_g`` / ``n_g``
    the loss sum / sample count of group ``g`` over all ranks, ``N = sum_g n_g``, ``a`` / ``b`` the groups with the
    largest / smallest mean loss (``max_g L_g - min_g L_g``; 0 with fewer than two groups). The detached sums and
    counts are summed over ranks (one ``all_reduce``), so every rank knows ``N``, ``n_g``, ``a`` and ``b``. The
    returned *surrogate* keeps this rank's autograd path only::

        J_r = grad_scale * ( sum_{i in r} l_i / N + lambda_fair * (S^r_a / n_a - S^r_b / n_b) )

    ``F`` is linear in the per-rank sums ``S^r_g`` once ``a``, ``b``, ``n`` are fixed, so ``sum_r dJ_r/dw =
    grad_scale * dF/dw``: with ``grad_scale = world_size`` and the gradients averaged over ranks (what
    ``DistributedDataParallel`` does) every rank gets exactly the single-process gradient of ``F``; with
    ``grad_scale = 1`` and summed gradients too. Without a process group (or world size 1) this is the
    single-process loss.

    Args:
        losses: this rank's per-sample losses ``(N_r,)``.
        groups: this rank's group ids ``(N_r,)``, integers >= 0.
        lambda_fair: weight of the fairness penalty.
        group: the process group (default the world; None without ``torch.distributed``).
        grad_scale: factor on the surrogate (``world_size`` when DDP averages the gradients).

    Returns:
        ``(surrogate, F_task, F_fair)``; the last two detached and identical on all ranks.

    Raises:
        ValueError: losses and group ids of different shapes or not 1-D, or a negative group id.
    """
    if losses.dim() != 1 or groups.shape != losses.shape:
        raise ValueError(f"need per-sample losses (N,) and group ids (N,), got {tuple(losses.shape)} and "
                         f"{tuple(groups.shape)}")
    if groups.numel() and int(groups.min()) < 0:
        raise ValueError("group ids must be >= 0 for the cross-process reduction")
    on = is_distributed(group)
    top = torch.tensor([int(groups.max()) if groups.numel() else -1], dtype=torch.int64, device=losses.device)
    if on:
        dist.all_reduce(top, op=dist.ReduceOp.MAX, group=group)
    n_ids = int(top) + 1
    if n_ids == 0:
        raise ValueError("every rank's batch is empty")
    # float32 at least (half-precision counts are inexact above 2048); differentiable through index_add
    acc = torch.promote_types(losses.dtype, torch.float32)
    sums = torch.zeros(n_ids, dtype=acc, device=losses.device).index_add(0, groups, losses.to(acc))
    counts = torch.bincount(groups, minlength=n_ids).to(acc)
    packed = torch.cat([sums.detach(), counts])
    if on:
        dist.all_reduce(packed, op=dist.ReduceOp.SUM, group=group)
    s_all, n_all = packed[:n_ids], packed[n_ids:]
    total_n = n_all.sum()
    task = (s_all.sum() / total_n).detach()
    surrogate = sums.sum() / total_n
    fair = task.new_zeros(())
    present = torch.nonzero(n_all > 0).flatten()
    if lambda_fair > 0 and present.numel() >= 2:
        means = s_all[present] / n_all[present]
        a, b = present[torch.argmax(means)], present[torch.argmin(means)]
        fair = (means.max() - means.min()).detach()
        surrogate = surrogate + lambda_fair * (sums[a] / n_all[a] - sums[b] / n_all[b])
    return surrogate * grad_scale, task, fair


def fit_baq_distributed(wrapper, batches, **kwargs):
    """``wrapper.fit(batches, distributed=True, **kwargs)``: BAQ with this rank's share of every global batch.

    ``batches`` are this rank's local batches (e.g. a ``DistributedSampler`` loader, or slice ``r`` of every global
    batch); step ``t`` of the run is the union over ranks of their ``t``-th batches. Every rank computes the
    objective of that union (:func:`global_group_objective`: global mean loss, fairness penalty over the global
    group means, bit-rate term), gradients are averaged over ranks, so every rank takes the single-process step
    and ends with identical ``theta``, bits and weights (rank 0's initial values are broadcast first).

    Args:
        wrapper: a :class:`medquant.fairquant.BAQWrapper`.
        batches: this rank's batches.
        **kwargs: passed to ``BAQWrapper.fit`` (epochs, learning rates...).

    Returns:
        What ``BAQWrapper.fit`` returns (the per-step history).
    """
    return wrapper.fit(batches, distributed=True, **kwargs)
