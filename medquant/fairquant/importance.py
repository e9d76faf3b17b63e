"""Group-conditioned importance of every Linear / Conv2d weight.

The model is frozen (``eval()``, no parameter update). For each calibration batch the per-sample losses are
computed once; for each group ``g`` present in the batch, ``L_g`` = mean loss over that group's samples and one
backward pass (``torch.autograd.grad``) gives ``dL_g/dw`` for every weight ``w``. Scores are summed over batches:

* ``grape``:    ``I_g[w] += (dL_g/dw * w) ** 2``  (first-order Taylor importance, elementwise)
* ``gradient``: ``I_g[w] += |dL_g/dw|``

``w`` is the weight the forward pass uses (for a weight under ``torch.nn.utils.parametrize`` - weight_norm,
fake quantization - the computed weight, the one ``quantize_`` quantizes). The terms are computed in float32
(float64 for a float64 model) whatever the weights' dtype, so the square of a float16 model's ``dL_g/dw * w`` is
not flushed to zero. The result keeps one full map per group and layer (memory: groups x quantizable weights,
float32).
"""
from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from ..models.runner import eval_mode
from ..quant.api import quantizable_modules, resolve_configs
from ..quant.experts import moe_routers
from .batches import GroupsFn, LossFn, batch_losses

METRICS = ("grape", "gradient")


@dataclass
class GroupImportance:
    """Per-group importance maps: ``maps[g][layer]`` has the layer weight's shape.

    Attributes:
        maps: group id -> layer name -> accumulated importance ``I_g``.
        counts: calibration samples per group.
        metric: ``"grape"`` or ``"gradient"``.
        batches: the number of calibration batches.
        layers: the layer names, in model order.
    """

    maps: dict[int, dict[str, torch.Tensor]]
    counts: dict[int, int]  # calibration samples per group
    metric: str
    batches: int
    layers: list[str] = field(default_factory=list)

    @property
    def groups(self) -> list[int]:
        """The group ids, sorted."""
        return sorted(self.maps)


def quantizable_layers(model: nn.Module, layers: Sequence[str] | None = None,
                       skip: Sequence[str] | None = None) -> dict[str, nn.Module]:
    """The Linear / Conv2d modules FairQuant allocates bits to, optionally restricted by ``layers`` / ``skip``.

    The modules are the ``nn.Linear`` / ``nn.Conv2d`` ones ``quantize_`` quantizes (torch.nn's own classes, not
    inside ``nn.MultiheadAttention``); MoE experts modules with 3-D weights, which ``quantize_`` also quantizes,
    are left out (they have no ``weight`` of one layer; the allocation leaves them in floating point), and so are
    MoE routers (:func:`medquant.quant.moe_routers`), which ``quantize_`` keeps in floating point unless one is
    named exactly: here, unless its exact name is one of ``layers``. ``layers`` / ``skip`` are ``quantize_``
    patterns.

    Args:
        model: the model.
        layers: patterns of the layers to keep (None: all).
        skip: patterns of layers to leave out.

    Returns:
        Name -> module.

    Raises:
        ValueError: no such layer is left.
    """
    routers = set(moe_routers(model)) - set(layers or ())  # float by default, as quantize_ keeps them
    all_q = {n: m for n, m in quantizable_modules(model).items()
             if isinstance(m, (nn.Linear, nn.Conv2d)) and n not in routers}
    if layers is not None or skip:
        plan = resolve_configs(model, {p: 8 for p in layers} if layers is not None else 8, skip=skip)
        all_q = {n: m for n, m in all_q.items() if n in plan}
    if not all_q:
        raise ValueError(
            f"{type(model).__name__} has no quantizable layers (torch.nn.Linear / nn.Conv2d"
            + (" left after the layers/skip patterns" if layers is not None or skip else "")
            + "): FairQuant allocates bits to Linear and Conv2d weights only"
        )
    return all_q


def compute_group_importance(
    model: nn.Module,
    batches: Iterable[Any],
    *,
    loss_fn: LossFn | None = None,
    groups_fn: GroupsFn | None = None,
    metric: str = "grape",
    max_batches: int | None = 50,
    layers: Sequence[str] | None = None,
    skip: Sequence[str] | None = None,
    expected_groups: Sequence[int] | None = None,
    progress: bool = True,
    on_batch: Callable[[int], None] | None = None,
    min_groups: int = 2,
) -> GroupImportance:
    """Accumulate ``I_g`` over up to ``max_batches`` calibration batches (see the module docstring).

    Args:
        model: the float model (its parameters' ``requires_grad`` flags are restored afterwards).
        batches: an iterable of batches (see :mod:`medquant.fairquant.batches` for the accepted layouts).
        loss_fn: ``loss_fn(model, batch)`` -> per-sample losses ``(N,)`` or ``(outputs, targets)``.
        groups_fn: ``groups_fn(batch)`` -> integer group ids ``(N,)``.
        metric: ``"grape"`` (``(dL_g/dw * w)^2``) or ``"gradient"`` (``|dL_g/dw|``).
        max_batches: use at most this many batches (None: all).
        layers: ``quantize_`` patterns of the layers to score (None: every quantizable layer).
        skip: ``quantize_`` patterns of layers to leave out.
        expected_groups: group ids that must all appear (a group without samples raises); ids outside it raise.
        progress: show a progress bar.
        on_batch: called with the batch index after each batch.
        min_groups: fewest groups with samples accepted (default 2: group-conditioned importance compares
            groups). ``1`` is for a partial sum that is reduced over processes afterwards
            (:func:`medquant.fairquant.distributed.distributed_group_importance` passes it and checks the global
            count).

    Returns:
        The :class:`GroupImportance`.

    Raises:
        ValueError: an unknown metric, ``max_batches < 1``, an invalid ``min_groups``, no quantizable layers, no
            batches, fewer than ``min_groups`` groups, an expected group without calibration samples, or a NaN /
            inf importance (a NaN / inf gradient of finite losses; the message names the group and the layer), or
            losses that do not depend on any scored layer (layers outside the forward pass, detached losses).
    """
    if metric not in METRICS:
        raise ValueError(f"unknown importance metric {metric!r}; accepted: {', '.join(METRICS)}")
    if max_batches is not None and max_batches < 1:
        raise ValueError(f"max_batches must be >= 1 or None, got {max_batches}")
    if isinstance(min_groups, bool) or min_groups not in (1, 2):
        raise ValueError(f"min_groups must be 1 (a partial, per-process sum) or 2 (default), got {min_groups!r}")
    targets = quantizable_layers(model, layers, skip)
    names = list(targets)
    weights = [targets[n].weight for n in names]  # shapes and dtypes; a parametrized one is recomputed per batch
    # weight_norm, spectral_norm, fake quantization...: module.weight is computed from other parameters at every
    # access, so the tensor the forward uses is taken inside parametrize.cached() (below), once per batch
    param = [parametrize.is_parametrized(targets[n], "weight") for n in names]
    allowed = None if expected_groups is None else {int(g) for g in expected_groups}

    flags = {p: p.requires_grad for p in model.parameters()}
    maps: dict[int, dict[str, torch.Tensor]] = {}
    counts: dict[int, int] = {}
    n_batches = 0
    it = itertools.islice(batches, max_batches) if max_batches is not None else batches
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(it, total=max_batches if max_batches is not None else None, desc="calibration", unit="batch")
    with eval_mode(model):
        try:
            for p in model.parameters():
                p.requires_grad_(False)
            for w, par in zip(weights, param):
                if not par:
                    w.requires_grad_(True)
            for batch in it:
                with parametrize.cached():
                    # the weights this batch's forward uses: a parametrized one is computed (from its frozen
                    # parameters, so a leaf tensor) once here and reused by the forward from the cache
                    weights = [targets[n].weight if par else w for n, w, par in zip(names, weights, param)]
                    for w, par in zip(weights, param):
                        if par and not w.requires_grad:
                            w.requires_grad_(True)
                    losses, groups = batch_losses(model, batch, loss_fn, groups_fn)
                present = torch.unique(groups).tolist()
                if allowed is not None:
                    extra = sorted(set(present) - allowed)
                    if extra:
                        raise ValueError(f"batch {n_batches} has group ids {extra} outside the declared groups "
                                         f"{sorted(allowed)}")
                if present and not losses.requires_grad:  # every other parameter is frozen here
                    shown = ", ".join(map(repr, names[:5])) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
                    raise ValueError(
                        f"the per-sample losses of batch {n_batches} do not depend on the scored layers ({shown}): "
                        f"no gradient reaches them. Score layers that the forward pass uses (layers / skip "
                        f"patterns) and give a loss_fn whose losses keep their autograd graph (no .detach(), no "
                        f"torch.no_grad)"
                    )
                for i, g in enumerate(present):
                    sel = groups == g
                    lg = losses[sel].mean()
                    grads = torch.autograd.grad(lg, weights, retain_graph=i < len(present) - 1, allow_unused=True)
                    gm = maps.setdefault(int(g), {})
                    for name, w, gr in zip(names, weights, grads):
                        if gr is None:
                            gr = torch.zeros_like(w)
                        # in float32 at least: (gr * w)^2 of a float16 model under 6e-8 (|gr * w| < 2.4e-4,
                        # the common case) would be flushed to 0, and above 65504 become inf
                        gr = gr.detach().to(torch.promote_types(gr.dtype, torch.float32))
                        term = (gr * w.detach().to(gr.dtype)).pow(2) if metric == "grape" else gr.abs()
                        term = term.float()
                        if name in gm:
                            gm[name] += term
                        else:
                            gm[name] = term.clone()
                    counts[int(g)] = counts.get(int(g), 0) + int(sel.sum())
                n_batches += 1
                if on_batch is not None:
                    on_batch(n_batches)
        finally:
            for p, f in flags.items():
                p.requires_grad_(f)
    if n_batches == 0:
        raise ValueError("no calibration batches: the data iterable was empty")
    if not counts:
        raise ValueError(f"calibration saw no samples: its {n_batches} batch(es) are all empty")
    for g in sorted(maps):  # one check per map after the loop, not a device sync per batch, group and layer
        for name, t in maps[g].items():
            if not bool(torch.isfinite(t).all()):
                raise ValueError(
                    f"the importance of group {g} in layer {name!r} is NaN/inf: the gradient dL_g/dw of that group's "
                    f"mean loss is NaN/inf in some batch (the losses themselves were finite; e.g. sqrt or log at 0 "
                    f"in the forward pass), or the float32 sum overflowed. Fix the model's forward or the loss_fn"
                )
    if allowed is not None:
        missing = sorted(allowed - set(counts))
        if missing:
            raise ValueError(
                f"group(s) {missing} have no samples in the {n_batches} calibration batch(es); every declared group "
                f"needs samples (declared: {sorted(allowed)}, seen: {sorted(counts)})"
            )
    if len(counts) < min_groups:
        raise ValueError(
            f"calibration saw a single group ({sorted(counts)}); group-conditioned importance needs at least two "
            f"groups with samples (pass group ids per sample, e.g. sex or age band)"
        )
    # groups that were absent from a batch simply got no contribution from it
    for gm in maps.values():
        for name, w in zip(names, weights):
            gm.setdefault(name, torch.zeros_like(w, dtype=torch.float32))
    return GroupImportance(maps=maps, counts=counts, metric=metric, batches=n_batches, layers=names)
