"""Image complexity scoring (SPEC section 2, seed 000): five metrics, calibrated score and levels.

``ComplexityScorer`` is the public entry point; ``metrics`` holds the batched torch kernels, ``reference``
the per-image scikit-image/numpy pipeline used as the test reference and the benchmark baseline.
"""
from .metrics import METRIC_NAMES
from .scorer import ComplexityScorer

__all__ = ["METRIC_NAMES", "ComplexityScorer"]
