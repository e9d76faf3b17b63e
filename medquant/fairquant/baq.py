"""BAQ: learnable per-scope bit-widths.

Every allocated Linear / Conv2d weight gets one logit ``theta`` per scope (output channel, or the whole tensor) and
is replaced in the forward pass (``torch.nn.utils.parametrize``) by

    b_cont = b_min + (b_max - b_min) * tanh(|theta|)
    b      = round_STE(b_cont)                       (forward: round; backward: identity)
    A      = max |w| over the scope (detached)
    s(b)   = A / (2^(b-1) - 1)                       (rounded to float16 with an STE, as the exported layer stores it)
    w^     = s(b) * clamp(round_STE(w / s(b)), -q_max(b), q_max(b))

Nothing else is detached, so the task and fairness losses reach ``theta`` (LSQ-style): inside the range
``dw^/db = (round(w/s) - w/s) * ds/db``, which is non-zero; codes equal to ``+-q_max`` (the max element's) count
as inside, so the max element, reconstructed as ``A`` for every ``b``, adds about 0. (The original BAQ code built
``(wq - w).detach() + w``, so its logits received no gradient from the task or fairness loss and moved only through
weight decay.)

Loss = ``mean CE + lambda_fair * (max_g L_g - min_g L_g) + lambda_bit * R_bits`` (``L_g``: mean loss over the
batch's samples of group ``g``, groups present in the batch) with
``R_bits = sum_s n_s b_cont_s / sum_s n_s`` (the model's parameter-weighted average of the continuous bits) or, with
``target_bits``, the hinge ``max(R_bits - target_bits, 0)``.

Initialisation: from a static allocation ``b0`` (``init_bits``, e.g. ``FairQuantAllocator.bit_map()``),
``theta = atanh(clamp((b0 - b_min) / (b_max - b_min), 1e-3, 0.9999))`` (the lower clamp is ours: ``|theta|`` has
zero gradient at exactly 0, which would freeze scopes started at ``b_min``); otherwise ``theta = 6`` (about
``b_max``). Defaults: ``lambda_fair = 0.5``, bit range [2, 8], logit lr 3e-3, weight lr 3e-5, no weight decay on
``theta``. ``lambda_bit`` default 0.05 with the plain average (no target): it is small against the task loss, so
the bits move down only where the task loss barely changes; for a fixed budget use ``target_bits`` with a large
``lambda_bit`` (the benchmark uses 1.0 and target 4). After training, ``bits = round(b_cont)`` (optionally projected
down to the budget: while the average exceeds ``target_bits + tolerance`` the scope with the lowest continuous bits
above ``b_min`` loses one bit) and :meth:`BAQWrapper.export` calls ``quantize_`` with those bits.
"""
from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from .. import distributed as mqd
from ..quant.api import ConfigMap, quantize_
from ..quant.config import QuantConfig
from ..quant.core import scale_eps
from ..training import train_steps
from .batches import GroupsFn, LossFn, batch_losses, fairness_penalty
from .distributed import global_group_objective
from .importance import quantizable_layers
from .qat import _drop_weight_parametrizations

_EPS16 = scale_eps(torch.float16)


def _round_ste(x: torch.Tensor) -> torch.Tensor:
    return x + (torch.round(x) - x).detach()


def _round_to_float16(s: torch.Tensor) -> torch.Tensor:
    """``s.to(float16).float()`` for float32 ``s >= 0``, written so that ``torch.compile`` keeps it.

    Inductor drops a float32 -> float16 -> float32 round trip (``emulate_precision_casts`` is off by default), so a
    compiled forward would quantize with the unrounded scale, not the float16 one the exported layer stores. Here
    the rounding is arithmetic: 11 significant bits (``frexp`` / ``ldexp``, round half to even) for normal values,
    a multiple of ``2^-24`` below ``2^-14`` (subnormals), ``inf`` from 65520 up - bit-identical to the cast.
    """
    m, e = torch.frexp(s)
    normal = torch.ldexp(torch.round(torch.ldexp(m, torch.full_like(e, 11))), e - 11)
    sub = torch.round(s * 2.0 ** 24) * 2.0 ** -24
    out = torch.where(s < 2.0 ** -14, sub, normal)
    return torch.where(s >= 65520.0, torch.full_like(s, math.inf), out)


class BAQWeight(nn.Module):
    """Parametrization ``w -> w^(theta)`` (module docstring): ``theta`` has one entry per scope.

    Args:
        theta: the initial bit logits, one per scope (output channel or tensor).
        b_min: the lowest bit-width.
        b_max: the highest bit-width.
        per_channel: one scale per output channel (else one per tensor).
    """

    def __init__(self, theta: torch.Tensor, b_min: int, b_max: int, per_channel: bool):
        super().__init__()
        self.theta = nn.Parameter(theta.float())
        self.b_min, self.b_max, self.per_channel = b_min, b_max, per_channel

    def _apply(self, fn, recurse=True):
        # theta follows device moves but stays float32 through dtype casts (model.half() / .to(torch.bfloat16)):
        # in float16 its spacing near the default theta = 6 is ~0.004, coarser than an optimizer step, and the
        # bits would stop learning; the weight it quantizes is cast as the model says
        def device_only(t):
            moved = fn(t)
            return t.detach().to(moved.device) if t.is_floating_point() and moved.dtype != t.dtype else moved

        return super()._apply(device_only, recurse)

    def continuous_bits(self) -> torch.Tensor:
        """``b_cont = b_min + (b_max - b_min) * tanh(|theta|)`` per scope (differentiable in ``theta``).

        Returns:
            A tensor with one value per scope.
        """
        return self.b_min + (self.b_max - self.b_min) * torch.tanh(self.theta.abs())

    def bits(self) -> torch.Tensor:
        """``round(b_cont)`` per scope, with a straight-through gradient to ``theta``.

        Returns:
            A float tensor of integer values, one per scope.
        """
        return _round_ste(self.continuous_bits())

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        """The weight fake-quantized at the current bits of each scope (symmetric, scale from the absolute max).

        Args:
            w: the float weight, ``(O, ...)``.

        Returns:
            The fake-quantized weight, same shape.
        """
        w2 = w.reshape(w.shape[0], -1)
        b = self.bits()  # (scopes,)
        a = w2.detach().abs().amax(1) if self.per_channel else w2.detach().abs().amax().reshape(1)
        a = a.clamp_min(_EPS16)
        qmax = torch.pow(2.0, b - 1) - 1  # differentiable in b
        s = a / qmax
        s = s + (_round_to_float16(s).clamp_min(_EPS16) - s).detach()  # the stored fp16 scale, STE
        s = s.reshape(-1, 1)
        # torch.clamp with tensor bounds sends the gradient of a code equal to +-q_max (the scope's max |w|, and
        # every |w/s| rounding to q_max) to the code, giving (round(w/s) - w/s) * ds/db as for any code in range;
        # minimum/maximum split it half-half with q_max, and with q_max detached the max element got about
        # q_max/2 * ds/db although w^ = s * q_max = A for every b, swamping theta's gradient. q_max keeps its
        # gradient for codes beyond the range (w^ = s * q_max there)
        qm = qmax.reshape(-1, 1)
        q = torch.clamp(_round_ste(w2 / s), -qm, qm)
        return (s * q).reshape(w.shape).to(w.dtype)


def _init_bits_tensor(name: str, value: Any, n_scopes: int) -> torch.Tensor:
    """``init_bits[name]`` as a float tensor: a sequence gives one value per scope, a single number is the width of
    every scope of the layer (``n_scopes`` of them); a bool or a non-number is refused."""
    if isinstance(value, bool) or (isinstance(value, torch.Tensor) and value.dtype == torch.bool):
        raise ValueError(f"init_bits[{name!r}] must be an integer bit-width or one per scope, got {value!r}")
    if isinstance(value, numbers.Real) or (isinstance(value, torch.Tensor) and value.dim() == 0):
        return torch.full((n_scopes,), float(value))
    try:
        return torch.tensor([float(b) for b in value])
    except (TypeError, ValueError):
        raise ValueError(f"init_bits[{name!r}] must be an integer bit-width or a sequence of them (one per "
                         f"scope), got {value!r}") from None


class BAQWrapper:
    """Attach learnable bit-widths to a model's Linear / Conv2d weights, train them with the weights, export.

    Args:
        model: any model with torch.nn Linear / Conv2d layers (changed in place: parametrizations are attached).
        bit_range: ``(b_min, b_max)``, integers with ``2 <= b_min < b_max <= 8`` (default ``(2, 8)``).
        scope: ``"channel"`` (one bit-width per output channel, default) or ``"tensor"``.
        init_bits: ``{module name: bits per scope}`` warm start (e.g. ``FairQuantAllocator.bit_map()`` or the
            allocator itself), or ``{module name: bits}`` for every scope of the layer; ``None`` = ``theta = 6``.
            Layers the map leaves out start at ``theta = 6``, except with the allocator itself and neither
            ``layers`` nor ``skip`` given: then exactly the allocator's layers get learnable bits, so the layers its
            ``layers`` / ``skip`` left out stay float (as after ``alloc.apply``).
        lambda_bit: weight of the bit-rate term (module docstring).
        lambda_fair: weight of the fairness penalty (module docstring).
        target_bits: average-bit budget: the bit term becomes ``relu(bit rate - target_bits)``; None: the rate.
        layers: ``quantize_`` patterns of the layers that get learnable bits (default: all).
        skip: ``quantize_`` patterns of layers left out.

    Raises:
        ValueError: a ``bit_range`` outside ``2 <= b_min < b_max <= 8``, an unknown scope, negative lambdas, a
            target outside the bit range, a model already sharded with FSDP2, layers that already carry the bits of
            another ``BAQWrapper``, or ``init_bits`` for unknown layers, of the wrong length, outside the bit range
            or not integers (the model is left unchanged).
    """

    def __init__(self, model: nn.Module, *, bit_range: tuple[int, int] = (2, 8), scope: str = "channel",
                 init_bits: Mapping[str, Sequence[int]] | Any | None = None, lambda_bit: float = 0.05,
                 lambda_fair: float = 0.5, target_bits: float | None = None, layers: Sequence[str] | None = None,
                 skip: Sequence[str] | None = None) -> None:
        try:  # a pair of whole numbers (2.0 too); anything else (3 entries, None, "a", a bare int) is refused below
            b_min, b_max = (int(b) for b in bit_range)
            pair = (b_min, b_max) == tuple(bit_range)
        except (TypeError, ValueError):
            b_min, b_max, pair = 0, 0, False
        if not pair or not 1 <= b_min < b_max <= 8:
            raise ValueError(f"bit_range must be two integers 2 <= b_min < b_max <= 8, got {bit_range!r}")
        if b_min == 1:
            raise ValueError("b_min must be >= 2: the symmetric estimator needs 2^(b-1) - 1 > 0")
        if scope not in ("channel", "tensor"):
            raise ValueError(f"unknown scope {scope!r}; accepted: channel, tensor")
        if not (lambda_bit >= 0 and lambda_fair >= 0) or math.isinf(lambda_bit) or math.isinf(lambda_fair):
            raise ValueError(f"lambda_bit and lambda_fair must be finite numbers >= 0, got {lambda_bit!r} and "
                             f"{lambda_fair!r}")
        if target_bits is not None and not b_min <= target_bits <= b_max:
            raise ValueError(f"target_bits={target_bits} is impossible in the bit range [{b_min}, {b_max}]")
        from_allocator = False
        if init_bits is not None and hasattr(init_bits, "bit_map"):
            init_bits, from_allocator = init_bits.bit_map(), True
        if mqd.has_fsdp(model):
            raise ValueError("BAQWrapper got a model already sharded with FSDP2 fully_shard: the BAQ "
                             "parametrizations must be attached before sharding. Pass the plain model and call "
                             "fit(..., distributed=True, fsdp=True) (or fsdp=mesh), which shards it")
        self.model = model
        self._skeleton: nn.Module | None = None
        self._exported = False
        self.b_min, self.b_max, self.scope = b_min, b_max, scope
        self.lambda_bit, self.lambda_fair, self.target_bits = float(lambda_bit), float(lambda_fair), target_bits
        targets = quantizable_layers(model, layers, skip)
        if from_allocator and init_bits is not None and layers is None and skip is None:  # the allocator's layers
            targets = {n: m for n, m in targets.items() if n in init_bits}
        if init_bits is not None:
            unknown = sorted(set(init_bits) - set(targets))
            if unknown:
                raise ValueError(f"init_bits names modules that are not quantizable layers here: {unknown[:5]}")
        wrapped = [n for n, m in targets.items() if parametrize.is_parametrized(m, "weight")
                   and any(isinstance(p, BAQWeight) for p in m.parametrizations["weight"])]
        if wrapped:  # a second BAQWeight would quantize the first one's output, under two sets of theta
            raise ValueError(f"layers {wrapped[:5]} already carry learnable bits of another BAQWrapper: train and "
                             "export that wrapper, or build the new one on a model without them")
        self.params: dict[str, BAQWeight] = {}
        self.sizes: dict[str, int] = {}
        self._rows: dict[str, int] = {}  # output channels per layer (bit_map still reads them after export)
        # every layer's init_bits is checked before the first parametrization is attached: a refused entry raises
        # with the model unchanged, not with the layers met before it wrapped
        thetas: dict[str, torch.Tensor] = {}
        for name, mod in targets.items():
            rows = mod.weight.shape[0]
            n_scopes = rows if scope == "channel" else 1
            if init_bits is not None and name in init_bits:
                b0 = _init_bits_tensor(name, init_bits[name], n_scopes)
                frac = sorted(set(b0[b0 != b0.round()].tolist()))
                if frac:  # 4.5 silently started at 4 (round half to even)
                    raise ValueError(f"init_bits[{name!r}] has non-integer bits {frac}; bit-widths are integers")
                if scope == "tensor" and b0.numel() == rows:
                    b0 = b0.mean().reshape(1)
                if b0.numel() != n_scopes:
                    raise ValueError(f"init_bits[{name!r}] has {b0.numel()} entries, expected {n_scopes}")
                if (b0 < b_min).any() or (b0 > b_max).any():
                    raise ValueError(f"init_bits[{name!r}] has bits outside [{b_min}, {b_max}]")
                theta = torch.atanh(((b0 - b_min) / (b_max - b_min)).clamp(1e-3, 0.9999))
            else:
                theta = torch.full((n_scopes,), 6.0)
            thetas[name] = theta
        for name, theta in thetas.items():
            mod = targets[name]
            p = BAQWeight(theta.to(mod.weight.device), b_min, b_max, scope == "channel")
            self._rows[name] = mod.weight.shape[0]
            self.sizes[name] = mod.weight[0].numel() if scope == "channel" else mod.weight.numel()
            parametrize.register_parametrization(mod, "weight", p)
            self.params[name] = p

    # ------------------------------------------------------------------ parameters and bits
    def logits(self) -> list[nn.Parameter]:
        """The bit logits ``theta`` of every wrapped layer.

        Returns:
            The parameters, one per layer.
        """
        return [p.theta for p in self.params.values()]

    def weights(self) -> list[nn.Parameter]:
        """The model's trainable parameters other than the bit logits.

        Returns:
            The parameters.
        """
        ids = {id(t) for t in self.logits()}
        return [p for p in self.model.parameters() if p.requires_grad and id(p) not in ids]

    def continuous_bits(self) -> dict[str, torch.Tensor]:
        """Layer name -> continuous bits per scope (see :meth:`BAQWeight.continuous_bits`).

        Returns:
            The detached tensors.
        """
        return {n: p.continuous_bits().detach() for n, p in self.params.items()}

    def bit_rate(self) -> torch.Tensor:
        """``R_bits``: parameter-weighted mean of the continuous bits over all scopes (differentiable).

        Returns:
            A scalar tensor.
        """
        num = sum(p.continuous_bits().sum() * self.sizes[n] for n, p in self.params.items())
        den = sum(p.theta.numel() * self.sizes[n] for n, p in self.params.items())
        return num / den

    def bits(self, project: bool = True, tolerance: float = 0.1) -> dict[str, tuple[int, ...]]:
        """Discrete bits ``round(b_cont)`` per scope; with ``project`` and ``target_bits``, lowered to the budget.

        The projection (module docstring): while the parameter-weighted average exceeds ``target_bits +
        tolerance``, the scope with the lowest continuous bits among those above ``b_min`` loses one bit (ties by
        layer name, then scope index), so a scope reaches ``b_min`` before one with higher continuous bits loses
        a bit.

        Args:
            project: lower the bits to the budget when ``target_bits`` is set.
            tolerance: allowed distance above ``target_bits``.

        Returns:
            ``{layer name: bits per scope}``.
        """
        cont = {n: p.continuous_bits().detach() for n, p in self.params.items()}
        bits = {n: torch.round(c).long() for n, c in cont.items()}
        if project and self.target_bits is not None:
            total = sum(b.numel() * self.sizes[n] for n, b in bits.items())
            used = sum(int(b.sum()) * self.sizes[n] for n, b in bits.items())
            if used / total > self.target_bits + tolerance:
                # the scope with the lowest continuous bits stays the lowest one above b_min until it reaches
                # b_min (its continuous bits do not change): lower it to b_min or until the budget is met, then
                # the next
                cands = sorted((float(c[i]), n, i) for n, c in cont.items() for i in range(c.numel()))
                for _, n, i in cands:
                    while used / total > self.target_bits + tolerance and bits[n][i] > self.b_min:
                        bits[n][i] -= 1
                        used -= self.sizes[n]
        return {n: tuple(int(x) for x in b.tolist()) for n, b in bits.items()}

    def average_bits(self, **kw) -> float:
        """Parameter-weighted mean of the discrete bits of :meth:`bits`.

        Args:
            **kw: the keyword arguments of :meth:`bits`.

        Returns:
            The average.
        """
        b = self.bits(**kw)
        return sum(sum(v) * self.sizes[n] for n, v in b.items()) / sum(len(v) * self.sizes[n] for n, v in b.items())

    def bit_map(self, **kw) -> dict[str, tuple[int, ...]]:
        """``{module name: bits per output channel}`` (per-tensor bits expanded).

        Args:
            **kw: the keyword arguments of :meth:`bits`.

        Returns:
            The bit map.
        """
        out = {}
        for n, b in self.bits(**kw).items():
            out[n] = b if self.scope == "channel" else b * self._rows[n]
        return out

    # ------------------------------------------------------------------ loss and training
    def loss(self, losses: torch.Tensor, groups: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        """BAQ's objective.

        ``mean(loss) + lambda_fair * fairness penalty + lambda_bit * R``, where ``R`` is the bit rate
        (:meth:`bit_rate`) or, with ``target_bits``, ``relu(bit rate - target_bits)``.

        Args:
            losses: per-sample task losses ``(N,)``.
            groups: per-sample group ids ``(N,)``.

        Returns:
            ``(total loss, {"loss", "task", "fair", "avg_bits_cont"} as floats)``.

        Raises:
            ValueError: ``losses`` is empty (a batch of 0 samples: its mean would be NaN).
        """
        if losses.numel() == 0:
            raise ValueError(f"BAQ loss of an empty batch: losses has shape {tuple(losses.shape)}, 0 samples; the "
                             f"loss needs at least one per-sample loss (drop empty batches from the data)")
        task = losses.mean()
        fair = fairness_penalty(losses, groups) if self.lambda_fair > 0 else task.new_zeros(())
        rate = self.bit_rate()
        reg = rate if self.target_bits is None else torch.relu(rate - self.target_bits)
        total = task + self.lambda_fair * fair + self.lambda_bit * reg
        return total, {"loss": float(total.detach()), "task": float(task.detach()), "fair": float(fair.detach()),
                       "avg_bits_cont": float(rate.detach())}

    def optimizer(self, weight_lr: float = 3e-5, logit_lr: float = 3e-3, weight_decay: float = 0.01):
        """AdamW with two groups: weights (``weight_decay``) and bit logits (no weight decay).

        Args:
            weight_lr: learning rate of the weights.
            logit_lr: learning rate of the bit logits.
            weight_decay: weight decay of the weights.

        Returns:
            The optimiser.
        """
        return torch.optim.AdamW([
            {"params": self.weights(), "lr": weight_lr, "weight_decay": weight_decay},
            {"params": self.logits(), "lr": logit_lr, "weight_decay": 0.0},
        ])

    def fit(self, batches: Iterable[Any], *, epochs: int = 1, max_steps: int | None = None,
            weight_lr: float = 3e-5, logit_lr: float = 3e-3, weight_decay: float = 0.01,
            grad_clip: float | None = 1.0, loss_fn: LossFn | None = None, groups_fn: GroupsFn | None = None,
            progress: bool = True, distributed: bool = False, group: Any = None, fsdp: Any = None,
            fsdp_units: Sequence[str] | None = None) -> list[dict[str, float]]:
        """Train weights and bit logits jointly; returns the per-step history. ``batches`` is re-iterated per epoch.

        ``distributed=True`` (with an initialised ``torch.distributed`` process group; see
        :func:`medquant.fairquant.distributed.fit_baq_distributed`): ``batches`` are this rank's share, step ``t``
        optimises the loss of the union of every rank's ``t``-th batch - global mean loss, fairness penalty over
        the global group means (:func:`medquant.fairquant.distributed.global_group_objective`) and the bit-rate
        term - with gradients averaged over ranks, after broadcasting rank 0's weights and logits. Every rank then
        takes the single-process step on the global batch and ends with the same ``theta`` and bits. The epoch
        ends when any rank runs out of batches. Without it, each rank trains on its own data only (the bits differ
        by rank), without any collective (``train_steps(local=True)``: a rank may fit alone).
        Without an initialised process group, ``distributed=True`` is the ordinary single-process fit.

        ``fsdp=True`` (or a 1-D ``DeviceMesh``; needs ``distributed=True`` and a process group): the model is
        FSDP2-sharded before training (:func:`medquant.distributed.fsdp_shard`: ``fully_shard`` on every module
        in ``fsdp_units``, default each BAQ layer, then on the root; rank 0's values broadcast first). Each rank
        stores a shard of every weight (and its AdamW state); the bit logits ``theta`` are left out of the
        sharding (``ignored_params``): replicated, their gradients averaged by
        :func:`medquant.distributed.all_reduce_gradients`, so ``bits()`` / ``bit_rate()`` read them directly on
        every rank. Gradient clipping over the shards
        (:func:`medquant.distributed.clip_grad_norm_`). Call :meth:`export` on every rank afterwards: it gathers
        the full weights into a plain copy of the model taken before sharding. A second ``fit`` of a sharded
        wrapper is refused.

        Args:
            batches: this rank's calibration / training batches (re-iterated per epoch).
            epochs: passes over ``batches``.
            max_steps: stop after this many optimiser steps (None: all epochs).
            weight_lr: AdamW learning rate of the weights.
            logit_lr: AdamW learning rate of the bit logits.
            weight_decay: AdamW weight decay of the weights (none on the logits).
            grad_clip: gradient-norm clip (None: none).
            loss_fn: per-sample losses of ``(model, batch)`` (default
                :func:`medquant.fairquant.batches.default_loss`).
            groups_fn: group ids of a batch (default :func:`medquant.fairquant.batches.default_groups`).
            progress: show a progress bar.
            distributed: optimise the global objective over the ranks (see above).
            group: the process group (default: the world).
            fsdp: ``True`` or a 1-D ``DeviceMesh``: shard the model with FSDP2 first (see above).
            fsdp_units: the module names ``fully_shard`` wraps (default each BAQ layer).

        Returns:
            One dict per step: ``loss``, ``task``, ``fair``, ``avg_bits_cont``.

        Raises:
            ValueError: ``epochs < 1``, ``fsdp`` without a distributed run, ``fsdp`` together with ``group``, or
                an empty batch (:meth:`loss`).
            RuntimeError: the wrapper's model was already sharded by an earlier fit, or already exported.
        """
        if epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {epochs}")
        self._check_not_exported("fit")
        import torch.distributed as dist

        # without a process group (plain ``python script.py``) distributed=True is the single-process fit
        distributed = distributed and dist.is_available() and dist.is_initialized()
        use_fsdp = fsdp is not None and fsdp is not False
        if self._skeleton is not None:
            raise RuntimeError("this BAQWrapper's model is already FSDP-sharded by an earlier fit: export() it, "
                               "or build a new wrapper on a plain model")
        if use_fsdp:
            if not distributed:
                raise ValueError("fsdp needs distributed=True and an initialised torch.distributed process group")
            if group is not None:
                raise ValueError("with fsdp, pass the ranks as a DeviceMesh (fsdp=mesh), not group=")
            # the skeleton is the plain model: take it with the BAQ parametrizations detached, then put the same
            # BAQWeight objects (same theta) back. (Removing them from a deep copy instead would delete the
            # ``weight`` property from the parametrized class, which the copy shares with the model.)
            for n in self.params:
                _drop_weight_parametrizations(self.model.get_submodule(n), BAQWeight)
            self._skeleton = mqd.meta_skeleton(self.model)
            for n, p in self.params.items():
                parametrize.register_parametrization(self.model.get_submodule(n), "weight", p)
            units = list(self.params) if fsdp_units is None else list(fsdp_units)
            mesh = mqd.fsdp_shard(self.model, units, mesh=None if fsdp is True else fsdp,
                                  ignored_params=self.logits())
            group = mesh.get_group()
        if distributed:
            world = dist.get_world_size(group)
        elif mqd.is_distributed(group):
            import warnings

            warnings.warn("BAQWrapper.fit runs in a process group of several ranks without distributed=True: each "
                          "rank trains on its own batches and may end with different bits", stacklevel=2)
        opt = self.optimizer(weight_lr, logit_lr, weight_decay)
        params = self.weights() + self.logits()
        if distributed and not use_fsdp:  # fsdp_shard broadcast them before sharding
            mqd.broadcast_parameters(params, group=group)

        def step_loss(batch: Any) -> tuple[torch.Tensor, dict[str, float]]:
            losses, groups = batch_losses(self.model, batch, loss_fn, groups_fn)
            if distributed:
                return self._global_loss(losses, groups, group, world)
            return self.loss(losses, groups)

        if use_fsdp:  # FSDP averaged the weights' gradients; theta is replicated
            sync = self.logits()
        else:
            sync = params if distributed else []
        history = train_steps(step_loss, batches, opt, params, epochs=epochs, max_steps=max_steps,
                              grad_clip=grad_clip, sharded=use_fsdp, sync_params=sync, group=group,
                              stop_together=True if distributed else None,
                              local=not distributed,  # each rank its own fit (warned above): no collective
                              model=self.model, progress=progress, desc="BAQ")
        for i, parts in enumerate(history):
            parts["step"] = i
        return history

    def _global_loss(self, losses: torch.Tensor, groups: torch.Tensor, group: Any, world: int
                     ) -> tuple[torch.Tensor, dict[str, float]]:
        """Surrogate whose rank-averaged gradient is the gradient of :meth:`loss` on the union of all ranks'
        batches (:func:`medquant.fairquant.distributed.global_group_objective`); the bit-rate term depends on
        ``theta`` only, identical on every rank, so it enters unscaled."""
        sur, task, fair = global_group_objective(losses, groups, lambda_fair=self.lambda_fair, group=group,
                                                 grad_scale=world)
        rate = self.bit_rate()
        reg = rate if self.target_bits is None else torch.relu(rate - self.target_bits)
        value = task + self.lambda_fair * fair + self.lambda_bit * reg.detach()
        return sur + self.lambda_bit * reg, {"loss": float(value), "task": float(task), "fair": float(fair),
                                             "avg_bits_cont": float(rate.detach())}

    # ------------------------------------------------------------------ export
    def quant_map(self, **kw) -> ConfigMap:
        """The discretised bits (:meth:`bits`) as the :class:`~medquant.quant.ConfigMap` ``quantize_`` takes.

        Symmetric weights with per-channel scales and ``channel_bits`` (``scope="channel"``) or one scale and
        bit-width per tensor (:func:`medquant.quantize_`).

        Args:
            **kw: the keyword arguments of :meth:`bits`.

        Returns:
            The config map.
        """
        out = {}
        for n, b in self.bits(**kw).items():
            if self.scope == "channel":
                out[n] = QuantConfig(bits=max(b), scope="channel", symmetric=True, channel_bits=b)
            else:
                out[n] = QuantConfig(bits=b[0], scope="tensor", symmetric=True)
        return ConfigMap(out)

    def export(self, project: bool = True, tolerance: float = 0.1) -> nn.Module:
        """Remove the BAQ parametrizations (keeping the trained weights) and ``quantize_`` with the discrete bits.

        Only the BAQ entries are removed: another parametrization of the same weight (the user's own) stays, and
        ``quantize_`` quantizes its value, the weight the BAQ bits were trained on.

        The result has ordinary QuantLinear / QuantConv2d layers (it saves and reloads). After an FSDP fit this is a
        collective: every rank gathers the full weights and returns the full exported model.

        Args:
            project: lower the bits to ``target_bits`` (see :meth:`bits`).
            tolerance: allowed distance above ``target_bits``.

        Returns:
            The quantized model, in eval mode.

        Raises:
            RuntimeError: the wrapper was already exported (its BAQ parametrizations are gone and the model is
                quantized; the model returned then is ``self.model``, its bits ``self.params_exported``).
        """
        self._check_not_exported("export")
        qmap = self.quant_map(project=project, tolerance=tolerance)
        if self._skeleton is not None:  # FSDP: gather the trained weights into the plain copy (all ranks)
            self.model = mqd.load_full_state(self._skeleton, self.model)
            self._skeleton = None
            self.params_exported = qmap
            quantize_(self.model, qmap)
            self._exported = True
            self.model.eval()
            return self.model
        for n in self.params:
            _drop_weight_parametrizations(self.model.get_submodule(n), BAQWeight)
        self.params_exported = qmap
        quantize_(self.model, qmap)
        self._exported = True
        self.model.eval()
        return self.model

    def _check_not_exported(self, what: str) -> None:
        if self._exported:
            raise RuntimeError(f"BAQWrapper.{what}(): this wrapper was already exported, its model is quantized "
                               f"and has no learnable bits any more (the exported model is wrapper.model, its bits "
                               f"wrapper.params_exported); build a new BAQWrapper on a float model to train again")


def finite_difference_bits(param: BAQWeight, loss_at: Any, scope: int) -> float:
    """``L(b+1) - L(b)`` for one scope, holding every other scope's bits fixed (used by the tests).

    Args:
        param: the layer's :class:`BAQWeight` (restored afterwards).
        loss_at: a callable returning the loss at the current bits.
        scope: the scope whose bit-width is raised by one.

    Returns:
        The loss difference.
    """
    with torch.no_grad():
        theta0 = param.theta.detach().clone()
        b = float(torch.round(param.continuous_bits()[scope]))
        base = float(loss_at())
        frac = (b + 1 - param.b_min) / (param.b_max - param.b_min)
        param.theta[scope] = math.atanh(min(frac, 0.9999)) if frac < 1 else 20.0
        up = float(loss_at())
        param.theta.copy_(theta0)
    return up - base
