"""Structured pruning: remove attention heads, FFN neurons and CNN channels physically.

``StructuredPruner`` scores structures (weight magnitude, first-order Taylor ``|sum g*theta|``, activation
statistics weighted by the outgoing weights), removes the lowest scoring ``floor(r*n + 0.5)`` of each layer's ``n``
and updates head/neuron counts and configs. ``block_influence`` scores how much each block changes its input
(``1 - cos(x, y)`` and the Wasserstein-1 distance of the value distributions divided by ``std(x)``);
``allocate_ratios`` / ``least_influential`` turn those scores into per-layer ratios or whole blocks to drop.
``save_pruned`` / ``load_pruned`` round-trip models with per-layer shapes. The blocks and their attention / FFN
units come from :func:`medquant.models.transformer_blocks`. See docs/guides/pruning.md.
"""
from ..models.blocks import AttentionUnit, Block, FFNUnit
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
    "influence_table",
    "least_influential",
    "load_pruned",
    "parameter_report",
    "plot_influence",
    "save_pruned",
    "shape_table",
]
