"""The one training loop behind FQ-QAT, BAQ, distillation and QLoRA: :func:`train_steps`.

Each of those workflows only says how a batch becomes a loss; this module owns the rest of a step, in this order::

    for every optimizer step (at most max_steps in all, over `epochs` passes of `batches`):
        for each of the step's grad_accum batches:
            objective, record = loss_fn(batch)
            optimizer.zero_grad(set_to_none=True)            (before the step's first backward only)
            (objective / grad_accum).backward()              (objective.backward() when grad_accum == 1)
        a last step with n < grad_accum batches: .grad *= grad_accum / n  (the gradient of its batches' mean)
        a non-finite objective in any of them (on any rank)  -> FloatingPointError, before optimizer.step()
        average the .grad of sync_params over the ranks     (medquant.distributed.all_reduce_gradients)
        clip the global gradient norm to grad_clip:
            coef = min(1, grad_clip / (||g||_2 + 1e-6)),  g *= coef
            (torch.nn.utils.clip_grad_norm_, or medquant.distributed.clip_grad_norm_ when the parameters are
            FSDP2 shards: their squared sums are all-reduced, replicated tensors counted once)
        optimizer.step()

Data parallelism stays with the caller's model (``DistributedDataParallel`` or FSDP2 ``fully_shard`` reduce the
gradients of what they wrap during ``backward``); the loop adds what they do not cover: gradients of parameters
outside the wrapper (``sync_params``), clipping over shards, stopping every rank together when one runs out of
batches (``stop_together``), and a progress bar on rank 0 only.

Uneven data over the ranks (one rank with more batches than another: per-rank shards of different sizes, an
iterable dataset split over the ranks, accelerate's ``even_batches=False``) is safe by default: in a
run whose ``group`` has several ranks (``medquant.distributed.is_distributed(group)``) ``stop_together`` is on
unless the caller turns it off, so every rank ends each pass at the step where the first rank runs out of batches
and the ranks take the same number of steps (step ``t`` averages the ranks' ``t``-th batches; a rank's batches
beyond that point are read but not trained on). Without it the rank with more batches would go on into a
collective the others never join (DDP's gradient all-reduce, a loss that all-reduces its statistics, the
non-finite check below): a hang until the backend's timeout, or a crash. Without a process group (one process)
the loop runs no collective at all. The loop draws no random numbers itself: dropout
and data shuffling happen in ``loss_fn`` and in iterating ``batches`` (one ``iter(batches)`` per pass).

A NaN or infinite objective (a learning rate too high for the model, an overflow in half precision) stops the
loop with ``FloatingPointError`` before that step's ``optimizer.step()``: the parameters stay as the last finite
step left them, instead of every later step training NaN weights that are then saved or quantized. In a run with a
process group every rank of ``group`` raises together (the flag is or-ed over the ranks, one ``all_reduce`` of one
element per step), so no rank waits in a collective for one that stopped.
"""
from __future__ import annotations

import itertools
import numbers
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from . import distributed as mqd

__all__ = ["LossStep", "train_steps"]

#: ``loss_fn(batch) -> (objective, record)``: the tensor to back-propagate and what to keep for this batch
#: (a float, or a dict of floats with a ``"loss"`` entry shown on the progress bar).
LossStep = Callable[[Any], tuple[torch.Tensor, Any]]

_END = object()


def train_steps(
    loss_fn: LossStep,
    batches: Iterable[Any],
    optimizer: torch.optim.Optimizer,
    params: Sequence[torch.Tensor],
    *,
    epochs: int | None = 1,
    max_steps: int | None = None,
    grad_accum: int = 1,
    grad_clip: float | None = None,
    sharded: bool = False,
    sync_params: Sequence[torch.Tensor] = (),
    group: Any = None,
    stop_together: bool | None = None,
    local: bool = False,
    model: nn.Module | None = None,
    progress: bool = True,
    desc: str = "train",
) -> list[Any]:
    """Train with ``optimizer`` over ``batches`` (module docstring for the step); returns one record per step.

    Args:
        loss_fn: ``batch -> (objective, record)``; ``objective`` is the scalar tensor that is back-propagated
            (divided by ``grad_accum``), ``record`` what the step reports (a float, a dict of floats...).
        batches: a re-iterable (a list, a ``DataLoader``) when ``epochs > 1``; read once per pass.
        optimizer: the optimizer over (at least) ``params``; ``step()`` and ``zero_grad()`` once per step.
        params: the trained parameters: gradient clipping runs over them.
        epochs: passes over ``batches``; ``None`` repeats passes until ``max_steps`` (and ends early when a pass
            yields no batch).
        max_steps: cap on optimizer steps over all passes; no batch beyond the last step is read.
        grad_accum: batches per step; a step's record is the mean of its batches' records (numbers, or dicts of
            numbers with the same keys: averaged key by key). A last, incomplete step of ``n < grad_accum`` batches
            takes the gradient of the mean of its ``n`` objectives, as a full step does of its ``grad_accum``
            (its gradients, accumulated divided by ``grad_accum``, are multiplied by ``grad_accum / n`` before
            clipping and the step): the last batches of a pass weigh as much as the others.
        grad_clip: max global 2-norm of the gradients of ``params``, a real number > 0 (``math.inf`` clips nothing;
            ``None``: no clipping).
        sharded: ``params`` include FSDP2 shards (``DTensor``): clip with
            :func:`medquant.distributed.clip_grad_norm_` over ``group``.
        sync_params: parameters whose gradients are averaged over ``group`` after the backward passes (those
            outside a DDP / FSDP wrapper, or every parameter when the model is not wrapped).
        group: the process group of ``sync_params``, ``sharded`` clipping, ``stop_together`` and the non-finite
            objective check (default the world). In a run with a process group every rank of ``group`` takes part
            in that check once per step: the ranks take the same number of steps (as data-parallel training does;
            ``stop_together``, on by default there, makes sure of it with uneven data).
        stop_together: every rank of ``group`` ends a pass as soon as one rank has no batch left (one
            ``all_reduce`` of one element per batch read; ranks then take the same number of steps, also with
            ``epochs=None``: every pass is as long as the shortest rank's). ``None`` (default): on when ``group``
            has several ranks (a DDP / FSDP run, or any initialised process group of more than one rank), off in a
            single process; ``False`` only where every rank is known to have the same number of batches.
        local: this process trains a model of its own, whatever the other processes of a multi-process job do (one
            rank fine-tuning alone, ranks training separate models): no collective at all (``stop_together`` off,
            the non-finite check on this process's objectives only), so a rank training alone does not wait for
            the others. Refused with ``sync_params``, ``sharded`` or ``stop_together=True``, which communicate.
        model: put in ``train()`` mode for the loop and in ``eval()`` mode after it (also on error).
        progress: a tqdm bar (rank 0 only) named ``desc``.
        desc: the bar's label.

    Returns:
        The steps' records, in order (one per optimizer step).

    Raises:
        ValueError: ``epochs < 1``, ``grad_accum < 1``, ``max_steps < 0``, ``epochs=None`` without ``max_steps``,
            ``grad_clip`` not > 0 (0 would zero every gradient, a negative value flip it, NaN make it NaN), or
            ``local`` with ``sync_params``, ``sharded`` or ``stop_together=True``.
        TypeError: ``epochs``, ``max_steps`` or ``grad_accum`` not an int (a bool or a float included); ``grad_clip`` a
            bool or not a real number; ``grad_accum > 1`` and records that cannot be averaged
            (raised before that step's ``optimizer.step()``).
        FloatingPointError: an objective of the step is NaN or infinite on this rank or another rank of ``group``
            (raised before that step's ``optimizer.step()``; the records of the finished steps are lost with the
            exception, the parameters keep their values after the last finished step).
    """
    for name, v in (("epochs", epochs), ("max_steps", max_steps), ("grad_accum", grad_accum)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, numbers.Integral)):  # 1.5 epochs ran 2
            raise TypeError(f"{name} must be an int{'' if name == 'grad_accum' else ' or None'}, got "
                            f"{type(v).__name__} {v!r}")
    if epochs is not None and epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    if epochs is None and max_steps is None:
        raise ValueError("epochs=None repeats passes until max_steps: give max_steps")
    if grad_accum < 1:
        raise ValueError(f"grad_accum must be >= 1, got {grad_accum}")
    if max_steps is not None and max_steps < 0:
        raise ValueError(f"max_steps must be >= 0, got {max_steps}")
    if grad_clip is not None:  # torch's clipping scales the gradients by grad_clip / norm, whatever its sign
        if isinstance(grad_clip, bool) or not isinstance(grad_clip, numbers.Real):
            raise TypeError(f"grad_clip must be a real number > 0 (or None: no clipping), not a bool; "
                            f"got {type(grad_clip).__name__} {grad_clip!r}")
        if not grad_clip > 0:
            raise ValueError(f"grad_clip must be a number > 0 (or None: no clipping), got {grad_clip}: clipping to "
                             f"{grad_clip} would {'zero' if grad_clip == 0 else 'flip' if grad_clip < 0 else 'NaN'} "
                             "every gradient")
    if local and (sync_params or sharded or stop_together):
        given = [n for n, v in (("sync_params", bool(sync_params)), ("sharded", sharded),
                                ("stop_together=True", bool(stop_together))) if v]
        raise ValueError(f"local=True trains this process alone, without collectives; {', '.join(given)} "
                         "communicate with the other ranks: drop them, or train with the group (local=False)")
    if stop_together is None:  # uneven data must not leave a rank waiting in a collective
        stop_together = False if local else mqd.is_distributed(group)
    records: list[Any] = []
    bar = None
    if progress and (local or mqd.rank() == 0):
        from tqdm.auto import tqdm

        bar = tqdm(total=_total_steps(batches, epochs, max_steps, grad_accum), desc=desc, unit="step", leave=False)
    if model is not None:
        model.train()
    try:
        epoch = 0
        while epochs is None or epoch < epochs:
            it: Iterable[Any] = batches
            if max_steps is not None:  # never read a batch beyond the last step
                it = itertools.islice(batches, (max_steps - len(records)) * grad_accum)
            it = iter(it)
            steps_before = len(records)
            exhausted = False
            while not exhausted:
                step_records: list[Any] = []
                bad: float | None = None  # the step's first non-finite objective
                for _ in range(grad_accum):
                    batch = next(it, _END)
                    end = batch is _END
                    if stop_together:
                        end = mqd.any_rank(end, group=group)  # on the backend's device
                    if end:
                        exhausted = True
                        break
                    objective, record = loss_fn(batch)
                    if bad is None and not bool(torch.isfinite(objective.detach()).all()):
                        bad = float(objective.detach().float().sum())
                    if not step_records:
                        optimizer.zero_grad(set_to_none=True)
                    (objective / grad_accum if grad_accum > 1 else objective).backward()
                    step_records.append(record)
                if not step_records:
                    break
                if bad is not None if local else mqd.any_rank(bad is not None, group=group):
                    _raise_not_finite(len(records), bad, optimizer)
                # the step's record first: a record that cannot be averaged raises before the optimizer moves
                record = step_records[0] if grad_accum == 1 else _mean_record(step_records)
                if len(step_records) < grad_accum:  # backward divided by grad_accum: make it the mean of n
                    _scale_gradients(optimizer, params, sync_params, grad_accum / len(step_records))
                if sync_params:
                    mqd.all_reduce_gradients(sync_params, average=True, group=group)
                if grad_clip is not None and sharded:
                    mqd.clip_grad_norm_(params, grad_clip, group=group)
                elif grad_clip is not None:
                    torch.nn.utils.clip_grad_norm_(params, grad_clip)
                optimizer.step()
                records.append(record)
                if bar is not None:
                    bar.update(1)
                    shown = _shown(records[-1])
                    if shown is not None:
                        bar.set_postfix(loss=f"{shown:.3f}")
            epoch += 1
            if max_steps is not None and len(records) >= max_steps:
                break
            if epochs is None and len(records) == steps_before:
                break  # a pass without a batch: repeating it would never reach max_steps
    finally:
        if bar is not None:
            bar.close()
        if model is not None:
            model.eval()
    return records


def _scale_gradients(optimizer: torch.optim.Optimizer, params: Sequence[torch.Tensor],
                     sync_params: Sequence[torch.Tensor], factor: float) -> None:
    seen: set[int] = set()
    groups = [p for g in optimizer.param_groups for p in g["params"]]
    with torch.no_grad():
        for p in itertools.chain(groups, params, sync_params):
            if id(p) not in seen and p.grad is not None:
                seen.add(id(p))
                p.grad.mul_(factor)


def _raise_not_finite(done: int, value: float | None, optimizer: torch.optim.Optimizer) -> None:
    lrs = sorted({g.get("lr") for g in optimizer.param_groups if isinstance(g.get("lr"), (int, float))})
    lr = f" (learning rate {', '.join(f'{v:g}' for v in lrs)})" if lrs else ""
    where = f"the loss is {value}" if value is not None else "another rank's loss is not finite"
    raise FloatingPointError(
        f"training step {done + 1}: {where}; the step was not taken, the parameters are as after step {done}. "
        f"A learning rate too high for this model{lr}, an overflow in half precision or a NaN in the data "
        f"usually causes it: lower the learning rate, set grad_clip, or check the inputs")


def _mean_record(records: list[Any]) -> Any:
    """The mean of a step's batch records: of numbers, or key by key of dicts of numbers with the same keys."""
    if all(isinstance(r, Mapping) for r in records):
        keys = list(records[0])
        if any(list(r) != keys for r in records[1:]):
            raise TypeError(f"grad_accum > 1 averages the batches' records key by key, but they have different keys: "
                            f"{[sorted(r) for r in records]}")
        try:
            return {k: sum(r[k] for r in records) / len(records) for k in keys}
        except TypeError:
            raise TypeError("grad_accum > 1 averages the batches' records: dict records need number values, got "
                            f"{[type(v).__name__ for v in records[0].values()]}") from None
    try:
        return sum(records) / len(records)
    except TypeError:
        raise TypeError("grad_accum > 1 averages the batches' records: loss_fn must record numbers or dicts of "
                        f"numbers, got {type(records[0]).__name__}") from None


def _total_steps(batches: Iterable[Any], epochs: int | None, max_steps: int | None, grad_accum: int) -> int | None:
    per_epoch = None
    try:
        per_epoch = -(-len(batches) // grad_accum)  # type: ignore[arg-type]
    except TypeError:
        pass
    if per_epoch is None or epochs is None:
        return max_steps
    total = per_epoch * epochs
    return total if max_steps is None else min(total, max_steps)


def _shown(record: Any) -> float | None:
    if isinstance(record, (int, float)):
        return float(record)
    if isinstance(record, Mapping) and isinstance(record.get("loss"), (int, float)):
        return float(record["loss"])
    return None
