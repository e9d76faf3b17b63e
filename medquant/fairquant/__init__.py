"""Fairness-aware mixed-precision quantization (SPEC section 4, seed 003): group-conditioned importance,
cross-group reducers, budgeted bit allocation (:class:`FairQuantAllocator`) and FQ-QAT fine-tuning, learnable bit-widths (:class:`BAQWrapper`)."""
from .allocation_rules import (
    ALLOCATION_SCOPES,
    allocate_by_quantile,
    allocate_by_rank,
    allocate_to_budget,
    bit_map_average_bits,
    scope_scores,
)
from .allocator import FairQuantAllocator
from .baq import BAQWeight, BAQWrapper
from .batches import default_groups, default_loss, fairness_penalty, per_sample_loss
from .importance import GroupImportance, compute_group_importance, quantizable_layers
from .qat import FakeQuantWeight, QATResult, attach_fake_quant, detach_fake_quant, fake_quantized, fq_qat
from .reducers import REDUCERS, reduce_groups

__all__ = [
    "ALLOCATION_SCOPES",
    "REDUCERS",
    "BAQWeight",
    "BAQWrapper",
    "FairQuantAllocator",
    "FakeQuantWeight",
    "GroupImportance",
    "QATResult",
    "allocate_by_quantile",
    "allocate_by_rank",
    "allocate_to_budget",
    "attach_fake_quant",
    "bit_map_average_bits",
    "compute_group_importance",
    "default_groups",
    "default_loss",
    "detach_fake_quant",
    "fairness_penalty",
    "fake_quantized",
    "fq_qat",
    "per_sample_loss",
    "quantizable_layers",
    "reduce_groups",
    "scope_scores",
]
