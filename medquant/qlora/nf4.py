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
import warnings
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from ..quant.api import (
    carry_hooks,
    names_by_module,
    quantize_module,
    register_quantize_module_handler,
    swap_under_all_names,
)
from .config import NF4Config

__all__ = ["nf4_dequantize_", "nf4_modules", "nf4_quantize_"]


def _bnb():
    try:
        import bitsandbytes as bnb
    except ImportError as exc:  # pragma: no cover - bitsandbytes is a dependency
        raise ImportError("QLoRA needs bitsandbytes (pip install bitsandbytes>=0.45)") from exc
    return bnb


#: bitsandbytes' AVX512-BF16 CPU layout packs 32 output rows at a time over whole 64-weight blocks
_PACK_ROWS, _PACK_COLS = 32, 64


def _packable(mod: nn.Linear) -> bool:
    """Whether bitsandbytes' CPU packing (see :func:`nf4_quantize_`) takes this Linear's shape: ``out_features``
    a multiple of 32 and ``in_features`` a multiple of 64 (other shapes crash inside its converter)."""
    return mod.out_features % _PACK_ROWS == 0 and mod.in_features % _PACK_COLS == 0


def _check_weight(w: torch.Tensor) -> None:
    """The refusals of medquant's ``QuantConfig`` handler: meta, empty and non-finite weights."""
    if w.device.type == "meta":
        raise ValueError("its weight is on the meta device (not loaded): load or materialise the weights first")
    if w.numel() == 0:
        raise ValueError(f"its weight is empty {tuple(w.shape)}: there is nothing to quantize")
    bad = int((~torch.isfinite(w)).sum())
    if bad:
        raise ValueError(f"weights contain {bad} NaN/inf values; quantization needs finite weights")


@register_quantize_module_handler(NF4Config, (nn.Linear,))
def _nf4_linear(mod: nn.Linear, cfg: NF4Config) -> nn.Module:
    """A bitsandbytes ``Linear4bit`` holding ``mod``'s weight, quantized on the weight's device.

    Refuses (``ValueError``) meta, empty and NaN/inf weights, like the ``QuantConfig`` handler: one NaN would make
    its whole block NaN (with double quantization the whole layer, through the mean of the absmax constants). A
    layer whose shape the CPU packing does not take stays in the standard layout (:func:`_packable`)."""
    bnb = _bnb()
    w = mod.weight.detach()
    _check_weight(w)
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
        q.support_avx512bf16_for_cpu = bool(q.support_avx512bf16_for_cpu and cfg.cpu_bf16_packing
                                            and _packable(mod))
    return q


def nf4_quantize_(model: nn.Module, names: Iterable[str], compute_dtype: torch.dtype = torch.float32,
                  double_quant: bool = True, quant_type: str = "nf4", cpu_bf16_packing: bool = False) -> list[str]:
    """Replace the named ``nn.Linear`` modules by bitsandbytes ``Linear4bit`` holding their quantized weights.

    The swap is :class:`NF4Config` through :func:`medquant.quant.quantize_module` and
    :func:`medquant.quant.swap_module`. The weight is wrapped in ``bnb.nn.Params4bit`` and quantized when the module is
    moved to the weight's device (bitsandbytes quantizes on ``.to(device)``, CPU included). Biases stay float and
    frozen; modules that already are ``Linear4bit`` are left alone. A Linear bound under several names (a shared
    module) is quantized once and the one ``Linear4bit`` is bound under all of them, whichever of its names
    ``names`` holds; the new layer runs the Linear's forward / backward hooks (:func:`medquant.quant.carry_hooks`).

    ``cpu_bf16_packing``: on CPUs with AVX512-BF16, bitsandbytes (0.50 here) repacks a ``Linear4bit`` weight at its
    first inference call (eval mode, no grad) into a CPU kernel layout whose block absmax is rounded to bfloat16
    and whose matmul runs in bfloat16. That is faster, but the outputs then depend on the CPU model and differ
    from training-mode outputs. Off by default, so results are the same on every CPU; ``True`` allows it.

    The packing needs ``out_features % 32 == 0`` and ``in_features % 64 == 0``; layers of other shapes stay in the
    standard layout (one warning names them).

    Every layer is quantized before any is swapped in, so an error leaves ``model`` unchanged.

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
        ValueError: a weight is on the meta device, empty, or holds NaN/inf values (the message names the module).
    """
    bnb = _bnb()
    cfg = NF4Config(compute_dtype, double_quant, quant_type, cpu_bf16_packing)
    built: list[tuple[str, nn.Module]] = []
    unpacked = []
    seen: set[int] = set()  # a Linear bound under several names is quantized once
    for name in names:
        mod = model.get_submodule(name)
        if isinstance(mod, bnb.nn.Linear4bit) or id(mod) in seen:
            continue
        seen.add(id(mod))
        if not isinstance(mod, nn.Linear):
            raise TypeError(f"{name} is {type(mod).__name__}, not nn.Linear; only Linear layers are NF4-quantized")
        if cpu_bf16_packing and not _packable(mod):
            unpacked.append(f"{name} ({mod.out_features}x{mod.in_features})")
        built.append((name, quantize_module(mod, cfg, name=name)))
    if unpacked:
        warnings.warn(f"cpu_bf16_packing: {len(unpacked)} layer(s) stay in bitsandbytes' standard layout, as its CPU "
                      f"packing needs out_features % {_PACK_ROWS} == 0 and in_features % {_PACK_COLS} == 0: "
                      f"{', '.join(unpacked[:5])}{', ...' if len(unpacked) > 5 else ''}", UserWarning, stacklevel=2)
    aliases = names_by_module(model)
    for name, q in built:  # under every name of the Linear (a shared one stays one module), with its hooks
        carry_hooks(model.get_submodule(name), q)
        swap_under_all_names(model, name, q, aliases)
    return [name for name, _ in built]


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

    A layer bound under several names becomes one ``nn.Linear`` bound under all of them, with the layer's hooks.

    Args:
        model: the model (modified in place).
        dtype: dtype of the float weights (a floating-point ``torch.dtype``).

    Returns:
        The names of the replaced modules (a shared one under its first name).

    Raises:
        TypeError: ``dtype`` is not a floating-point ``torch.dtype`` (before any layer is replaced).
    """
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"nf4_dequantize_ needs a floating-point torch.dtype (torch.float32, torch.bfloat16, "
                        f"torch.float16, torch.float64), got {type(dtype).__name__} {dtype!r}")
    names = nf4_modules(model)
    aliases = names_by_module(model)
    for name in names:  # under every name of the layer (a shared one stays one module), with its hooks
        old = model.get_submodule(name)
        new = _dequantized_linear(old, dtype)
        carry_hooks(old, new)
        swap_under_all_names(model, name, new, aliases)
    return names
