"""Efficiency metrics of a compressed model: average bits, stored bytes, MACs and BOPs.

* ``average_bits(model)`` - parameter-weighted mean nominal bit-width of the Linear / Conv2d weights
  (:func:`medquant.model_size`'s ``effective_bits``; float layers count their dtype's width).
* ``stored_bytes(model)`` - every byte a saved model holds (:func:`medquant.model_size`'s ``total_bytes``).
* ``count_macs(model, *args, **kwargs)`` - one forward pass with hooks on every Linear / Conv2d (float or
  quantized) on the sample input you give, counting MACs with the real number of tokens / output positions:
  Linear: ``tokens * in * out`` where ``tokens`` = every leading position of the input (batch x sequence);
  Conv2d: ``output positions (batch x H_out x W_out) * out_ch * (in_ch / groups) * kh * kw``.
  Pass one sample (batch 1) to get per-image numbers. Matmuls that are not Linear / Conv2d (attention scores)
  are not counted: they have no weights to quantize.
* ``bops(...)`` = ``sum over layers of MACs * weight bits * activation bits``; a mixed-precision layer uses the
  mean of its row bit-widths (every row has the same MACs). ``act_bits`` defaults to 32: FairQuant quantizes
  weights only.
* ``proxy_bops(model)`` - the authors' proxy: one MAC per weight (``params * weight bits * act bits``). It ignores
  the number of tokens of a ViT and the output positions of a convolution, so it understates those layers by the
  token count; medquant reports ``bops`` and, for comparison only, this proxy.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import nn

from ..quant.modules import QUANT_MODULES, QuantConv2d
from ..quant.size import model_size


def average_bits(model: nn.Module) -> float:
    """Effective weight bits per parameter of ``model`` (scales included), as :func:`medquant.quant.model_size`.

    Args:
        model: any model, quantized or not.

    Returns:
        ``model_size(model).effective_bits``.
    """
    return model_size(model).effective_bits


def stored_bytes(model: nn.Module) -> int:
    """Bytes ``model`` takes when saved: every tensor and the metadata, as :func:`medquant.quant.model_size`.

    Args:
        model: any model, quantized or not.

    Returns:
        ``model_size(model).total_bytes``.
    """
    return model_size(model).total_bytes


def _weight_bits(m: nn.Module) -> float:
    """Mean nominal bits per weight of a Linear / Conv2d (quantized: row bits; float: dtype width)."""
    if isinstance(m, QUANT_MODULES):
        return float(m.row_bits().float().mean())
    w = cast(torch.Tensor, m.weight)  # a parametrized (fake-quant) layer still reports its float dtype here
    return float(w.element_size() * 8)


def _is_layer(m: nn.Module) -> bool:
    return isinstance(m, (nn.Linear, nn.Conv2d) + QUANT_MODULES)


@dataclass
class LayerCost:
    """One Linear / Conv2d layer's cost in a forward pass (a row of :func:`count_macs`).

    Attributes:
        name: the module name.
        kind: the module class name (``"Linear"``, ``"Conv2d"``, ``"QuantLinear"``...).
        macs: multiply-accumulates in the forward pass on the given input.
        weight_bits: mean nominal bits per weight (row bits for quantized layers, the dtype width otherwise).
        params: weight parameters.
    """

    name: str
    kind: str
    macs: int
    weight_bits: float
    params: int


def count_macs(model: nn.Module, *args: Any, **kwargs: Any) -> list[LayerCost]:
    """Per-layer MACs of one forward pass on the given input (module docstring). Runs under ``no_grad``.

    Args:
        model: the model.
        *args: the forward inputs.
        **kwargs: the forward keyword inputs.

    Returns:
        One :class:`LayerCost` per Linear / Conv2d layer that ran.

    Raises:
        ValueError: the model has no Linear / Conv2d layer.
    """
    rows: dict[str, LayerCost] = {}
    hooks = []

    def hook(name):
        def fn(mod, inp, out):
            y = out if isinstance(out, torch.Tensor) else out[0]
            if isinstance(mod, (nn.Conv2d, QuantConv2d)):
                k = (mod.in_channels // mod.groups) * mod.kernel_size[0] * mod.kernel_size[1]
                macs = y.numel() * k  # positions * out_ch * k
                params = mod.out_channels * k
            else:
                macs = y.numel() * mod.in_features  # tokens * out * in
                params = mod.out_features * mod.in_features
            prev = rows.get(name)
            total = macs + (prev.macs if prev else 0)  # a layer called twice counts twice
            rows[name] = LayerCost(name, type(mod).__name__, int(total), _weight_bits(mod), int(params))
        return fn

    for name, m in model.named_modules():
        if _is_layer(m):
            hooks.append(m.register_forward_hook(hook(name)))
    if not hooks:
        raise ValueError(f"{type(model).__name__} has no Linear / Conv2d layers to count")
    try:
        with torch.no_grad():
            model(*args, **kwargs)
    finally:
        for h in hooks:
            h.remove()
    return list(rows.values())


def bops(model: nn.Module, *args: Any, act_bits: int = 32, **kwargs: Any) -> float:
    """``sum_layers MACs * weight bits * act_bits`` for one forward pass on the given input.

    Args:
        model: the model (quantized layers count their row bits, float layers their dtype width).
        *args: the forward inputs.
        act_bits: activation bits.
        **kwargs: the forward keyword inputs.

    Returns:
        The bit operations of one forward pass.
    """
    return float(sum(r.macs * r.weight_bits * act_bits for r in count_macs(model, *args, **kwargs)))


def proxy_bops(model: nn.Module, act_bits: int = 32) -> float:
    """The authors' proxy ``sum_layers params * weight bits * act_bits`` (ignores tokens / output positions).

    Args:
        model: the model.
        act_bits: activation bits.

    Returns:
        The proxy bit operations.
    """
    total = 0.0
    for m in model.modules():
        if isinstance(m, QUANT_MODULES):
            total += float(m.row_bits().float().sum()) * m.k * act_bits
        elif isinstance(m, (nn.Linear, nn.Conv2d)):
            total += m.weight.numel() * _weight_bits(m) * act_bits
    return total


def model_size_summary(model: nn.Module, sample: Any, act_bits: int = 32) -> dict[str, float]:
    """``{"avg_bits", "bytes", "bops", "proxy_bops"}`` for one forward pass on ``sample`` (one input).

    Args:
        model: the model.
        sample: one forward input, passed as ``model(sample)``.
        act_bits: activation bits.

    Returns:
        The four numbers as a dict.
    """
    rep = model_size(model)
    return {"avg_bits": rep.effective_bits, "bytes": rep.total_bytes, "bops": bops(model, sample, act_bits=act_bits),
            "proxy_bops": proxy_bops(model, act_bits)}
