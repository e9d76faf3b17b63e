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

from ..distributed import is_distributed, rank
from .batches import default_groups
from .importance import compute_group_importance

__all__ = ["all_reduce_importance", "distributed_group_importance", "fit_allocator_distributed",
           "fit_baq_distributed", "global_group_objective"]


def _group_rank_world(group=None) -> tuple[int, int]:
    """``(rank, world size)`` in ``group`` when a process group is initialised, else ``(0, 1)``.

    Unlike :func:`medquant.distributed.rank` / ``world_size`` there is no ``$RANK`` / ``$WORLD_SIZE`` fallback: the
    work split here is only correct when the partial results are all-reduced afterwards, which needs a process group;
    without one every process computes the single-process answer.
    """
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(group), dist.get_world_size(group)
    return 0, 1


def all_reduce_importance(importance, group=None):
    """Sum a :class:`~medquant.fairquant.importance.GroupImportance` over all ranks, in place.

    Groups seen by only some ranks count as zero maps elsewhere. Afterwards ``importance`` itself holds the global
    importance: the maps of every group seen by some rank (this rank's map tensors reduced in place), the sample
    counts per group and the batch count summed over the ranks. No-op without a process group.

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
    # the whole object, not only the map tensors reduced in place: global maps with this rank's counts and batches
    # (and without the groups only other ranks saw) would be half-summed
    importance.maps, importance.counts, importance.batches = maps, dict(zip(union, c[:-1])), c[-1]
    return importance


def distributed_group_importance(model: nn.Module, batches, *, max_batches: int | None = 50, group=None, **kwargs):
    """Group importance of the first ``max_batches`` calibration batches, computed across ranks and summed.

    Each rank takes its share of the batches (``rank, rank + world, ...``) and computes its partial importance
    (``compute_group_importance(model, share, **kwargs)``); the partial maps are summed over the ranks. The rank and
    world size are those of ``group`` in the initialised process group; without a process group (even with
    ``$RANK`` / ``$WORLD_SIZE`` set) this is the single-process importance of all the batches. Every rank must get
    at least one batch with samples: the ranks agree on that (and on any other failure of a rank's share) before
    reducing, so every rank raises instead of some waiting in a collective. A rank's own error (raised by
    ``loss_fn``, ``groups_fn``, the data or a bad argument, also before its first sample) is raised as such on that
    rank, as one process raises it, and the other ranks raise ``RuntimeError``; only a share read to its end
    without a sample counts as empty. ``expected_groups`` (the declared
    group ids) is checked on the summed counts, as one process checks all its batches: with ``C_g`` the number of
    samples of group ``g`` over all ranks, every declared ``g`` needs ``C_g > 0`` and every ``g`` with ``C_g > 0``
    must be declared (a rank's share may hold only some of the declared groups).

    Args:
        model: the model (identical on every rank).
        batches: the calibration batches (the same on every rank).
        max_batches: use at most this many.
        group: the process group (default the world).
        **kwargs: passed to ``compute_group_importance`` (``expected_groups`` and ``min_groups``, default 2, are
            checked on the summed counts after the reduction: a rank's share may hold fewer groups).

    Returns:
        The global :class:`~medquant.fairquant.importance.GroupImportance`.

    Raises:
        ValueError: an invalid rank / world size, ``max_batches`` below the number of processes, fewer calibration
            batches (or batches with samples) than processes, a declared group without samples or an undeclared
            group with samples over all ranks, a single group over all ranks (with ``min_groups=2``, the
            default), or ``min_groups`` not 1 or 2.
        RuntimeError: another rank failed computing its share (that rank raises its own error).
    """
    r, w = _group_rank_world(group)
    if w < 1 or not 0 <= r < w:
        raise ValueError(f"rank must be in [0, world_size) and world_size >= 1, got rank={r}, world_size={w}")
    if max_batches is not None and max_batches < w:
        raise ValueError(f"max_batches={max_batches} leaves some of the {w} processes without a calibration batch; "
                         f"use max_batches >= world size")
    # checked on the groups of all ranks together (below): a rank's share may hold a single group
    min_groups = kwargs.pop("min_groups", 2)
    if isinstance(min_groups, bool) or min_groups not in (1, 2):
        raise ValueError(f"min_groups must be 1 (a partial, per-process sum) or 2 (default), got {min_groups!r}")
    seen = [0, 0, 0]  # batches and samples of this rank's share, whether the share was read to its end
    groups_fn = kwargs.pop("groups_fn", None) or default_groups
    # checked on the groups of all ranks together (below): a rank's share may miss a declared group
    expected = kwargs.pop("expected_groups", None)

    def counted(it):
        for b in it:
            seen[0] += 1
            yield b
        seen[2] = 1

    def counting_groups(batch):
        g = groups_fn(batch)
        seen[1] += int(g.numel()) if isinstance(g, torch.Tensor) else (len(g) if hasattr(g, "__len__") else 1)
        return g

    share = counted(itertools.islice(batches, r, max_batches, w))
    local, error = None, None
    try:
        # one rank may see a single group: the check is on the groups of all ranks together
        local = compute_group_importance(model, share, max_batches=None, min_groups=1, groups_fn=counting_groups,
                                         **kwargs)
    except Exception as e:  # noqa: BLE001 - re-raised below, after every rank knows whether one failed
        error = e
    # the error compute_group_importance raises after reading a share without samples ("no calibration batches",
    # "saw no samples") is the share's emptiness, reported below; any other error (raised by loss_fn, groups_fn,
    # the data, a bad argument...) is this rank's own and is raised as such
    own_error = error is not None and not (seen[2] and seen[1] == 0)
    status = torch.zeros(3, w, dtype=torch.int64)
    status[:, r] = torch.tensor([seen[0], seen[1], own_error])
    if w > 1:
        dev = next((p.device for p in model.parameters()), torch.device("cpu"))
        status = status.to(dev)
        dist.all_reduce(status, op=dist.ReduceOp.SUM, group=group)
    n_batches, n_samples, failed = status.tolist()
    bad = [i for i in range(w) if failed[i]]
    if own_error:
        assert error is not None
        raise error
    if bad:
        raise RuntimeError(f"rank(s) {bad} failed computing their share of the group importance (their own "
                           f"error is raised there)")
    if w == 1 and n_batches[0] > 0 and n_samples[0] == 0:
        raise ValueError(f"calibration saw no samples: its {n_batches[0]} batch(es) are all empty")
    empty = [i for i in range(w) if n_batches[i] == 0 or n_samples[i] == 0]
    if w > 1 and empty:
        raise ValueError(
            f"fewer calibration batches with samples than processes: rank(s) {empty} of {w} got no batch with "
            f"samples (batches per rank {n_batches}, samples per rank {n_samples}; rank r takes batches r, "
            f"r + {w}, ... of the first max_batches={max_batches}). Give at least {w} non-empty batches")
    if error is not None:
        raise error
    assert local is not None
    total = all_reduce_importance(local, group=group)
    if expected is not None:  # the same counts on every rank: every rank raises the same error
        allowed = {int(g) for g in expected}
        extra = sorted(set(total.counts) - allowed)
        if extra:
            raise ValueError(f"calibration over all {w} processes saw group ids {extra} outside the declared groups "
                             f"{sorted(allowed)}")
        missing = sorted(allowed - set(total.counts))
        if missing:
            raise ValueError(f"group(s) {missing} have no samples in the {total.batches} calibration batch(es) of all "
                             f"{w} processes; every declared group needs samples (declared: {sorted(allowed)}, seen: "
                             f"{sorted(total.counts)})")
    if len(total.counts) < min_groups:
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


def _global_ids(local_ids: torch.Tensor, group=None) -> torch.Tensor:
    """Sorted union over the ranks of ``group`` of each rank's sorted unique ids (two small all-gathers)."""
    w = dist.get_world_size(group)
    k = torch.tensor([local_ids.numel()], dtype=torch.int64, device=local_ids.device)
    sizes = [torch.zeros_like(k) for _ in range(w)]
    dist.all_gather(sizes, k, group=group)
    n = [int(t) for t in sizes]
    if max(n) == 0:
        return local_ids
    padded = torch.zeros(max(n), dtype=torch.int64, device=local_ids.device)
    padded[:local_ids.numel()] = local_ids
    parts = [torch.empty_like(padded) for _ in range(w)]
    dist.all_gather(parts, padded, group=group)
    return torch.unique(torch.cat([t[:m] for t, m in zip(parts, n)]))


def global_group_objective(losses: torch.Tensor, groups: torch.Tensor, *, lambda_fair: float = 0.0, group=None,
                           grad_scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mean loss and fairness penalty of the *global* batch (the union of every rank's batch).

    The global objective is ``F = sum_g S_g / N + lambda_fair * (max_g S_g / n_g - min_g S_g / n_g)`` with ``S_g``
    / ``n_g`` the loss sum / sample count of group ``g`` over all ranks and ``N = sum_g n_g`` (the penalty is 0 with
    fewer than two groups). Group ids are any integers (negative or large ones included): the sorted union of the
    ids of every rank is gathered and the ids are relabelled to their position in it, so memory is linear in the
    number of groups. The detached sums and counts are summed over ranks (one ``all_reduce``), so every rank knows
    ``N``, ``n_g`` and the global group means ``L_g``. The returned *surrogate* keeps this rank's autograd path
    only::

        J_r = grad_scale * ( sum_{i in r} l_i / N + lambda_fair * (max_g M_g - min_g M_g) ),
        M_g = L_g + (S^r_g - stopgrad(S^r_g)) / n_g

    ``M_g`` has the value of the global mean ``L_g`` and the gradient of this rank's share ``S^r_g / n_g``, and the
    max / min are torch's ``max()`` / ``min()`` of the vector of group means in ascending id order, the very op of
    the single-process penalty (:func:`medquant.fairquant.batches.fairness_penalty`): groups tied for the largest
    (smallest) mean share its gradient the same way. So ``sum_r dJ_r/dw = grad_scale * dF/dw``: with ``grad_scale =
    world_size`` and the gradients averaged over ranks (what ``DistributedDataParallel`` does) every rank gets
    exactly the single-process gradient of ``F``; with ``grad_scale = 1`` and summed gradients too. Without a
    process group (or world size 1) this is the single-process loss.

    Args:
        losses: this rank's per-sample losses ``(N_r,)``.
        groups: this rank's integer group ids ``(N_r,)``.
        lambda_fair: weight of the fairness penalty.
        group: the process group (default the world; None without ``torch.distributed``).
        grad_scale: factor on the surrogate (``world_size`` when DDP averages the gradients).

    Returns:
        ``(surrogate, F_task, F_fair)``; the last two detached and identical on all ranks.

    Raises:
        ValueError: losses and group ids of different shapes or not 1-D, non-integer group ids, or every rank's
            batch empty.
    """
    if losses.dim() != 1 or groups.shape != losses.shape:
        raise ValueError(f"need per-sample losses (N,) and group ids (N,), got {tuple(losses.shape)} and "
                         f"{tuple(groups.shape)}")
    if groups.dtype.is_floating_point or groups.dtype == torch.bool or groups.is_complex():
        raise ValueError(f"group ids must be integers, got dtype {groups.dtype}")
    on = is_distributed(group)
    groups = groups.to(device=losses.device, dtype=torch.int64)
    local_ids = torch.unique(groups)
    ids = _global_ids(local_ids, group) if on else local_ids
    n_ids = ids.numel()
    if n_ids == 0:
        raise ValueError("every rank's batch is empty")
    index = torch.searchsorted(ids, groups)
    # float32 at least (half-precision counts are inexact above 2048); differentiable through index_add
    acc = torch.promote_types(losses.dtype, torch.float32)
    sums = torch.zeros(n_ids, dtype=acc, device=losses.device).index_add(0, index, losses.to(acc))
    counts = torch.bincount(index, minlength=n_ids).to(acc)
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
        # global means as values, this rank's sums as the autograd path; same max()/min() as fairness_penalty
        means = (s_all[present] + (sums[present] - sums[present].detach())) / n_all[present]
        penalty = means.max() - means.min()
        fair = penalty.detach()
        surrogate = surrogate + lambda_fair * penalty
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
