"""The allocation rules of FairQuant: scope scores, then bits per scope by rank, by quantile or to a budget.

:class:`medquant.fairquant.FairQuantAllocator` calls these on the cross-group importance map ``R`` (one tensor
per quantizable layer, shaped like its weight); they are plain functions of tensors and numbers.


* Scope score = mean ``|R|`` over the scope's elements; scopes are output channels (rows of the weight viewed
  as ``(out, -1)``) or whole tensors.
* :func:`allocate_by_rank` - palette ``bits`` (sorted ascending) with target proportions ``props`` (normalised):
  scopes are ranked by score with a stable sort (ties keep index order, layers in model order) and the lowest
  ranked ``c_1`` scopes get ``bits[0]``, the next ``c_2 - c_1`` get ``bits[1]``, ... with cut points
  ``c_j = floor(q_j * n + 1/2)``, ``q_j = cumsum(props)_j``, ``n`` = number of scopes. Every tier's size is within
  one scope of ``props_j * n``, even when scores tie (dead channels all scoring 0), where the authors' quantile rule
  (``t_j = quantile(scores, q_j)``; first ``j`` with ``score <= t_j``) misses. When the scores are distinct and
  ``q_j * n`` is an integer the two rules give the same assignment (tested).
* :func:`allocate_to_budget` - a parameter-weighted average of ``target`` bits over the palette. Each scope ``s``
  with ``n_s`` weights and score ``r_s`` is charged the proxy error ``r_s * n_s * 4^(-b_s)`` (rounding noise of a
  ``b``-bit uniform quantizer scales as ``4^(-b)``); starting from ``bits[0]`` everywhere, the upgrade to the next
  palette bit with the largest error reduction per added bit (``r_s * (4^-b - 4^-b') / (b' - b)``, ties by scope
  index) is applied while the budget allows (the new average ``(sum_s n_s b_s) / sum_s n_s``, a quotient of exact
  integers, is at most ``target + 1e-12``: a budget met exactly, e.g. 2.3 bits over 1e8 weights, is not lost to
  the rounding of ``target * sum_s n_s``). Higher score therefore never gets fewer bits than a lower one of the
  same size, and the result is within one scope's increment of the budget; it must land within ``tolerance``
  (default 0.1 bit) of ``target`` or a ``ValueError`` explains why.
"""
from __future__ import annotations

import heapq
import math
from collections.abc import Mapping, Sequence

import torch

# the scopes bits are allocated to (not QuantConfig.scope, which also has "group")
ALLOCATION_SCOPES = ("channel", "tensor")


def scope_scores(reduced: dict[str, torch.Tensor], scope: str = "channel") -> dict[str, torch.Tensor]:
    """``{layer: scores}``: one score per output channel (``scope="channel"``) or one per tensor.

    Args:
        reduced: layer -> cross-group importance ``R`` (same shape as the weight).
        scope: ``"channel"`` or ``"tensor"``.

    Returns:
        ``{layer: scores}``.

    Raises:
        ValueError: an unknown ``scope``.
    """
    if scope not in ALLOCATION_SCOPES:
        raise ValueError(f"unknown scope {scope!r}; accepted: {', '.join(ALLOCATION_SCOPES)}")
    out = {}
    for name, r in reduced.items():
        a = r.detach().float().abs().reshape(r.shape[0], -1)
        out[name] = a.mean(1) if scope == "channel" else a.mean().reshape(1)
    return out


def check_palette(bits: Sequence[int], props: Sequence[float] | None = None) -> tuple[list[int], list[float] | None]:
    """Sorted palette (and proportions reordered with it, normalised). Integer bits 1..8, distinct.

    Args:
        bits: the palette bit-widths.
        props: one proportion per palette bit, or None.

    Returns:
        ``(sorted bits, proportions in the same order summing to 1, or None)``.

    Raises:
        ValueError: an empty palette, bits that are not integers in 1..8 (bools, NaN / inf too) or repeated, or
            proportions of another length, negative, not finite or all zero.
    """
    if len(bits) == 0:
        raise ValueError("the bit palette is empty; give e.g. bits=(2, 4, 8)")
    try:  # int(inf) raises OverflowError, int(nan) ValueError; bools are not bit-widths
        b = [int(x) for x in bits]
    except (TypeError, ValueError, OverflowError):
        b = []
    if (len(b) != len(bits) or any(isinstance(x, bool) for x in bits) or any(x != y for x, y in zip(b, bits))
            or any(not 1 <= x <= 8 for x in b)):
        raise ValueError(f"palette bits must be integers in 1..8, got {list(bits)}")
    if len(set(b)) != len(b):
        raise ValueError(f"palette bits must be distinct, got {list(bits)}")
    order = sorted(range(len(b)), key=lambda i: b[i])
    if props is None:
        return [b[i] for i in order], None
    if len(props) != len(b):
        raise ValueError(f"{len(props)} proportions for {len(b)} palette bits: give one proportion per bit")
    p = [float(x) for x in props]
    if any(not math.isfinite(x) or x < 0 for x in p) or sum(p) <= 0:
        raise ValueError(f"proportions must be finite, >= 0 and not all zero, got {list(props)}")
    total = sum(p)
    return [b[i] for i in order], [p[i] / total for i in order]


def _flatten(scores: dict[str, torch.Tensor]) -> tuple[torch.Tensor, list[tuple[str, int, int]]]:
    spans, parts, start = [], [], 0
    for name, s in scores.items():
        s = s.detach().double().reshape(-1)
        if not torch.isfinite(s).all():
            raise ValueError(f"scores of layer {name!r} contain NaN/inf")
        parts.append(s)
        spans.append((name, start, start + s.numel()))
        start += s.numel()
    if start == 0:
        raise ValueError("no scopes to allocate bits to")
    return torch.cat(parts), spans


def _unflatten(flat: list[int], spans) -> dict[str, tuple[int, ...]]:
    return {name: tuple(flat[a:b]) for name, a, b in spans}


def rank_cuts(n: int, props: Sequence[float]) -> list[int]:
    """Cut points ``[0, c_1, ..., n]`` of the rank rule: ``c_j = floor(q_j * n + 1/2)`` with ``q = cumsum(props)``.

    Args:
        n: the number of scopes.
        props: the normalised proportions.

    Returns:
        The cut points (tier ``j`` holds the ranks ``c_j .. c_{j+1} - 1``).
    """
    cuts, acc = [0], 0.0
    for p in props[:-1]:
        acc += p
        cuts.append(min(n, max(cuts[-1], math.floor(acc * n + 0.5 + 1e-9))))
    cuts.append(n)
    return cuts


def allocate_by_rank(scores: dict[str, torch.Tensor], bits: Sequence[int], props: Sequence[float]
                     ) -> dict[str, tuple[int, ...]]:
    """Rank rule (module docstring): ``{layer: bits per scope}``.

    Args:
        scores: layer -> one score per scope.
        bits: the palette, lowest first.
        props: the fraction of scopes for each palette width.

    Returns:
        ``{layer: bits per scope}``.
    """
    pal, pr = check_palette(bits, props)
    assert pr is not None  # proportions were given
    flat, spans = _flatten(scores)
    n = flat.numel()
    order = torch.argsort(flat, stable=True).tolist()
    cuts = rank_cuts(n, pr)
    assigned = [0] * n
    for j, b in enumerate(pal):
        for i in order[cuts[j]:cuts[j + 1]]:
            assigned[i] = b
    return _unflatten(assigned, spans)


def allocate_by_quantile(scores: dict[str, torch.Tensor], bits: Sequence[int], props: Sequence[float]
                         ) -> dict[str, tuple[int, ...]]:
    """The authors' quantile rule, for comparison only (misses the proportions when scores tie).

    Args:
        scores: layer -> one score per scope.
        bits: the palette, lowest first.
        props: the fraction of scopes for each palette width.

    Returns:
        ``{layer: bits per scope}``.
    """
    pal, pr = check_palette(bits, props)
    flat, spans = _flatten(scores)
    q = torch.tensor(pr, dtype=torch.float64).cumsum(0)[:-1].clamp(0, 1)
    thr = torch.quantile(flat, q).tolist()
    out = []
    for v in flat.tolist():
        out.append(next((pal[j] for j, t in enumerate(thr) if v <= t), pal[-1]))
    return _unflatten(out, spans)


def allocate_to_budget(scores: dict[str, torch.Tensor], sizes: dict[str, int], bits: Sequence[int],
                       target: float, tolerance: float = 0.1) -> dict[str, tuple[int, ...]]:
    """Budget rule (module docstring). ``sizes[layer]`` = weights per scope of that layer.

    Args:
        scores: layer -> one score per scope.
        sizes: layer -> weights per scope.
        bits: the palette.
        target: the parameter-weighted average bits to reach.
        tolerance: largest allowed ``|average - target|``.

    Returns:
        ``{layer: bits per scope}``.

    Raises:
        ValueError: no allocation of the palette lands within ``tolerance`` of ``target``.
    """
    pal, _ = check_palette(bits)
    target = float(target)
    if not math.isfinite(target) or target < pal[0] or target > pal[-1]:
        raise ValueError(
            f"target average bits {target} is impossible with the palette {pal}: it must lie between the smallest "
            f"({pal[0]}) and the largest ({pal[-1]}) palette bit-width"
        )
    flat, spans = _flatten(scores)
    n_per = []
    for name, a, b in spans:
        n_per += [int(sizes[name])] * (b - a)
    total = sum(n_per)
    level = [0] * len(n_per)
    used = pal[0] * total
    r = flat.tolist()

    def gain(i: int) -> float:
        b0, b1 = pal[level[i]], pal[level[i] + 1]
        return r[i] * (4.0 ** -b0 - 4.0 ** -b1) / (b1 - b0)

    heap = [(-gain(i), i) for i in range(len(r))] if len(pal) > 1 else []
    heapq.heapify(heap)
    skipped = []
    while heap:
        _, i = heapq.heappop(heap)
        cost = (pal[level[i] + 1] - pal[level[i]]) * n_per[i]
        # the average, not used + cost against target * total: that float product misses an exact budget of a
        # large model (2.3 * 1e8 = 229999999.99999997), while the quotient of two exact integers rounds to 2.3
        if (used + cost) / total > target + 1e-12:
            skipped.append(i)  # does not fit; a smaller scope later may
            continue
        used += cost
        level[i] += 1
        if level[i] + 1 < len(pal):
            heapq.heappush(heap, (-gain(i), i))
    avg = used / total
    if abs(avg - target) > tolerance + 1e-12:
        step = max((pal[j + 1] - pal[j]) * n for n in n_per for j in range(len(pal) - 1)) / total \
            if len(pal) > 1 else 0.0
        raise ValueError(
            f"could not meet {target} average bits within {tolerance}: the importance-ordered allocation reaches "
            f"{avg:.3f} (it raises scopes one palette step at a time while the budget allows, so it lands within "
            f"one scope's step of the target, here up to {step:.3f} average bits; another mix of widths may reach "
            f"the target exactly). Use smaller scopes (scope='channel' over whole layers; the model's layers are "
            f"few or small here), a palette with smaller steps, or a larger tolerance"
        )
    return _unflatten([pal[lv] for lv in level], spans)


def bit_map_average_bits(bit_map: Mapping[str, Sequence[int]], sizes: Mapping[str, int]) -> float:
    """Parameter-weighted average bits of a bit map: ``sum_s n_s b_s / sum_s n_s``.

    ``bit_map`` is ``{layer: per-scope bits}`` and ``sizes[layer]`` the number of weights in one of its scopes
    (:func:`medquant.eval.average_bits` gives the same figure for a quantized model).

    Args:
        bit_map: layer -> bits per scope.
        sizes: layer -> weights per scope.

    Returns:
        The average bits.
    """
    num = sum(sum(int(b) for b in bs) * sizes[name] for name, bs in bit_map.items())
    den = sum(len(bs) * sizes[name] for name, bs in bit_map.items())
    return num / den if den else 0.0
