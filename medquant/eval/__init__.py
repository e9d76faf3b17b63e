"""Evaluation: group fairness metrics, efficiency (average bits, stored bytes, BOPs) and language-model perplexity."""
from .bops import LayerCost, average_bits, bops, count_macs, model_size_summary, proxy_bops, stored_bytes
from .fairness import FairnessReport, balanced_accuracy, fairness_report, predictions
from .lm import perplexity, token_batches

__all__ = [
    "FairnessReport",
    "LayerCost",
    "average_bits",
    "balanced_accuracy",
    "bops",
    "count_macs",
    "fairness_report",
    "model_size_summary",
    "perplexity",
    "predictions",
    "proxy_bops",
    "stored_bytes",
    "token_batches",
]
