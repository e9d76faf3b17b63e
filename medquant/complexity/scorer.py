"""``ComplexityScorer``: five image-complexity metrics, a calibrated combined score and quantile levels.

Pipeline:

1. ``metrics(images)`` -> (N, 5) float64 raw metrics in :data:`METRIC_NAMES` order (see ``metrics.py``).
2. ``fit(calibration_images)`` learns, per metric m, an offset o_m and a scale s_m:
   ``normalisation="minmax"``: o = min, s = max - min; ``"quantile"`` (robust): o = q_lo, s = q_hi - q_lo
   (default q = 0.01, 0.99). A metric with zero spread (s < 1e-12) gets s = 1, so it contributes a constant
   and never divides by zero. Normalised values z_m = (x_m - o_m) / s_m are not clipped (ordering is kept).
3. ``score = sum_m w_m z_m / sum_m w_m`` (weights default 1 each, configurable).
4. ``levels``: thresholds t_k = quantile_{k/L}(calibration scores), k = 1..L-1 (linear interpolation);
   level = #{k : score > t_k}, so level 0 holds the simplest 1/L of the calibration set. Scores are always
   finite, so levels are never NaN.

The scorer is a ``torch.nn.Module`` whose state is a few buffers (float64, kept float64 even under
``model.half()``), so it is saved and loaded with a model it is attached to; ``state_dict()`` holds only
tensors (safetensors-friendly). Besides the calibration (offsets, spreads, thresholds, hence ``n_levels``), the
state carries every setting that decides the metrics or a re-fit: the weights, the edge threshold, the default
``bits_stored`` (``bits_stored_state``, ``0`` = none: the depth the input declares), ``normalisation``
(``normalisation_state``, 0 = ``"minmax"``, 1 = ``"quantile"``) and ``quantiles`` (``quantiles_state``). A
reloaded scorer therefore reads images, scores them and re-fits as the saved one did.

State versions: 1 had none of the three settings, 2 added ``bits_stored_state``, 3 (this build) adds
``normalisation_state`` and ``quantiles_state``. Older states still load: a setting they lack keeps the loading
scorer's own value (its constructor argument or default), which is what loading did before the setting was
recorded; saved again, the state is written as version 3. Computation runs on the device of the scorer
(``scorer.to("cuda")``).
"""
from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from .inputs import prepare
from .metrics import METRIC_NAMES, compute_metrics

STATE_VERSION = 3  # 2: adds "bits_stored_state"; 3: adds "normalisation_state" and "quantiles_state"
_READABLE_VERSIONS = (1, 2, 3)
_ADDED_IN = {"bits_stored_state": 2, "normalisation_state": 3, "quantiles_state": 3}  # key -> first version
_NORMALISATIONS = ("minmax", "quantile")  # normalisation_state codes 0, 1
_DEFAULT_QUANTILES = (0.01, 0.99)
_EPS_SPREAD = 1e-12


class ComplexityScorer(nn.Module):
    """Image complexity scorer: five metrics per image, a calibrated weighted score, and quantile levels.

    The score of metrics ``x`` is ``sum_m w_m (x_m - o_m) / s_m / sum_m w_m`` with the offsets ``o`` and
    spreads ``s`` fitted on calibration images (min / max, or two quantiles); level ``k`` of ``n_levels`` holds
    the scores between the ``k/n`` and ``(k+1)/n`` quantiles of the calibration scores (level 0 = the simplest).

    Args:
        n_levels: number of complexity levels (>= 1; default 4, quartiles).
        weights: metric weights for the combined score, a sequence of 5 non-negative numbers in
            :data:`METRIC_NAMES` order or a mapping name -> weight (missing names get 0). Default all 1.
        edge_threshold: Sobel magnitude threshold for the edge mask (default 0.1).
        normalisation: ``"minmax"`` or ``"quantile"``; None (default) means ``"minmax"`` unless a loaded state
            says otherwise. Saved in the state and restored by ``load_state_dict``.
        quantiles: (low, high) for ``"quantile"`` normalisation; None (default) means (0.01, 0.99) unless a
            loaded state says otherwise. Saved in the state and restored by ``load_state_dict``.
        bits_stored: default number of significant bits of integer images (e.g. 12), an int in 1..32 or None
            (the depth the input declares: 8 for uint8, 16 for uint16 and PIL ``I;16``; other integer dtypes
            then need one; see :mod:`medquant.complexity.inputs`); per-call override. Saved in the state and
            restored by ``load_state_dict``.

    Raises:
        ValueError: ``n_levels`` is not a positive int (Python or numpy), ``normalisation`` unknown,
            ``quantiles`` not ``0 <= low < high <= 1``, ``edge_threshold`` not a number, negative or not finite,
            ``weights`` not numbers, of the wrong length, with unknown names, negative, not finite or all zero, or
            ``bits_stored`` not None or an int in 1..32. ``load_state_dict`` raises it too for a state saved
            with another ``bits_stored``, ``normalisation`` or ``quantiles`` than the one this scorer was given
            explicitly (not None, in the constructor or by setting the attribute); a setting left None takes the
            state's value.

    Example::

        scorer = ComplexityScorer(n_levels=4).fit(calibration_images)
        raw = scorer.metrics(images)      # (N, 5)
        s = scorer.score(images)          # (N,)
        lv = scorer.levels(images)        # (N,) int64 in [0, n_levels)
    """

    METRIC_NAMES = METRIC_NAMES

    # buffers (registered in __init__; declared here for type checkers)
    metric_weights: torch.Tensor
    edge_threshold: torch.Tensor
    norm_offset: torch.Tensor
    norm_scale: torch.Tensor
    thresholds: torch.Tensor
    fitted: torch.Tensor
    state_version: torch.Tensor
    bits_stored_state: torch.Tensor
    normalisation_state: torch.Tensor
    quantiles_state: torch.Tensor

    def __init__(
        self,
        n_levels: int = 4,
        weights: Sequence[float] | Mapping[str, float] | None = None,
        edge_threshold: float = 0.1,
        normalisation: str | None = None,
        quantiles: tuple[float, float] | None = None,
        bits_stored: int | None = None,
    ):
        super().__init__()
        if isinstance(n_levels, bool) or not isinstance(n_levels, (int, numbers.Integral)) or n_levels < 1:
            raise ValueError(f"n_levels must be a positive integer, got {n_levels!r}")
        self._check_normalisation(normalisation)
        q = self._parse_quantiles(quantiles)
        try:
            et = float(edge_threshold) if not isinstance(edge_threshold, (str, bytes)) else math.nan
        except (TypeError, ValueError):
            et = math.nan
        if not (math.isfinite(et) and et >= 0.0):
            raise ValueError(f"edge_threshold must be a non-negative number, got {edge_threshold!r}")
        f64 = torch.float64
        self.register_buffer("metric_weights", self._parse_weights(weights))
        self.register_buffer("edge_threshold", torch.tensor(et, dtype=f64))
        self.register_buffer("norm_offset", torch.zeros(5, dtype=f64))
        self.register_buffer("norm_scale", torch.ones(5, dtype=f64))
        self.register_buffer("thresholds", torch.zeros(int(n_levels) - 1, dtype=f64))  # int: numpy ints too
        self.register_buffer("fitted", torch.tensor(False))
        self.register_buffer("state_version", torch.tensor(STATE_VERSION, dtype=torch.int64))
        self.register_buffer("bits_stored_state", torch.tensor(0, dtype=torch.int64))  # 0 = None
        self.register_buffer("normalisation_state", torch.tensor(0, dtype=torch.int64))  # _NORMALISATIONS index
        self.register_buffer("quantiles_state", torch.tensor(q, dtype=torch.float64))
        self._bits_stored_explicit = False
        self.bits_stored = bits_stored
        self.normalisation = normalisation
        self.quantiles = quantiles

    # ------------------------------------------------------------------ configuration
    @staticmethod
    def _parse_weights(weights) -> torch.Tensor:
        def refused() -> ValueError:
            return ValueError(f"weights must be 5 non-negative numbers in the order {', '.join(METRIC_NAMES)}, or a "
                              f"mapping name -> number; got {weights!r}")

        if weights is None:
            w = [1.0] * 5
        elif isinstance(weights, Mapping):
            unknown = set(weights) - set(METRIC_NAMES)
            if unknown:
                raise ValueError(f"unknown metric names in weights: {sorted(unknown)}; known: {METRIC_NAMES}")
            try:
                w = [float(weights.get(name, 0.0)) for name in METRIC_NAMES]
            except (TypeError, ValueError):
                raise refused() from None
        else:
            try:
                if isinstance(weights, (str, bytes)):
                    raise TypeError
                w = [float(x) for x in weights]
            except (TypeError, ValueError, RuntimeError):  # RuntimeError: a tensor entry of several values
                raise refused() from None
            if len(w) != 5:
                raise ValueError(f"weights must have 5 entries ({', '.join(METRIC_NAMES)}), got {len(w)}")
        t = torch.tensor(w, dtype=torch.float64)
        if not bool(torch.isfinite(t).all()) or bool((t < 0).any()) or float(t.sum()) <= 0:
            raise ValueError(f"weights must be finite, non-negative and not all zero, got {w}")
        return t

    @staticmethod
    def _check_normalisation(value) -> None:
        if value is not None and (not isinstance(value, str) or value not in _NORMALISATIONS):
            raise ValueError(f"normalisation must be 'minmax', 'quantile' or None, got {value!r}")

    @staticmethod
    def _parse_quantiles(value) -> tuple[float, float]:
        if value is None:
            return _DEFAULT_QUANTILES
        try:
            lo_q, hi_q = (float(q) for q in value)
        except (TypeError, ValueError):
            lo_q = hi_q = float("nan")
        if not 0.0 <= lo_q < hi_q <= 1.0:
            raise ValueError(f"quantiles must be None or (low, high) with 0 <= low < high <= 1, got {value!r}")
        return lo_q, hi_q

    @property
    def n_levels(self) -> int:
        """Number of complexity levels (``len(thresholds) + 1``)."""
        return int(self.thresholds.numel()) + 1

    @property
    def bits_stored(self) -> int | None:
        """Default significant bits of integer images (None: the depth the input declares); part of the state."""
        v = int(self.bits_stored_state)
        return None if v == 0 else v

    @bits_stored.setter
    def bits_stored(self, value: int | None) -> None:
        if value is not None and (isinstance(value, bool) or not isinstance(value, numbers.Integral)
                                  or not 1 <= int(value) <= 32):
            raise ValueError(f"bits_stored must be None or an integer in 1..32, got {value!r}")
        self.bits_stored_state.fill_(0 if value is None else int(value))
        self._bits_stored_explicit = value is not None

    @property
    def normalisation(self) -> str:
        """``"minmax"`` or ``"quantile"``: how :meth:`fit` normalises each metric; part of the state."""
        return _NORMALISATIONS[int(self.normalisation_state)]

    @normalisation.setter
    def normalisation(self, value: str | None) -> None:
        self._check_normalisation(value)
        self.normalisation_state.fill_(_NORMALISATIONS.index(value or "minmax"))
        self._normalisation_explicit = value is not None

    @property
    def quantiles(self) -> tuple[float, float]:
        """(low, high) quantiles of ``"quantile"`` normalisation; part of the state."""
        lo_q, hi_q = self.quantiles_state.tolist()
        return float(lo_q), float(hi_q)

    @quantiles.setter
    def quantiles(self, value: tuple[float, float] | None) -> None:
        q = self._parse_quantiles(value)
        self.quantiles_state.copy_(torch.tensor(q, dtype=torch.float64))
        self._quantiles_explicit = value is not None

    @property
    def device(self) -> torch.device:
        """The device of the scorer's buffers (where metrics are computed)."""
        return self.thresholds.device

    @property
    def is_fitted(self) -> bool:
        """Whether :meth:`fit` (or ``load_state_dict`` of a fitted state) has run."""
        return bool(self.fitted)

    def set_weights(self, weights) -> ComplexityScorer:
        """Change the metric weights (takes effect on the next ``score``; re-``fit`` to update the thresholds).

        Args:
            weights: 5 non-negative numbers in :data:`METRIC_NAMES` order, or a mapping name -> weight.

        Returns:
            ``self``.
        """
        self.metric_weights = self._parse_weights(weights).to(self.device)
        return self

    # ------------------------------------------------------------------ metrics
    @torch.no_grad()
    def metrics(self, images, bits_stored: int | None = None, as_dict: bool = False):
        """The five raw metrics of each image, on the scorer's device.

        Args:
            images: what :mod:`medquant.complexity.inputs` accepts (tensors, arrays, PIL / DICOM images,
                lists of them).
            bits_stored: significant bits of integer images (default: the scorer's ``bits_stored``).
            as_dict: return ``name -> (N,)`` instead of one tensor.

        Returns:
            A float64 tensor ``(N, 5)`` in :data:`METRIC_NAMES` order (an empty list gives ``(0, 5)``; an
            array or tensor batch of 0 images is refused with a ``ValueError``), or the dict.
        """
        bits = bits_stored if bits_stored is not None else self.bits_stored
        n, groups = prepare(images, bits_stored=bits, device=self.device)
        out = torch.zeros(n, 5, dtype=torch.float64, device=self.device)
        thr = float(self.edge_threshold)
        for g in groups:
            vals = compute_metrics(g.gray, g.u8, edge_threshold=thr, exact_u8=g.exact_u8)
            out[torch.tensor(g.indices, device=self.device)] = vals
        if as_dict:
            return {name: out[:, i] for i, name in enumerate(METRIC_NAMES)}
        return out

    def _as_metric_tensor(self, images=None, metrics=None) -> torch.Tensor:
        if images is not None and metrics is not None:  # one would be silently ignored
            raise ValueError("pass images or metrics=, not both")
        if metrics is not None:
            m = torch.as_tensor(metrics, dtype=torch.float64, device=self.device)
            if m.ndim != 2 or m.shape[1] != 5:
                raise ValueError(f"metrics must have shape (N, 5), got {tuple(m.shape)}")
            if not bool(torch.isfinite(m).all()):
                raise ValueError("metrics contain NaN or inf")
            return m
        if images is None:
            raise ValueError("pass images or metrics=")
        return self.metrics(images)

    # ------------------------------------------------------------------ calibration
    @torch.no_grad()
    def fit(self, calibration_images=None, metrics=None) -> ComplexityScorer:
        """Learn the per-metric normalisation and the level thresholds from a calibration set.

        Args:
            calibration_images: the calibration images (as for :meth:`metrics`).
            metrics: instead of images, their precomputed raw metrics ``(N, 5)``.

        Returns:
            ``self``.

        Raises:
            ValueError: no calibration image, neither or both of images and metrics, or metrics of the wrong
                shape or not finite.
        """
        m = self._as_metric_tensor(calibration_images, metrics)
        if m.shape[0] == 0:
            raise ValueError("fit needs at least one calibration image")
        if self.normalisation == "minmax":
            lo, hi = m.min(dim=0).values, m.max(dim=0).values
        else:
            q = torch.tensor(self.quantiles, dtype=torch.float64, device=m.device)
            qs = torch.quantile(m, q, dim=0)
            lo, hi = qs[0], qs[1]
        spread = hi - lo
        self.norm_offset.copy_(lo)
        self.norm_scale.copy_(torch.where(spread > _EPS_SPREAD, spread, torch.ones_like(spread)))
        scores = self._score_from_metrics(m)
        if self.n_levels > 1:
            probs = torch.arange(1, self.n_levels, dtype=torch.float64, device=m.device) / self.n_levels
            self.thresholds.copy_(torch.quantile(scores, probs))
        self.fitted.fill_(True)
        return self

    # ------------------------------------------------------------------ scoring
    def _score_from_metrics(self, m: torch.Tensor) -> torch.Tensor:
        z = (m - self.norm_offset) / self.norm_scale
        w = self.metric_weights
        return (z * w).sum(dim=1) / w.sum()

    def _check_fitted(self):
        if not self.is_fitted:
            raise RuntimeError("ComplexityScorer is not calibrated: call fit(calibration_images) or "
                               "load_state_dict(...) first")

    @torch.no_grad()
    def score(self, images=None, metrics=None) -> torch.Tensor:
        """Combined complexity score: the weighted mean of the normalised metrics (see the class docstring).

        Args:
            images: the images (as for :meth:`metrics`).
            metrics: instead of images, their raw metrics ``(N, 5)``.

        Returns:
            A float64 tensor ``(N,)``.

        Raises:
            RuntimeError: the scorer is not fitted.
            ValueError: neither or both of images and metrics, or metrics of the wrong shape or not finite.
        """
        self._check_fitted()
        return self._score_from_metrics(self._as_metric_tensor(images, metrics))

    @torch.no_grad()
    def levels_from_scores(self, scores: torch.Tensor) -> torch.Tensor:
        """Level of precomputed scores: ``#{k : score > t_k}`` for the fitted thresholds ``t``.

        Args:
            scores: combined scores (:meth:`score`), any shape.

        Returns:
            An int64 tensor of the same shape, values in ``[0, n_levels)``.

        Raises:
            RuntimeError: the scorer is not fitted.
            ValueError: a score is NaN or infinite.
        """
        self._check_fitted()
        s = torch.as_tensor(scores, dtype=torch.float64, device=self.device)
        if not bool(torch.isfinite(s).all()):
            raise ValueError("scores contain NaN or inf")
        if self.n_levels == 1:
            return torch.zeros(s.shape, dtype=torch.int64, device=self.device)
        return (s.unsqueeze(-1) > self.thresholds).sum(dim=-1).to(torch.int64)

    @torch.no_grad()
    def levels(self, images=None, metrics=None) -> torch.Tensor:
        """Complexity level of each image; 0 = simplest.

        Args:
            images: the images (as for :meth:`metrics`).
            metrics: instead of images, their raw metrics ``(N, 5)``.

        Returns:
            An int64 tensor ``(N,)`` with values in ``[0, n_levels)``.

        Raises:
            RuntimeError: the scorer is not fitted.
            ValueError: as :meth:`score`.
        """
        return self.levels_from_scores(self.score(images, metrics))

    def forward(self, images) -> torch.Tensor:
        """Same as :meth:`levels`.

        Args:
            images: the images (as for :meth:`metrics`).

        Returns:
            An int64 tensor ``(N,)`` of levels.
        """
        return self.levels(images)

    # ------------------------------------------------------------------ state
    def _apply(self, fn, recurse=True):
        # Follow device moves but never dtype casts: model.half() must not round the float64 thresholds.
        # (This module has buffers only, no parameters or children.)
        for k, buf in self._buffers.items():
            if buf is None:
                continue
            moved = fn(buf)
            self._buffers[k] = moved if moved.dtype == buf.dtype else buf.to(moved.device)
        return self

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        key = prefix + "thresholds"
        if key in state_dict:
            thr = state_dict[key]
            if not isinstance(thr, torch.Tensor) or thr.ndim != 1:
                raise ValueError(f"{key} must be a 1-D tensor")
        # validate before resizing anything: a refused state must leave this scorer as it was
        self._validate_state({k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)})
        ver_key = prefix + "state_version"
        # a setting given explicitly (not None) must agree with the state's; one left None takes the state's
        saved_settings = {
            "bits_stored": (self._bits_stored_explicit, self.bits_stored,
                            lambda v: int(v) or None),
            "normalisation": (self._normalisation_explicit, self.normalisation,
                              lambda v: _NORMALISATIONS[int(v)]),
            "quantiles": (self._quantiles_explicit, self.quantiles,
                          lambda v: tuple(float(q) for q in torch.as_tensor(v).tolist())),
        }
        for name, (explicit, own, decode) in saved_settings.items():
            k = f"{prefix}{name}_state"
            if explicit and k in state_dict and decode(state_dict[k]) != own:
                saved = decode(state_dict[k])
                raise ValueError(f"the state was saved with {name}={saved!r} but this scorer was constructed "
                                 f"with {name}={own!r}; construct it with {name}={saved!r} or None to load this "
                                 "state")
        if key in state_dict and state_dict[key].shape != self.thresholds.shape:  # saved with another n_levels
            self.thresholds = torch.zeros(state_dict[key].shape, dtype=torch.float64, device=self.device)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        if ver_key in state_dict:
            for name, since in _ADDED_IN.items():
                k = prefix + name
                if int(state_dict[ver_key]) < since and k not in state_dict and k in missing_keys:
                    # saved before this setting was recorded: keep this scorer's own (the old behaviour)
                    missing_keys.remove(k)
        self.state_version.fill_(STATE_VERSION)  # saved again, the state is this build's (with every setting)

    @staticmethod
    def _validate_state(sd: Mapping) -> None:
        def t(name):
            v = sd.get(name)
            return None if v is None else torch.as_tensor(v)

        ver = t("state_version")
        if ver is not None and int(ver) not in _READABLE_VERSIONS:
            raise ValueError(f"unsupported ComplexityScorer state version {int(ver)} (this build reads "
                             f"{', '.join(map(str, _READABLE_VERSIONS))})")
        for name in ("metric_weights", "norm_offset", "norm_scale"):
            v = t(name)
            if v is not None and (v.shape != (5,) or not bool(torch.isfinite(v.double()).all())):
                raise ValueError(f"{name} must be 5 finite values, got {v.tolist()}")
        scale = t("norm_scale")
        if scale is not None and bool((scale <= 0).any()):
            raise ValueError("norm_scale must be positive")
        w = t("metric_weights")
        if w is not None and (bool((w < 0).any()) or float(w.sum()) <= 0):
            raise ValueError("metric_weights must be non-negative and not all zero")
        thr = t("thresholds")
        if thr is not None:
            thr = thr.double()
            if not bool(torch.isfinite(thr).all()) or bool((thr[1:] < thr[:-1]).any()):
                raise ValueError(f"thresholds must be finite and non-decreasing, got {thr.tolist()}")
        bits = t("bits_stored_state")
        if bits is not None and (bits.numel() != 1 or bits.dtype.is_floating_point or bits.dtype == torch.bool
                                 or not 0 <= int(bits) <= 32):
            raise ValueError(f"bits_stored_state must be one integer in 0..32 (0 = none), got {bits.tolist()}")
        norm = t("normalisation_state")
        if norm is not None and (norm.numel() != 1 or norm.dtype.is_floating_point or norm.dtype == torch.bool
                                 or not 0 <= int(norm) < len(_NORMALISATIONS)):
            raise ValueError("normalisation_state must be one integer, 0 (minmax) or 1 (quantile), got "
                             f"{norm.tolist()}")
        q = t("quantiles_state")
        if q is not None:
            qd = q.double()
            if (q.shape != (2,) or not q.dtype.is_floating_point or not bool(torch.isfinite(qd).all())
                    or not 0.0 <= float(qd[0]) < float(qd[1]) <= 1):
                raise ValueError(f"quantiles_state must be 2 values with 0 <= low < high <= 1, got {q.tolist()}")
        et = t("edge_threshold")
        if et is not None and (et.numel() != 1 or not 0 <= float(et) < float("inf")):
            raise ValueError(f"edge_threshold must be one finite non-negative number, got {et.tolist()}")

    def extra_repr(self) -> str:
        return (f"n_levels={self.n_levels}, edge_threshold={float(self.edge_threshold)}, "
                f"normalisation={self.normalisation!r}, quantiles={self.quantiles}, bits_stored={self.bits_stored}, "
                f"fitted={self.is_fitted}")
