"""The recipe of a quantized layer: one writer (:func:`layer_recipe`) and one reader (:func:`layer_from_recipe`).

A recipe is the JSON-serialisable dict that, together with the layer's tensors, rebuilds a
:class:`~medquant.QuantLinear` or :class:`~medquant.QuantConv2d` exactly. It is what ``medquant.json``
(:func:`medquant.save`), the transformers ``quantization_config.modules`` (:func:`medquant.hf.save_pretrained`)
and the shards of :func:`medquant.calibrate.quantize_shard` record for every quantized module. Its keys, in
this order (FORMAT_VERSION 1)::

    type          "QuantLinear" | "QuantConv2d"
    config        QuantConfig.to_dict(): bits, symmetric, scope, group_size, scale_dtype, channel_bits, and
                  compute_dtype when the config sets one (the CPU kernels' activation dtype, kept by a load)
    bias          whether the layer has a bias
    in_features, out_features                                    (QuantLinear)
    in_channels, out_channels, kernel_size, stride, padding,     (QuantConv2d; lists, padding may be a string)
    dilation, groups
    dtype         dtype of the bias ("float32" without bias)
    weight_dtype  dtype of the dequantized weight (only with ``weight_dtype=True``; the transformers config and
                  the shards write it, ``medquant.json`` does not)
    padding_idx   (QuantEmbedding only, when set) its padding index; a QuantEmbedding records its table
                  ``(num_embeddings, embedding_dim)`` as ``out_features`` / ``in_features``, ``bias`` false
    tied_to       (model recipes only) the QuantEmbedding whose packed tensors this QuantLinear head shares
    layout        2 when the layer stores 3/5/6/7-bit rows in the dense layout (FORMAT_VERSION 2, see
                  :mod:`medquant.kernels.layout`); absent otherwise, and an absent key reads as 1 (4/8-bit
                  containers), so every recipe written before reads as before

The reader builds an *empty shell*: the layer with every buffer allocated at the shapes the recipe implies
(packed codes, scales, zeros, float rows, bit map) and filled with placeholders, ready for a state dict to be
loaded into it. The recipe fixes the shape of every stored tensor: rows of ``b`` bits (1..8) hold unsigned codes
``u`` with scales ``s`` (and zero points ``z`` when asymmetric), and compute with ``w^ = (u - z) * s``, where

* symmetric: ``s = max|w| / (2^(b-1) - 1)``, ``z = 2^(b-1)`` (not stored), ``u = clamp(round(w/s), -(2^(b-1) - 1),
  2^(b-1) - 1) + 2^(b-1)``;
* asymmetric: ``min' = min(min w, 0)``, ``max' = max(max w, 0)``, ``s = (max' - min') / (2^b - 1)``,
  ``z = round(-min'/s)``, ``u = clamp(round(w/s) + z, 0, 2^b - 1)``

over each scale group (the tensor, a row, or ``group_size`` consecutive elements of a row); see
:mod:`medquant.quant.core` for the 1-bit case and the epsilon guarding all-zero groups.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from .config import QuantConfig
from .modules import QUANT_LAYERS, QuantConv2d, QuantEmbedding, QuantLinear, tied_heads

__all__ = ["RECIPE_TYPES", "RecipeError", "bit_map_matches", "layer_from_recipe", "layer_recipe", "model_recipe",
           "shared_modules"]

RECIPE_TYPES: dict[str, type[nn.Module]] = {"QuantLinear": QuantLinear, "QuantConv2d": QuantConv2d,
                                            "QuantEmbedding": QuantEmbedding}
_FLOAT_DTYPES = ("float32", "float16", "bfloat16", "float64")
_LINEAR_KEYS = ("in_features", "out_features")
_CONV_KEYS = ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups")


class RecipeError(ValueError):
    """A layer recipe is malformed: unknown type, missing or ill-typed field, invalid QuantConfig."""


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def layer_recipe(module: nn.Module, *, weight_dtype: bool = False) -> dict[str, Any]:
    """The recipe of one QuantLinear / QuantConv2d / QuantEmbedding (see the module docstring for its keys).

    Args:
        module: the quantized layer.
        weight_dtype: also record the dtype of the dequantized weight (``"weight_dtype"``), as the transformers
            config and the shards do.

    Returns:
        The JSON-ready recipe dict (``type``, ``config``, ``bias``, shapes, ``dtype``, optional ``weight_dtype``
        and ``layout``).

    Raises:
        TypeError: ``module`` is not a QuantLinear, QuantConv2d or QuantEmbedding.
    """
    if not isinstance(module, QUANT_LAYERS):
        raise TypeError(f"layer_recipe expects a QuantLinear, QuantConv2d or QuantEmbedding, got "
                        f"{type(module).__name__}")
    m = module
    entry: dict[str, Any] = {"type": type(m).__name__, "config": m.config.to_dict(), "bias": m.bias is not None}
    if isinstance(m, QuantEmbedding):
        entry.update(in_features=m.embedding_dim, out_features=m.num_embeddings)
        if m.padding_idx is not None:
            entry["padding_idx"] = m.padding_idx
    elif isinstance(m, QuantLinear):
        entry.update(in_features=m.in_features, out_features=m.out_features)
    else:
        entry.update(in_channels=m.in_channels, out_channels=m.out_channels,
                     kernel_size=list(m.kernel_size), stride=list(m.stride),
                     padding=m.padding if isinstance(m.padding, str) else list(m.padding),
                     dilation=list(m.dilation), groups=m.groups)
    entry["dtype"] = _dtype_name(m.bias.dtype) if m.bias is not None else (
        _dtype_name(m.weight_dtype) if isinstance(m, QuantEmbedding) else "float32")
    if weight_dtype:
        entry["weight_dtype"] = _dtype_name(m.weight_dtype)
    if m.stores_dense:
        entry["layout"] = 2
    return entry


def model_recipe(model: nn.Module, *, weight_dtype: bool = False) -> dict[str, dict[str, Any]]:
    """Module name -> :func:`layer_recipe` of every quantized layer of ``model``, in ``named_modules`` order.

    A QuantLinear head sharing a QuantEmbedding's packed tensors records ``"tied_to": <embedding name>``.

    Args:
        model: the (partly) quantized model.
        weight_dtype: record each layer's dequantized-weight dtype too (see :func:`layer_recipe`).

    Returns:
        ``{module name: recipe}``; empty when nothing is quantized.
    """
    kinds = QUANT_LAYERS
    named = [(name, m) for name, m in model.named_modules() if isinstance(m, kinds)]
    out = {name: layer_recipe(m, weight_dtype=weight_dtype) for name, m in named}
    for name, ename in tied_heads(model).items():
        out[name]["tied_to"] = ename
    return out


def shared_modules(model: nn.Module) -> dict[str, str]:
    """Every further name of a quantized layer registered under several names -> its first name.

    :func:`model_recipe` lists a shared layer once, under its first name in ``named_modules`` order (and the weights
    file holds its tensors once); a load binds the other names to the same rebuilt layer.

    Args:
        model: the (partly) quantized model.

    Returns:
        ``{alias: first name}``; empty when no quantized layer is shared.
    """
    first: dict[int, str] = {}
    out: dict[str, str] = {}
    for name, m in model.named_modules(remove_duplicate=False):
        if not isinstance(m, QUANT_LAYERS):
            continue
        if id(m) in first:
            out[name] = first[id(m)]
        else:
            first[id(m)] = name
    return out


def _int(entry: Mapping, key: str, minimum: int = 1) -> int:
    v = entry[key]
    if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
        raise RecipeError(f"{key!r} must be an integer >= {minimum}, got {v!r}")
    return v


def _pair(entry: Mapping, key: str, minimum: int) -> tuple[int, int]:
    v = entry[key]
    if isinstance(v, int) and not isinstance(v, bool):
        v = [v, v]
    if not isinstance(v, (list, tuple)) or len(v) != 2 or any(
            isinstance(x, bool) or not isinstance(x, int) or x < minimum for x in v):
        raise RecipeError(f"{key!r} must be a pair of integers >= {minimum}, got {entry[key]!r}")
    return tuple(v)


def _dtype(entry: Mapping) -> torch.dtype:
    name = entry.get("weight_dtype", entry.get("dtype", "float32"))
    if name not in _FLOAT_DTYPES:
        raise RecipeError(f"dtype {name!r} is not a floating-point dtype; accepted: {', '.join(_FLOAT_DTYPES)}")
    return getattr(torch, name)


def layer_from_recipe(entry: Mapping[str, Any], *, device: torch.device | str | None = None) -> nn.Module:
    """An empty QuantLinear / QuantConv2d / QuantEmbedding of the recipe ``entry``, ready for its state dict.

    Its buffers have the shapes the recipe implies and hold placeholders; its dtype is ``dtype`` (the loaders
    cast to ``weight_dtype`` when recorded).

    Args:
        entry: one recipe, as :func:`layer_recipe` writes it.
        device: where to allocate the buffers; ``"meta"`` allocates nothing; ``None`` is the default device.

    Returns:
        The layer shell.

    Raises:
        RecipeError: (a ``ValueError``) the recipe is not a dict, has an unknown ``type``, misses a field or
            holds an invalid value; the message names the field.
    """
    if not isinstance(entry, Mapping):
        raise RecipeError(f"a recipe must be a dict, got {type(entry).__name__}")
    kind = entry.get("type")
    if kind not in RECIPE_TYPES:
        raise RecipeError(f"unknown type {kind!r}; accepted: {', '.join(RECIPE_TYPES)}")
    try:
        if not isinstance(entry["config"], Mapping):
            raise RecipeError(f"'config' must be a QuantConfig dict, got {entry['config']!r}")
        cfg = QuantConfig.from_dict(dict(entry["config"]))
        bias = entry["bias"]
        if not isinstance(bias, bool):
            raise RecipeError(f"'bias' must be true or false, got {bias!r}")
        dtype = _dtype(entry)
        layout = entry.get("layout", 1)
        if isinstance(layout, bool) or layout not in (1, 2):
            raise RecipeError(f"'layout' must be 1 or 2, got {layout!r}")
        # row bit-widths are computed on the CPU even inside a meta-device context (from_pretrained's skeleton)
        with torch.device("cpu"):
            if kind == "QuantEmbedding":
                if bias:
                    raise RecipeError("'bias' must be false for a QuantEmbedding (an embedding table has no bias), "
                                      "got true")
                pidx = entry.get("padding_idx")
                if pidx is not None and (isinstance(pidx, bool) or not isinstance(pidx, int)):
                    raise RecipeError(f"'padding_idx' must be an integer, got {pidx!r}")
                return QuantEmbedding(_int(entry, "out_features"), _int(entry, "in_features"), cfg, pidx,
                                      device=device, dtype=dtype, layout=layout)
            if kind == "QuantLinear":
                return QuantLinear(_int(entry, "in_features"), _int(entry, "out_features"), bias, cfg,
                                   device=device, dtype=dtype, layout=layout)
            pad = entry["padding"]
            if not isinstance(pad, str):
                pad = _pair(entry, "padding", 0)
            return QuantConv2d(_int(entry, "in_channels"), _int(entry, "out_channels"),
                               _pair(entry, "kernel_size", 1), _pair(entry, "stride", 1), pad,
                               _pair(entry, "dilation", 1), _int(entry, "groups"), bias, cfg,
                               device=device, dtype=dtype, layout=layout)
    except RecipeError:
        raise
    except KeyError as e:
        raise RecipeError(f"the field {e.args[0]!r} is missing") from None
    except (TypeError, ValueError) as e:
        raise RecipeError(str(e)) from None


def bit_map_matches(layer: QuantLinear | QuantConv2d) -> bool:
    """Whether a loaded layer's stored ``bit_map`` equals the per-row bits of its recipe's config.

    The check every reader runs after the tensors are in, against altered files or recipes; only
    mixed-precision layers store a ``bit_map``.

    Args:
        layer: a layer built by :func:`layer_from_recipe` with its state dict loaded.

    Returns:
        True when the layer is not mixed or its ``bit_map`` equals ``config.row_bits(out_rows)``.
    """
    if not layer.mixed:
        return True
    config: QuantConfig = layer.config
    return torch.equal(layer.get_buffer("bit_map").detach().to("cpu", torch.int16), config.row_bits(layer.out_rows))
