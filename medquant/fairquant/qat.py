"""FQ-QAT: fine-tune with a fixed mixed-precision allocation.

While training, every allocated Linear / Conv2d weight is replaced in the forward pass by its fake-quantized
version (``torch.nn.utils.parametrize``; rows grouped by bit-width, each through
:func:`medquant.quant.fake_quantize` with a straight-through gradient), so the float weights learn to live on the
quantization grid of their allocation: for a row with ``b`` bits, forward

    w^ = s * (clamp(round(w / s) + z, 0, 2^b - 1) - z)      (asymmetric; symmetric: z = 0, |codes| <= 2^(b-1) - 1)

with the scale ``s`` and zero point ``z`` of the layer's ``QuantConfig`` (:mod:`medquant.quant.core`), and
backward ``dw^/dw = 1``. The loss per batch is

    mean_i l_i  +  lambda_fair * (max_g L_g - min_g L_g)

with ``l_i`` the per-sample cross-entropy and ``L_g`` the mean loss over the batch's samples of group ``g`` (groups
present in the batch), optimised with AdamW and gradient-norm clipping (1.0) by
:func:`medquant.training.train_steps`. At the end (``export=True``, the default) the parametrizations are removed and
the model is exported with :func:`medquant.quantize_` to real ``QuantLinear`` / ``QuantConv2d`` layers with the same
allocation: the exported model computes exactly what the fake-quantized model computed. With ``export=False`` the
model is returned with its fake-quant parametrizations attached (remove them with :func:`detach_fake_quant` to get
the trained float weights).
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from .. import distributed as mqd
from ..quant.api import quantize_, resolve_configs
from ..quant.config import FLOAT_BITS, QuantConfig
from ..quant.core import fake_quantize
from ..training import train_steps
from .batches import GroupsFn, LossFn, batch_losses, fairness_penalty
from .distributed import global_group_objective


class _Float16RoundSTE(torch.autograd.Function):
    """``w`` rounded to float16 and back to its dtype; straight-through gradient."""

    @staticmethod
    def forward(ctx, w: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return w.to(torch.float16).to(w.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return grad


class FakeQuantWeight(nn.Module):
    """Parametrization ``w -> fake_quantize(w)`` row group by row group (per-row ``channel_bits``).

    Each bit group's rows are fake-quantized on their own (``fake_quantize(w[rows], config, b)``): with tensor scope
    the group's one scale comes from its rows, as the exported layer stores it (per-row and per-group scales do not
    depend on the other rows). Rows kept in floating point in a layer that is quantized (mixed ``channel_bits``) are
    the weights the exported ``QuantLinear`` / ``QuantConv2d`` stores: 16-bit rows rounded to float16 (straight-through gradient), 32-bit
    rows unchanged. A layer that is entirely float (``config.is_float``) stays a float32 module when exported, so
    its weight passes unchanged.

    Args:
        config: the layer's ``QuantConfig`` (its ``row_bits`` give each output channel's bits).
        out_rows: the number of output channels of the weight.
    """

    def __init__(self, config: QuantConfig, out_rows: int):
        super().__init__()
        self.config = config
        rb = config.row_bits(out_rows)
        self.groups = [(int(b), (rb == b)) for b in torch.unique(rb).tolist()]

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        """``w`` fake-quantized at the fixed bits of each output channel (straight-through gradient).

        Args:
            w: the float weight ``(O, ...)``.

        Returns:
            The fake-quantized weight, same shape and dtype.
        """
        if len(self.groups) == 1:
            return fake_quantize(w, self.config, self.groups[0][0])
        out = torch.zeros_like(w)
        for b, mask in self.groups:
            m = mask.to(w.device).reshape(-1, *([1] * (w.dim() - 1)))
            if b == 16 and not self.config.is_float:  # exported as float16 rows (fweight_16)
                fq = _Float16RoundSTE.apply(w)
            elif b in FLOAT_BITS:
                fq = w
            elif b == 0:
                continue
            else:  # the group's own rows: a tensor-scope scale is that of the bit group's rows, as exported
                rows = mask.to(w.device).nonzero().squeeze(1)
                out = out.index_copy(0, rows, fake_quantize(w.index_select(0, rows), self.config, b))
                continue
            out = torch.where(m, fq, out)
        return out


def attach_fake_quant(model: nn.Module, quant_map: Mapping[str, QuantConfig | int | None]) -> dict[str, QuantConfig]:
    """Register :class:`FakeQuantWeight` on every module ``quant_map`` resolves (``quantize_`` patterns).

    Returns the resolved plan. Undo with :func:`detach_fake_quant`.

    Args:
        model: the model (parametrized in place).
        quant_map: ``quantize_`` patterns -> configuration, bits, or None.

    Returns:
        Layer name -> ``QuantConfig`` that is fake-quantized.

    Raises:
        ValueError: the map selects no Linear / Conv2d layer.
    """
    plan = resolve_configs(model, quant_map)
    if not plan:
        raise ValueError("the quantization map selects no Linear / Conv2d layer")
    for name, cfg in plan.items():
        mod = model.get_submodule(name)
        parametrize.register_parametrization(mod, "weight", FakeQuantWeight(cfg, mod.weight.shape[0]))
    return plan


def _drop_weight_parametrizations(mod: nn.Module, kind: type) -> None:
    """Remove the ``kind`` entries from ``mod``'s weight parametrizations, keeping the others (a user's own
    ``weight_norm`` / orthogonal / custom parametrization) and the original tensor; when none is left ``weight``
    is the plain original parameter again (``remove_parametrizations(..., leave_parametrized=False)``)."""
    plist = mod.parametrizations["weight"]
    if all(isinstance(p, kind) for p in plist):
        parametrize.remove_parametrizations(mod, "weight", leave_parametrized=False)
        return
    for i in reversed(range(len(plist))):  # none of ours changed the original (no right_inverse): just unlink
        if isinstance(plist[i], kind):
            del plist[i]


def detach_fake_quant(model: nn.Module) -> None:
    """Remove the fake-quant parametrizations, keeping the trained float weights.

    Only the :class:`FakeQuantWeight` entries go: another parametrization of the same weight (the user's own)
    stays, with its original tensor.

    Args:
        model: the model.
    """
    for mod in model.modules():
        if parametrize.is_parametrized(mod, "weight") and any(
                isinstance(p, FakeQuantWeight) for p in mod.parametrizations["weight"]):
            _drop_weight_parametrizations(mod, FakeQuantWeight)


@contextmanager
def fake_quantized(model: nn.Module, quant_map: Mapping[str, QuantConfig | int | None]):
    """Context manager: the model computes with fake-quantized weights inside the block.

    Args:
        model: the model.
        quant_map: as in :func:`attach_fake_quant`.

    Yields:
        ``model``, parametrized; the parametrizations are removed when the block ends.
    """
    attach_fake_quant(model, quant_map)
    try:
        yield model
    finally:
        detach_fake_quant(model)


@dataclass
class QATResult:
    """What :func:`fq_qat` returns.

    Attributes:
        model: the fine-tuned model: exported ``QuantLinear`` / ``QuantConv2d`` layers (``export=True``) or the
            model with its fake-quantization parametrizations still attached (``export=False``).
        plan: the per-layer configurations that were trained with (layer name -> ``QuantConfig``).
        history: one dict per optimiser step: ``step`` and the losses the training step recorded.
    """

    model: nn.Module
    plan: dict[str, QuantConfig]
    history: list[dict[str, float]] = field(default_factory=list)


def fq_qat(
    model: nn.Module,
    quant_map: Mapping[str, QuantConfig | int | None],
    batches: Iterable[Any],
    *,
    epochs: int = 1,
    max_steps: int | None = None,
    lr: float = 1e-4,
    weight_decay: float = 0.01,
    lambda_fair: float = 0.0,
    grad_clip: float | None = 1.0,
    loss_fn: LossFn | None = None,
    groups_fn: GroupsFn | None = None,
    export: bool = True,
    progress: bool = True,
    fsdp: Any = None,
    fsdp_units: Sequence[str] | None = None,
) -> QATResult:
    """Fine-tune ``model`` with the fixed allocation ``quant_map`` (e.g. ``FairQuantAllocator.to_quant_map()``).

    Args:
        model: the float model (or its DDP wrapper; see below).
        quant_map: ``quantize_`` patterns -> ``QuantConfig`` / bits / None, the fixed allocation.
        batches: a re-iterable of training batches (a DataLoader or a list), read once per epoch.
        epochs: passes over ``batches``.
        max_steps: stop after this many optimiser steps (None: all epochs).
        lr: AdamW learning rate (the paper's range: 3e-5 .. 3e-4).
        weight_decay: AdamW weight decay.
        lambda_fair: weight of ``max_g L_g - min_g L_g`` over the groups in the batch (0 = plain QAT).
        grad_clip: max global gradient norm (None disables).
        loss_fn: per-sample losses of ``(model, batch)`` (default
            :func:`medquant.fairquant.batches.default_loss`).
        groups_fn: group ids of a batch (default :func:`medquant.fairquant.batches.default_groups`).
        export: swap the fake-quantized layers for real QuantLinear / QuantConv2d (``quantize_``) at the end;
            ``False`` returns the model with its fake-quant parametrizations attached (:func:`detach_fake_quant`
            removes them).
        progress: show a progress bar.
        fsdp: ``True`` or a 1-D ``DeviceMesh``: shard the model with FSDP2 (see below).
        fsdp_units: the module names ``fully_shard`` wraps (default each quantized layer).

    Several processes: pass the model wrapped in ``torch.nn.parallel.DistributedDataParallel`` and this rank's
    batches. The fake-quant parametrizations go on ``model.module``, which is trained through a new DDP wrapper
    with the same settings (:func:`medquant.distributed.ddp_like`; the given one would miss the parametrized
    weights' gradients). The loss is the one of the union of every rank's batch
    (:func:`medquant.fairquant.distributed.global_group_objective` with ``grad_scale = world_size``: global mean
    loss and the fairness penalty over the global group means), and DDP averages the gradients, so every rank
    takes the single-process step on the global batch. The returned model (exported or not) is the unwrapped
    ``model.module``.

    Uneven data (DDP or FSDP2): the ranks may hold different numbers of batches; every rank ends each pass when the
    first one runs out (:func:`medquant.training.train_steps` turns ``stop_together`` on in a run of several ranks),
    so all ranks take the same steps on the global batches they all have (a longer rank's surplus batches are not
    trained on) and end with the same weights, instead of one rank waiting in the objective's ``all_reduce`` or
    DDP's gradient all-reduce that the others never join. A plain model (neither DDP nor FSDP) trains in this process
    alone, without any collective (``train_steps(local=True)``), also inside a multi-process job.

    FSDP2 (the model sharded over the ranks, ``fsdp=True`` or a 1-D ``DeviceMesh``): pass the *plain* model
    (every rank builds the same one; rank 0's values are broadcast) and this rank's batches. The fake-quant
    parametrizations are attached first, then every module in ``fsdp_units`` (default: each quantized layer) and
    the root are ``fully_shard``-ed (:func:`medquant.distributed.fsdp_shard`), so each rank stores a shard of
    every weight and its optimizer state; the forward all-gathers a layer's full float weight and fake-quantizes
    it. Same global-batch objective as with DDP (FSDP averages the reduce-scattered gradients); gradient
    clipping over the shards (:func:`medquant.distributed.clip_grad_norm_`). At the end the trained weights are
    gathered (``DTensor.full_tensor()``) into a plain copy of the model (taken on the meta device before
    sharding), exported there; every rank returns that full model. The ``model`` passed in stays sharded and
    fake-quantized: do not use it afterwards. An already ``fully_shard``-ed model is refused (the
    parametrizations must be attached before sharding).

    Returns:
        A :class:`QATResult` with the (exported) model, the resolved plan and the per-step loss history.

    Raises:
        ValueError: a map that selects no layer, ``epochs`` < 1, ``lr`` <= 0, ``lambda_fair`` < 0, NaN or
            infinite, a model without trainable parameters, an already sharded model, or a DDP wrapper together
            with ``fsdp``.
        RuntimeError: ``fsdp`` without an initialised process group of several ranks.
    """
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    if not lr > 0:
        raise ValueError(f"lr must be > 0, got {lr}")
    if not (lambda_fair >= 0 and math.isfinite(lambda_fair)):  # NaN / inf would make every loss NaN / inf
        raise ValueError(f"lambda_fair must be a finite number >= 0, got {lambda_fair}")
    if mqd.has_fsdp(model):
        raise ValueError("fq_qat got a model already sharded with fully_shard: the fake-quant parametrizations "
                         "must be attached before sharding. Pass the plain model with fsdp=True (or fsdp=mesh); "
                         "fq_qat attaches them and shards it")
    ddp = mqd.is_ddp(model)
    use_fsdp = fsdp is not None and fsdp is not False
    if use_fsdp and ddp:
        raise ValueError("fsdp=... needs the plain model, not a DistributedDataParallel wrapper")
    if use_fsdp and not mqd.is_distributed():
        raise RuntimeError("fsdp=... needs an initialised torch.distributed process group of several ranks "
                           "(torch.distributed.init_process_group, torchrun or accelerate launch)")
    inner = mqd.unwrap(model)
    skeleton = mqd.meta_skeleton(inner) if use_fsdp else None
    plan = attach_fake_quant(inner, quant_map)
    pg = None
    world = 1
    if ddp:  # a DDP built before the parametrizations misses their gradients: wrap again, same settings
        pg = model.process_group
        world = torch.distributed.get_world_size(pg)
        model = mqd.ddp_like(model, inner)
    elif use_fsdp:
        units = list(plan) if fsdp_units is None else list(fsdp_units)
        mesh = mqd.fsdp_shard(inner, units, mesh=None if fsdp is True else fsdp)
        pg, world = mesh.get_group(), mesh.size()
    distributed = ddp or use_fsdp

    def step_loss(batch: Any) -> tuple[torch.Tensor, dict[str, float]]:
        losses, groups = batch_losses(model, batch, loss_fn, groups_fn)
        if distributed:
            objective, task, fair = global_group_objective(losses, groups, lambda_fair=lambda_fair, group=pg,
                                                           grad_scale=world)
            loss = task + lambda_fair * fair
        else:
            task = losses.mean()
            fair = fairness_penalty(losses, groups) if lambda_fair > 0 else task.new_zeros(())
            objective = loss = task + lambda_fair * fair
        return objective, {"loss": float(loss.detach()), "task": float(task.detach()),
                           "fair": float(fair.detach())}

    try:
        params = [p for p in model.parameters() if p.requires_grad]
        if not params:
            raise ValueError("the model has no trainable parameters")
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
        records = train_steps(step_loss, batches, opt, params, epochs=epochs, max_steps=max_steps,
                              grad_clip=grad_clip, sharded=use_fsdp, group=pg,
                              local=not distributed,  # a plain model: this process's own, no collective
                              model=model, progress=progress, desc="FQ-QAT")
        history = [{"step": i, **r} for i, r in enumerate(records)]
    except BaseException:
        if not use_fsdp:  # leave the caller's model as it was given: float weights, no parametrizations
            detach_fake_quant(inner)
        raise
    if use_fsdp:  # gather the trained float weights into a plain copy of the model (collective: all ranks)
        inner = mqd.load_full_state(skeleton, inner)
        inner.eval()
        if not export:  # the same fake-quantized model as without FSDP
            attach_fake_quant(inner, plan)
    elif export:
        detach_fake_quant(inner)
    if export:
        quantize_(inner, plan)
    return QATResult(model=inner, plan=plan, history=history)
