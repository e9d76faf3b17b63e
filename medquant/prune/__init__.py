"""Structured pruning: remove attention heads, FFN neurons and CNN channels physically (SPEC section 5).

``StructuredPruner`` scores structures (magnitude, first-order Taylor, activation statistics), removes them and
updates head/neuron counts and configs; ``block_influence`` / ``allocate_ratios`` / ``least_influential`` choose
per-layer ratios or whole blocks from calibration activations (seed 004); ``save_pruned`` / ``load_pruned``
round-trip models with per-layer shapes. See docs/pruning.md.
"""
from .arch import AttentionUnit, Block, FFNUnit, find_blocks
from .importance import METHODS as IMPORTANCE_METHODS
from .io import load_pruned, save_pruned, shape_table
from .layers import (
    allocate_ratios,
    block_influence,
    drop_blocks,
    influence_table,
    least_influential,
    plot_influence,
)
from .pruner import PrunePlan, StructuredPruner, apply_plan, parameter_report

__all__ = [
    "IMPORTANCE_METHODS",
    "AttentionUnit",
    "Block",
    "FFNUnit",
    "PrunePlan",
    "StructuredPruner",
    "allocate_ratios",
    "apply_plan",
    "block_influence",
    "drop_blocks",
    "find_blocks",
    "influence_table",
    "least_influential",
    "load_pruned",
    "parameter_report",
    "plot_influence",
    "save_pruned",
    "shape_table",
]
