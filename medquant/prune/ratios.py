"""How a removal ratio becomes a count and which structures it removes; shared by the transformer pruner
(heads, neurons) and the CNN channel pruner.

A ratio ``r`` in ``[0, 1)`` of ``n`` structures removes ``floor(r*n + 0.5)`` of them (round half up), the ones
with the lowest importance scores (ties: the lower index goes first). ``r*n`` is computed exactly on the decimal
value of ``r`` as written (its shortest ``repr``): ``0.29`` of 50 is 14.5 and removes 15, although the binary
float product ``0.29 * 50`` is ``14.499999999999998``.
"""
from __future__ import annotations

import math
import numbers
from fractions import Fraction

import torch

__all__ = ["check_ratio", "lowest_indices", "n_to_remove"]


def n_to_remove(ratio: float, n: int) -> int:
    """The number of structures a ratio removes out of ``n``: ``floor(ratio * n + 0.5)``, exact in decimal
    arithmetic on ``ratio`` as written (its shortest ``repr``; module docstring), so a product that is a half
    rounds up."""
    return math.floor(Fraction(repr(float(ratio))) * n + Fraction(1, 2))


def check_ratio(r: float, what: str) -> float:
    """``r`` as a float after checking it is a number in ``[0, 1)``; ``what`` names it in the error.

    Any real number is accepted (``int``, ``float``, NumPy scalars such as ``np.float32``).

    Raises:
        TypeError: ``r`` is not a real number (``bool`` included).
        ValueError: ``r`` is not finite or lies outside ``[0, 1)``.
    """
    if not isinstance(r, numbers.Real) or isinstance(r, bool):
        raise TypeError(f"{what} must be a number in [0, 1) (fraction to remove); got {type(r).__name__} {r!r}")
    if not math.isfinite(r) or not 0.0 <= r < 1.0:
        raise ValueError(f"{what} must be a number in [0, 1) (fraction to remove); got {r!r}")
    return float(r)


def lowest_indices(scores: torch.Tensor, k: int) -> list[int]:
    """Indices of the ``k`` lowest entries of the 1-D ``scores``, lowest first (ties: lower index first)."""
    order = sorted(range(scores.numel()), key=lambda i: (float(scores[i]), i))
    return order[:k]
