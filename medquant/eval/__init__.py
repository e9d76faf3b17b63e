"""Evaluation: group fairness metrics, efficiency (average bits, stored bytes, BOPs), language-model perplexity,
report text metrics (BLEU-4, ROUGE-L, METEOR, BERTScore) and the rule-based CheXpert-style report labeler."""
from .bops import LayerCost, average_bits, bops, count_macs, model_size_summary, proxy_bops, stored_bytes
from .fairness import FairnessReport, balanced_accuracy, fairness_report, predictions
from .findings import (
    CHEXPERT_FINDINGS,
    MESH_MAP,
    MultilabelAUC,
    MultilabelScores,
    binarize,
    mesh_labels,
    multilabel_auc,
    multilabel_scores,
)
from .labeler import label_report, label_reports, label_text
from .lm import perplexity, token_batches
from .text import TextMetrics, text_metrics

__all__ = [
    "CHEXPERT_FINDINGS",
    "MESH_MAP",
    "FairnessReport",
    "LayerCost",
    "MultilabelAUC",
    "MultilabelScores",
    "TextMetrics",
    "average_bits",
    "balanced_accuracy",
    "binarize",
    "bops",
    "count_macs",
    "fairness_report",
    "label_report",
    "label_reports",
    "label_text",
    "mesh_labels",
    "model_size_summary",
    "multilabel_auc",
    "multilabel_scores",
    "perplexity",
    "predictions",
    "proxy_bops",
    "stored_bytes",
    "text_metrics",
    "token_batches",
]
