"""The NF4 base layers of QLoRA: bitsandbytes ``Linear4bit`` in place of ``nn.Linear``, and back.

Each block of 64 weights ``w`` is stored as 4-bit indices ``i`` into the 16 NF4 levels ``q_i`` (quantiles of
N(0, 1) normalised to [-1, 1]) and the block's absmax ``a``: ``w^ = q_i * a`` (double quantization stores the
absmax constants in 8 bits in turn). The forward pass dequantizes to ``compute_dtype`` and runs an ordinary
matmul; bitsandbytes >= 0.45 does this on CPU too. :class:`~medquant.qlora.config.NF4Config` is registered as a
:func:`medquant.quant.register_quantize_module_handler` config, so the one swap of :mod:`medquant.quant.api`
places these layers.
"""
from __future__ import annotations

import copy
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from ..quant.api import quantize_module, register_quantize_module_handler, swap_module
from .config import NF4Config

__all__ = ["nf4_dequantize_", "nf4_modules", "nf4_quantize_"]


def _bnb():
    try:
        import bitsandbytes as bnb
    except ImportError as exc:  # pragma: no cover - bitsandbytes is a dependency
        raise ImportError("QLoRA needs bitsandbytes (pip install bitsandbytes>=0.45)") from exc
    return bnb


@register_quantize_module_handler(NF4Config, (nn.Linear,))
def _nf4_linear(mod: nn.Linear, cfg: NF4Config) -> nn.Module:
    """A bitsandbytes ``Linear4bit`` holding ``mod``'s weight, quantized on the weight's device."""
    bnb = _bnb()
    w = mod.weight.detach()
    device = w.device
    q = bnb.nn.Linear4bit(mod.in_features, mod.out_features, bias=mod.bias is not None,
                          compute_dtype=cfg.compute_dtype, compress_statistics=cfg.double_quant,
                          quant_type=cfg.quant_type, device="meta")
    q.weight = bnb.nn.Params4bit(w.to(torch.float32 if w.dtype == torch.float64 else w.dtype).cpu().clone(),
                                 requires_grad=False, compress_statistics=cfg.double_quant,
                                 quant_type=cfg.quant_type)
    if mod.bias is not None:
        q.bias = nn.Parameter(mod.bias.detach().clone(), requires_grad=False)
    q = q.to(device)
    if hasattr(q, "support_avx512bf16_for_cpu"):
        q.support_avx512bf16_for_cpu = bool(q.support_avx512bf16_for_cpu and cfg.cpu_bf16_packing)
    return q


def nf4_quantize_(model: nn.Module, names: Iterable[str], compute_dtype: torch.dtype = torch.float32,
                  double_quant: bool = True, quant_type: str = "nf4", cpu_bf16_packing: bool = False) -> list[str]:
    """Replace the named ``nn.Linear`` modules by bitsandbytes ``Linear4bit`` holding their quantized weights.

    The swap is :class:`NF4Config` through :func:`medquant.quant.quantize_module` and
    :func:`medquant.quant.swap_module`. The weight is wrapped in ``bnb.nn.Params4bit`` and quantized when the module is
    moved to the weight's device (bitsandbytes quantizes on ``.to(device)``, CPU included). Biases stay float and
    frozen; modules that already are ``Linear4bit`` are left alone.

    ``cpu_bf16_packing``: on CPUs with AVX512-BF16, bitsandbytes (0.50 here) repacks a ``Linear4bit`` weight at its
    first inference call (eval mode, no grad) into a CPU kernel layout whose block absmax is rounded to bfloat16
    and whose matmul runs in bfloat16. That is faster, but the outputs then depend on the CPU model and differ
    from training-mode outputs. Off by default, so results are the same on every CPU; ``True`` allows it.

    Args:
        model: the model (modified in place).
        names: full names of the ``nn.Linear`` modules to quantize.
        compute_dtype: dtype the NF4 layers dequantize to for their matmul.
        double_quant: quantize the block constants too (bitsandbytes double quantization).
        quant_type: ``"nf4"`` or ``"fp4"``.
        cpu_bf16_packing: see above.

    Returns:
        The names of the modules replaced.

    Raises:
        TypeError: a named module is not an ``nn.Linear``.
    """
    bnb = _bnb()
    cfg = NF4Config(compute_dtype, double_quant, quant_type, cpu_bf16_packing)
    done = []
    for name in names:
        mod = model.get_submodule(name)
        if isinstance(mod, bnb.nn.Linear4bit):
            continue
        if not isinstance(mod, nn.Linear):
            raise TypeError(f"{name} is {type(mod).__name__}, not nn.Linear; only Linear layers are NF4-quantized")
        swap_module(model, name, quantize_module(mod, cfg))
        done.append(name)
    return done


def nf4_modules(model: nn.Module) -> list[str]:
    """Names of the bitsandbytes ``Linear4bit`` modules in ``model``.

    Args:
        model: the model.

    Returns:
        The module names.
    """
    bnb = _bnb()
    return [n for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)]


def _canonical_4bit(data: torch.Tensor, state: Any) -> tuple[torch.Tensor, Any]:
    """``(data, quant_state)`` in bitsandbytes' standard layout, undoing its AVX512-BF16 CPU packing (see
    :func:`nf4_quantize_`) without changing the values: the packed state's bfloat16 absmax is used as it is
    (bitsandbytes' own inverse re-quantizes it when double quantization was on). The module is not modified."""
    if not getattr(state, "packing_format_for_cpu", False):
        return data, state
    from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

    st = copy.copy(state)  # shallow: the inverse reassigns fields, never mutates the tensors
    st.original_nested = False  # keep the (bf16) absmax instead of re-quantizing it
    qweight, st = _convert_weight_packed_for_cpu_inverse(data, st)
    st.absmax = state.absmax.T.reshape(-1).float()  # packed as (K / blocksize, N); standard: flat, per block
    st.nested, st.offset, st.state2 = False, None, None
    st.dtype = getattr(state, "original_dtype", torch.float32)
    return qweight, st


def _dequantized_linear(q: nn.Module, dtype: torch.dtype) -> nn.Linear:
    bnb = _bnb()
    data, state = _canonical_4bit(q.weight.data, q.weight.quant_state)
    w = bnb.functional.dequantize_4bit(data, state).to(dtype)
    lin = nn.Linear(q.in_features, q.out_features, bias=q.bias is not None, device=w.device, dtype=dtype)
    with torch.no_grad():
        lin.weight.copy_(w)
        if q.bias is not None:
            lin.bias.copy_(q.bias.to(dtype))
    return lin


def nf4_dequantize_(model: nn.Module, dtype: torch.dtype = torch.float32) -> list[str]:
    """Replace every ``Linear4bit`` in ``model`` by an ``nn.Linear`` holding its dequantized weight.

    Args:
        model: the model (modified in place).
        dtype: dtype of the float weights.

    Returns:
        The names of the replaced modules.
    """
    names = nf4_modules(model)
    for name in names:
        swap_module(model, name, _dequantized_linear(model.get_submodule(name), dtype))
    return names
