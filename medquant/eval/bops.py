"""Efficiency metrics of a compressed model: average bits, stored bytes, MACs and BOPs.

* ``average_bits(model)`` - parameter-weighted mean nominal bit-width of the Linear / Conv2d weights
  (:func:`medquant.model_size`'s ``effective_bits``; float layers count their dtype's width).
* ``stored_bytes(model)`` - every byte a saved model holds (:func:`medquant.model_size`'s ``total_bytes``).
* ``count_macs(model, *args, **kwargs)`` - one forward pass with hooks on every Linear / Conv2d (float or
  quantized) on the sample input you give, counting MACs with the real number of tokens / output positions:
  Linear: ``tokens * in * out`` where ``tokens`` = every leading position of the input (batch x sequence);
  Conv2d: ``output positions (batch x H_out x W_out) * out_ch * (in_ch / groups) * kh * kw``;
  ``nn.MultiheadAttention`` (whose projections run functionally, not as modules) gives two rows:
  ``<name>.in_proj`` = ``query tokens * E * E + key tokens * kdim * E + value tokens * vdim * E`` (the q, k, v
  projections: ``in_proj_weight``, or ``q/k/v_proj_weight`` when ``kdim`` / ``vdim`` differ from ``E``) and
  ``<name>.out_proj`` = ``query tokens * E * E``. Pass one sample (batch 1) to get per-image numbers. Matmuls
  that are not Linear / Conv2d (attention scores) are not counted: they have no weights to quantize.
* ``bops(...)`` = ``sum over layers of MACs * weight bits * activation bits``; a mixed-precision layer uses the
  mean of its row bit-widths (every row has the same MACs). ``act_bits`` defaults to 32: FairQuant quantizes
  weights only.
* ``proxy_bops(model)`` - the authors' proxy: one MAC per weight (``params * weight bits * act bits``; an
  ``nn.MultiheadAttention``'s in-projection weights count as one more layer). It ignores
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
        return float(m.row_bits().double().mean())  # float64: a float32 mean of e.g. 41/6 is off by 1e-8
    w = cast(torch.Tensor, m.weight)  # a parametrized (fake-quant) layer still reports its float dtype here
    return float(w.element_size() * 8)


def _is_layer(m: nn.Module) -> bool:
    return isinstance(m, (nn.Linear, nn.Conv2d) + QUANT_MODULES)


def _in_proj_weights(m: nn.MultiheadAttention) -> list[torch.Tensor]:
    """The q, k, v projection weights of ``m``: the fused ``in_proj_weight`` or the three separate ones."""
    if m.in_proj_weight is not None:
        return [m.in_proj_weight]
    return [w for w in (m.q_proj_weight, m.k_proj_weight, m.v_proj_weight) if w is not None]


def _in_proj_bits(m: nn.MultiheadAttention) -> float:
    """Parameter-weighted bits per weight of the in-projection (its dtype width: it is never a quantized layer)."""
    ws = _in_proj_weights(m)
    return sum(w.numel() * w.element_size() * 8 for w in ws) / max(sum(w.numel() for w in ws), 1)


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
        One :class:`LayerCost` per Linear / Conv2d layer that ran, and two (``<name>.in_proj``,
        ``<name>.out_proj``) per ``nn.MultiheadAttention`` that ran.

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
            add(name, type(mod).__name__, macs, _weight_bits(mod), params)
        return fn

    def add(name, kind, macs, bits, params):
        prev = rows.get(name)
        total = macs + (prev.macs if prev else 0)  # a layer called twice counts twice
        rows[name] = LayerCost(name, kind, int(total), bits, int(params))

    def attention_hook(name):
        def fn(mod, args, kwargs, out):
            q, k, v = (list(args) + [kwargs.get(key) for key in ("query", "key", "value")[len(args):]])[:3]
            e = mod.embed_dim
            tq, tk, tv = q.numel() // e, k.numel() // mod.kdim, v.numel() // mod.vdim  # tokens (batch x sequence)
            in_params = e * e + e * mod.kdim + e * mod.vdim
            add(f"{name}.in_proj", type(mod).__name__, tq * e * e + tk * mod.kdim * e + tv * mod.vdim * e,
                _in_proj_bits(mod), in_params)
            add(f"{name}.out_proj", type(mod.out_proj).__name__, tq * e * e, _weight_bits(mod.out_proj), e * e)
        return fn

    # nn.MultiheadAttention runs its projections functionally: it is counted by a hook of its own, and its
    # out_proj Linear (never called as a module) is left to that hook
    attention = {name: m for name, m in model.named_modules() if isinstance(m, nn.MultiheadAttention)}
    inside = {id(m.out_proj) for m in attention.values()}
    for name, m in model.named_modules():
        if name in attention:
            hooks.append(m.register_forward_hook(attention_hook(name), with_kwargs=True))
        elif _is_layer(m) and id(m) not in inside:
            hooks.append(m.register_forward_hook(hook(name)))
    if not hooks:
        raise ValueError(f"{type(model).__name__} has no Linear / Conv2d / MultiheadAttention layers to count")
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

    Linear / Conv2d layers count their weights; an ``nn.MultiheadAttention`` also counts its in-projection
    weights (its ``out_proj`` is a Linear, counted as such).

    Args:
        model: the model.
        act_bits: activation bits.

    Returns:
        The proxy bit operations.
    """
    total = 0.0
    for m in model.modules():
        if isinstance(m, QUANT_MODULES):
            total += float(m.row_bits().double().sum()) * m.k * act_bits
        elif isinstance(m, (nn.Linear, nn.Conv2d)):
            total += m.weight.numel() * _weight_bits(m) * act_bits
        elif isinstance(m, nn.MultiheadAttention):
            total += sum(w.numel() * w.element_size() * 8 for w in _in_proj_weights(m)) * act_bits
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
