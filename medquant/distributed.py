"""Multi-process helpers: group importance summed across ranks, block-sharded sequential quantization.

**FairQuant importance over several processes** (SPEC section 4, "Importance"). ``I_g[w]`` is a sum over
calibration batches, so it can be split: every rank iterates the same calibration sequence and keeps batches
``rank, rank + world, ...`` (of the first ``max_batches``), computes its partial ``I_g`` with
:func:`medquant.fairquant.importance.compute_group_importance`, and :func:`all_reduce_importance` sums maps, sample
counts and batch counts over ranks (``torch.distributed.all_reduce``, gloo on CPU / nccl on GPU). Every rank then
holds the same maps - equal to the single-process ones up to the order of floating-point additions - and
:func:`fit_allocator_distributed` runs the (deterministic) allocation on them, so every rank computes the
identical bit allocation. Launch with ``torchrun --nproc_per_node N script.py`` or ``accelerate launch
--num_processes N script.py``; call ``torch.distributed.init_process_group("gloo" or "nccl")`` first.

**Training across processes** (BAQ, FQ-QAT, distillation, QLoRA): every rank gets its share of each global batch.
:func:`global_group_objective` all-reduces per-group loss sums and counts so the mean loss and the fairness
penalty ``max_g L_g - min_g L_g`` are those of the global batch, while each rank back-propagates only through its
own samples (a surrogate whose gradients, summed over ranks, are the global gradient). ``BAQWrapper.fit(...,
distributed=True)`` (:func:`fit_baq_distributed`) uses it with :func:`all_reduce_gradients`; ``fq_qat`` uses it
with a ``DistributedDataParallel`` model; ``Distiller`` and ``QLoRAAdapter.train(ddp=True)`` rely on DDP (or
FSDP2 for the distillation student). FSDP2 for FQ-QAT and BAQ (``fq_qat(..., fsdp=True)``,
``BAQWrapper.fit(..., distributed=True, fsdp=True)``): the parametrizations are attached to the plain model, then
:func:`fsdp_shard` shards it, and :func:`load_full_state` gathers the trained weights into a
:func:`meta_skeleton` for export. See docs/large_models.md.
"""
from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import torch
from torch import nn

from .quant.config import QuantConfig
from .quant.modules import QuantConv2d, QuantLinear
from .quant.size import quant_metadata

__all__ = ["all_reduce_gradients", "all_reduce_importance", "barrier",
           "broadcast_parameters", "ddp_like", "distributed_group_importance", "fit_allocator_distributed", "fit_baq_distributed",
           "global_group_objective", "is_ddp", "is_fsdp", "rank", "unwrap", "world_size"]

def rank() -> int:
    """This process's rank: the initialised torch.distributed group's, else ``$RANK``, else 0."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank()
    return int(os.environ.get("RANK", "0"))


def world_size() -> int:
    """Number of processes: the initialised group's, else ``$WORLD_SIZE``, else 1."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1"))


def barrier() -> None:
    """``torch.distributed.barrier()`` when a process group is initialised; a no-op otherwise."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


# ---------------------------------------------------------------------------------------------- FairQuant importance
def all_reduce_importance(importance, group=None):
    """Sum a :class:`~medquant.fairquant.importance.GroupImportance` over all ranks (in place on the maps; also
    returned). Groups seen by only some ranks count as zero maps elsewhere. No-op without a process group."""
    import torch.distributed as dist

    from .fairquant.importance import GroupImportance

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
    """This rank's share of the first ``max_batches`` calibration batches (``rank, rank + world, ...``), its partial
    importance (``compute_group_importance(model, share, **kwargs)``), summed over ranks."""
    import itertools

    from .fairquant.importance import compute_group_importance

    r, w = _check_rank(None, None)
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
    """``allocator.fit(model, batches)`` with the calibration split across ranks (module docstring); returns the
    fitted allocator, identical on every rank."""
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


# ---------------------------------------------------------------------------------- training across processes
def _dist_active(group=None) -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside ``DistributedDataParallel`` / ``DataParallel`` wrappers (``model`` itself otherwise)."""
    from torch.nn.parallel import DataParallel, DistributedDataParallel

    while isinstance(model, (DistributedDataParallel, DataParallel)):
        model = model.module
    return model


def is_ddp(model: nn.Module) -> bool:
    """``model`` is a ``torch.nn.parallel.DistributedDataParallel``."""
    from torch.nn.parallel import DistributedDataParallel

    return isinstance(model, DistributedDataParallel)


def is_fsdp(model: nn.Module) -> bool:
    """``model`` was sharded with FSDP2's ``torch.distributed.fsdp.fully_shard``."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - torch without FSDP2
        return False
    return isinstance(model, FSDPModule)


def global_group_objective(losses: torch.Tensor, groups: torch.Tensor, *, lambda_fair: float = 0.0, group=None,
                           grad_scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mean loss and fairness penalty of the *global* batch (the union of every rank's batch), SPEC section 4.

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
    single-process loss. Returns ``(surrogate, F_task, F_fair)`` (the last two detached, identical on all ranks).
    """
    import torch.distributed as dist

    if losses.dim() != 1 or groups.shape != losses.shape:
        raise ValueError(f"need per-sample losses (N,) and group ids (N,), got {tuple(losses.shape)} and "
                         f"{tuple(groups.shape)}")
    if groups.numel() and int(groups.min()) < 0:
        raise ValueError("group ids must be >= 0 for the cross-process reduction")
    on = _dist_active(group)
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


def broadcast_parameters(params: Iterable[torch.Tensor], src: int = 0, group=None) -> None:
    """Copy ``src``'s values of ``params`` to every rank (no-op without a process group)."""
    import torch.distributed as dist

    if not _dist_active(group):
        return
    with torch.no_grad():
        for p in params:
            dist.broadcast(p.data, src=src, group=group)


def all_reduce_gradients(params: Sequence[torch.Tensor], *, average: bool = True, group=None,
                         bucket_bytes: int = 25 * 2**20) -> None:
    """Sum (``average=False``) or average the ``.grad`` of ``params`` over ranks, in buckets of about
    ``bucket_bytes`` (a missing gradient counts as zeros, so every rank issues the same collectives). No-op
    without a process group."""
    import torch.distributed as dist

    if not _dist_active(group):
        return
    w = dist.get_world_size(group)
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    bucket: list[torch.Tensor] = []
    size = 0

    def flush():
        if not bucket:
            return
        flat = torch.cat([p.grad.reshape(-1) for p in bucket])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
        if average:
            flat /= w
        off = 0
        for q in bucket:
            q.grad.copy_(flat[off:off + q.numel()].view_as(q.grad))
            off += q.numel()
        bucket.clear()

    for p in params:
        if bucket and (p.grad.dtype != bucket[0].grad.dtype or p.grad.device != bucket[0].grad.device):
            flush()
            size = 0
        bucket.append(p)
        size += p.grad.numel() * p.grad.element_size()
        if size >= bucket_bytes:
            flush()
            size = 0
    flush()


def fit_baq_distributed(wrapper, batches, **kwargs):
    """``wrapper.fit(batches, distributed=True, **kwargs)``: BAQ with this rank's share of every global batch.

    ``batches`` are this rank's local batches (e.g. a ``DistributedSampler`` loader, or slice ``r`` of every global
    batch); step ``t`` of the run is the union over ranks of their ``t``-th batches. Every rank computes the
    objective of that union (:func:`global_group_objective`: global mean loss, fairness penalty over the global
    group means, bit-rate term), gradients are averaged over ranks, so every rank takes the single-process step
    and ends with identical ``theta``, bits and weights (rank 0's initial values are broadcast first)."""
    return wrapper.fit(batches, distributed=True, **kwargs)


def ddp_like(ddp: nn.Module, module: nn.Module) -> nn.Module:
    """A new ``DistributedDataParallel`` around ``module`` with ``ddp``'s settings (process group, devices,
    bucket size, unused-parameter detection, buffer sync). Needed after ``torch.nn.utils.parametrize`` changed
    the wrapped module: a DDP built before no longer sees the parametrized weights' gradients. The old wrapper's
    hooks stay inert as long as its own forward is not called again."""
    import inspect

    from torch.nn.parallel import DistributedDataParallel

    kw = {"device_ids": ddp.device_ids, "output_device": ddp.output_device, "dim": ddp.dim,
          "process_group": ddp.process_group, "bucket_cap_mb": ddp.bucket_bytes_cap / 2**20,
          "find_unused_parameters": ddp.find_unused_parameters,
          "gradient_as_bucket_view": ddp.gradient_as_bucket_view, "static_graph": ddp.static_graph}
    if "forward_sync_buffers" in inspect.signature(DistributedDataParallel.__init__).parameters:
        kw["forward_sync_buffers"] = ddp.forward_sync_buffers
    else:  # older torch
        kw["broadcast_buffers"] = ddp.broadcast_buffers
    return DistributedDataParallel(module, **kw)


# ------------------------------------------------------------------------------------------------ FSDP2 helpers
def has_fsdp(model: nn.Module) -> bool:
    """``model`` or one of its submodules was sharded with FSDP2's ``fully_shard``."""
    return any(is_fsdp(m) for m in model.modules())


def meta_skeleton(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` whose parameters are on the meta device (no memory); buffers are copied (FSDP2
    does not shard them, and non-persistent ones are absent from state dicts). Take it *before* attaching
    parametrizations or sharding; :func:`load_full_state` fills it."""
    import copy

    memo = {id(p): nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
            for p in model.parameters()}
    return copy.deepcopy(model, memo)


def fsdp_shard(model: nn.Module, units: Iterable[str] = (), *, mesh=None, ignored_params=None):
    """FSDP2-shard ``model`` in place: ``fully_shard`` on each module named in ``units`` (its own all-gather
    group), then on ``model``. Rank 0's parameter values are broadcast first (``fully_shard`` keeps each rank's
    slice of its own local tensor, so ranks built with different weights would mix them). ``mesh``: a 1-D
    ``DeviceMesh`` (default: every rank, on the device type of the parameters). ``ignored_params`` stay plain,
    replicated tensors. Returns the mesh."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("FSDP needs an initialised torch.distributed process group "
                           "(torch.distributed.init_process_group, torchrun or accelerate launch)")
    if has_fsdp(model):
        raise ValueError("the model is already sharded with fully_shard: pass the plain (unsharded) model, "
                         "medquant shards it after attaching its parametrizations")
    if mesh is None:
        dev = next(model.parameters()).device.type
        mesh = init_device_mesh(dev, (dist.get_world_size(),))
    if mesh.ndim != 1:
        raise ValueError(f"only a 1-D device mesh (plain FSDP) is supported, got {mesh.ndim}-D")
    broadcast_parameters(model.parameters(), group=mesh.get_group())
    kw = {"mesh": mesh}
    if ignored_params is not None:
        kw["ignored_params"] = set(ignored_params)
    for name in units:
        fully_shard(model.get_submodule(name), **kw)
    fully_shard(model, **kw)
    return mesh


def _plain_name(key: str) -> str:
    """``a.parametrizations.weight.original`` -> ``a.weight`` (the name without the parametrization)."""
    while ".parametrizations." in key or key.startswith("parametrizations."):
        head, _, tail = key.partition("parametrizations.")
        attr, _, rest = tail.partition(".")
        if rest != "original":
            return ""  # a parameter of the parametrization itself (e.g. BAQ's theta): not a model weight
        key = head + attr
    return key


def load_full_state(skeleton: nn.Module, sharded: nn.Module) -> nn.Module:
    """Fill the :func:`meta_skeleton` ``skeleton`` with the full (gathered) tensors of the FSDP2-sharded,
    possibly parametrized ``sharded`` model: ``DTensor.full_tensor()`` one tensor at a time (a collective: every
    rank must call it), ``...parametrizations.weight.original`` stored as ``...weight``; parameters of the
    parametrizations (BAQ's ``theta``) are left out; tied parameters stay tied. Every rank ends with the full model.
    Returns ``skeleton``."""
    from torch.distributed.tensor import DTensor

    want = dict(skeleton.state_dict())
    full = {}
    for key, t in sharded.state_dict().items():
        name = _plain_name(key)
        if not name:
            continue
        if name not in want:
            raise ValueError(f"{key!r} of the sharded model has no slot {name!r} in the skeleton")
        t = t.full_tensor() if isinstance(t, DTensor) else t
        full[name] = t.detach().clone()
    missing = sorted(set(want) - set(full))
    if missing:
        raise ValueError(f"the sharded model lacks {missing[:5]}")
    aliases, first = {}, {}  # tied parameters (e.g. lm_head / embeddings): re-tied after the assigning load
    for n, p in skeleton.named_parameters(remove_duplicate=False):
        if id(p) in first:
            aliases[n] = first[id(p)]
        else:
            first[id(p)] = n
    skeleton.load_state_dict(full, assign=True)
    for n, src in aliases.items():
        parent, _, attr = n.rpartition(".")
        setattr(skeleton.get_submodule(parent) if parent else skeleton, attr, skeleton.get_parameter(src))
    for p in skeleton.parameters():
        if p.device.type == "meta":
            raise RuntimeError("a parameter of the skeleton is still on the meta device after loading")
    return skeleton


def clip_grad_norm_(params: Sequence[torch.Tensor], max_norm: float, group=None) -> torch.Tensor:
    """``torch.nn.utils.clip_grad_norm_`` (2-norm) over parameters that may mix FSDP2-sharded ``DTensor``s
    (each element held by one rank: local squared sums are all-reduced) and plain replicated tensors (same
    gradient on every rank: counted once). Same formula as torch: ``coef = min(1, max_norm / (norm + 1e-6))``."""
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    dev = (grads[0].to_local() if isinstance(grads[0], DTensor) else grads[0]).device
    sharded = torch.zeros((), dtype=torch.float64, device=dev)
    plain = torch.zeros((), dtype=torch.float64, device=dev)
    for g in grads:
        if isinstance(g, DTensor):
            sharded += g.to_local().double().pow(2).sum()
        else:
            plain += g.double().pow(2).sum()
    if _dist_active(group):
        dist.all_reduce(sharded, op=dist.ReduceOp.SUM, group=group)
    total = (sharded + plain).sqrt().float()
    coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
    with torch.no_grad():
        for g in grads:
            if isinstance(g, DTensor):
                g.to_local().mul_(coef.to(g.to_local().dtype))
            else:
                g.mul_(coef.to(g.dtype))
    return total
