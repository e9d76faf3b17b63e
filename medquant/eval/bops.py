"""Efficiency metrics of a compressed model: average bits, stored bytes, MACs and BOPs.

* ``average_bits(model)`` - parameter-weighted mean nominal bit-width of the weights of the layers ``count_macs``
  counts below (:func:`medquant.model_size`'s ``effective_bits``: quantized rows their bits, float layers their
  dtype's width, bitsandbytes NF4 4; scales and other per-group constants not included).
* ``stored_bytes(model)`` - every byte a saved model holds (:func:`medquant.model_size`'s ``total_bytes``).
* ``count_macs(model, *args, **kwargs)`` - one forward pass with hooks on every weight layer (Linear / Conv2d,
  float or quantized; and the layers ``quantize_`` leaves in floating point: ``nn.Conv1d`` / ``nn.Conv3d``,
  ``nn.ConvTranspose1d/2d/3d`` and transformers' ``Conv1D`` of GPT-2) on the sample input you give, counting MACs
  with the real number of tokens / output positions:
  Linear (and transformers' ``Conv1D``, weight ``in x out``): ``tokens * in * out`` where ``tokens`` = every
  leading position of the input (batch x sequence);
  Conv1d / Conv2d / Conv3d: ``output positions (batch x spatial output size) * out_ch * (in_ch / groups) *
  prod(kernel size)`` (stride, padding and dilation act through the output size);
  ConvTranspose: ``input positions (batch x spatial input size) * in_ch * (out_ch / groups) * prod(kernel size)``
  (each input value meets every weight of its group once: the MACs of the convolution it transposes);
  ``nn.MultiheadAttention`` (whose projections run functionally, not as modules) gives two rows:
  ``<name>.in_proj`` = ``query tokens * E * E + key tokens * kdim * E + value tokens * vdim * E`` (the q, k, v
  projections: ``in_proj_weight``, or ``q/k/v_proj_weight`` when ``kdim`` / ``vdim`` differ from ``E``) and
  ``<name>.out_proj`` = ``query tokens * E * E``. Pass one sample (batch 1) to get per-image numbers. Matmuls
  without weights (attention scores, ``q @ k^T`` and ``attn @ v``) are not counted.
  A float mixture-of-experts module with 3-D expert weights (transformers 5: ``gate_up_proj`` / ``up_proj`` and
  ``down_proj``, :func:`medquant.quant.experts.experts_layout`) gives one row, ``<name>`` =
  ``routed token-expert pairs * (H * U + I * H)`` (``U = 2I`` with a gate, ``I`` without; routed style: the
  ``top_k_index`` entries below the number of experts ``E``; dense style (Llama 4): ``E x`` the tokens, every
  expert sees every token), as its quantized form (one quantized Linear per expert, called on its routed tokens)
  counts; its parameters are ``E * (H * U + I * H)``, its bits the dtype width of the stacked weights.
* ``bops(...)`` = ``sum over layers of MACs * weight bits * activation bits``; a mixed-precision layer uses the
  mean of its row bit-widths (every row has the same MACs; pruned rows count 0 bits, float rows 16 / 32); a
  layer medquant did not quantize uses its weight tensor's bits per weight: the dtype width of a float layer
  (32, or 16 for fp16 / bf16), 4 for QLoRA's bitsandbytes NF4 ``Linear4bit`` (two codes per uint8; absmax
  constants not counted, as medquant's scales are not). ``act_bits`` defaults to 32: FairQuant quantizes
  weights only.
* ``proxy_bops(model)`` - the authors' proxy: one MAC per weight (``params * weight bits * act bits`` over the
  layers ``count_macs`` counts; an ``nn.MultiheadAttention``'s in-projection weights and a float experts module's
  stacked expert weights count as one more layer each).
  It ignores the number of tokens of a ViT and the output positions of a convolution, so it understates those
  layers by the token count; medquant reports ``bops`` and, for comparison only, this proxy.
"""
from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..quant.experts import experts_layout
from ..quant.modules import QUANT_MODULES, QuantConv2d
from ..quant.size import (
    is_hf_conv1d,
    is_weight_layer,
    mha_in_proj_weights,
    model_size,
    weight_layer_bits,
    weight_layer_params,
)


def average_bits(model: nn.Module) -> float:
    """Nominal weight bits per parameter of ``model`` (scales not included), as :func:`medquant.quant.model_size`.

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
    """Mean nominal bits per weight of a weight layer: quantized, its row bits; otherwise the weight tensor's bits
    per weight (:func:`medquant.quant.size.weight_layer_bits`: the dtype width for a float layer, 4 for a
    bitsandbytes NF4 ``Linear4bit`` whose uint8 tensor packs two codes)."""
    if isinstance(m, QUANT_MODULES):
        return float(m.row_bits().double().mean())  # float64: a float32 mean of e.g. 41/6 is off by 1e-8
    return weight_layer_bits(m)  # a parametrized (fake-quant) layer still reports its float dtype here


def _is_layer(m: nn.Module) -> bool:
    return isinstance(m, QUANT_MODULES) or is_weight_layer(m)


def _in_proj_bits(m: nn.MultiheadAttention) -> float:
    """Parameter-weighted bits per weight of the in-projection (its dtype width: it is never a quantized layer)."""
    ws = list(mha_in_proj_weights(m).values())
    return sum(w.numel() * w.element_size() * 8 for w in ws) / max(sum(w.numel() for w in ws), 1)


def _experts_weights(m: nn.Module, lay: dict[str, Any]) -> list[torch.Tensor]:
    """The stacked 3-D expert weights of a float experts module (biases excluded)."""
    return [getattr(m, "gate_up_proj" if lay["gate"] else "up_proj"), m.down_proj]


def _experts_params(lay: dict[str, Any]) -> int:
    """``E * (H * U + I * H)``: the expert weights of a float experts module, ``U = 2I`` with a gate, else ``I``."""
    h, i = lay["hidden"], lay["inter"]
    return lay["num_experts"] * (h * (2 * i if lay["gate"] else i) + i * h)


@dataclass
class LayerCost:
    """One weight layer's cost in a forward pass (a row of :func:`count_macs`).

    Attributes:
        name: the module name.
        kind: the module class name (``"Linear"``, ``"Conv2d"``, ``"QuantLinear"``...).
        macs: multiply-accumulates in the forward pass on the given input, every output row counted (the pruned,
            0-bit rows of a quantized layer too: :func:`bops` weighs them by their 0 bits).
        weight_bits: mean nominal bits per weight (row bits for quantized layers, pruned rows 0; otherwise the
            weight tensor's bits per weight: the dtype width, 4 for a bitsandbytes NF4 ``Linear4bit``).
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
        One :class:`LayerCost` per weight layer and per float experts module that ran (module docstring), and two
        (``<name>.in_proj``, ``<name>.out_proj``) per ``nn.MultiheadAttention`` that ran.

    Raises:
        ValueError: the model has no weight layer (Linear, convolution, ``nn.MultiheadAttention``, float experts
            module) to count.
    """
    rows: dict[str, LayerCost] = {}
    hooks = []

    def hook(name):
        def fn(mod, inp, out):
            y = out if isinstance(out, torch.Tensor) else out[0]
            if isinstance(mod, nn.modules.conv._ConvTransposeNd):
                per_input = (mod.out_channels // mod.groups) * math.prod(mod.kernel_size)
                macs = inp[0].numel() * per_input  # input positions * in_ch * (out_ch / groups) * kernel
                params = mod.in_channels * per_input
            elif isinstance(mod, (nn.modules.conv._ConvNd, QuantConv2d)):
                k = (mod.in_channels // mod.groups) * math.prod(mod.kernel_size)
                macs = y.numel() * k  # positions * out_ch * k
                params = mod.out_channels * k
            elif is_hf_conv1d(mod):  # weight (in, out)
                macs = y.numel() * mod.weight.shape[0]
                params = mod.weight.numel()
            else:
                macs = y.numel() * mod.in_features  # tokens * out * in
                params = mod.out_features * mod.in_features  # not weight.numel(): a packed NF4 weight is half that
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

    def experts_hook(name, m, lay):
        h = lay["hidden"]
        per_pair = _experts_params(lay) // lay["num_experts"]  # one expert on one token
        ws = _experts_weights(m, lay)
        bits = sum(w.numel() * w.element_size() * 8 for w in ws) / max(sum(w.numel() for w in ws), 1)

        def fn(mod, args, kwargs, out):
            if lay["style"] == "dense":  # (E * T, H): every expert on every token
                pairs = args[0].numel() // h if args else kwargs["hidden_states"].numel() // h
            else:  # (hidden_states, top_k_index, top_k_weights); E is the expert-parallel sentinel
                idx = args[1] if len(args) > 1 else kwargs[list(inspect.signature(mod.forward).parameters)[1]]
                pairs = int((idx < lay["num_experts"]).sum())
            add(name, type(mod).__name__, pairs * per_pair, bits, _experts_params(lay))
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
        elif (lay := experts_layout(m)) is not None:
            hooks.append(m.register_forward_hook(experts_hook(name, m, lay), with_kwargs=True))
    if not hooks:
        raise ValueError(f"{type(model).__name__} has no Linear / convolution / MultiheadAttention / "
                         "experts layers to count")
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
        model: the model (quantized layers count their row bits, float layers their dtype width, NF4 layers 4).
        *args: the forward inputs.
        act_bits: activation bits.
        **kwargs: the forward keyword inputs.

    Returns:
        The bit operations of one forward pass.
    """
    return float(sum(r.macs * r.weight_bits * act_bits for r in count_macs(model, *args, **kwargs)))


def proxy_bops(model: nn.Module, act_bits: int = 32) -> float:
    """The authors' proxy ``sum_layers params * weight bits * act_bits`` (ignores tokens / output positions).

    The layers :func:`count_macs` counts (Linear, convolutions, transformers' ``Conv1D``) count their weights; an
    ``nn.MultiheadAttention`` also counts its in-projection weights (its ``out_proj`` is a Linear, counted as such),
    and a float experts module its stacked 3-D expert weights (``E`` expert matrices per projection).

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
        elif _is_layer(m):
            total += weight_layer_params(m) * _weight_bits(m) * act_bits
        elif isinstance(m, nn.MultiheadAttention):
            total += sum(w.numel() * w.element_size() * 8 for w in mha_in_proj_weights(m).values()) * act_bits
        elif (lay := experts_layout(m)) is not None:
            total += sum(w.numel() * w.element_size() * 8 for w in _experts_weights(m, lay)) * act_bits
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
