"""How a removal ratio becomes a count and which structures it removes; shared by the transformer pruner
(heads, neurons) and the CNN channel pruner.

A ratio ``r`` in ``[0, 1)`` of ``n`` structures removes ``floor(r*n + 0.5)`` of them (round half up), the ones
with the lowest importance scores (ties: the lower index goes first). ``r*n`` is computed exactly on the decimal
value of ``r`` as written (its shortest ``repr``): ``0.29`` of 50 is 14.5 and removes 15, although the binary
float product ``0.29 * 50`` is ``14.499999999999998``.

A ratio held in a narrower binary float (a NumPy ``float32`` / ``float16`` scalar or array, a torch
``float32`` / ``float16`` / ``bfloat16`` tensor) is read as the shortest decimal that rounds to it in its own
format (:func:`typed_float`), the number typed: ``np.float32(0.35)`` is ``0.35`` (of 10: 3.5, removes 4), not
its binary value ``0.3499999940395355`` (3.4999999, which would remove 3).
"""
from __future__ import annotations

import math
import numbers
from fractions import Fraction
from typing import Any

import torch

__all__ = ["check_ratio", "lowest_indices", "n_to_remove", "plain_ratios", "typed_float"]


def _narrow_float(x: Any) -> bool:
    """Whether ``x`` (a scalar, array or tensor) holds binary floats narrower than float64."""
    import numpy as np

    if isinstance(x, torch.Tensor):
        return x.dtype.is_floating_point and x.dtype.itemsize < 8
    dtype = getattr(x, "dtype", None)
    return isinstance(dtype, np.dtype) and dtype.kind == "f" and dtype.itemsize < 8


def typed_float(x: Any) -> float:
    """``x`` as a Python float; a float narrower than float64 (a NumPy ``float16`` / ``float32`` scalar or 0-d
    array, a 0-d torch ``float16`` / ``bfloat16`` / ``float32`` tensor) becomes the shortest decimal that rounds
    to ``x`` in ``x``'s own format (the fewest significant digits ``d`` such that ``x``'s format rounds
    ``f"{x:.{d}g}"`` back to ``x``): ``np.float32(0.35) -> 0.35``, not ``0.3499999940395355``. Other numbers
    become ``float(x)``."""
    if not _narrow_float(x):
        return float(x.item() if isinstance(x, torch.Tensor) else x)
    if isinstance(x, torch.Tensor):
        v, dtype = float(x.item()), x.dtype

        def back(f: float) -> float:
            return float(torch.tensor(f, dtype=dtype).item())
    else:
        v, kind = float(x), x.dtype.type

        def back(f: float) -> float:
            return float(kind(f))
    if not math.isfinite(v):
        return v
    for digits in range(1, 18):
        s = float(f"{v:.{digits}g}")
        if back(s) == v:
            return s
    return v


def plain_ratios(x: Any) -> Any:
    """A NumPy array / torch tensor of ratios as Python numbers (``tolist``; a 0-d one as a number); narrower
    floats are read as typed (:func:`typed_float`), element by element."""
    if not _narrow_float(x):
        return x.tolist()
    vals = [typed_float(v) for v in x.reshape(-1)]
    return vals[0] if x.ndim == 0 else vals


def n_to_remove(ratio: float, n: int) -> int:
    """The number of structures a ratio removes out of ``n``: ``floor(ratio * n + 0.5)``, exact in decimal
    arithmetic on ``ratio`` as written (its shortest ``repr``, in its own format for a float32 / float16 ratio:
    :func:`typed_float`; module docstring), so a product that is a half rounds up."""
    return math.floor(Fraction(repr(typed_float(ratio))) * n + Fraction(1, 2))


def check_ratio(r: float, what: str) -> float:
    """``r`` as a float after checking it is a number in ``[0, 1)``; ``what`` names it in the error.

    Any real number is accepted (``int``, ``float``, NumPy scalars such as ``np.float32``); a float32 / float16
    one is read as typed (:func:`typed_float`: ``np.float32(0.35)`` gives ``0.35``).

    Raises:
        TypeError: ``r`` is not a real number (``bool`` included).
        ValueError: ``r`` is not finite or lies outside ``[0, 1)``.
    """
    if not isinstance(r, numbers.Real) or isinstance(r, bool):
        raise TypeError(f"{what} must be a number in [0, 1) (fraction to remove); got {type(r).__name__} {r!r}")
    if not math.isfinite(r) or not 0.0 <= r < 1.0:
        raise ValueError(f"{what} must be a number in [0, 1) (fraction to remove); got {r!r}")
    return typed_float(r)


def lowest_indices(scores: torch.Tensor, k: int) -> list[int]:
    """Indices of the ``k`` lowest entries of the 1-D ``scores``, lowest first (ties: lower index first)."""
    order = sorted(range(scores.numel()), key=lambda i: (float(scores[i]), i))
    return order[:k]
