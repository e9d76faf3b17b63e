"""QLoRA fine-tuning (SPEC section 7): NF4 base through bitsandbytes, LoRA adapters through PEFT."""
from .adapter import (
    DEFAULT_TARGETS,
    QLoRAAdapter,
    nf4_dequantize_,
    nf4_modules,
    nf4_quantize_,
    resolve_targets,
    train_loop,
)

__all__ = ["DEFAULT_TARGETS", "QLoRAAdapter", "nf4_dequantize_", "nf4_modules", "nf4_quantize_",
           "resolve_targets", "train_loop"]
