"""``FairQuantAllocator``: fairness-aware mixed-precision bit allocation (after "FairQuant: Fairness-Aware
Mixed-Precision Quantization for Medical Image Classification", 2025).

Pipeline: calibration batches -> per-group importance ``I_g`` (:mod:`.importance`) -> cross-group reducer ``R``
(:mod:`.reducers`) -> scope scores (mean ``|R|`` per output channel or per tensor) -> bits by rank over a palette
with target proportions, or to a parameter-weighted average-bit budget (:mod:`.allocation_rules`) -> a map that
:func:`medquant.quantize_` consumes (weights only, symmetric, per-output-channel scales by default).

Example::

    alloc = FairQuantAllocator(bits=(2, 4, 8), proportions=(0.2, 0.4, 0.4))   # or target_bits=4.0
    alloc.fit(model, calib_loader)          # batches (x, y, group_ids) by default; see medquant.fairquant.batches
    alloc.average_bits_                     # parameter-weighted
    quantize_(model, alloc.to_quant_map())  # mixed-precision QuantLinear / QuantConv2d
    medquant.save(model, "out/", extras={"fairquant": alloc.state()})
"""
from __future__ import annotations

import numbers
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from ..quant.api import ConfigMap, quantize_
from ..quant.config import QuantConfig
from .allocation_rules import (
    ALLOCATION_SCOPES,
    allocate_by_rank,
    allocate_to_budget,
    bit_map_average_bits,
    check_palette,
    scope_scores,
)
from .batches import GroupsFn, LossFn
from .importance import METRICS, GroupImportance, compute_group_importance
from .reducers import REDUCERS, reduce_groups

# version of :meth:`FairQuantAllocator.state`: 1 (no "version" field) saved bits, proportions, target_bits,
# metric, reducer, scope and cvar_alpha; 2 saves every constructor setting but progress.
STATE_VERSION = 2
# the settings a version-1 state lacks, with the values from_state gave them (the constructor defaults then)
_V1_SETTINGS: dict[str, Any] = {"max_batches": 50, "groups": None, "layers": None, "skip": None, "seed": 0,
                                "tolerance": 0.1}


def _integral(g) -> bool:
    """Whether ``g`` is an integer group id (an int, or a number with no fractional part).

    Not a bool (Python's, numpy's or a bool tensor's) and not a string (``"1"``): the calibration data's ids
    (:func:`medquant.fairquant.batches.check_groups`) refuse both.
    """
    if isinstance(g, (bool, str, bytes)) or getattr(g, "dtype", None) in (torch.bool, np.bool_):
        return False
    try:
        return float(g).is_integer()
    except (TypeError, ValueError):
        return False


def _real(name: str, value: Any) -> float:
    """``float(value)`` for a real number (int, float, a numpy / 0-d torch number); ``TypeError`` naming the
    setting for anything else: a string (``"4"`` is not read as 4.0), a bool, None, a complex number, a list."""
    ok = isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))
    if isinstance(value, torch.Tensor):  # a 0-d real tensor, e.g. a budget computed with torch
        ok = value.dim() == 0 and value.dtype != torch.bool and not value.is_complex()
    if not ok:
        raise TypeError(f"{name} must be a real number (an int or a float), got {type(value).__name__} {value!r}")
    return float(value)


class FairQuantAllocator:
    """Allocate per-scope weight bit-widths from group-conditioned importance.

    Importance per group ``g`` is ``I_g = sum over batches of (dL_g/dw * w)^2`` (``"grape"``) or of ``|dL_g/dw|``
    (``"gradient"``), ``L_g`` the mean loss of the batch's samples of group ``g`` (:mod:`.importance`);
    the reducer combines the groups' maps into one map ``R`` per layer; each scope (output channel or tensor) is
    scored from ``R`` and the palette bits are given by rank (``proportions``) or to meet ``target_bits``.

    Fitted attributes: ``importance_`` (:class:`GroupImportance`), ``reduced_`` (``{layer: R}``), ``scores_``
    (``{layer: scope scores}``), ``bit_map_`` (``{layer: per-scope bits}``), ``average_bits_``, ``scope_size_``.

    Args:
        bits: palette of integer bit-widths (1..8), e.g. ``(2, 4, 8)``.
        proportions: target share of scopes per palette bit (normalised), used when ``target_bits`` is None.
        target_bits: parameter-weighted average-bit budget; overrides ``proportions`` (met within ``tolerance``).
        metric: ``"grape"`` (``(dL_g/dw * w)^2``) or ``"gradient"`` (``|dL_g/dw|``).
        reducer: ``"balanced"`` (default), ``"max"``, ``"mean"`` or ``"cvar"``.
        scope: ``"channel"`` (one bit-width and scale per output channel, default) or ``"tensor"``.
        cvar_alpha: ``a`` of the ``"cvar"`` reducer, which averages the top ``ceil((1 - a) G)`` of the ``G``
            groups' values (:mod:`.reducers`; default 0.1: the top 90%, not a 10% tail).
        max_batches: calibration mini-batches (default 50, as in the paper).
        groups: the group ids that must appear in the calibration data (optional; a declared group without
            samples raises). At least two groups must be seen in any case.
        layers: ``quantize_`` patterns of the Linear / Conv2d layers that get bits (default: all).
        skip: ``quantize_`` patterns of layers left out.
        seed: seeds torch's global generator before calibration, so a shuffling DataLoader gives the same batches.
        tolerance: allowed distance of the achieved average from ``target_bits``.
        progress: tqdm bar over calibration batches.

    Raises:
        ValueError: an unknown metric, reducer or scope, neither proportions nor a target, an invalid palette, a
            target outside the palette's range, fewer than two declared groups, or ``max_batches < 1``.
        TypeError: declared groups that are not integer ids (1.7, True, "a", "1"), ``groups`` / ``layers`` /
            ``skip`` given as a single string rather than a list (as :func:`medquant.quantize_` refuses ``skip``),
            a ``max_batches`` that is not an integer (``True``, ``2.5``) or None, or a ``target_bits``,
            ``tolerance`` or ``cvar_alpha`` that is not a real number (a string such as ``"4"``, a bool, a list),
            or a ``seed`` that is not an integer or None (``1.5``, ``"3"``).
    """

    def __init__(
        self,
        bits: Sequence[int] = (2, 4, 8),
        proportions: Sequence[float] | None = (0.2, 0.4, 0.4),
        *,
        target_bits: float | None = None,
        metric: str = "grape",
        reducer: str = "balanced",
        scope: str = "channel",
        cvar_alpha: float = 0.1,
        max_batches: int | None = 50,
        groups: Sequence[int] | None = None,
        layers: Sequence[str] | None = None,
        skip: Sequence[str] | None = None,
        seed: int | None = 0,
        tolerance: float = 0.1,
        progress: bool = True,
    ) -> None:
        if metric not in METRICS:
            raise ValueError(f"unknown importance metric {metric!r}; accepted: {', '.join(METRICS)}")
        if reducer not in REDUCERS:
            raise ValueError(f"unknown reducer {reducer!r}; accepted: {', '.join(REDUCERS)}")
        if scope not in ALLOCATION_SCOPES:
            raise ValueError(f"unknown scope {scope!r}; accepted: {', '.join(ALLOCATION_SCOPES)}")
        if target_bits is None and proportions is None:
            raise ValueError("give either proportions (rank mode) or target_bits (budget mode)")
        pal, props = check_palette(bits, None if target_bits is not None else proportions)
        if target_bits is not None:
            t = _real("target_bits", target_bits)
            if not pal[0] <= t <= pal[-1]:
                raise ValueError(
                    f"target_bits={target_bits} is impossible with the palette {pal}: it must lie between the "
                    f"smallest ({pal[0]}) and the largest ({pal[-1]}) palette bit-width"
                )
        for arg, val in (("groups", groups), ("layers", layers), ("skip", skip)):
            if isinstance(val, (str, bytes)):  # list("10") would be the patterns / ids "1" and "0"
                what = "integer group ids" if arg == "groups" else "patterns"
                raise TypeError(f"{arg} must be a list of {what}, not a single string: {arg}=[{val!r}]")
        if groups is not None:  # group ids are integers, as in the data (int() would read 1.7 as group 1)
            bad = [g for g in groups if not _integral(g)]
            if bad:
                raise TypeError(f"groups must be integer group ids, got {bad}")
        if groups is not None and len({int(g) for g in groups}) < 2:
            raise ValueError(f"groups={list(groups)}: fairness-aware allocation needs at least two groups")
        self.bits = tuple(pal)
        self.proportions = tuple(props) if props is not None else None
        self.target_bits = None if target_bits is None else _real("target_bits", target_bits)
        self.metric, self.reducer, self.scope = metric, reducer, scope
        self.cvar_alpha = _real("cvar_alpha", cvar_alpha)
        if not 0.0 <= self.cvar_alpha < 1.0:  # checked when fitting too (reduce_groups); refused here, early
            raise ValueError(f"cvar_alpha must be in [0, 1), got {cvar_alpha!r}")
        if max_batches is not None:  # checked when fitting too; a bool or 2.5 would reach itertools.islice
            if isinstance(max_batches, bool) or not isinstance(max_batches, (int, np.integer)):
                raise TypeError(f"max_batches must be a positive integer or None, got {max_batches!r}")
            if max_batches < 1:
                raise ValueError(f"max_batches must be >= 1 or None, got {max_batches}")
        self.max_batches = max_batches
        self.groups = None if groups is None else tuple(int(g) for g in groups)
        self.layers = None if layers is None else list(layers)
        self.skip = None if skip is None else list(skip)
        if seed is not None and (isinstance(seed, (bool, np.bool_)) or not isinstance(seed, (int, np.integer))):
            raise TypeError(f"seed must be an integer or None (torch.manual_seed before calibration), got "
                            f"{type(seed).__name__} {seed!r}")
        self.seed = seed
        self.tolerance = _real("tolerance", tolerance)
        if not self.tolerance >= 0:  # NaN too
            raise ValueError(f"tolerance must be a non-negative number (largest |average bits - target|), got "
                             f"{tolerance!r}")
        self.progress = progress

    # ------------------------------------------------------------------ fitting
    def fit(self, model: nn.Module, batches: Iterable[Any], *, loss_fn: LossFn | None = None,
            groups_fn: GroupsFn | None = None) -> FairQuantAllocator:
        """Calibrate on ``batches`` and allocate.

        Args:
            model: the float model.
            batches: calibration batches.
            loss_fn: ``loss_fn(model, batch)`` returns per-sample losses ``(N,)`` or ``(outputs, targets)``
                (default :func:`medquant.fairquant.batches.default_loss`).
            groups_fn: ``groups_fn(batch)`` returns integer group ids ``(N,)`` (default
                :func:`medquant.fairquant.batches.default_groups`).

        Returns:
            ``self``, fitted.

        Raises:
            TypeError: ``model`` is not an ``nn.Module``.
        """
        if not isinstance(model, nn.Module):
            raise TypeError(f"fit expects an nn.Module, got {type(model).__name__}")
        if self.seed is not None:
            torch.manual_seed(self.seed)
        imp = compute_group_importance(
            model, batches, loss_fn=loss_fn, groups_fn=groups_fn, metric=self.metric,
            max_batches=self.max_batches, layers=self.layers, skip=self.skip, expected_groups=self.groups,
            progress=self.progress,
        )
        return self.fit_importance(imp)

    def fit_importance(self, importance: GroupImportance) -> FairQuantAllocator:
        """Allocate from precomputed per-group maps (e.g. hand-built ones); weight shapes come from the maps.

        Args:
            importance: the per-group importance maps.

        Returns:
            ``self``, fitted. On an error (maps the reducer refuses, a budget the allocation cannot meet) the
            allocator is left as it was: unfitted, or with its previous allocation and importance whole.

        Raises:
            ValueError: declared ``groups`` that differ from the groups of ``importance`` (a declared group without
                maps, or maps of an undeclared group: what :meth:`fit` refuses in the calibration data), maps the
                reducer refuses, or a budget the allocation cannot meet within ``tolerance``.
        """
        if self.groups is not None:  # as fit checks the calibration data (compute_group_importance)
            seen, declared = set(importance.maps), set(self.groups)
            if seen - declared:
                raise ValueError(f"the importance has group ids {sorted(seen - declared)} outside the declared groups "
                                 f"{sorted(declared)}")
            if declared - seen:
                raise ValueError(f"group(s) {sorted(declared - seen)} have no samples (no importance maps); every "
                                 f"declared group needs samples (declared: {sorted(declared)}, seen: {sorted(seen)})")
        reduced = reduce_groups(importance.maps, self.reducer, self.cvar_alpha)
        self.fit_reduced(reduced)  # sets every fitted attribute only when the allocation succeeded
        self.importance_ = importance
        return self

    def fit_reduced(self, reduced: dict[str, torch.Tensor]) -> FairQuantAllocator:
        """Allocate from one reduced importance map per layer (shapes = the layers' weight shapes).

        Args:
            reduced: ``{layer name: R}``.

        Returns:
            ``self``, fitted; ``importance_`` of an earlier :meth:`fit` is dropped (and with it the calibration
            summary of :meth:`state`): this allocation does not come from it. On an error (NaN / inf scores, a
            budget the allocation cannot meet) the allocator is left as it was: unfitted, or with its previous
            allocation whole.
        """
        scores = scope_scores(reduced, self.scope)
        weight_shape = {n: tuple(r.shape) for n, r in reduced.items()}
        scope_size = {n: (r[0].numel() if self.scope == "channel" else r.numel()) for n, r in reduced.items()}
        if self.target_bits is not None:
            bit_map = allocate_to_budget(scores, scope_size, self.bits, self.target_bits, self.tolerance)
        else:
            assert self.proportions is not None  # rank mode (checked in __init__)
            bit_map = allocate_by_rank(scores, self.bits, self.proportions)
        # the fitted attributes of one allocation, set together once it succeeded
        self.reduced_, self.scores_, self.weight_shape_, self.scope_size_ = reduced, scores, weight_shape, scope_size
        self.bit_map_ = bit_map
        self.average_bits_ = bit_map_average_bits(bit_map, scope_size)
        # maps given directly: an earlier fit's importance (and its calibration summary in state()) no longer
        # describes this allocation (fit_importance sets its own right after)
        self.__dict__.pop("importance_", None)
        return self

    def _check_fitted(self) -> None:
        if not hasattr(self, "bit_map_"):
            raise RuntimeError("FairQuantAllocator is not fitted: call fit(model, batches) first")

    # ------------------------------------------------------------------ outputs
    def bit_map(self) -> dict[str, tuple[int, ...]]:
        """``{module name: bits per output channel}`` (a per-tensor allocation is expanded to every channel).

        Returns:
            The bit map.
        """
        self._check_fitted()
        out = {}
        for name, bs in self.bit_map_.items():
            rows = self.weight_shape_[name][0]
            out[name] = tuple(bs) if self.scope == "channel" else tuple(bs) * rows
        return out

    def to_quant_map(self, scale_dtype: str = "float16") -> ConfigMap:
        """The :class:`~medquant.quant.ConfigMap` :func:`medquant.quantize_` consumes (exact layer names).

        Symmetric weights, per-output-channel scales and bits (``scope="channel"``), or one bit-width and one
        scale per tensor (``scope="tensor"``).

        Args:
            scale_dtype: the dtype the scales are stored in.

        Returns:
            The config map.
        """
        self._check_fitted()
        out = {}
        for name, bs in self.bit_map_.items():
            if self.scope == "channel":
                out[name] = QuantConfig(bits=max(bs), scope="channel", symmetric=True, channel_bits=tuple(bs),
                                        scale_dtype=scale_dtype)
            else:
                out[name] = QuantConfig(bits=bs[0], scope="tensor", symmetric=True, scale_dtype=scale_dtype)
        return ConfigMap(out)

    def apply(self, model: nn.Module, progress: bool = False) -> nn.Module:
        """``quantize_(model, self.to_quant_map())`` in place.

        Args:
            model: the model the allocator was fitted on.
            progress: show a progress bar while quantizing.

        Returns:
            The quantized model.
        """
        return quantize_(model, self.to_quant_map(), progress=progress)

    def layer_table(self) -> list[dict]:
        """One row per layer: name, weight shape, scopes per palette bit, average bits.

        Returns:
            The rows as dicts (``name``, ``shape``, ``scopes``, ``counts``, ``avg_bits``).
        """
        self._check_fitted()
        rows = []
        for name, bs in self.bit_map_.items():
            counts = {b: sum(1 for x in bs if x == b) for b in self.bits}
            rows.append({"name": name, "shape": list(self.weight_shape_[name]), "scopes": len(bs),
                         "counts": counts, "avg_bits": sum(bs) / len(bs)})
        return rows

    def format_table(self) -> str:
        """The allocation as text: one line per layer (shape, channels at each palette width, average bits).

        Returns:
            The table, with the parameter-weighted average on its last line.
        """
        rows = self.layer_table()
        w = max([len(r["name"]) for r in rows] + [5])
        head = f"{'layer':<{w}}  {'shape':<18}" + "".join(f"{str(b) + 'b':>7}" for b in self.bits) + "  avg bits"
        lines = [head, "-" * len(head)]
        for r in rows:
            lines.append(f"{r['name']:<{w}}  {tuple(r['shape'])!s:<18}"
                         + "".join(f"{r['counts'][b]:>7}" for b in self.bits) + f"  {r['avg_bits']:8.2f}")
        lines.append(f"parameter-weighted average bits: {self.average_bits_:.3f}")
        return "\n".join(lines)

    def state(self) -> dict[str, Any]:
        """JSON-serialisable settings and allocation (for ``medquant.save(..., extras=...)``).

        The state (version ``STATE_VERSION`` = 2) holds every constructor setting but ``progress`` (display only):
        ``bits``, ``proportions``, ``target_bits``, ``metric``, ``reducer``, ``scope``, ``cvar_alpha``,
        ``max_batches``, ``groups``, ``layers``, ``skip``, ``seed`` and ``tolerance``, so that an allocator rebuilt
        by :meth:`from_state` and fitted again calibrates and allocates as this one did; then the allocation
        (``bit_map``, ``weight_shape``, ``average_bits``) and, after :meth:`fit` / :meth:`fit_importance`, the
        calibration summary (``group_counts``, ``calibration_batches``).

        Returns:
            The state dict; :meth:`from_state` reads it.
        """
        self._check_fitted()
        st: dict[str, Any] = {
            "version": STATE_VERSION,
            "bits": list(self.bits), "proportions": None if self.proportions is None else list(self.proportions),
            "target_bits": self.target_bits, "metric": self.metric, "reducer": self.reducer, "scope": self.scope,
            "cvar_alpha": self.cvar_alpha,
            "max_batches": None if self.max_batches is None else int(self.max_batches),
            "groups": None if self.groups is None else list(self.groups),
            "layers": None if self.layers is None else list(self.layers),
            "skip": None if self.skip is None else list(self.skip),
            "seed": None if self.seed is None else int(self.seed),
            "tolerance": self.tolerance,
            "average_bits": self.average_bits_,
            "bit_map": {k: list(v) for k, v in self.bit_map_.items()},
            "weight_shape": {k: list(v) for k, v in self.weight_shape_.items()},
        }
        if hasattr(self, "importance_"):
            st["group_counts"] = {str(g): c for g, c in self.importance_.counts.items()}
            st["calibration_batches"] = self.importance_.batches
        return st

    @classmethod
    def from_state(cls, st: dict[str, Any]) -> FairQuantAllocator:
        """Rebuild a fitted allocator (allocation only, no importance maps) from :meth:`state`.

        Every saved setting is restored with its type (``groups`` a tuple of ints, ``layers`` / ``skip`` lists of
        patterns, ``tolerance`` a float), so a :meth:`fit` of the rebuilt allocator on the same model and batches
        gives the same allocation. ``progress`` is not saved: the rebuilt allocator has ``progress=False``.

        A state without ``"version"`` (version 1, written before the settings below were saved) loads with the
        values from_state gave them then: ``max_batches=50``, ``groups=None``, ``layers=None``, ``skip=None``,
        ``seed=0``, ``tolerance=0.1``.

        Args:
            st: what :meth:`state` returned.

        Returns:
            The fitted allocator.

        Raises:
            ValueError: a version other than 1 (no ``"version"``) and ``STATE_VERSION``, a version-2 state that
                lacks one of its settings, a setting the constructor refuses, or an allocation that does not fit
                the state (``bit_map`` and ``weight_shape`` naming different layers, a layer whose number of
                bit-widths is not its number of output channels - one with ``scope="tensor"`` - or a bit-width
                outside the palette).
        """
        version = st.get("version", 1)
        if isinstance(version, bool) or version not in (1, STATE_VERSION):
            raise ValueError(f"unsupported FairQuantAllocator state version {version!r}: this medquant reads "
                             f"versions 1 (no 'version' field) to {STATE_VERSION}")
        if version == 1:
            saved = dict(_V1_SETTINGS)
        else:
            missing = [k for k in _V1_SETTINGS if k not in st]
            if missing:
                raise ValueError(f"FairQuantAllocator state version {version} lacks {', '.join(map(repr, missing))}"
                                 f" (a version-{version} state stores every setting)")
            saved = {k: st[k] for k in _V1_SETTINGS}
        a = cls(st["bits"], st["proportions"], target_bits=st["target_bits"], metric=st["metric"],
                reducer=st["reducer"], scope=st["scope"], cvar_alpha=st["cvar_alpha"], progress=False, **saved)
        bit_map = {k: tuple(v) for k, v in st["bit_map"].items()}
        weight_shape = {k: tuple(v) for k, v in st["weight_shape"].items()}
        if set(bit_map) != set(weight_shape):
            raise ValueError(f"the state's bit_map and weight_shape name different layers: "
                             f"{sorted(set(bit_map) ^ set(weight_shape))} are in one only")
        for k, bs in bit_map.items():
            rows = weight_shape[k][0] if a.scope == "channel" and weight_shape[k] else 1
            if len(bs) != rows:
                raise ValueError(f"layer {k!r}: the state's bit_map has {len(bs)} bit-width(s) for a weight of shape "
                                 f"{list(weight_shape[k])}; scope={a.scope!r} needs {rows} (one per "
                                 f"{'output channel' if a.scope == 'channel' else 'tensor'})")
            off = [b for b in bs if isinstance(b, bool) or b not in a.bits]
            if off:
                raise ValueError(f"layer {k!r}: the state's bit_map holds bit-width(s) {sorted(set(off))} outside "
                                 f"its palette {list(a.bits)}")
        a.bit_map_ = bit_map
        a.weight_shape_ = weight_shape
        a.scope_size_ = {k: (int(torch.Size(v[1:]).numel()) if a.scope == "channel" else int(torch.Size(v).numel()))
                         for k, v in a.weight_shape_.items()}
        a.average_bits_ = bit_map_average_bits(a.bit_map_, a.scope_size_)
        return a
