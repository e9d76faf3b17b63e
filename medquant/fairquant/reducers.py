"""Cross-group reducers: one importance map ``R`` from the per-group maps ``I_g``.

Elementwise over the full maps, before scope aggregation:

* ``balanced`` (default): ``S_g = sum of I_g over the whole model``, ``share_g = S_g / sum_g S_g``,
  ``R = max_g ( I_g / max(share_g, 1e-8) )`` - a group whose total importance is small gets its map scaled up,
  so the weights it relies on count as much as those of the dominant group.
* ``max``:  ``R = max_g I_g``
* ``mean``: ``R = mean_g I_g``
* ``cvar``: ``R = mean of the top ceil((1 - a) G) values of I_g`` over the ``G`` groups (``a = 0.1``).
"""
from __future__ import annotations

import math

import torch

REDUCERS = ("balanced", "max", "mean", "cvar")
SHARE_FLOOR = 1e-8


def reduce_groups(maps: dict[int, dict[str, torch.Tensor]], reducer: str = "balanced",
                  alpha: float = 0.1) -> dict[str, torch.Tensor]:
    """``{layer: R}`` from ``{group: {layer: I_g}}`` (see the module docstring for the formulas).

    Args:
        maps: group -> layer -> importance map.
        reducer: one of ``REDUCERS``.
        alpha: the CVaR parameter ``a`` (module docstring).

    Returns:
        Layer -> reduced importance.

    Every group must have a map for the same layers (in any order), and a layer's maps must have the same shape
    in every group (the layer weight's shape), since ``R`` is taken elementwise over the groups.

    Raises:
        ValueError: an unknown reducer, no maps, ``alpha`` outside [0, 1), groups with maps for different layers,
            or maps of one layer whose shapes differ between groups (the message names the layer, the groups and
            their shapes).
        TypeError: a map that is not a ``torch.Tensor``.
    """
    if reducer not in REDUCERS:
        raise ValueError(f"unknown reducer {reducer!r}; accepted: {', '.join(REDUCERS)}")
    if not maps:
        raise ValueError("no group importance maps to reduce")
    if not 0.0 <= alpha < 1.0:
        raise ValueError(f"cvar alpha must be in [0, 1), got {alpha}")
    groups = sorted(maps)
    layers = list(maps[groups[0]])
    for g in groups:
        if set(maps[g]) != set(layers):  # the same layers in another insertion order are the same layers
            raise ValueError(f"group {g} has maps for different layers than group {groups[0]}")
    for g in groups:
        for name in layers:
            if not isinstance(maps[g][name], torch.Tensor):
                raise TypeError(f"group {g}, layer {name!r}: importance maps must be torch.Tensor, got "
                                f"{type(maps[g][name]).__name__}")
    for name in layers:
        shapes = {g: tuple(maps[g][name].shape) for g in groups}
        if len(set(shapes.values())) > 1:
            listed = ", ".join(f"group {g}: {s}" for g, s in shapes.items())
            raise ValueError(f"layer {name!r}: the groups' importance maps have different shapes ({listed}); "
                             f"accepted: one map per group with the same shape in every group (the layer "
                             f"weight's shape)")
    n_groups = len(groups)
    if reducer == "balanced":
        totals = torch.tensor([sum(float(t.double().sum()) for t in maps[g].values()) for g in groups],
                              dtype=torch.float64)
        denom = float(totals.sum())
        shares = totals / denom if denom > 0 else torch.full_like(totals, 1.0 / n_groups)
        scale = [1.0 / max(float(s), SHARE_FLOOR) for s in shares]
    out = {}
    for name in layers:
        stack = torch.stack([maps[g][name].float() for g in groups])  # (G, *shape)
        if reducer == "balanced":
            sc = torch.tensor(scale, dtype=torch.float64).reshape(-1, *([1] * (stack.dim() - 1)))
            out[name] = (stack.double() * sc).amax(0).float()
        elif reducer == "max":
            out[name] = stack.amax(0)
        elif reducer == "mean":
            out[name] = stack.mean(0)
        else:
            k = max(1, math.ceil((1.0 - alpha) * n_groups - 1e-9))
            out[name] = stack.topk(k, dim=0).values.mean(0)
    return out
