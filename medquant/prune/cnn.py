"""Output-channel pruning of plain CNNs.

The model is traced with ``torch.fx`` and shapes are propagated on an example input. For every ``nn.Conv2d``
(``groups == 1``) the pass follows its output through shape-preserving, per-channel operations -- at most one
``BatchNorm2d`` (pruned along), activations, dropout, pooling, ``flatten`` -- to its consumers, which must be
``nn.Conv2d`` (``groups == 1``, input channels pruned) or ``nn.Linear`` after a flatten (the ``H*W`` columns of
each channel pruned). A conv whose output reaches anything else (a residual ``add``, ``cat``, the model output,
a depthwise conv...) is left alone; ``plan.sizes`` lists only prunable convs.

Removing channel ``c`` is exactly equivalent to zeroing filter ``c`` (and its bias) and the BatchNorm's
``gamma_c`` and ``beta_c`` in the original model when every activation between producer and consumer maps 0 to
0 (ReLU, GELU, SiLU, tanh...); with e.g. a sigmoid in between, the channel's constant contribution is dropped.

Channel importance: ``magnitude`` = ``||W_c||_2 * |gamma_c| / sqrt(var_c + eps)`` (the BatchNorm-scaled filter
norm; ``||W_c||_2`` without BN); ``activation`` = RMS of the channel's output (after the BN) over calibration
data; ``taylor`` = ``mean_batches |sum g*theta|`` over the filter, its bias and the BN ``gamma_c``, ``beta_c``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from ..models.runner import eval_mode, run_model
from .importance import calibration_loss
from .ratios import check_ratio, lowest_indices, n_to_remove

__all__ = ["ChannelGroup", "apply_channels", "channel_groups", "plan_channels"]

_PASS_MODULES = (nn.BatchNorm2d, nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.LeakyReLU, nn.ELU, nn.Hardswish,
                 nn.Tanh, nn.Sigmoid, nn.Dropout, nn.Dropout2d, nn.Identity, nn.MaxPool2d, nn.AvgPool2d,
                 nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.Flatten)
_PASS_FUNCS = {F.relu, torch.relu, F.relu6, F.gelu, F.silu, F.leaky_relu, torch.tanh, torch.sigmoid, F.dropout,
               F.max_pool2d, F.avg_pool2d, F.adaptive_avg_pool2d, F.adaptive_max_pool2d, torch.flatten}
_PASS_METHODS = {"relu", "flatten", "sigmoid", "tanh"}


@dataclass
class ChannelGroup:
    conv: str
    bn: str | None
    consumers: list[tuple[str, int]] = field(default_factory=list)  # (module name, columns per channel)
    n_channels: int = 0


def _flatten_ok(node: fx.Node) -> bool:
    if node.op == "call_module":
        return True
    start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
    return start == 1


def channel_groups(model: nn.Module, example_input: Any) -> tuple[list[ChannelGroup], dict[str, str]]:
    """Prunable conv groups and, for the others, why not (``{conv: reason}``)."""
    try:
        gm = fx.symbolic_trace(model)
    except Exception as e:  # noqa: BLE001 - fx raises many types (TraceError, TypeError, ...); all mean "untraceable"
        raise ValueError(f"{type(model).__name__}: channel pruning traces the model with torch.fx, which failed "
                         f"({type(e).__name__}: {e}); models with data-dependent control flow are not supported")
    args = example_input if isinstance(example_input, (tuple, list)) else (example_input,)
    ShapeProp(gm).propagate(*args)
    mods = dict(gm.named_modules())
    groups, skipped = [], {}
    for node in gm.graph.nodes:
        if node.op != "call_module" or not isinstance(mods[node.target], nn.Conv2d):
            continue
        conv = mods[node.target]
        if conv.groups != 1:
            skipped[node.target] = "grouped/depthwise conv"
            continue
        g = ChannelGroup(node.target, None, n_channels=conv.out_channels)
        ok, why = True, ""
        stack = [(u, 1) for u in node.users]
        while stack and ok:
            u, cols = stack.pop()
            if u.op == "call_module":
                m = mods[u.target]
                if isinstance(m, nn.Conv2d) and m.groups == 1:
                    if cols != 1:
                        ok, why = False, f"conv {u.target} after flatten"
                    else:
                        g.consumers.append((u.target, 1))
                    continue
                if isinstance(m, nn.Linear):
                    if cols == 1 and m.in_features != conv.out_channels:
                        ok, why = False, f"linear {u.target} on an unflattened map"
                    else:
                        g.consumers.append((u.target, cols))
                    continue
                if isinstance(m, nn.BatchNorm2d):
                    if g.bn is not None:
                        ok, why = False, "two BatchNorms"
                        continue
                    g.bn = u.target
                elif not isinstance(m, _PASS_MODULES):
                    ok, why = False, f"output reaches {type(m).__name__} {u.target}"
                    continue
                if isinstance(m, nn.Flatten) and m.start_dim != 1:
                    ok, why = False, "flatten with start_dim != 1"
                    continue
            elif u.op == "call_function" and u.target in _PASS_FUNCS:
                if u.target is torch.flatten and not _flatten_ok(u):
                    ok, why = False, "flatten with start_dim != 1"
                    continue
            elif u.op == "call_method" and u.target in _PASS_METHODS:
                pass
            else:
                ok, why = False, f"output reaches {u.op} {getattr(u.target, '__name__', u.target)}"
                continue
            is_flat = (u.op == "call_module" and isinstance(mods[u.target], nn.Flatten)) or u.target in (
                torch.flatten, "flatten")
            new_cols = cols
            if is_flat:
                shp = u.args[0].meta["tensor_meta"].shape
                new_cols = cols * int(torch.tensor(shp[2:]).prod()) if len(shp) > 2 else cols
            stack.extend((w, new_cols) for w in u.users)
        if ok and g.consumers:
            groups.append(g)
        else:
            skipped[node.target] = why or "no consumer"
    return groups, skipped


def _first(calib):
    for b in calib:
        return b
    return None


def _scores(model: nn.Module, groups: list[ChannelGroup], method: str, calib, loss_fn, progress: bool):
    out: dict[str, torch.Tensor] = {}
    if method == "magnitude":
        with torch.no_grad():
            for g in groups:
                w = model.get_submodule(g.conv).weight.float().flatten(1).norm(dim=1)
                if g.bn is not None:
                    bn = model.get_submodule(g.bn)
                    w = w * bn.weight.float().abs() / (bn.running_var.float() + bn.eps).sqrt()
                out[g.conv] = w
        return out
    if calib is None:
        raise ValueError(f"{method} importance needs calibration data: pass calib=<iterable of batches>")
    with eval_mode(model):
        if method == "activation":
            return _activation_scores(model, groups, calib, progress)
        return _taylor_scores(model, groups, calib, loss_fn, progress)


def _activation_scores(model: nn.Module, groups: list[ChannelGroup], calib, progress: bool
                       ) -> dict[str, torch.Tensor]:
    from tqdm.auto import tqdm

    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    handles = []
    for g in groups:
        def hook(m, a, y, key=g.conv):
            y = y.detach().float()
            sums[key] = sums.get(key, 0) + y.pow(2).transpose(0, 1).reshape(y.shape[1], -1).sum(1)
            counts[key] = counts.get(key, 0) + y.numel() // y.shape[1]
        handles.append(model.get_submodule(g.bn or g.conv).register_forward_hook(hook))
    try:
        with torch.no_grad():
            for batch in tqdm(calib, desc="activation statistics", disable=not progress, leave=False):
                run_model(model, batch)
    finally:
        for h in handles:
            h.remove()
    return {k: (sums[k] / counts[k]).sqrt() for k in sums}


def _taylor_scores(model: nn.Module, groups: list[ChannelGroup], calib, loss_fn, progress: bool
                   ) -> dict[str, torch.Tensor]:
    from tqdm.auto import tqdm

    acc: dict[str, torch.Tensor] = {}
    n = 0
    try:
        for batch in tqdm(calib, desc="taylor importance", disable=not progress, leave=False):
            model.zero_grad(set_to_none=True)
            calibration_loss(model, batch, loss_fn).backward()
            n += 1
            with torch.no_grad():
                for g in groups:
                    c = model.get_submodule(g.conv)
                    s = (c.weight.grad * c.weight).flatten(1).sum(1)
                    if c.bias is not None:
                        s = s + c.bias.grad * c.bias
                    if g.bn is not None:
                        bn = model.get_submodule(g.bn)
                        s = s + bn.weight.grad * bn.weight + bn.bias.grad * bn.bias
                    acc[g.conv] = acc.get(g.conv, 0) + s.abs().float()
    finally:
        model.zero_grad(set_to_none=True)
    return {k: v / n for k, v in acc.items()}


def plan_channels(model: nn.Module, pruner, plan, calib, loss_fn, example_input) -> None:
    """Fill ``plan.channels`` / ``plan.sizes`` for a plain CNN (called by ``StructuredPruner.plan``)."""
    ex = example_input if example_input is not None else (_first(calib) if calib is not None else None)
    if ex is None:
        raise ValueError("channel pruning needs an example input (example_input=...) or calibration batches to "
                         "trace the CNN's shapes")
    groups, _ = channel_groups(model, ex)
    ratios = pruner.channel_ratio
    if isinstance(ratios, dict):
        names = {g.conv for g in groups}
        bad = sorted(set(ratios) - names)
        if bad:
            raise ValueError(f"channel_ratio names convs that cannot be pruned or do not exist: {bad}; prunable: "
                             f"{sorted(names)}")
        ratios = {k: check_ratio(v, f"channel_ratio[{k!r}]") for k, v in ratios.items()}
    else:
        ratios = {g.conv: ratios for g in groups}
    active = [g for g in groups if ratios.get(g.conv, 0) > 0]
    if not groups:
        raise ValueError(f"{type(model).__name__}: found no prunable conv channels (nor transformer blocks)")
    scores = _scores(model, active, pruner.importance, calib, loss_fn, pruner.progress) if active else {}
    for g in groups:
        plan.sizes[g.conv] = {"channels": g.n_channels}
        keep = list(range(g.n_channels))
        r = ratios.get(g.conv, 0)
        if r > 0:
            k = n_to_remove(r, g.n_channels)
            if k >= g.n_channels:
                raise ValueError(f"{g.conv}: channel ratio {r} would remove all {g.n_channels} channels")
            drop = set(lowest_indices(scores[g.conv], k))
            keep = [c for c in keep if c not in drop]
        plan.channels[g.conv] = keep
    plan.channel_groups = [{"conv": g.conv, "bn": g.bn, "consumers": [list(c) for c in g.consumers],
                            "n_channels": g.n_channels} for g in groups]


@torch.no_grad()
def _keep(param: torch.Tensor, idx: torch.Tensor, dim: int) -> nn.Parameter:
    return nn.Parameter(param.index_select(dim, idx.to(param.device)).clone(), requires_grad=param.requires_grad)


@torch.no_grad()
def apply_channels(model: nn.Module, plan, groups: list[ChannelGroup] | None = None) -> None:
    """Remove the channels of ``plan.channels`` (producer conv, its BN, consumers' inputs), in place."""
    if groups is None:
        groups = [ChannelGroup(d["conv"], d["bn"], [(c[0], int(c[1])) for c in d["consumers"]], d["n_channels"])
                  for d in plan.channel_groups]
    for g in groups:
        keep = plan.channels.get(g.conv)
        if keep is None or len(keep) == g.n_channels:
            continue
        if not keep:
            raise ValueError(f"{g.conv}: refusing to remove all {g.n_channels} channels")
        idx = torch.tensor(sorted(keep), dtype=torch.long)
        conv = model.get_submodule(g.conv)
        conv.weight = _keep(conv.weight, idx, 0)
        if conv.bias is not None:
            conv.bias = _keep(conv.bias, idx, 0)
        conv.out_channels = len(keep)
        if g.bn is not None:
            bn = model.get_submodule(g.bn)
            bn.weight, bn.bias = _keep(bn.weight, idx, 0), _keep(bn.bias, idx, 0)
            bn.running_mean = bn.running_mean.index_select(0, idx)
            bn.running_var = bn.running_var.index_select(0, idx)
            bn.num_features = len(keep)
        for name, cols in g.consumers:
            m = model.get_submodule(name)
            if isinstance(m, nn.Conv2d):
                m.weight = _keep(m.weight, idx, 1)
                m.in_channels = len(keep)
            else:
                cidx = (idx[:, None] * cols + torch.arange(cols)[None, :]).flatten()
                m.weight = _keep(m.weight, cidx, 1)
                m.in_features = int(cidx.numel())
        g.n_channels = len(keep)

