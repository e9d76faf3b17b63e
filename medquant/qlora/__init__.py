"""QLoRA fine-tuning: a frozen NF4 base through bitsandbytes, LoRA adapters through PEFT.

Each adapted Linear computes ``y = W_nf4 x + (alpha / sqrt(r)) * B A dropout(x)`` (rank-stabilised scaling) with
``W_nf4`` the frozen 4-bit NormalFloat base and ``A``, ``B`` trained; :mod:`medquant.qlora.adapter` has the details.

Inside: :mod:`~medquant.qlora.config` (:class:`NF4Config`, the default LoRA targets), :mod:`~medquant.qlora.nf4`
(the NF4 base layers: :func:`nf4_quantize_`, :func:`nf4_dequantize_`), :mod:`~medquant.qlora.adapter` (the
workflow: :class:`QLoRAAdapter`, :func:`train_loop`)."""
from .adapter import QLoRAAdapter, resolve_targets, train_loop
from .config import DEFAULT_TARGETS, NF4Config
from .nf4 import nf4_dequantize_, nf4_modules, nf4_quantize_

__all__ = ["DEFAULT_TARGETS", "NF4Config", "QLoRAAdapter", "nf4_dequantize_", "nf4_modules", "nf4_quantize_",
           "resolve_targets", "train_loop"]
