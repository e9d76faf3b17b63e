"""Image complexity scoring: five per-image metrics, a calibrated combined score and quantile levels.

The metrics (:data:`METRIC_NAMES`, on the gray image in [0, 1]): Shannon entropy of the 256-bin histogram,
``-sum_v p_v log2 p_v``; edge density, the fraction of pixels whose Sobel magnitude exceeds a threshold
(default 0.1); intensity standard deviation; the box-counting fractal dimension of that edge mask (least-squares
slope of ``log N(s)`` against ``log(1/s)`` for box sizes ``s = 2, 4, 8, ...``); and the Shannon entropy of the
uniform LBP codes (P=8, R=1). Each metric is normalised with statistics fitted on calibration images,
``z_m = (x_m - o_m) / s_m``; the score is ``sum_m w_m z_m / sum_m w_m``; levels are quantiles of the
calibration scores (level 0 = the simplest ``1/n_levels``).

``ComplexityScorer`` is the public entry point; ``metrics`` holds the batched torch kernels;
``reference_metrics`` / ``reference_metrics_batch`` compute the same five metrics one image at a time with
scikit-image and numpy (the reference the tests check the torch code against, and the speed baseline).
"""
from .metrics import METRIC_NAMES
from .reference import reference_metrics, reference_metrics_batch
from .scorer import ComplexityScorer

__all__ = ["METRIC_NAMES", "ComplexityScorer", "reference_metrics", "reference_metrics_batch"]
