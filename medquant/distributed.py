"""Generic multi-process helpers: ranks, collectives, data-parallel wrappers and FSDP2 sharding.

Nothing here knows about quantization; the workflows build on it (FairQuant's cross-rank importance and
global-batch objective live in :mod:`medquant.fairquant.distributed`, block-sharded quantization in
:mod:`medquant.calibrate.shards`, the shared training step in :mod:`medquant.training`). Every function is a no-op
or the single-process answer without an initialised ``torch.distributed`` process group, so the same script runs
with ``python script.py``, ``torchrun --nproc_per_node N script.py`` or ``accelerate launch --num_processes N
script.py`` (call ``torch.distributed.init_process_group("gloo" or "nccl")`` first). The exceptions are
:func:`rank` / :func:`world_size`, which fall back to ``$RANK`` / ``$WORLD_SIZE`` for work split without
communication, and :func:`fsdp_shard`, which raises ``RuntimeError`` (FSDP needs a process group).

* ranks: :func:`rank`, :func:`world_size`, :func:`is_distributed`, :func:`barrier`, :func:`any_rank`;
* data parallel: :func:`broadcast_parameters` (rank 0's values everywhere), :func:`all_reduce_gradients`
  (bucketed sum / mean of ``.grad``, the ranks' parameter lists checked first; a gradient missing on every rank
  stays ``None``), :func:`unwrap`, :func:`is_ddp`,
  :func:`ddp_like`;
* FSDP2 (``torch.distributed.fsdp.fully_shard``): :func:`is_fsdp`, :func:`has_fsdp`, :func:`fsdp_shard`,
  :func:`clip_grad_norm_` over sharded and replicated gradients, :func:`meta_skeleton` + :func:`load_full_state`
  to gather the trained full weights into a plain copy of the model. See docs/guides/large_models.md.
"""
from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

__all__ = ["all_reduce_gradients", "any_rank", "barrier", "broadcast_parameters", "clip_grad_norm_", "ddp_like",
           "fsdp_shard", "has_fsdp", "is_ddp", "is_distributed", "is_fsdp", "load_full_state", "meta_skeleton",
           "rank", "unwrap", "world_size"]


def rank() -> int:
    """This process's rank: the initialised torch.distributed group's, else ``$RANK``, else 0.

    The ``$RANK`` fallback is for work split without communication (:func:`medquant.calibrate.quantize_shard`
    writes one shard per process) and for logging on one process. Work whose partial results are combined with
    collectives must not split on it without a process group (the reduction would be skipped and each process
    keep a partial result): :func:`medquant.fairquant.distributed_group_importance` uses the group's rank, 0
    without a process group.

    Returns:
        The rank, 0-based (0 in a single process).
    """
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank()
    return int(os.environ.get("RANK", "0"))


def world_size() -> int:
    """Number of processes: the initialised group's, else ``$WORLD_SIZE``, else 1.

    Same ``$WORLD_SIZE`` fallback and caveat as :func:`rank`: for splitting work that needs no collective.

    Returns:
        The world size, at least 1.
    """
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1"))


def barrier() -> None:
    """``torch.distributed.barrier()`` when a process group is initialised; a no-op otherwise."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


def is_distributed(group=None) -> bool:
    """Whether collectives communicate: a process group is initialised and ``group`` has more than one rank.

    Args:
        group: the process group (default the world).

    Returns:
        Whether collectives communicate.
    """
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


def _flag_device(backend: str) -> torch.device:
    """The device of the small tensors (flags, norms) the helpers reduce with a group of backend ``backend``.

    ``torch.distributed.get_backend(group)`` names the backend: ``"nccl"`` (or a per-device list such as
    ``"cuda:nccl"`` without a CPU entry) reduces only CUDA tensors: the current CUDA device; anything else (``"gloo"``,
    ``"mpi"``, ``"cpu:gloo,cuda:nccl"``) reduces CPU tensors: the CPU.
    """
    parts = [b.strip() for b in backend.lower().split(",") if b.strip()]
    if any(":" not in b for b in parts):  # one backend for every device type
        cpu = parts != ["nccl"]
    else:  # "device:backend" pairs
        cpu = any(b.partition(":")[0] == "cpu" for b in parts) or not any(b.endswith(":nccl") for b in parts)
    return torch.device("cpu") if cpu else torch.device("cuda", torch.cuda.current_device())


def _raise_together(error: str | None, group=None, what: str = "") -> None:
    """Raise ``ValueError`` on every rank of ``group`` when ``error`` (this rank's bad input) is set on any rank.

    Input checked on each rank before a collective: a rank raising alone would leave the others waiting in the
    collective. One ``all_reduce`` of one flag per rank (on the backend's device); every rank raises, naming the
    (global) ranks with bad input; those ranks give their own ``error``. Without a process group (or with a
    one-rank group) ``error`` is raised directly.
    """
    import torch.distributed as dist

    if not is_distributed(group):
        if error is not None:
            raise ValueError(error)
        return
    flags = torch.zeros(dist.get_world_size(group), device=_flag_device(dist.get_backend(group)))
    flags[dist.get_rank(group)] = float(error is not None)
    dist.all_reduce(flags, op=dist.ReduceOp.SUM, group=group)
    bad = [i for i, f in enumerate(flags.tolist()) if f > 0]
    if not bad:
        return
    ranks = bad if group is None else [dist.get_global_rank(group, i) for i in bad]
    if error is not None:
        raise ValueError(f"{error} (bad input on rank(s) {ranks}: every rank raises)")
    raise ValueError(f"{what}: bad input on rank(s) {ranks}, see the error raised there (every rank raises, none is "
                     "left waiting in a collective)")


def any_rank(flag: bool, device: torch.device | str | None = None, group=None) -> bool:
    """``flag`` or-ed over every rank of ``group``; ``flag`` itself without a process group.

    One ``all_reduce`` (MAX) of a one-element tensor. Lets every rank stop a loop together when one runs out of
    data.

    Args:
        flag: this rank's flag.
        device: device of the reduced tensor; None (default): the backend's, the current CUDA device for NCCL
            (``torch.distributed.get_backend(group) == "nccl"``), the CPU for gloo.
        group: the process group (default the world).

    Returns:
        True when any rank passed True.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return bool(flag)
    if device is None:
        device = _flag_device(dist.get_backend(group))
    t = torch.tensor([float(flag)], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return t.item() > 0


# ------------------------------------------------------------------------------------------------ data parallel
def unwrap(model: nn.Module) -> nn.Module:
    """The module inside ``DistributedDataParallel`` / ``DataParallel`` wrappers (``model`` itself otherwise).

    Args:
        model: a model, possibly wrapped.

    Returns:
        The inner module.
    """
    from torch.nn.parallel import DataParallel

    while isinstance(model, (DistributedDataParallel, DataParallel)):
        model = model.module
    return model


def is_ddp(model: nn.Module) -> bool:
    """``model`` is a ``torch.nn.parallel.DistributedDataParallel``.

    Args:
        model: the model.

    Returns:
        Whether it is a DDP wrapper.
    """
    return isinstance(model, DistributedDataParallel)


def is_fsdp(model: nn.Module) -> bool:
    """``model`` was sharded with FSDP2's ``torch.distributed.fsdp.fully_shard``.

    Args:
        model: the model.

    Returns:
        Whether the model itself is FSDP2-sharded.
    """
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - torch without FSDP2
        return False
    return isinstance(model, FSDPModule)


def broadcast_parameters(params: Iterable[torch.Tensor], src: int = 0, group=None) -> None:
    """Copy ``src``'s values of ``params`` to every rank of ``group`` (no-op without a process group).

    ``src`` is a rank *within* ``group`` (``0``: the group's first rank), the same as the global rank for the
    world; on a sub-group such as ``new_group([2, 3])`` ``src=0`` is global rank 2.

    Args:
        params: the tensors to overwrite in place.
        src: the rank of ``group`` whose values win.
        group: the process group (default the world).
    """
    import torch.distributed as dist

    if not is_distributed(group):
        return
    root = src if group is None else dist.get_global_rank(group, src)
    with torch.no_grad():
        for p in params:
            dist.broadcast(p.data, src=root, group=group)


def _reduce_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype gradients of ``dtype`` are all-reduced in: float32 for float16 / bfloat16, ``dtype`` otherwise."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


_SIG_MOD = 2**64
_SIG_MUL = 0x100000001B3  # the 64-bit FNV prime: multiplier of the polynomial hash of the parameter list


def _grad_desc(p: torch.Tensor) -> tuple[str, str, tuple[int, ...]]:
    """``(device type, dtype, shape)`` of the gradient :func:`all_reduce_gradients` reduces for ``p``: its ``.grad``,
    else (a zero gradient like ``p``) ``p``'s own."""
    g = p.grad if p.grad is not None else p
    return g.device.type, str(g.dtype).removeprefix("torch."), tuple(g.shape)


def _signature(descs: Sequence[tuple[str, str, tuple[int, ...]]]) -> list[int]:
    """``[count, total numel, hash]`` of a parameter list's descriptions, as int64 values (the same on every process).

    The hash is the polynomial ``h <- (h * _SIG_MUL + t + 1) mod 2^64`` over the tokens ``t`` of each description in
    order: CRC32 of the device type and of the dtype name, the number of dimensions, then each dimension (the number
    of dimensions makes the token sequence decodable, so different lists collide only by chance). CRC32, not
    Python's ``hash`` (salted per process).
    """
    import zlib

    h, numel = 0, 0
    for dev, dtype, shape in descs:
        n = 1
        for t in (zlib.crc32(dev.encode()), zlib.crc32(dtype.encode()), len(shape), *shape):
            h = (h * _SIG_MUL + t + 1) % _SIG_MOD
        for d in shape:
            n *= d
        numel += n
    return [len(descs), numel, h - _SIG_MOD if h >= 2**63 else h]


def _fmt_desc(d: tuple[str, str, tuple[int, ...]]) -> str:
    """``"cpu float32[2, 3]"``."""
    return f"{d[0]} {d[1]}[{', '.join(map(str, d[2]))}]"


def _fmt_list(descs: Sequence[tuple[str, str, tuple[int, ...]]], most: int = 8) -> str:
    """The first ``most`` descriptions, comma-separated (``...`` for the rest)."""
    shown = ", ".join(_fmt_desc(d) for d in descs[:most])
    return shown + (", ..." if len(descs) > most else "")


def _check_same_params(descs: list[tuple[str, str, tuple[int, ...]]], group=None) -> None:
    """Raise the same ``ValueError`` on every rank of ``group`` unless all pass the same parameter descriptions.

    One ``all_gather`` of this rank's :func:`_signature` (3 int64 values, on the backend's device). Only when the
    signatures differ: ``all_gather_object`` of the descriptions, and every rank builds the same message from them,
    comparing the first rank that differs from the group's first rank (ranks named by their global rank).
    """
    import torch.distributed as dist

    w = dist.get_world_size(group)
    mine = torch.tensor(_signature(descs), dtype=torch.int64, device=_flag_device(dist.get_backend(group)))
    sigs = [torch.empty_like(mine) for _ in range(w)]
    dist.all_gather(sigs, mine, group=group)
    rows = [s.tolist() for s in sigs]
    if all(r == rows[0] for r in rows):
        return
    every: list[Any] = [None] * w
    dist.all_gather_object(every, descs, group=group)
    first = next(i for i in range(w) if rows[i] != rows[0])
    a, b = every[first], every[0]
    ra, rb = (first, 0) if group is None else (dist.get_global_rank(group, first), dist.get_global_rank(group, 0))
    if len(a) != len(b):
        what = (f"rank {ra} passes {len(a)} parameters ({_fmt_list(a)}), rank {rb} passes {len(b)} "
                f"({_fmt_list(b)})")
    else:
        i = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)
        what = (f"parameter {i} is {_fmt_desc(a[i])} on rank {ra} but {_fmt_desc(b[i])} on rank {rb}" if i is not None
                else f"rank {ra} and rank {rb} pass different parameters ({_fmt_list(a)} / {_fmt_list(b)})")
    raise ValueError(f"all_reduce_gradients: the ranks pass different parameter lists: {what}. The gradients are "
                     "reduced in flattened buckets: pass the same parameters, in the same order, on every rank (the "
                     "same number, shapes, dtypes and device types); nothing was reduced (every rank raises)")


def all_reduce_gradients(params: Sequence[torch.Tensor], *, average: bool = True, group=None,
                         bucket_bytes: int = 25 * 2**20, check: bool = True) -> None:
    """Sum (``average=False``) or average the ``.grad`` of ``params`` over ranks, in place.

    With ``W`` ranks of ``group`` and ``g_r`` rank ``r``'s gradient, every rank ends with
    ``round_dtype(sum_r float32(g_r) / W)`` (``average``) or ``round_dtype(sum_r float32(g_r))``: half-precision
    (``float16`` / ``bfloat16``) gradients are summed and divided in float32 and rounded once to their dtype (no
    half-precision partial sums over ranks, and a ``float16`` mean does not overflow when the sum exceeds 65504);
    float32 / float64 gradients are reduced in their own dtype. Gradients are
    flattened into buckets of about ``bucket_bytes`` of reduced data (one ``all_reduce`` each); a gradient missing
    on some ranks counts as zeros there (every rank issues the same collectives; those ranks end with the sum /
    mean too). A parameter whose gradient is missing on *every* rank keeps ``.grad = None``, as in a single
    process, where optimizers skip it (a zero gradient would still let AdamW's weight decay or SGD's momentum move
    it); which parameters had a gradient on some rank travels as one 0/1 flag per parameter appended to the last
    bucket (no extra collective). Parameters of an integer or bool dtype (NF4 or packed weights: autograd gives
    them no gradient) are left out, their ``.grad`` untouched, so ``model.parameters()`` of a quantized model can be
    passed. No-op without a process group.

    Every rank must pass the same parameters, in the same order: the same number, and at each position the same
    gradient shape, dtype and device type (a missing ``.grad`` counts as ``p``'s own). Otherwise the buckets
    would not line up (a hang, a gloo / NCCL error or abort, or, with the same total size, gradients of different
    parameters silently summed together). With ``check`` (default) this is verified first: one ``all_gather`` of
    a 3-element int64 signature per rank (count, total number of elements, a 64-bit polynomial hash of the device
    types, dtypes and shapes in order); when the signatures differ, every rank raises the same ``ValueError``
    naming the first rank that differs from the group's first rank and what differs (the numbers of parameters
    with both lists, or the first position whose shape / dtype differs, with both values), before any gradient is
    touched. ``check=False`` skips that collective (the caller guarantees the lists match).

    Args:
        params: the parameters whose gradients to reduce.
        average: divide the sum by the world size.
        group: the process group (default the world).
        bucket_bytes: a bucket is closed once it holds this many bytes (of the float32 copies for half-precision
            gradients): a collective reduces less than ``bucket_bytes`` plus one gradient (a gradient is never
            split), plus the flags in the last bucket.
        check: verify first that every rank passes the same parameter list (one small collective per call).

    Raises:
        ValueError: with ``check``, the ranks' parameter lists differ (on every rank of ``group``).
    """
    import torch.distributed as dist

    if not is_distributed(group):
        return
    params = list(params)  # iterated twice (an iterator such as model.parameters() is accepted)
    if check:
        _check_same_params([_grad_desc(p) for p in params], group)
    # integer / bool parameters (NF4 or packed weights) have no gradient to reduce: autograd gives only floating-point
    # and complex tensors one (the same dtypes on every rank, so every rank leaves out the same ones)
    params = [p for p in params if p.is_floating_point() or p.is_complex()]
    if not params:
        return
    w = dist.get_world_size(group)
    had = [p.grad is not None for p in params]  # before any zeros are filled in (a parameter may repeat)
    grads: list[torch.Tensor] = []
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        grads.append(p.grad)
    # the same bucket boundaries on every rank (same descriptions): dtype / device changes and the size limit
    buckets: list[list[torch.Tensor]] = [[]]
    size = 0
    for g in grads:
        if buckets[-1] and (size >= bucket_bytes or g.dtype != buckets[-1][0].dtype
                            or g.device != buckets[-1][0].device):
            buckets.append([])
            size = 0
        buckets[-1].append(g)
        size += g.numel() * _reduce_dtype(g.dtype).itemsize
    anywhere: list[bool] = had
    for i, bucket in enumerate(buckets):
        parts = [g.reshape(-1).to(_reduce_dtype(g.dtype)) for g in bucket]
        last = i == len(buckets) - 1
        if last:  # 1 where this rank has the gradient: summed, > 0 where some rank has it
            parts.append(torch.tensor(had, dtype=parts[0].dtype, device=parts[0].device))
        flat = torch.cat(parts)
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
        if last:
            anywhere = (flat[flat.numel() - len(params):].real > 0).tolist()
        if average:
            flat /= w
        off = 0
        for g in bucket:
            g.copy_(flat[off:off + g.numel()].view_as(g))
            off += g.numel()
    for p, some in zip(params, anywhere):
        if not some:  # no rank had a gradient: as in one process, none (the zeros filled in above are dropped)
            p.grad = None


def ddp_like(ddp: DistributedDataParallel, module: nn.Module, *, init_sync: bool = True) -> DistributedDataParallel:
    """A new ``DistributedDataParallel`` around ``module`` with ``ddp``'s settings.

    Needed after ``torch.nn.utils.parametrize`` changed the wrapped module: a DDP built before no longer sees the
    parametrized weights' gradients. Carried (each where the installed torch has it):

    * process group, or the 1-D ``device_mesh`` it was built from; ``device_ids``, ``output_device``, ``dim``;
    * buckets: ``bucket_cap_mb`` (DDP's default kept as the default, with its small first bucket) or
      ``bucket_cap_mb_list``; ``find_unused_parameters``, ``gradient_as_bucket_view``, ``static_graph``,
      ``skip_all_reduce_unused_params``, ``batched_grad_copy``;
    * buffer sync: ``forward_sync_buffers`` (``broadcast_buffers`` on older torch). A wrapper that does not sync
      buffers in the forward does not sync them at construction either (rank-local buffers stay rank-local);
    * ``mixed_precision`` (the same config object; the new wrapper installs DDP's own upcast hook and low-precision
      copies, and the old wrapper's forward hooks are removed from the module's submodules);
    * communication hooks: every ``register_comm_hook(state, hook)`` of ``ddp`` is registered again with the *same*
      state object (shared, not copied; hooks the new wrapper installs itself, e.g. the mixed-precision one, are not
      repeated); a built-in hook (``_register_builtin_comm_hook``) by its type; the buffer hook
      (``_register_buffer_comm_hook``) with its state and location;
    * ignored parameters / buffers (``ddp.parameters_to_ignore``, set with
      ``DistributedDataParallel._set_params_and_buffers_to_ignore_for_model``): each name is resolved in ``module``;
      a name ``prefix.attr`` that is no longer a parameter or buffer because ``attr`` was parametrized becomes its
      ``prefix.parametrizations.attr.original`` (``original0``, ``original1``, ... for a multi-tensor
      ``right_inverse``). The resolved names are set on ``module`` (``_ddp_params_and_buffers_to_ignore``), which
      DDP reads.

    ``init_sync`` is not recorded by DDP, so it cannot be read from ``ddp``: the argument gives it (``True``, DDP's
    default: rank 0's parameters, and buffers where they are synced, are broadcast at construction).

    The old wrapper must not be used afterwards: its forward hooks on the module's submodules and its
    python-reducer gradient hooks are removed (they would run in the new wrapper's passes); its reducer's hooks
    stay inert as long as its own forward is not called again.

    Args:
        ddp: the existing wrapper.
        module: the module to wrap (``ddp.module`` after parametrization, or another module).
        init_sync: DDP's ``init_sync`` for the new wrapper.

    Returns:
        The new wrapper.

    Raises:
        ValueError: a setting that cannot be carried: ``delay_all_reduce_named_params`` /
            ``param_to_hook_all_reduce`` (their hook stays on the old parameter), a ``device_mesh`` sliced from a
            larger mesh (DDP + tensor parallel: the module transform cannot be applied twice), an ignored name that
            resolves to no parameter or buffer of ``module``, or a built-in communication hook this torch cannot
            name.
    """
    import inspect
    import warnings

    import torch.distributed as dist

    sig = inspect.signature(DistributedDataParallel.__init__).parameters
    if getattr(ddp, "_delay_all_reduce_params", None):
        raise ValueError("ddp_like cannot carry delay_all_reduce_named_params / param_to_hook_all_reduce: DDP does "
                         "not record them, and the old wrapper's all-reduce hook stays on param_to_hook_all_reduce; "
                         "build the new DistributedDataParallel by hand")
    kw: dict[str, Any] = {"device_ids": ddp.device_ids, "output_device": ddp.output_device, "dim": ddp.dim,
                          "find_unused_parameters": ddp.find_unused_parameters,
                          "gradient_as_bucket_view": ddp.gradient_as_bucket_view, "static_graph": ddp.static_graph}
    mesh = getattr(ddp, "device_mesh", None)
    if mesh is not None:
        if mesh._get_root_mesh() != mesh:
            raise ValueError("ddp_like cannot carry a device_mesh sliced from a larger mesh (DDP with tensor "
                             "parallelism: DDP transforms the module once, at construction)")
        kw["device_mesh"] = mesh
    else:
        kw["process_group"] = ddp.process_group
    # buckets: a per-bucket list, else the single cap, None where DDP's default (small first bucket) was used
    caps = list(getattr(ddp, "bucket_bytes_cap_list", []) or [])
    if caps and "bucket_cap_mb_list" in sig:
        kw["bucket_cap_mb_list"] = [c / 2**20 for c in caps]
    elif not getattr(ddp, "bucket_bytes_cap_default", False):
        kw["bucket_cap_mb"] = ddp.bucket_bytes_cap / 2**20
    for name in ("skip_all_reduce_unused_params", "batched_grad_copy", "mixed_precision"):
        if name in sig and hasattr(ddp, name):
            kw[name] = getattr(ddp, name)
    if "init_sync" in sig:
        kw["init_sync"] = init_sync
    elif not init_sync:
        raise ValueError("init_sync=False needs a torch whose DistributedDataParallel has init_sync")
    sync_buffers = ddp.forward_sync_buffers if hasattr(ddp, "forward_sync_buffers") else ddp.broadcast_buffers
    if "forward_sync_buffers" in sig and sync_buffers:
        kw["forward_sync_buffers"] = True
    else:  # older torch, or no buffer sync: broadcast_buffers=False also skips the construction-time buffer sync
        kw["broadcast_buffers"] = sync_buffers

    ignored = sorted(getattr(ddp, "parameters_to_ignore", ()))
    if ignored or hasattr(module, "_ddp_params_and_buffers_to_ignore"):
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(module, _resolve_ignored(module, ignored))

    builtin = None
    old_hooks: list[tuple[Any, Any]] = list(getattr(ddp, "_comm_hooks", []))
    if not old_hooks and getattr(ddp, "logger", None) is not None:
        name = ddp._get_ddp_logging_data().get("comm_hook")
        if isinstance(name, str) and name.startswith("BuiltinCommHookType."):
            builtin = getattr(dist.BuiltinCommHookType, name.split(".", 1)[1], None)
            if builtin is None:
                raise ValueError(f"ddp_like cannot carry the built-in communication hook {name}: not a "
                                 "BuiltinCommHookType of this torch")

    # the old wrapper's hooks on the module (mixed precision) and on the parameters (python reducer) would run in
    # the new wrapper's forward / backward: remove them
    for sub in ddp.module.modules():
        for hooks in (sub._forward_pre_hooks, sub._forward_hooks):
            for key in [k for k, h in hooks.items() if getattr(h, "__self__", None) is ddp]:
                del hooks[key]
                sub._forward_pre_hooks_with_kwargs.pop(key, None)
                sub._forward_hooks_with_kwargs.pop(key, None)
    for handle in getattr(ddp, "_accum_grad_hooks", ()):
        handle.remove()

    with warnings.catch_warnings():  # broadcast_buffers=False is deprecated in favour of forward_sync_buffers,
        warnings.filterwarnings("ignore", message=".*broadcast_buffers.*", category=FutureWarning)  # which syncs
        new = DistributedDataParallel(module, **kw)  # the buffers at construction

    own = {hook for hook, _ in new._comm_hooks}  # installed by the new wrapper itself (mixed precision, ...)
    for hook, state in old_hooks:
        if hook not in own:
            new.register_comm_hook(state, hook)
    if builtin is not None:
        new._register_builtin_comm_hook(builtin)
    buffer_hook = getattr(ddp, "buffer_hook", None)
    if buffer_hook is not None:
        new._register_buffer_comm_hook(buffer_hook.buffer_comm_hook_state, buffer_hook.buffer_comm_hook,
                                       buffer_hook.buffer_comm_hook_location)
    return new


def _resolve_ignored(module: nn.Module, names: Sequence[str]) -> list[str]:
    """The names of ``module``'s parameters / buffers that DDP-ignored ``names`` denote now.

    A name that is a parameter or buffer of ``module`` stays; ``prefix.attr`` where ``attr`` of ``prefix`` is
    parametrized becomes the parametrization's originals ``prefix.parametrizations.attr.original`` (or
    ``original0``, ``original1``, ...).

    Raises:
        ValueError: names that resolve to nothing.
    """
    from torch.nn.utils import parametrize

    have = {n for n, _ in module.named_parameters()} | {n for n, _ in module.named_buffers()}
    out: list[str] = []
    missing: list[str] = []
    for name in names:
        if name in have:
            out.append(name)
            continue
        prefix, _, attr = name.rpartition(".")
        try:
            sub = module.get_submodule(prefix)
        except AttributeError:
            sub = None
        if sub is not None and parametrize.is_parametrized(sub, attr):
            plist = sub.get_submodule(f"parametrizations.{attr}")
            base = f"{prefix}.parametrizations.{attr}." if prefix else f"parametrizations.{attr}."
            originals = [base + n for n, _ in [*plist.named_parameters(recurse=False),
                                                *plist.named_buffers(recurse=False)] if n.startswith("original")]
            if originals and all(o in have for o in originals):
                out.extend(originals)
                continue
        missing.append(name)
    if missing:
        raise ValueError(f"ddp_like: the ignored parameters / buffers {missing} of the old DistributedDataParallel "
                         "are not parameters or buffers of the new module (nor parametrized ones); set the names "
                         "with DistributedDataParallel._set_params_and_buffers_to_ignore_for_model and wrap it by "
                         "hand")
    return out


# ------------------------------------------------------------------------------------------------ FSDP2 helpers
def has_fsdp(model: nn.Module) -> bool:
    """``model`` or one of its submodules was sharded with FSDP2's ``fully_shard``.

    Args:
        model: the model.

    Returns:
        Whether any module of ``model`` is FSDP2-sharded.
    """
    return any(is_fsdp(m) for m in model.modules())


def meta_skeleton(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` whose parameters are on the meta device (no memory).

    Buffers are copied (FSDP2 does not shard them, and non-persistent ones are absent from state dicts). Take it
    *before* attaching
    parametrizations or sharding; :func:`load_full_state` fills it.

    Args:
        model: the model to copy.

    Returns:
        The meta-device copy.
    """
    import copy

    memo = {id(p): nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
            for p in model.parameters()}
    return copy.deepcopy(model, memo)


def fsdp_shard(model: nn.Module, units: Iterable[str] = (), *, mesh=None, ignored_params=None):
    """FSDP2-shard ``model`` in place: ``fully_shard`` on each module named in ``units``, then on ``model``.

    Each unit is its own all-gather group. Rank 0's parameter values are broadcast first (``fully_shard`` keeps each rank's
    slice of its own local tensor, so ranks built with different weights would mix them). ``mesh``: a 1-D
    ``DeviceMesh`` (default: every rank, on the device type of the parameters). ``ignored_params`` stay plain,
    replicated tensors. Returns the mesh.

    Args:
        model: the model (sharded in place).
        units: names of the submodules to shard as their own units.
        mesh: a 1-D ``DeviceMesh``, or None.
        ignored_params: parameters left unsharded.

    Returns:
        The device mesh used.

    Raises:
        RuntimeError: no initialised process group.
        ValueError: ``model`` is already sharded (on any rank of the mesh: every rank raises, naming the ranks
            whose model is), or ``mesh`` is not 1-D.
    """
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("FSDP needs an initialised torch.distributed process group "
                           "(torch.distributed.init_process_group, torchrun or accelerate launch)")
    if mesh is not None and mesh.ndim != 1:
        raise ValueError(f"only a 1-D device mesh (plain FSDP) is supported, got {mesh.ndim}-D")
    # checked on every rank of the mesh together: a rank raising alone would leave the others in the broadcast
    _raise_together("the model is already sharded with fully_shard: pass the plain (unsharded) model, medquant "
                    "shards it after attaching its parametrizations" if has_fsdp(model) else None,
                    None if mesh is None else mesh.get_group(), "fsdp_shard")
    if mesh is None:
        dev = next(model.parameters()).device.type
        mesh = init_device_mesh(dev, (dist.get_world_size(),))
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
    """Fill the :func:`meta_skeleton` ``skeleton`` with the full (gathered) tensors of the sharded model.

    ``sharded`` is FSDP2-sharded and possibly parametrized: ``DTensor.full_tensor()`` one tensor at a time (a collective: every
    rank must call it), ``...parametrizations.weight.original`` stored as ``...weight``; parameters of the
    parametrizations (BAQ's ``theta``) are left out; tied parameters stay tied. Every rank ends with the full model.
    The names are checked before any tensor is gathered, on every rank of the sharded tensors' mesh together: a
    mismatch on one rank raises on all of them (naming the ranks with the mismatch), none is left waiting in a
    gathering. Returns ``skeleton``.

    Args:
        skeleton: the meta-device copy from :func:`meta_skeleton`.
        sharded: the trained, sharded model.

    Returns:
        ``skeleton``, filled.

    Raises:
        ValueError: the two models do not have the same tensors (a name of one missing from the other), on this
            rank or another rank of the mesh.
        RuntimeError: a skeleton parameter is still on the meta device after loading.
    """
    from torch.distributed.tensor import DTensor

    want = dict(skeleton.state_dict())
    state = {key: (name, t) for key, t in sharded.state_dict().items() if (name := _plain_name(key))}
    error = next((f"{key!r} of the sharded model has no slot {name!r} in the skeleton"
                  for key, (name, _) in state.items() if name not in want), None)
    missing = sorted(set(want) - {name for name, _ in state.values()})
    if error is None and missing:
        error = f"the sharded model lacks {missing[:5]}"
    # every rank holding sharded tensors gathers them together: agree on the names before the first gathering
    mesh = next((t.device_mesh for _, t in state.values() if isinstance(t, DTensor)), None)
    if mesh is not None and mesh.ndim == 1:
        _raise_together(error, mesh.get_group(), "load_full_state")
    elif error is not None:
        raise ValueError(error)
    full = {}
    for name, t in state.values():
        t = t.full_tensor() if isinstance(t, DTensor) else t
        full[name] = t.detach().clone()
    aliases: dict[str, str] = {}
    first: dict[int, str] = {}  # tied parameters (e.g. lm_head / embeddings): re-tied after the assigning load
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
    """``torch.nn.utils.clip_grad_norm_`` (2-norm) over FSDP2-sharded ``DTensor`` and replicated parameters.

    The parameters may mix ``DTensor``s and plain replicated tensors (same gradient on every rank: counted once).
    A ``DTensor`` gradient's local squared sum is all-reduced over ``group``, counted on the ranks whose mesh
    coordinate is 0 along each ``Replicate()`` mesh dimension only: a ``Shard`` dimension (FSDP2's ``Shard(0)``:
    each element held by one rank) sums the shards, a ``Replicate`` one counts its copy once. ``group`` must hold
    the ranks of the DTensors' mesh. Same formula as torch: ``coef = min(1, max_norm / (norm + 1e-6))``.
    Every rank of ``group`` takes part in the reduction, also one without gradients (or without parameters): its
    total is the reduced sharded part alone (zero without a process group).

    Args:
        params: the parameters whose gradients to clip in place.
        max_norm: the largest total 2-norm.
        group: the process group of the sharded tensors (default the world).

    Returns:
        The total norm before clipping.

    Raises:
        ValueError: a ``DTensor`` gradient with a ``Partial`` placement (a pending sum over ranks: its local values
            do not give its norm) on any rank: every rank raises (after the one reduction), before any gradient is
            scaled.
    """
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    grads = [p.grad for p in params if p.grad is not None]
    partial = next((g for g in grads if isinstance(g, DTensor) and any(pl.is_partial() for pl in g.placements)),
                   None)
    error = None if partial is None else (
        f"clip_grad_norm_: a DTensor gradient has placements {tuple(partial.placements)}: a Partial placement is a "
        "pending sum over ranks, whose norm the local values do not give; reduce it first (redistribute to Shard or "
        "Replicate). Nothing was clipped")
    if grads:
        dev = (grads[0].to_local() if isinstance(grads[0], DTensor) else grads[0]).device
    else:  # no early return: the other ranks of the group wait for this one in the all_reduce
        dev = _flag_device(dist.get_backend(group)) if is_distributed(group) else torch.device("cpu")
    # [squared sum of the DTensor parts, ranks with a Partial gradient]: one all_reduce, so every rank raises
    reduced = torch.tensor([0.0, float(error is not None)], dtype=torch.float64, device=dev)
    sharded = reduced[0]
    plain = torch.zeros((), dtype=torch.float64, device=dev)
    for g in grads:
        if isinstance(g, DTensor):
            coord = g.device_mesh.get_coordinate()
            # a Replicate mesh dimension holds a copy on each of its ranks: counted on its coordinate 0 only
            if coord is not None and all(c == 0 for c, pl in zip(coord, g.placements) if pl.is_replicate()):
                sharded += g.to_local().double().pow(2).sum()
        else:
            plain += g.double().pow(2).sum()
    if is_distributed(group):
        dist.all_reduce(reduced, op=dist.ReduceOp.SUM, group=group)
    if reduced[1] > 0:
        raise ValueError(error or "clip_grad_norm_: another rank of the group has a DTensor gradient with a Partial "
                         "placement (a pending sum over ranks, whose norm the local values do not give); nothing "
                         "was clipped")
    total = (sharded + plain).sqrt().float()
    coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
    with torch.no_grad():
        for g in grads:
            if isinstance(g, DTensor):
                g.to_local().mul_(coef.to(g.to_local().dtype))
            else:
                g.mul_(coef.to(g.dtype))
    return total
