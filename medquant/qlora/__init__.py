"""QLoRA fine-tuning: a frozen NF4 base through bitsandbytes, LoRA adapters through PEFT.

Each adapted Linear computes ``y = W_nf4 x + (alpha / sqrt(r)) * B A dropout(x)`` (rank-stabilised scaling) with
``W_nf4`` the frozen 4-bit NormalFloat base and ``A``, ``B`` trained; :mod:`medquant.qlora.adapter` has the details."""
from .adapter import (
    DEFAULT_TARGETS,
    NF4Config,
    QLoRAAdapter,
    nf4_dequantize_,
    nf4_modules,
    nf4_quantize_,
    resolve_targets,
    train_loop,
)

__all__ = ["DEFAULT_TARGETS", "NF4Config", "QLoRAAdapter", "nf4_dequantize_", "nf4_modules", "nf4_quantize_",
           "resolve_targets", "train_loop"]
