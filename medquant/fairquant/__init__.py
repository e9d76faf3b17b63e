"""Fairness-aware mixed-precision quantization: group-conditioned importance, cross-group reducers, budgeted bit
allocation (:class:`FairQuantAllocator`), FQ-QAT fine-tuning, learnable bit-widths (:class:`BAQWrapper`), and
their multi-process versions (:mod:`medquant.fairquant.distributed`)."""
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
from .distributed import (
    all_reduce_importance,
    distributed_group_importance,
    fit_allocator_distributed,
    fit_baq_distributed,
    global_group_objective,
)
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
    "all_reduce_importance",
    "allocate_by_quantile",
    "allocate_by_rank",
    "allocate_to_budget",
    "attach_fake_quant",
    "bit_map_average_bits",
    "compute_group_importance",
    "default_groups",
    "default_loss",
    "detach_fake_quant",
    "distributed_group_importance",
    "fairness_penalty",
    "fake_quantized",
    "fit_allocator_distributed",
    "fit_baq_distributed",
    "fq_qat",
    "global_group_objective",
    "per_sample_loss",
    "quantizable_layers",
    "reduce_groups",
    "scope_scores",
]
