"""Configuration of QLoRA: the NF4 base-weight format (:class:`NF4Config`) and the default LoRA targets.

The LoRA settings themselves (rank ``r``, ``lora_alpha``, ``lora_dropout``, rsLoRA, targets and roles) are the
keyword arguments of :class:`medquant.qlora.QLoRAAdapter`, recorded in its ``settings`` and saved with the adapter.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["DEFAULT_TARGETS", "NF4Config"]

#: the Linear layers LoRA adapts by default: the language model's attention and MLP projections (last name part)
DEFAULT_TARGETS: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class NF4Config:
    """bitsandbytes 4-bit weights for ``nn.Linear`` layers, as a :func:`medquant.quant.quantize_` config.

    The handler registered for this type (:func:`medquant.quant.register_quantize_module_handler`, in
    :mod:`medquant.qlora.nf4`) turns a Linear into a bitsandbytes ``Linear4bit``; :func:`~medquant.qlora.nf4_quantize_`
    applies it by name. Each block of 64 weights ``w`` is stored as 4-bit indices ``i`` into 16 levels ``q_i`` (NF4:
    quantiles of N(0, 1) normalised to [-1, 1]; FP4: a 4-bit float grid) and the block's absmax ``a``:
    ``w^ = q_i * a``; ``double_quant`` quantizes the absmax constants to 8 bits in turn.

    Attributes:
        compute_dtype: the dtype the forward pass dequantizes to (float32, bfloat16 or float16).
        double_quant: quantize the block constants too.
        quant_type: ``"nf4"`` or ``"fp4"``.
        cpu_bf16_packing: let bitsandbytes repack for its AVX512-BF16 CPU kernel (see
            :func:`~medquant.qlora.nf4_quantize_`); layers with ``out_features % 32`` or ``in_features % 64`` not 0
            stay in the standard layout, which that kernel's packing does not take.

    Use it like any :func:`medquant.quantize_` config (``quantize_(model, {"@language": NF4Config()})``); its
    handler takes ``nn.Linear`` layers and refuses meta, empty and NaN/inf weights with ``ValueError``.

    Raises:
        ValueError: ``quant_type`` or ``compute_dtype`` not one of the accepted values.
    """

    compute_dtype: torch.dtype = torch.float32
    double_quant: bool = True
    quant_type: str = "nf4"
    cpu_bf16_packing: bool = False

    def __post_init__(self) -> None:
        if self.quant_type not in ("nf4", "fp4"):
            raise ValueError(f"quant_type must be 'nf4' or 'fp4', got {self.quant_type!r}")
        if self.compute_dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise ValueError(f"compute_dtype must be torch.float32, bfloat16 or float16, got {self.compute_dtype}")
