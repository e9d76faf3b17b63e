"""Model helpers: which parts of a Hugging Face model are vision tower, projector, language model, head."""

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
    vision_layers,
)

__all__ = [
    "ROLES",
    "WEIGHT_MODULE_TYPES",
    "UnsupportedArchitectureError",
    "language_model_layers",
    "model_roles",
    "modules_in_role",
    "role_of",
    "supported_architectures",
    "unassigned_modules",
    "vision_layers",
]
