"""Complexity-adaptive quantization: per-input activation bit-widths chosen by image complexity (after
the report "Complexity-Based Quantization of Gemma 3 on MIMIC-CXR-JPG").

* :class:`AdaptiveQuantizer` - wraps a model; each sample's complexity level picks its activation bits at one or
  more sites, weights quantized globally through ``quantize_``; eval and training (STE); bit accounting.
* :func:`fake_quantize_per_sample` - the per-sample dynamic fake quantization it uses (torch; Triton on CUDA).
* :class:`VLMClassifier` - that report's multi-label classifier on a Hugging Face VLM; :class:`CompactCNN`,
  :class:`SmallViT` - image-only variants with the same head.
* :class:`LearnedPolicy`, :func:`policy_labels`, :func:`per_sample_losses` - a learned level policy under an
  average-bit budget.

Per-sample activation quantization is simulated: it changes accuracy, not speed, unless a real low-bit path runs.
"""
from .classifier import CompactCNN, SmallViT, VLMClassifier
from .fakequant import fake_quantize_per_sample
from .policy import LearnedPolicy, per_sample_losses, policy_labels
from .quantizer import DEFAULT_BIT_MAP, AdaptiveQuantizer, block_output_sites, default_sites

__all__ = [
    "DEFAULT_BIT_MAP",
    "AdaptiveQuantizer",
    "CompactCNN",
    "LearnedPolicy",
    "SmallViT",
    "VLMClassifier",
    "block_output_sites",
    "default_sites",
    "fake_quantize_per_sample",
    "per_sample_losses",
    "policy_labels",
]
