"""Output-channel pruning of plain CNNs.

The model is traced with ``torch.fx`` and shapes are propagated on an example input. For every ``nn.Conv2d``
(``groups == 1``, batched ``(N, C, H, W)`` output) the pass follows its output through shape-preserving,
per-channel operations that take it as their (first and only tensor) input -- at most one ``BatchNorm2d``
(pruned along), activations, dropout, pooling, and a flatten of the channel axis and every axis after it
(``start_dim=1, end_dim=-1``: ``nn.Flatten()``, ``torch.flatten(x, 1)``, ``x.flatten(1)``; and a ``view`` /
``reshape`` -- ``x.view(x.size(0), -1)``, ``x.reshape(x.shape[0], -1)``, ``torch.reshape(x, (n, -1))`` -- whose
traced output is ``(N, C*...)`` and whose arguments are ``(b, -1)``, ``b`` an int or the batch size ``t.size(0)``
/ ``t.shape[0]`` / ``t.size()[0]`` of a model input or of the conv's map; reads of the map's batch size are
allowed as well) -- to its consumers, which must be ``nn.Conv2d`` (``groups == 1``, on the 4-D map, input channels
pruned) or ``nn.Linear`` on the flattened 2-D ``(N, C*H*W)`` map with ``in_features == C*H*W`` (the ``H*W``
columns of each channel pruned). A conv whose output reaches anything else (a residual ``add``, ``cat``, the model
output, a depthwise conv, any other flatten or view -- to ``(N, C, H*W)`` or ``(N*C, ...)``, or with a literal
width such as ``x.view(-1, 128)``, which the pruned map would no longer fit since the forward's code is not
rewritten --, a read of its channel count ``x.size(1)`` / ``x.shape[1]``, a ``Linear`` over another axis...) is
left alone, and so is one whose conv, BatchNorm or consumer the forward calls more than once (shared weights),
shares a parameter with another module (tied weights), is parametrized (``torch.nn.utils.parametrize``, e.g. ``parametrizations.weight_norm``) or has a ``weight`` computed
by a hook (legacy ``weight_norm`` / ``spectral_norm``); ``plan.sizes`` lists only prunable convs. Other convs
(``Conv1d``, ``Conv3d``, transposed) are not pruned, and named as such. Tracing runs the model in eval mode
without gradients on the example input (or the first calibration batch), read as
:func:`~medquant.models.runner.run_model` reads a batch: a mapping by the forward's parameter names (a parameter
left out takes its default), a tuple / list positionally, else one input. Planning leaves BatchNorm statistics as
they were.

A float ``channel_ratio`` ``r`` removes ``min(floor(r*n + 0.5), n - 1)`` of the ``n`` channels of every prunable
conv (:func:`~medquant.prune.ratios.n_to_remove`, round half up, keeping at least one channel: a 1-channel conv
stays whole at any ratio); a ``{conv: r}`` dict entry with ``floor(r*n + 0.5) >= n`` raises ``ValueError`` naming
the conv.

Removing channel ``c`` is exactly equivalent to zeroing channel ``c`` of the producer's output after its BatchNorm
(zeroing filter ``c``, its bias and the BatchNorm's ``gamma_c`` and ``beta_c``) in the original model when every
activation between producer and consumer maps 0 to 0 (ReLU, GELU, SiLU, tanh...); with e.g. a sigmoid in between,
the channel's constant contribution is dropped. BatchNorms without affine parameters (``affine=False``) or
without running statistics (``track_running_stats=False``, batch statistics) are pruned too: they normalise each
channel on its own, and lose the entries they have.

Channel importance: ``magnitude`` = ``||W_c||_2 * |gamma_c| / sqrt(var_c + eps)`` (the BatchNorm-scaled filter
norm; ``||W_c||_2`` without BN, and a factor the BN lacks is left out: ``gamma_c`` without ``affine``, ``var_c``
without running statistics); ``activation`` = RMS of the channel's output (after the BN) over calibration data;
``taylor`` = ``mean_batches |sum g*theta|`` over the filter, its bias and the BN ``gamma_c``, ``beta_c`` (when
``affine``), with the gradient ``g`` of the calibration loss (:func:`medquant.prune.importance.calibration_loss`).
Every score is computed in float32 (a bfloat16 / float16 model's weights, gradients and activations are cast
before the products and sums), and Taylor gradients are computed also inside the caller's ``torch.no_grad()``.
Every score must be finite: a NaN or inf score (NaN / inf weights, or NaN / inf activations or gradients, e.g.
float16 overflow) cannot be ranked and raises ``ValueError`` naming the conv.
"""
from __future__ import annotations

import operator
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from ..models.runner import eval_mode, run_model
from .importance import _check_finite, calibration_loss
from .ratios import check_ratio, lowest_indices, n_to_remove

__all__ = ["ChannelGroup", "apply_channels", "channel_groups", "plan_channels"]

_PASS_MODULES = (nn.BatchNorm2d, nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.LeakyReLU, nn.ELU, nn.Hardswish,
                 nn.Tanh, nn.Sigmoid, nn.Dropout, nn.Dropout2d, nn.Identity, nn.MaxPool2d, nn.AvgPool2d,
                 nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.Flatten)
_PASS_FUNCS = {F.relu, torch.relu, F.relu6, F.gelu, F.silu, F.leaky_relu, torch.tanh, torch.sigmoid, F.dropout,
               F.max_pool2d, F.avg_pool2d, F.adaptive_avg_pool2d, F.adaptive_max_pool2d, torch.flatten}
_PASS_METHODS = {"relu", "flatten", "sigmoid", "tanh"}
_VIEW_FUNCS = {torch.reshape}
_VIEW_METHODS = {"view", "reshape"}
_FLAT_HINT = "write x.view(x.size(0), -1) or x.flatten(1)"


@dataclass
class ChannelGroup:
    conv: str
    bn: str | None
    consumers: list[tuple[str, int]] = field(default_factory=list)  # (module name, columns per channel)
    n_channels: int = 0


def _shape(node: Any) -> tuple[int, ...] | None:
    """The shape ``ShapeProp`` recorded for ``node`` (None when it is not a traced tensor)."""
    meta = node.meta.get("tensor_meta") if isinstance(node, fx.Node) else None
    return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None


def _flatten_dims(node: fx.Node, mods: dict[str, nn.Module]) -> tuple[Any, Any]:
    """``(start_dim, end_dim)`` of a flatten node: ``nn.Flatten`` (defaults 1, -1), ``torch.flatten`` or the
    ``Tensor.flatten`` method (defaults 0, -1; both take ``(input, start_dim, end_dim)``)."""
    if node.op == "call_module":
        m = mods[node.target]
        return m.start_dim, m.end_dim
    start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
    end = node.args[2] if len(node.args) > 2 else node.kwargs.get("end_dim", -1)
    return start, end


def _flatten_ok(node: fx.Node, mods: dict[str, nn.Module]) -> bool:
    """Whether a flatten merges exactly the channel axis (1) and every axis after it, ``(N, C, ...) -> (N, C*...)``,
    of an input that the channel tensor itself is."""
    shp = _shape(node.args[0]) if node.args else None
    start, end = _flatten_dims(node, mods)
    if shp is None or len(shp) < 2 or not isinstance(start, int) or not isinstance(end, int):
        return False
    r = len(shp)
    return start % r == 1 and end % r == r - 1


def _is_view(node: fx.Node) -> bool:
    """Whether ``node`` is a ``view`` / ``reshape`` (``Tensor.view``, ``Tensor.reshape``, ``torch.reshape``)."""
    return ((node.op == "call_method" and node.target in _VIEW_METHODS)
            or (node.op == "call_function" and node.target in _VIEW_FUNCS))


def _is_shape_read(node: fx.Node) -> bool:
    """Whether ``node`` reads the shape of its input: ``x.size(...)`` or ``x.shape``."""
    return ((node.op == "call_method" and node.target == "size")
            or (node.op == "call_function" and node.target is getattr and len(node.args) == 2
                and node.args[1] == "shape"))


def _is_batch_index(i: Any, rank: int | None) -> bool:
    """Whether ``i`` indexes axis 0 of a ``rank``-D shape (``0``, or ``-rank``)."""
    return isinstance(i, int) and not isinstance(i, bool) and rank is not None and -rank <= i < rank and i % rank == 0


def _shape_read_problem(node: fx.Node) -> str | None:
    """Why the shape read ``node`` (``_is_shape_read``) of the channel map is not followed, or None when it reads
    the batch size only -- ``x.size(0)``, ``x.shape[0]``, ``x.size()[0]`` (also with index ``-rank``) -- which
    pruning channels leaves unchanged. Any other read (``x.size(1)``, ``x.shape``, ``x.size()``) sees the channel
    count, which pruning changes."""
    src = cast(fx.Node, node.args[0])
    shp = _shape(src)
    rank = len(shp) if shp is not None else None
    if node.target == "size":
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        if dim is not None:
            return None if _is_batch_index(dim, rank) else (
                f"reads the map's size x.size({dim}), which pruning changes; only the batch size x.size(0) / "
                "x.shape[0] is followed")
    what = "x.size()" if node.target == "size" else "x.shape"
    for w in node.users:
        if not (w.op == "call_function" and w.target is operator.getitem and len(w.args) == 2 and w.args[0] is node
                and _is_batch_index(w.args[1], rank)):
            return (f"reads the map's size {what} (used by {w.name}), which pruning changes; only the batch size "
                    "x.size(0) / x.shape[0] is followed")
    return None


def _batch_read_source(a: Any) -> fx.Node | None:
    """The tensor ``t`` when ``a`` is a read of its batch size (``t.size(0)``, ``t.shape[0]``, ``t.size()[0]``)."""
    if not isinstance(a, fx.Node):
        return None
    if a.op == "call_method" and a.target == "size" and len(a.args) == 2 and isinstance(a.args[0], fx.Node):
        t = a.args[0]
        shp = _shape(t)
        return t if _is_batch_index(a.args[1], len(shp) if shp is not None else None) else None
    if (a.op == "call_function" and a.target is operator.getitem and len(a.args) == 2
            and isinstance(a.args[0], fx.Node) and _is_shape_read(a.args[0])
            and (a.args[0].target != "size" or len(a.args[0].args) == 1) and not a.args[0].kwargs):
        t = cast(fx.Node, a.args[0].args[0])
        shp = _shape(t)
        return t if _is_batch_index(a.args[1], len(shp) if shp is not None else None) else None
    return None


def _view_problem(node: fx.Node) -> tuple[str | None, fx.Node | None]:
    """``(why not, t)`` for a view / reshape of the channel map ``node.args[0]``.

    Followed when it provably flattens ``(N, C, ...)`` into ``(N, C*...)`` both before and after pruning: the traced
    output is 2-D with ``dim 0 == N`` and ``dim 1 == C * prod(rest)``, and the arguments are ``(b, -1)`` (also as one
    tuple / list), with ``b`` an int or a batch-size read ``t.size(0)`` / ``t.shape[0]`` / ``t.size()[0]`` (then
    ``t`` is returned, for the caller to check that pruning leaves its batch size unchanged). A literal width
    (``x.view(-1, 128)``, ``x.view(n, 128)``) is refused: the forward's code cannot be rewritten, and the literal
    would no longer fit the pruned map."""
    shp, out = _shape(node.args[0]), _shape(node)
    dims: tuple[Any, ...] = tuple(node.args[1:])
    if len(dims) == 1 and isinstance(dims[0], (tuple, list)):
        dims = tuple(dims[0])
    name = "torch.reshape" if node.op == "call_function" else f"x.{node.target}"
    desc = f"{name}({', '.join(str(a) for a in dims)})"
    if (shp is None or len(shp) < 2 or out is None or len(out) != 2 or out[0] != shp[0]
            or out[1] != int(torch.tensor(shp[1:]).prod())):
        return (f"{desc} of a {shp} map gives {out}: only a flatten of the channel axis and every axis after it, "
                "(N, C, ...) -> (N, C*...), is followed"), None
    if node.kwargs or len(dims) != 2:
        return f"{desc}: only the arguments (x.size(0), -1) (or an int batch size) are followed; {_FLAT_HINT}", None
    b, w = dims
    if isinstance(w, int) and w != -1:
        return (f"{desc} spells the flattened width as the literal {w}, which pruning changes (the forward's code "
                f"is not rewritten); {_FLAT_HINT}"), None
    if w != -1:
        return (f"{desc}: the width argument {w} is computed, not -1; only x.size(0) / x.shape[0], ints and -1 "
                f"are followed; {_FLAT_HINT}"), None
    if isinstance(b, int) and not isinstance(b, bool):
        return None, None  # == N (checked above): unchanged by pruning
    t = _batch_read_source(b)
    if t is None:
        return (f"{desc}: the batch argument {b} is not x.size(0) / x.shape[0] or an int; {_FLAT_HINT}"), None
    return None, t


def _reads_only(u: fx.Node, src: fx.Node) -> bool:
    """Whether ``u`` reads ``src`` as its first argument and nowhere else (an operation on the map itself)."""
    return bool(u.args) and u.args[0] is src and not any(a is src for a in (*u.args[1:], *u.kwargs.values()))


def _param_owners(model: nn.Module) -> Counter[int]:
    """How many modules of ``model`` hold each parameter (by identity; above 1: a tied parameter)."""
    return Counter(id(p) for m in model.modules() for p in m.parameters(recurse=False))


def _not_sliceable(name: str, m: nn.Module, owners: Counter[int]) -> str | None:
    """Why the channels of layer ``m`` (``name``) cannot be sliced, or None: a parametrized layer
    (``torch.nn.utils.parametrize``, e.g. ``parametrizations.weight_norm``), a ``weight`` / ``bias`` that is not a
    parameter (recomputed by a hook: legacy ``weight_norm`` / ``spectral_norm``), or one shared with another module
    (tied weights: slicing one module would untie them)."""
    from torch.nn.utils import parametrize

    if parametrize.is_parametrized(m):
        return (f"{name} is parametrized ({', '.join(cast(Any, m).parametrizations)}: torch.nn.utils.parametrize, "
                "e.g. weight norm); its weight is computed and cannot be sliced")
    for attr in ("weight", "bias"):
        t = getattr(m, attr, None)
        if t is not None and not isinstance(t, nn.Parameter):
            return (f"{name}.{attr} is not a parameter but computed by a hook (legacy weight_norm / spectral_norm) "
                    "and cannot be sliced")
        if isinstance(t, nn.Parameter) and owners[id(t)] > 1:
            return f"{name}.{attr} shares its tensor with another module (tied weights); slicing it would untie them"
    return None


def _trace_args(gm: fx.GraphModule, example_input: Any, model: nn.Module) -> tuple[Any, ...]:
    """Positional inputs of the traced forward for one batch, read as :func:`~medquant.models.runner.run_model`
    reads it: a mapping by parameter name (an omitted parameter takes its default), a tuple / list positionally,
    anything else as the one input.

    Raises:
        ValueError: a mapping with a key the forward does not take, or without a parameter that has no default.
    """
    if not isinstance(example_input, Mapping):
        return tuple(example_input) if isinstance(example_input, (tuple, list)) else (example_input,)
    phs = [n for n in gm.graph.nodes if n.op == "placeholder"]
    names = [str(n.target) for n in phs]
    unknown = sorted(str(k) for k in set(example_input) - set(names))
    if unknown:
        raise ValueError(f"the example input / calibration batch has keys {unknown} that "
                         f"{type(model).__name__}.forward does not take (its inputs: {names})")
    args = []
    for n in phs:
        if n.target in example_input:
            args.append(example_input[n.target])
        elif n.args:  # the parameter's default
            args.append(n.args[0])
        else:
            raise ValueError(f"the example input / calibration batch lacks {n.target!r}, an input of "
                             f"{type(model).__name__}.forward without a default (its inputs: {names})")
    return tuple(args)


def channel_groups(model: nn.Module, example_input: Any) -> tuple[list[ChannelGroup], dict[str, str]]:
    """Prunable conv groups and, for the others, why not (``{conv: reason}``).

    ``example_input`` is one batch as :func:`~medquant.models.runner.run_model` takes it: a mapping of the
    forward's inputs by name, a tuple / list of positional inputs, or one tensor.

    Raises:
        ValueError: the model cannot be traced by ``torch.fx``, or a mapping batch does not fit its forward.
    """
    try:
        gm = fx.symbolic_trace(model)
    except Exception as e:  # noqa: BLE001 - fx raises many types (TraceError, TypeError, ...); all mean "untraceable"
        raise ValueError(f"{type(model).__name__}: channel pruning traces the model with torch.fx, which failed "
                         f"({type(e).__name__}: {e}); models with data-dependent control flow are not supported")
    args = _trace_args(gm, example_input, model)
    with eval_mode(model), torch.no_grad():  # a model in train mode must not update its BatchNorm statistics
        ShapeProp(gm).propagate(*args)
    mods = dict(gm.named_modules())
    calls = Counter(n.target for n in gm.graph.nodes if n.op == "call_module")
    owners = _param_owners(model)
    groups, skipped = [], {}
    for node in gm.graph.nodes:
        if node.op != "call_module" or not isinstance(mods[node.target], nn.Conv2d):
            if node.op == "call_module" and isinstance(mods[node.target], nn.modules.conv._ConvNd):
                skipped[node.target] = f"{type(mods[node.target]).__name__}: only nn.Conv2d output channels are pruned"
            continue
        conv = mods[node.target]
        if conv.groups != 1:
            skipped[node.target] = "grouped/depthwise conv"
            continue
        if calls[node.target] > 1:
            skipped[node.target] = f"called {calls[node.target]} times in the forward (shared weights)"
            continue
        why_not = _not_sliceable(node.target, conv, owners)
        if why_not is not None:
            skipped[node.target] = why_not
            continue
        out_shape = _shape(node)
        if out_shape is None or len(out_shape) != 4:
            skipped[node.target] = f"output of shape {out_shape} is not a batched (N, C, H, W) map"
            continue
        g = ChannelGroup(node.target, None, n_channels=conv.out_channels)
        ok, why = True, ""
        stack = [(u, node, 1) for u in node.users]  # (user, the channel tensor it reads, columns per channel)
        chain = {node}  # the channel tensors: their batch axis (0) is unchanged by pruning
        batch_reads: list[tuple[fx.Node, fx.Node]] = []  # (view, tensor whose batch size it reads)
        while stack and ok:
            u, src, cols = stack.pop()
            shp = _shape(src)
            m = mods[u.target] if u.op == "call_module" else None
            if _is_shape_read(u) and _reads_only(u, src):  # a leaf: the value it gives is not the map
                problem = _shape_read_problem(u)
                if problem is not None:
                    ok, why = False, f"{u.name} {problem}"
                continue
            if not ((u.op == "call_function" and u.target in _PASS_FUNCS)
                    or (u.op == "call_method" and u.target in _PASS_METHODS) or _is_view(u)
                    or isinstance(m, (nn.Linear, nn.BatchNorm2d, *_PASS_MODULES))
                    or (isinstance(m, nn.Conv2d) and m.groups == 1)):
                ok, why = False, (f"output reaches {type(m).__name__} {u.target}" if m is not None else
                                  f"output reaches {u.op} {getattr(u.target, '__name__', u.target)}")
                continue
            if not _reads_only(u, src):
                ok, why = False, f"{u.op} {getattr(u.target, '__name__', u.target)} does not take the map as its input"
                continue
            if isinstance(m, (nn.Conv2d, nn.Linear, nn.BatchNorm2d)) and calls[u.target] > 1:
                ok, why = False, (f"output reaches {type(m).__name__} {u.target}, which is called {calls[u.target]} "
                                  "times in the forward (shared weights)")
                continue
            why_not = (_not_sliceable(u.target, m, owners) if isinstance(m, (nn.Conv2d, nn.Linear, nn.BatchNorm2d))
                       else None)
            if why_not is not None:
                ok, why = False, f"output reaches {type(m).__name__} {u.target}: {why_not}"
                continue
            if m is not None:
                if isinstance(m, nn.Conv2d):
                    if cols != 1 or shp is None or len(shp) != 4:
                        ok, why = False, f"conv {u.target} after flatten"
                    else:
                        g.consumers.append((u.target, 1))
                    continue
                if isinstance(m, nn.Linear):  # acts on the last axis: must be the (flattened) channel axis
                    if shp is None or len(shp) != 2 or m.in_features != conv.out_channels * cols:
                        ok, why = False, (f"linear {u.target} on an input of shape {shp}, not the flattened "
                                          f"channels (N, {conv.out_channels} x {cols})")
                    else:
                        g.consumers.append((u.target, cols))
                    continue
                if isinstance(m, nn.BatchNorm2d):
                    if g.bn is not None:
                        ok, why = False, "two BatchNorms"
                        continue
                    g.bn = u.target
            is_flat = isinstance(m, nn.Flatten) or (m is None and u.target in (torch.flatten, "flatten"))
            new_cols = cols
            if is_flat:
                if not _flatten_ok(u, mods):
                    start, end = _flatten_dims(u, mods)
                    ok, why = False, (f"flatten(start_dim={start}, end_dim={end}) of a {shp} map: only flattening "
                                      "the channel axis and every axis after it (start_dim=1, end_dim=-1) is followed")
                    continue
                new_cols = cols * int(torch.tensor(shp[2:]).prod()) if shp is not None and len(shp) > 2 else cols
            elif _is_view(u):
                problem, t = _view_problem(u)
                if problem is not None:
                    ok, why = False, problem
                    continue
                if t is not None:
                    batch_reads.append((u, t))
                new_cols = cols * int(torch.tensor(shp[2:]).prod()) if shp is not None and len(shp) > 2 else cols
            elif shp is None or len(shp) not in (2, 4) or _shape(u) is None or len(_shape(u) or ()) != len(shp):
                ok, why = False, f"{u.op} {getattr(u.target, '__name__', u.target)} changes the map's rank"
                continue
            chain.add(u)
            stack.extend((w, u, new_cols) for w in u.users)
        for view, t in batch_reads if ok else []:
            if t not in chain and t.op != "placeholder":
                ok, why = False, (f"{view.name} reads the batch size of {t.name}, which is neither a model input nor "
                                  f"the conv's output map; {_FLAT_HINT}")
                break
        if ok and g.consumers:
            groups.append(g)
        else:
            skipped[node.target] = why or "no consumer"
    return groups, skipped


def _first(calib):
    for b in calib:
        return b
    return None


def _magnitude_scores(model: nn.Module, groups: list[ChannelGroup]) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for g in groups:
            w = model.get_submodule(g.conv).weight.float().flatten(1).norm(dim=1)
            if g.bn is not None:
                bn = model.get_submodule(g.bn)
                if bn.weight is not None:  # affine=False: no gamma
                    w = w * bn.weight.float().abs()
                if bn.running_var is not None:  # track_running_stats=False: batch statistics, no var_c
                    w = w / (bn.running_var.float() + bn.eps).sqrt()
            out[g.conv] = w
    return out


def _scores(model: nn.Module, groups: list[ChannelGroup], method: str, calib, loss_fn, progress: bool
            ) -> dict[str, torch.Tensor]:
    """``{conv: (out_channels,) float32 scores}`` of the module docstring.

    Raises:
        ValueError: missing calibration data (activation, taylor), empty calibration data, or a non-finite score
            (named by its conv), or a scored conv / BatchNorm parameter that gets no Taylor gradient.
    """
    if method == "magnitude":
        out = _magnitude_scores(model, groups)
    elif calib is None:
        raise ValueError(f"{method} importance needs calibration data: pass calib=<iterable of batches>")
    else:
        with eval_mode(model):
            if method == "activation":
                out = _activation_scores(model, groups, calib, progress)
            else:
                out = _taylor_scores(model, groups, calib, loss_fn, progress)
    for g in groups:
        _check_finite(out[g.conv], f"{method} importance of conv {g.conv}")
    return out


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
    n = 0
    try:
        with torch.no_grad():
            for batch in tqdm(calib, desc="activation statistics", disable=not progress, leave=False):
                run_model(model, batch)
                n += 1
    finally:
        for h in handles:
            h.remove()
    if n == 0:
        raise ValueError("activation statistics: the calibration data is empty")
    return {k: (sums[k] / counts[k]).sqrt() for k in sums}


def _gw(p: torch.Tensor) -> torch.Tensor:
    """``g * theta`` of a parameter, in float32 (also for bfloat16 / float16 models)."""
    if p.grad is None:
        raise ValueError("taylor importance: a scored conv / BatchNorm parameter gets no gradient from the "
                         "calibration loss")
    return p.grad.float() * p.float()


def _taylor_scores(model: nn.Module, groups: list[ChannelGroup], calib, loss_fn, progress: bool
                   ) -> dict[str, torch.Tensor]:
    from tqdm.auto import tqdm

    params = []
    for g in groups:
        params += list(model.get_submodule(g.conv).parameters())
        if g.bn is not None:
            params += list(model.get_submodule(g.bn).parameters())
    saved_req = {id(p): p.requires_grad for p in model.parameters()}
    saved_grad = {id(p): p.grad for p in model.parameters()}
    for p in model.parameters():  # gradients of the scored filters only, also when the model is frozen
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    acc: dict[str, torch.Tensor] = {}
    n = 0
    try:
        for batch in tqdm(calib, desc="taylor importance", disable=not progress, leave=False):
            for p in params:
                p.grad = None
            with torch.enable_grad():  # also inside the caller's torch.no_grad()
                calibration_loss(model, batch, loss_fn).backward()
            n += 1
            with torch.no_grad():
                for g in groups:
                    c = cast(nn.Conv2d, model.get_submodule(g.conv))
                    s = _gw(c.weight).flatten(1).sum(1)
                    if c.bias is not None:
                        s = s + _gw(c.bias)
                    bn = cast(nn.BatchNorm2d, model.get_submodule(g.bn)) if g.bn is not None else None
                    if bn is not None and bn.weight is not None and bn.bias is not None:
                        s = s + _gw(bn.weight) + _gw(bn.bias)
                    acc[g.conv] = acc[g.conv] + s.abs() if g.conv in acc else s.abs()
    finally:  # the model's gradients and requires_grad flags as they were
        for p in model.parameters():
            p.requires_grad_(saved_req[id(p)])
            p.grad = saved_grad[id(p)]
    if n == 0:
        raise ValueError("taylor importance: the calibration data is empty")
    return {k: v / n for k, v in acc.items()}


def plan_channels(model: nn.Module, pruner, plan, calib, loss_fn, example_input) -> None:
    """Fill ``plan.channels`` / ``plan.sizes`` for a plain CNN (called by ``StructuredPruner.plan``)."""
    ex = example_input if example_input is not None else (_first(calib) if calib is not None else None)
    if ex is None:
        raise ValueError("channel pruning needs an example input (example_input=...) or calibration batches to "
                         "trace the CNN's shapes")
    groups, not_prunable = channel_groups(model, ex)
    ratios = pruner.channel_ratio
    per_conv = isinstance(ratios, dict)
    if per_conv:
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
        why = "; ".join(f"{k}: {v}" for k, v in list(not_prunable.items())[:3])
        raise ValueError(f"{type(model).__name__}: found no prunable conv channels (nor transformer blocks)"
                         + (f"; {why}" if why else ""))
    scores = _scores(model, active, pruner.importance, calib, loss_fn, pruner.progress) if active else {}
    for g in groups:
        plan.sizes[g.conv] = {"channels": g.n_channels}
        keep = list(range(g.n_channels))
        r = ratios.get(g.conv, 0)
        if r > 0:
            k = n_to_remove(r, g.n_channels)
            if k >= g.n_channels and per_conv:
                raise ValueError(f"channel_ratio[{g.conv!r}]={r} would remove all {g.n_channels} channels of "
                                 f"{g.conv} (a ratio r removes floor(r*n + 0.5) of n channels): give it a ratio "
                                 f"below {1 - 0.5 / g.n_channels:g}, or leave it out")
            k = min(k, g.n_channels - 1)  # a global ratio keeps at least one channel of every conv
            drop = set(lowest_indices(scores[g.conv], k))
            keep = [c for c in keep if c not in drop]
        plan.channels[g.conv] = keep
    plan.channel_groups = [{"conv": g.conv, "bn": g.bn, "consumers": [list(c) for c in g.consumers],
                            "n_channels": g.n_channels} for g in groups]


@torch.no_grad()
def _keep(param: torch.Tensor, idx: torch.Tensor, dim: int) -> nn.Parameter:
    return nn.Parameter(param.index_select(dim, idx.to(param.device)).clone(), requires_grad=param.requires_grad)


def _check_groups(model: nn.Module, plan, groups: list[ChannelGroup]) -> None:
    """Raise ``ValueError`` when ``plan`` does not fit ``model`` (checked before any layer changes)."""
    def get(name: str, kinds: tuple[type, ...], what: str) -> nn.Module:
        try:
            m = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"the plan names {what} {name!r}, which {type(model).__name__} does not have") from None
        if not isinstance(m, kinds):
            raise ValueError(f"the plan's {what} {name!r} is a {type(m).__name__}, not "  # noqa: TRY004
                             f"{' or '.join(k.__name__ for k in kinds)}")
        return m

    owners = _param_owners(model)

    def sliceable(name: str, m: nn.Module) -> None:
        why = _not_sliceable(name, m, owners)
        if why is not None:
            raise ValueError(f"the plan prunes {name}, but {why}")

    seen: set[tuple[str, str]] = set()
    for g in groups:
        for role, name in [("producer conv", g.conv), ("BatchNorm", g.bn)] + [("consumer", c) for c, _ in g.consumers]:
            if name is not None and (role, name) in seen:
                raise ValueError(f"the plan's channel groups name the {role} {name!r} twice; a layer can follow one "
                                 "producer only (a layer the forward calls more than once is not prunable)")
            seen.add((role, name))
    for g in groups:
        keep = plan.channels.get(g.conv)
        if keep is None or len(keep) == g.n_channels:
            continue
        if not keep:
            raise ValueError(f"{g.conv}: refusing to remove all {g.n_channels} channels")
        if len(set(keep)) != len(keep) or any(not 0 <= int(c) < g.n_channels for c in keep):
            raise ValueError(f"{g.conv}: kept channels must be unique and in [0, {g.n_channels})")
        conv = get(g.conv, (nn.Conv2d,), "conv")
        if conv.out_channels != g.n_channels or conv.groups != 1:
            raise ValueError(f"{g.conv}: the plan expects a conv with {g.n_channels} output channels and groups=1, "
                             f"the model has {conv.out_channels} (groups={conv.groups}); was it already pruned?")
        sliceable(g.conv, conv)
        if g.bn is not None:
            bn = get(g.bn, (nn.BatchNorm2d,), "BatchNorm")
            if bn.num_features != g.n_channels:
                raise ValueError(f"{g.bn}: the plan expects {g.n_channels} features, the model's BatchNorm has "
                                 f"{bn.num_features}")
            sliceable(g.bn, bn)
        for name, cols in g.consumers:
            m = get(name, (nn.Conv2d, nn.Linear) if cols == 1 else (nn.Linear,), "consumer")
            sliceable(name, m)
            if isinstance(m, nn.Conv2d) and m.groups != 1:
                raise ValueError(f"{name}: a consumer conv with groups={m.groups}; only groups=1 convs are pruned")
            width = m.in_channels if isinstance(m, nn.Conv2d) else m.in_features
            if width != g.n_channels * cols:
                raise ValueError(f"{name}: the plan expects {g.n_channels * cols} input features "
                                 f"({g.n_channels} channels x {cols}), the model's layer has {width}")


@torch.no_grad()
def apply_channels(model: nn.Module, plan, groups: list[ChannelGroup] | None = None) -> None:
    """Remove the channels of ``plan.channels`` (producer conv, its BN, consumers' inputs), in place.

    A BatchNorm loses the entries of its ``weight`` / ``bias`` (when ``affine``) and of its running statistics
    (when ``track_running_stats``) that it has. Every layer the plan names is checked (exists, has the type and
    width the plan expects, holds its weights as untied, unparametrized parameters; kept channels unique, in range
    and not empty) before any layer changes.

    Raises:
        ValueError: the plan does not fit the model (nothing is changed then).
    """
    if groups is None:
        groups = [ChannelGroup(d["conv"], d["bn"], [(c[0], int(c[1])) for c in d["consumers"]], d["n_channels"])
                  for d in plan.channel_groups]
    _check_groups(model, plan, groups)
    for g in groups:
        keep = plan.channels.get(g.conv)
        if keep is None or len(keep) == g.n_channels:
            continue
        idx = torch.tensor(sorted(int(c) for c in keep), dtype=torch.long)
        conv = model.get_submodule(g.conv)
        conv.weight = _keep(conv.weight, idx, 0)
        if conv.bias is not None:
            conv.bias = _keep(conv.bias, idx, 0)
        conv.out_channels = len(keep)
        if g.bn is not None:
            bn = model.get_submodule(g.bn)
            if bn.weight is not None:
                bn.weight = _keep(bn.weight, idx, 0)
            if bn.bias is not None:
                bn.bias = _keep(bn.bias, idx, 0)
            if bn.running_mean is not None:
                bn.running_mean = bn.running_mean.index_select(0, idx.to(bn.running_mean.device))
            if bn.running_var is not None:
                bn.running_var = bn.running_var.index_select(0, idx.to(bn.running_var.device))
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
