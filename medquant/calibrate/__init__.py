"""Calibration workflows: quantization that runs the model on data (activation-aware scaling, GPTQ, learned rounding,
block-by-block quantization from a checkpoint, block-sharded quantization over several processes).

These sit above :mod:`medquant.quant` (the quantizer, the modules and the one swap) and use it; nothing under
``medquant.quant`` imports from here.
"""
from .adaround import InputQuantizer, adaround_quantize_, attach_input_quantizers, fold_batchnorm_
from .awq import awq_groups, awq_quantize_, awq_quantize_sequential, search_and_fold, search_and_fold_block
from .gptq import (
    HessianAccumulator,
    calibration_records,
    gptq_quantize_,
    gptq_quantize_layer,
    gptq_quantize_sequential,
    gptq_quantize_weight,
)
from .sequential import BlockInputs, CheckpointSource, OutsideLayer, quantize_sequential
from .shards import SHARD_PATTERN, assemble_shards, quantize_shard, shard_blocks

__all__ = [
    "SHARD_PATTERN",
    "BlockInputs",
    "CheckpointSource",
    "HessianAccumulator",
    "InputQuantizer",
    "OutsideLayer",
    "adaround_quantize_",
    "assemble_shards",
    "attach_input_quantizers",
    "awq_groups",
    "awq_quantize_",
    "awq_quantize_sequential",
    "calibration_records",
    "fold_batchnorm_",
    "gptq_quantize_",
    "gptq_quantize_layer",
    "gptq_quantize_sequential",
    "gptq_quantize_weight",
    "quantize_sequential",
    "quantize_shard",
    "search_and_fold",
    "search_and_fold_block",
    "shard_blocks",
]
