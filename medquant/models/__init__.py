"""Model helpers: which parts of a Hugging Face model are vision tower, projector, language model, head
(:mod:`.introspect`); its repeated blocks and their attention / FFN linears (:mod:`.blocks`); running a model on
one batch and reading its main output (:mod:`.runner`); the names transformers gives a checkpoint's stored tensors
while loading it (:mod:`.checkpoint_names`)."""

from .blocks import AttentionUnit, Block, FFNUnit, block_stacks, transformer_blocks
from .checkpoint_names import CheckpointRenaming, checkpoint_renaming
from .introspect import (
    ROLES,
    WEIGHT_MODULE_TYPES,
    UnsupportedArchitectureError,
    language_model_layers,
    model_roles,
    modules_in_role,
    role_of,
    supported_architectures,
    unassigned_modules,
    unassigned_parameters,
    vision_layers,
)
from .runner import eval_mode, main_output, placeholder_token_ids, run_model

__all__ = [
    "ROLES",
    "WEIGHT_MODULE_TYPES",
    "AttentionUnit",
    "Block",
    "CheckpointRenaming",
    "FFNUnit",
    "UnsupportedArchitectureError",
    "block_stacks",
    "checkpoint_renaming",
    "eval_mode",
    "language_model_layers",
    "main_output",
    "model_roles",
    "modules_in_role",
    "placeholder_token_ids",
    "role_of",
    "run_model",
    "supported_architectures",
    "transformer_blocks",
    "unassigned_modules",
    "unassigned_parameters",
    "vision_layers",
]
