"""Which modules get quantized with which config, and the one place a module is swapped for its quantized version.

``quantize_(model, config_or_map, skip=...)`` is built from four public pieces, which the sequential
quantizer, the transformers loader and QLoRA use as well:

* :func:`quantizable_modules` - the one traversal: the modules a config type can quantize (for
  :class:`QuantConfig`: torch.nn's own ``Linear`` and ``Conv2d``, and subclasses that compute exactly as them:
  the parent's ``forward``, no parameters but ``weight`` / ``bias``, no buffers or children; not inside
  ``nn.MultiheadAttention``, which reads ``out_proj.weight`` directly, nor a PEFT layer's trainable adapters
  (``lora_A`` / ``lora_B``: its ``base_layer`` is quantized, they stay float); other subclasses, e.g. bitsandbytes'
  ``Linear4bit``, are already quantized or compute differently: :func:`unquantizable_subclasses` lists them and
  :func:`quantize_` reports those its config covers);
* :class:`ConfigMap` - which config each of them gets (patterns, default, skip; see below);
* :func:`quantize_module` - the dispatch: the handler registered for the config's type with
  :func:`register_quantize_module_handler` turns a float module into its quantized replacement;
* :func:`swap_module` - the one swap: replaces the module bound to a name.

Patterns (keys of a :class:`ConfigMap` or of a plain mapping, entries of ``skip``):

* ``"model.layers.0.mlp.up_proj"`` - an exact module name: that module, or every module below it when it names
  a container (``"model.vision_tower"`` covers the whole tower);
* ``"re:<regex>"`` - a regular expression that must match a module's full name (``re.fullmatch``);
* ``"@vision"``, ``"@projector"``, ``"@language"``, ``"@head"`` - a role of a Hugging Face VLM/LM, resolved by
  :func:`medquant.models.model_roles` (found from the model's structure; see its guide for the supported list).
  A role the model lacks, named only to leave modules out (in ``skip``, or mapped to ``None``), is left out
  with a warning once per model class and pattern, so one recipe serves several architectures; a role to
  quantize that the model lacks raises, and so does any role on a model with no known roles (a plain
  ``nn.Module``: its head may be there, and leaving nothing out would quantize it);
* ``"_default"`` - every quantizable module no other pattern matches.

Precedence, for each quantizable module: (1) a pattern equal to its full name; (2) otherwise the first pattern, in
insertion order, that matches it (a container name above it, a ``re:`` pattern or a role: these rank by order
alone); (3) otherwise ``"_default"``; (4) otherwise it stays in floating point. The chosen value ``None`` (or a
config with 16/32 bits) leaves the module in floating point; an ``int`` is shorthand for ``QuantConfig(bits=int)``.
``skip`` wins over everything. A module bound under several names (a shared module, e.g. the blocks of
``nn.ModuleList([block] * n)``) is matched by each of its names: a skip pattern matching any of them keeps it in
floating point under all of them, a config pattern matching any of them gives it that config (two of its exact
names mapped to different configs raise ``ValueError``), and it stays one module. A pattern that matches no module raises ``ValueError``
naming the pattern (a skip list that silently misses is worse than an error), and so does a pattern with a config
that matches modules of which none is quantizable. A single config (not a mapping) is the map
``{"_default": config}``.

What a :class:`QuantConfig` handler stores, per scale group (the tensor, a row, or ``group_size`` consecutive
elements of a row) of a row with ``b`` bits: symmetric scales ``s = max|w| / (2^(b-1) - 1)``; asymmetric
``s = (max' - min') / (2^b - 1)`` with ``min' = min(min w, 0)``, ``max' = max(max w, 0)``, zero point
``z = round(-min'/s)``; codes ``u = clamp(round(w/s) + z, 0, 2^b - 1)`` (symmetric: ``z = 2^(b-1)``, the signed
value clamped to ``+-(2^(b-1) - 1)`` first) and the layer computes with ``w^ = (u - z) * s``
(:mod:`medquant.quant.core` has the 1-bit case and the epsilon of all-zero groups).
"""
from __future__ import annotations

import difflib
import json
import numbers
import re
import warnings
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import nn

from ..kernels.layout import FORMAT_VERSION
from .activations import carry_input_quantizer
from .config import QuantConfig
from .experts import QuantExperts, is_experts_module, moe_routers, unsupported_experts
from .modules import (
    QUANT_MODULES,
    QuantConv2d,
    QuantEmbedding,
    QuantLinear,
    _check_computes_as,
    _remember_float_class,
    tied_heads,
)

ROLE_PREFIX = "@"
REGEX_PREFIX = "re:"
DEFAULT_KEY = "_default"
_ROLES = ("vision", "projector", "language", "head")

__all__ = [
    "DEFAULT_KEY",
    "ConfigMap",
    "as_config_map",
    "carry_hooks",
    "dequantize_",
    "names_by_module",
    "notify_quantized",
    "on_quantized",
    "quantizable_modules",
    "quantize_",
    "quantize_module",
    "quantized_modules",
    "register_quantize_module_handler",
    "resolve_configs",
    "swap_module",
    "swap_under_all_names",
    "unquantizable_subclasses",
    "without_moe_routers",
]


# ---------------------------------------------------------------------------------------------- handlers
@dataclass(frozen=True)
class _Handler:
    module_types: tuple[type[nn.Module], ...]
    fn: Callable[[nn.Module, Any], nn.Module]
    accepts: Callable[[nn.Module], bool] | None = None


_HANDLERS: dict[type, _Handler] = {}
_EXTRA_HANDLERS: dict[type, dict[tuple[type[nn.Module], ...], _Handler]] = {}


def register_quantize_module_handler(config_type: type, module_types: Iterable[type[nn.Module]] = (nn.Linear,
                                                                                                  nn.Conv2d),
                                     *, accepts: Callable[[nn.Module], bool] | None = None):
    """Decorator registering ``fn(module, config) -> module`` as the quantizer of a config type.

    ``fn`` quantizes modules of ``module_types`` for configs of ``config_type`` (or a subclass). Registering a
    type again replaces its handler. Example::

        @register_quantize_module_handler(MyConfig, (nn.Linear,))
        def _my_linear(module, config):
            return MyQuantLinear.from_float(module, config)

    With ``accepts(module) -> bool`` the handler is an *additional* one for the modules of ``module_types``
    (of any class, e.g. transformers' MoE experts) that ``accepts`` approves; it is tried before the config
    type's main handler, and registering the same ``module_types`` again replaces it.

    Args:
        config_type: the config class the handler serves (``quantize_`` picks the handler by ``type(config)``).
        module_types: module classes the handler quantizes; :func:`quantizable_modules` lists the modules of
            these types.
        accepts: optional predicate making this an additional handler for the modules it approves.

    Returns:
        The decorator; it registers ``fn`` and returns it unchanged.

    Raises:
        TypeError: ``config_type`` is not a class, or ``module_types`` is empty or holds non-``nn.Module`` types.
    """
    if not isinstance(config_type, type):
        raise TypeError(f"config_type must be a class, got {config_type!r}")
    types = tuple(module_types)
    if not types or not all(isinstance(t, type) and issubclass(t, nn.Module) for t in types):
        raise TypeError(f"module_types must be nn.Module subclasses, got {module_types!r}")

    def decorator(fn: Callable[[nn.Module, Any], nn.Module]) -> Callable[[nn.Module, Any], nn.Module]:
        if accepts is None:
            _HANDLERS[config_type] = _Handler(types, fn)
        else:
            _EXTRA_HANDLERS.setdefault(config_type, {})[types] = _Handler(types, fn, accepts)
        return fn

    return decorator


def _extra_handler(config_type: type, module: nn.Module) -> _Handler | None:
    """The additional handler (registered with ``accepts``) of ``config_type`` that takes ``module``, if any."""
    for cls in config_type.__mro__:
        for h in _EXTRA_HANDLERS.get(cls, {}).values():
            if isinstance(module, h.module_types) and h.accepts is not None and h.accepts(module):
                return h
    return None


def _handler(config_type: type) -> _Handler:
    for cls in config_type.__mro__:
        if cls in _HANDLERS:
            return _HANDLERS[cls]
    raise TypeError(f"no quantization handler is registered for {config_type.__name__}; register one with "
                    "medquant.quant.register_quantize_module_handler")


def quantize_module(module: nn.Module, config: Any, *, name: str | None = None) -> nn.Module:
    """The quantized replacement of ``module`` made by the handler registered for ``type(config)``.

    The replacement is in the same train / eval mode; ``module`` itself is not changed. A ``RuntimeWarning``
    names layers whose float16 scales underflow to subnormal numbers, or whose non-zero weights come back as all
    zeros (for MoE experts: the expert layers concerned, ``<name>.down.3``).

    Args:
        module: the float module (e.g. ``nn.Linear``, ``nn.Conv2d``, an MoE experts module).
        config: its config (:class:`QuantConfig` or a registered config type).
        name: the module's name in its model; prefixes error messages when given.

    Returns:
        The new quantized module.

    Raises:
        TypeError: no handler for ``type(config)``, or the handler does not take modules of ``type(module)``.
        ValueError: the handler refuses the module (meta or empty weight, NaN weights, a ``channel_bits`` of
            the wrong length...); with ``name``, the message starts with it.
    """
    handler = _extra_handler(type(config), module) or _handler(type(config))
    if not isinstance(module, handler.module_types):
        accepted = " or ".join(t.__name__ for t in handler.module_types)
        raise TypeError(f"{name + ': ' if name else ''}{type(config).__name__} quantizes {accepted} modules, "
                        f"got {type(module).__name__}")
    try:
        q = handler.fn(module, config)
    except (ValueError, TypeError) as e:
        if name is None:
            raise
        raise type(e)(f"{name}: {e}") from None
    q.train(module.training)
    _warn_subnormal_scales(q, name, module)
    return q


_FP16_TINY = torch.finfo(torch.float16).tiny  # 2^-14: smaller float16 values are subnormal (fewer bits)


def _nonzero_per_scale(w: torch.Tensor, pw, shape: torch.Size) -> torch.Tensor:
    """Whether each scale's weights (``w``: the row group's ``(rows, k)`` weights) hold a non-zero value, shaped as
    the scales ``(rows or 1, groups)``."""
    w = nn.functional.pad(w.float(), (0, pw.k_pad - pw.k))
    return (w.reshape(shape[0], shape[1], -1) != 0).any(-1)


def _subnormal_counts(q: QuantLinear | QuantConv2d, weight: torch.Tensor | None) -> tuple[int, int]:
    """``(subnormal, lost)`` of one QuantLinear / QuantConv2d with float16 scales: the scale groups whose scale is
    subnormal and which still hold a non-zero weight, and those whose float ``weight`` (when given, ``(out, ...)``)
    had a non-zero value but which come back as all zeros (see :func:`_warn_subnormal_scales`)."""
    orig = weight.detach().reshape(weight.shape[0], -1) if isinstance(weight, torch.Tensor) else None
    n = lost = 0
    for b in q.bit_groups:
        if not 1 <= b <= 8:
            continue
        pw = q.packed_weight(b)
        a = pw.scales.detach().abs()
        sub = (a > 0) & (a < _FP16_TINY)
        if sub.any():
            nonzero = _nonzero_per_scale(pw.dequantize(torch.float32), pw, a.shape)
            n += int((sub & nonzero).sum())
            if orig is not None and orig.shape == (q.out_rows, q.k):
                before = _nonzero_per_scale(orig[q.row_bits().to(orig.device) == b], pw, a.shape)
                lost += int((sub & ~nonzero & before).sum())
    return n, lost


def _warn_subnormal_scales(q: nn.Module, name: str | None, module: nn.Module | None = None) -> None:
    """Warn when float16 scales of a quantized layer fall below the smallest normal float16 ``2^-14`` (at 8 bits
    symmetric, groups whose largest weight is below ~7.8e-3): such scales keep fewer significant bits; ``scale_dtype="float32"`` or ``"bfloat16"`` keeps
    them exact. Scale groups reconstructed as all zeros are not counted when their float weights (``module``'s)
    were all zero too: an all-zero (pruned) group gets the smallest scale and is exact. A group whose weights were
    not all zero but come back as all zeros (weights below about half the smallest float16 scale, ~3e-8 times the
    code range: the weights of that group are lost) is counted and named as such.

    For MoE experts (a :class:`QuantExperts` ``q`` of the float experts ``module``) every expert layer is checked
    against its float matrix (:meth:`QuantExperts.expert_weights`), and the warnings name the expert layers
    concerned (``<name>.down.3``: expert 3's down projection)."""
    if isinstance(q, QuantExperts):
        floats: list[list[torch.Tensor | None]] = [[None] * q.num_experts] * 2
        if module is not None and is_experts_module(module):  # {up: [(W_e, b_e)], down: [...]}, in that order
            floats = [[w for w, _ in pairs] for pairs in QuantExperts.expert_weights(module).values()]
        layers = [(f"{key}.{e}", lin, floats[i][e]) for i, key in enumerate((q.up_name, "down"))
                  for e, lin in enumerate(getattr(q, key))]
    else:
        layers = [("", q, getattr(module, "weight", None))]
    prefix = name or type(q).__name__
    subnormal: dict[str, int] = {}
    lost: dict[str, int] = {}
    for rel, layer, weight in layers:
        if not isinstance(layer, QUANT_MODULES) or layer.config.scale_dtype != "float16":
            continue
        n, n_lost = _subnormal_counts(layer, weight)
        full = f"{prefix}.{rel}" if rel else prefix
        if n:
            subnormal[full] = n
        if n_lost:
            lost[full] = n_lost

    def where(found: dict[str, int]) -> str:
        names = list(found)
        return ", ".join(names[:4]) + (f" (and {len(names) - 4} more expert layers)" if len(names) > 4 else "")

    if subnormal:
        warnings.warn(f"{where(subnormal)}: {sum(subnormal.values())} float16 scale(s) are subnormal "
                      f"(< {_FP16_TINY:.3g}), so the quantized weights lose precision; "
                      "QuantConfig(scale_dtype='float32') or 'bfloat16' keeps them", RuntimeWarning, stacklevel=3)
    if lost:
        warnings.warn(f"{where(lost)}: {sum(lost.values())} scale group(s) of non-zero weights come back as all zeros "
                      "(their weights are below what a float16 scale can resolve): "
                      "QuantConfig(scale_dtype='float32') or 'bfloat16' keeps them", RuntimeWarning, stacklevel=3)


_CHUNK_ROWS = 4096  # rows quantized at a time in large Linear layers (bounds the float temporaries)


@register_quantize_module_handler(QuantConfig, (nn.Linear, nn.Conv2d))
def _quantize_linear_or_conv(module: nn.Module, config: QuantConfig) -> nn.Module:
    """``QuantLinear/QuantConv2d.from_float(module, config)``. A Linear with more than ``_CHUNK_ROWS`` rows
    (``lm_head``) is quantized ``_CHUNK_ROWS`` rows at a time and the row blocks of its buffers concatenated:
    bit-identical, since with per-channel or per-group scales and one bit-width for every row each row is
    quantized on its own (per-tensor scales and mixed per-row bit-widths take the one-shot path); as
    ``from_float``, it refuses a subclass with its own ``forward`` and records a subclass computing as
    ``nn.Linear`` for ``to_float`` / :func:`dequantize_`. A layer whose
    weight is not there yet is refused with ``ValueError``: on the meta device, or the uninitialized parameter of
    a lazy module (``nn.LazyLinear`` / ``nn.LazyConv2d`` before its first forward, which makes it a plain
    ``nn.Linear`` / ``nn.Conv2d``: quantized as such); so is one whose bias alone is on the meta device."""
    weight = cast(torch.Tensor, module.weight)
    if any(nn.parameter.is_lazy(p) for p in module.parameters(recurse=False)):
        raise ValueError(f"it is a lazy module ({type(module).__name__}) whose parameters are still uninitialized: "
                         "run one forward pass through the model to materialize them first (or skip it)")
    meta = [n for n, p in module.named_parameters(recurse=False) if p.device.type == "meta"]
    if meta:  # the weight, or a bias alone that a partly loaded checkpoint left out
        raise ValueError(f"its {'weight' if 'weight' in meta else meta[0]} is on the meta device (not loaded): load "
                         "or materialise the weights first")
    if weight.numel() == 0:
        raise ValueError(f"its weight is empty {tuple(weight.shape)}: there is nothing to quantize")
    if isinstance(module, nn.Conv2d):
        return QuantConv2d.from_float(module, config)
    assert isinstance(module, nn.Linear)
    w = module.weight.detach()
    rows = w.shape[0]
    if rows <= _CHUNK_ROWS or config.scope == "tensor" or config.channel_bits is not None \
            or not 1 <= config.bits <= 8:
        return QuantLinear.from_float(module, config)
    _check_computes_as(module, nn.Linear, ("forward",), "QuantLinear")  # as from_float: the chunks are plain
    parts = []
    for start in range(0, rows, _CHUNK_ROWS):
        chunk = w[start:start + _CHUNK_ROWS]
        with torch.device("meta"):
            tmp = nn.Linear(module.in_features, chunk.shape[0], bias=False)
        tmp.weight = nn.Parameter(chunk, requires_grad=False)
        parts.append(dict(QuantLinear.from_float(tmp, config).named_buffers()))
    q = QuantLinear(module.in_features, rows, module.bias is not None, config, device=w.device, dtype=w.dtype,
                    layout=FORMAT_VERSION)  # the parts' layout: from_float stores 3/5/6/7 bits densely
    with torch.no_grad():
        for name, buf in q.named_buffers():
            buf.copy_(torch.cat([p[name] for p in parts]))
        if module.bias is not None and q.bias is not None:
            q.bias.copy_(module.bias.detach())
    _remember_float_class(q, module, nn.Linear)  # a subclass computing as nn.Linear comes back as itself
    return q


@register_quantize_module_handler(QuantConfig, (nn.Module,), accepts=is_experts_module)
def _quantize_experts(module: nn.Module, config: QuantConfig) -> nn.Module:
    """MoE experts stored as 3-D parameters (transformers 5): :meth:`QuantExperts.from_float`, one QuantLinear
    per expert and projection (see :mod:`medquant.quant.experts`)."""
    return QuantExperts.from_float(module, config)


# ---------------------------------------------------------------------------------------------- traversal, swap
def quantizable_modules(model: nn.Module, config_type: type = QuantConfig) -> dict[str, nn.Module]:
    """Name -> module, in ``named_modules`` order, of the modules that configs of ``config_type`` quantize.

    These are the module types its handler was registered for (torch.nn's own classes, and subclasses that
    compute exactly as their parent), not inside ``nn.MultiheadAttention`` nor among a PEFT tuner layer's
    adapters (``lora_A`` / ``lora_B``...: they stay float and trainable; its ``base_layer`` is listed), plus the
    modules an additional handler accepts (MoE experts with 3-D weights; nothing below them is listed). A module bound to several
    names is listed once, under its first name.

    Args:
        model: the model to search.
        config_type: the config class whose handler decides (default :class:`QuantConfig`: Linear, Conv2d and
            MoE experts).

    Returns:
        ``{module name: module}``.
    """
    types = _handler(config_type).module_types
    out = {}
    skip_prefixes = [n + "." for n, m in model.named_modules() if isinstance(m, nn.MultiheadAttention)]
    skip_prefixes += _peft_adapter_prefixes(model)
    for name, m in model.named_modules():
        if name and _extra_handler(config_type, m) is not None:
            if not any(name.startswith(p) for p in skip_prefixes):
                out[name] = m
                skip_prefixes.append(name + ".")
            continue
        if isinstance(m, types) and (type(m).__module__.startswith("torch.nn") or _plain_subclass(m, types)):
            if any(name.startswith(p) for p in skip_prefixes):
                continue
            out[name] = m
    return out


def _peft_adapter_prefixes(model: nn.Module) -> list[str]:
    """``"<name>.lora_A."``-style prefixes of the adapter layers of PEFT tuner layers (their class lists them in
    ``adapter_layer_names``: ``lora_A``, ``lora_B``, ``lora_embedding_A``...): trainable low-rank adapters, not
    weights to pack (a quantized adapter would have no parameters left to train)."""
    out = []
    for n, m in model.named_modules():
        names = getattr(type(m), "adapter_layer_names", None)
        if isinstance(names, tuple) and type(m).__module__.startswith("peft"):
            out += [f"{n}.{a}." if n else f"{a}." for a in names if isinstance(m._modules.get(a), nn.Module)]
    return out


def _plain_subclass(m: nn.Module, types: tuple[type[nn.Module], ...]) -> bool:
    """A subclass of a torch.nn module type that computes exactly as its parent: it keeps the parent's
    ``forward`` (and ``_conv_forward``), holds no parameters but ``weight`` / ``bias``, no buffers, no children."""
    base = next((t for t in types if isinstance(m, t) and t.__module__.startswith("torch.nn")), None)
    if base is None:
        return False
    cls = type(m)
    same = all(getattr(cls, attr, None) is getattr(base, attr, None) for attr in ("forward", "_conv_forward"))
    return same and set(m._parameters) <= {"weight", "bias"} and not m._buffers and not m._modules


def _unhandled_weight_layers(model: nn.Module, found: Mapping[str, nn.Module]) -> dict[str, nn.Module]:
    """Name -> module of the weight layers no :class:`QuantConfig` handler takes and that are not in ``found``:
    torch.nn's other convolutions (``Conv1d``, ``Conv3d``, ``ConvTranspose1d/2d/3d``) and transformers' ``Conv1D``
    (GPT-2's projections, an ``nn.Module`` holding a transposed Linear weight)."""
    return {n: m for n, m in model.named_modules() if n and n not in found and (
        (isinstance(m, nn.modules.conv._ConvNd) and not isinstance(m, nn.Conv2d))
        or (type(m).__name__ == "Conv1D" and type(m).__module__.startswith("transformers")))}


def _warn_unhandled_layers(model: nn.Module, cmap: ConfigMap, targets: Mapping[str, nn.Module],
                           filter_fn: Callable[[nn.Module, str], bool] | None = None) -> None:
    """One ``UserWarning`` naming the weight layers of :func:`_unhandled_weight_layers` that ``cmap`` covers (a
    pattern or ``"_default"`` gives them a config; ``skip``, ``None`` and ``filter_fn`` leave them out): they stay
    in floating point, and a user who asked for "every layer at 4 bits" should know (GPT-2's ``Conv1D``
    projections, a 3-D CNN's ``Conv3d``...). ``targets`` are the modules the plan was resolved over."""
    foreign = _unhandled_weight_layers(model, targets)
    if not foreign:
        return
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the same patterns were resolved (and warned about) already
            covered = _resolve(model, cmap, {**targets, **foreign})
    except ValueError:  # e.g. two names of one shared Conv1d mapped to different configs: nothing to add here
        return
    missed = [f"{n} ({type(m).__name__})" for n, m in foreign.items()
              if n in covered and (filter_fn is None or filter_fn(m, n))]
    if missed:
        warnings.warn(f"{len(missed)} weight layer(s) the config covers are of a type medquant does not quantize "
                      f"(it takes Linear / Conv2d) and stay in floating point: {', '.join(missed[:5])}"
                      f"{', ...' if len(missed) > 5 else ''}", UserWarning, stacklevel=3)


def unquantizable_subclasses(model: nn.Module, config_type: type = QuantConfig) -> dict[str, nn.Module]:
    """Name -> module of the subclasses of the quantizable types that :func:`quantizable_modules` leaves out
    (their own ``forward``, extra parameters or children: quantizing them would change what they compute)."""
    types = _handler(config_type).module_types
    found = quantizable_modules(model, config_type)
    return {n: m for n, m in model.named_modules() if isinstance(m, types) and n not in found
            and not type(m).__module__.startswith("torch.nn")}


# the hook tables of an nn.Module that describe what happens around its forward / backward (state-dict hooks are
# left alone: the quantized layer stores other tensors)
_HOOK_TABLES = ("_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_forward_hooks", "_forward_hooks_with_kwargs",
                "_forward_hooks_always_called", "_backward_pre_hooks", "_backward_hooks")


def _baked_hook_types() -> tuple[type, ...]:
    """torch's weight reparametrisations run as forward pre-hooks (``weight_norm``, ``spectral_norm``, ``prune``):
    they compute ``weight`` from other parameters, which the swapped layer has baked into its (quantized) weight."""
    from torch.nn.utils import prune
    from torch.nn.utils.spectral_norm import SpectralNorm
    from torch.nn.utils.weight_norm import WeightNorm

    return (WeightNorm, SpectralNorm, prune.BasePruningMethod)


def carry_hooks(old: nn.Module, new: nn.Module) -> None:
    """Give ``new`` (the replacement :func:`quantize_` / :func:`dequantize_` binds in ``old``'s place) ``old``'s
    forward pre-hooks, forward hooks and backward hooks, so they run around the new layer as they ran around the old
    one. When ``new`` has none of its own the tables are shared, not copied: a handle the user holds
    (``h = layer.register_forward_hook(...)``) still removes its hook. torch's weight reparametrisation hooks
    (``weight_norm``, ``spectral_norm``, ``prune``) are not carried: the new layer's weight already is their result.
    An active :class:`~medquant.quant.activations.InputQuantizer` goes with its hook
    (:func:`~medquant.quant.activations.carry_input_quantizer`): the new layer's ``input_quantizer`` is listed,
    saved and removable like the old one's.

    Args:
        old: the module being replaced.
        new: its replacement (called before it is bound in ``old``'s place).
    """
    baked = _baked_hook_types()
    for table in _HOOK_TABLES:
        src = getattr(old, table, None)
        dst = getattr(new, table, None)
        if not src or dst is None or src is dst:
            continue
        has_baked = any(isinstance(h, baked) for h in src.values())
        if not dst and not has_baked:
            setattr(new, table, src)
        else:
            dst.update((k, h) for k, h in src.items() if not isinstance(h, baked))
    if old._backward_hooks and not getattr(new, "_is_full_backward_hook", None):
        new._is_full_backward_hook = old._is_full_backward_hook
    carry_input_quantizer(old, new)


def swap_module(model: nn.Module, name: str, new: nn.Module) -> nn.Module | None:
    """Bind ``new`` to the submodule path ``name`` of ``model`` and return the module it replaces.

    Only that name changes: another name bound to the same module object (a shared module) keeps the old one,
    and parameters tied to the old module's (a tied ``lm_head``) stay with the old tensors; the transformers
    integration drops such ties for the modules it quantizes.

    When ``new`` is a medquant quantized module (``QuantLinear``, ``QuantConv2d``, ``QuantEmbedding``,
    ``QuantExperts``) replacing another module, it (1) runs ``old``'s hooks (:func:`carry_hooks`), whatever path
    quantized it (:func:`quantize_`, :func:`~medquant.quant.embeddings.quantize_embeddings_`, the calibrations,
    loading), and (2) remembers the ``requires_grad`` of each of ``old``'s own parameters (``old``'s record when
    ``old`` is itself quantized: requantizing; a quantized module that already holds a record, e.g. one put back
    by an undo, keeps it), which :func:`dequantize_` gives back to the float layer. The record is an attribute
    of the module object: it follows ``copy.deepcopy`` but is not saved in checkpoints.

    Args:
        model: the root module.
        name: dotted submodule path (``"model.layers.0.mlp.up_proj"``); not empty.
        new: the module to bind there.

    Returns:
        The module that was bound to ``name`` before.

    Raises:
        ValueError: ``name`` is empty (the root cannot be swapped).
        AttributeError: ``model`` has no submodule ``name``.
    """
    if not name:
        raise ValueError("swap_module needs a submodule name; the root module cannot be swapped")
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    if attr not in parent._modules:
        raise AttributeError(f"{type(model).__name__} has no submodule {name!r}")
    old = parent._modules[attr]
    if isinstance(new, _QUANTIZED) and old is not None and old is not new:
        carry_hooks(old, new)
        rec = getattr(old, _REQUIRES_GRAD, None) if isinstance(old, _QUANTIZED) else \
            {n: p.requires_grad for n, p in old.named_parameters(recurse=False)}
        if rec is not None and not hasattr(new, _REQUIRES_GRAD):  # a module put back keeps its own record
            setattr(new, _REQUIRES_GRAD, dict(rec))
    setattr(parent, attr, new)
    if isinstance(new, QUANT_MODULES):
        notify_quantized(model)
    return old


# the quantized modules swap_module binds with the hooks and the requires_grad flags of the module they replace
_QUANTIZED = (*QUANT_MODULES, QuantEmbedding, QuantExperts)
_REQUIRES_GRAD = "_medquant_float_requires_grad"  # {parameter name: requires_grad of the float module's}


def _restore_requires_grad(quantized: nn.Module, layer: nn.Module) -> None:
    """Give ``layer`` (the float module :func:`dequantize_` makes of ``quantized``) the ``requires_grad`` of each
    parameter the float module had before quantizing (recorded by :func:`swap_module`; without a record the
    flags ``to_float`` gave stay); a parameter the quantized module itself trains (e.g. an unfrozen ``bias``)
    stays trainable."""
    rec = getattr(quantized, _REQUIRES_GRAD, None)
    if not isinstance(rec, dict):
        return
    for name, p in layer.named_parameters(recurse=False):
        if name in rec:
            own = quantized._parameters.get(name)
            p.requires_grad_(bool(rec[name]) or (own is not None and own.requires_grad))


_QUANTIZED_HOOKS: list[Callable[[nn.Module], None]] = []


def on_quantized(hook: Callable[[nn.Module], None]) -> Callable[[nn.Module], None]:
    """Register ``hook(model)``, called each time medquant binds a quantized Linear / Conv2d into ``model``.

    :func:`swap_module` calls it with its root (and :func:`quantize_` and the block-by-block calibrations with the
    whole model when they finish). The transformers integration uses it so that ``model.save_pretrained(dir)`` of
    a transformers model quantized in place writes a medquant checkpoint (it wrote the packed tensors without the
    recipe, and ``from_pretrained`` then gave random float weights). A hook must be cheap and idempotent.

    Args:
        hook: called with the root module; registered once (a second registration is ignored).

    Returns:
        ``hook`` (usable as a decorator).
    """
    if hook not in _QUANTIZED_HOOKS:
        _QUANTIZED_HOOKS.append(hook)
    return hook


def notify_quantized(model: nn.Module) -> None:
    """Call the :func:`on_quantized` hooks with ``model`` (a model that now holds quantized layers).

    Args:
        model: the root module.
    """
    for hook in tuple(_QUANTIZED_HOOKS):  # a hook may register another
        hook(model)


# ---------------------------------------------------------------------------------------------- config map
def _registered(config_type: type) -> bool:
    """Whether a handler is registered (:func:`register_quantize_module_handler`) for ``config_type`` or a base."""
    return any(cls in _HANDLERS for cls in config_type.__mro__)


def _as_config(value: Any, pattern: str) -> Any:
    """``value`` as a config: a :class:`QuantConfig` (from itself, an int bit-width or a QuantConfig dict), ``None``,
    or an instance of another config type with a registered handler (e.g. ``medquant.qlora.NF4Config``)."""
    if value is None or isinstance(value, QuantConfig):
        return value
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):  # numpy integers too
        return QuantConfig(bits=int(value))
    if isinstance(value, Mapping):
        try:
            return QuantConfig.from_dict(dict(value))
        except (TypeError, ValueError) as e:
            raise ValueError(f"value for pattern {pattern!r} is not a valid QuantConfig: {e}") from None
    if not isinstance(value, type) and _registered(type(value)):
        return value
    others = sorted(t.__name__ for t in _HANDLERS if t is not QuantConfig)
    raise TypeError(
        f"value for pattern {pattern!r} must be a QuantConfig, an int bit-width, a QuantConfig dict, None"
        + (f", or a config with a registered handler ({', '.join(others)})" if others else "")
        + f", got {type(value).__name__}"
    )


def _takes(cfg: Any, module: nn.Module) -> bool:
    """Whether ``cfg``'s handlers take ``module`` (a medquant quantized layer counts as its float type)."""
    if isinstance(cfg, QuantConfig) or isinstance(module, QUANT_MODULES):
        return True
    return isinstance(module, _handler(type(cfg)).module_types) or _extra_handler(type(cfg), module) is not None


def _check_skip(skip: Iterable[str] | None) -> tuple[str, ...]:
    if skip is None:
        return ()
    if isinstance(skip, str):
        raise TypeError("skip must be a list of patterns, not a single string")
    out = tuple(skip)
    for p in out:
        if not isinstance(p, str) or not p:
            raise TypeError(f"module patterns must be non-empty strings, got {p!r}")
    return out


class ConfigMap(Mapping):
    """An immutable per-module config map: ``pattern -> QuantConfig | None`` plus ``skip`` patterns.

    Keys are exact module names, ``"re:<regex>"``, roles (``"@language"``...) and ``"_default"``; values are
    :class:`QuantConfig` (an ``int`` or a QuantConfig dict is converted), or ``None`` to keep the matched
    modules in floating point. The precedence is the module docstring's: exact name, then the first matching
    pattern in insertion order, then ``"_default"``; ``skip`` wins over everything. It is a ``Mapping`` (so it
    compares equal to a plain dict with the same entries and no ``skip``), hashable, and round-trips through JSON
    (:meth:`to_dict` / :meth:`from_dict`) when its configs are :class:`QuantConfig` (or ``None``). :func:`quantize_` accepts it like a plain mapping.

    Example::

        ConfigMap({"@vision": None, "re:.*mlp.*": QuantConfig(2), "_default": QuantConfig(4)}, skip=["@head"])

    Args:
        entries: ``pattern -> config`` as a mapping or ``(pattern, config)`` pairs; a config is a
            :class:`QuantConfig`, an ``int`` bit-width, a QuantConfig dict, or ``None`` (keep float). A
            ``ConfigMap`` passed here keeps its own ``skip`` patterns.
        skip: patterns (names, ``"re:..."``, roles) left in float whatever else matches them.

    Raises:
        TypeError: a pattern that is not a non-empty string, a value that is not a config, or ``skip`` given as
            one string instead of a list.
        ValueError: a pattern given twice, or a config dict with invalid fields.
    """

    __slots__ = ("_entries", "_skip")
    _entries: dict[str, QuantConfig | None]
    _skip: tuple[str, ...]

    def __init__(self, entries: Mapping[str, Any] | Iterable[tuple[str, Any]] = (), *,
                 skip: Iterable[str] | None = None) -> None:
        extra_skip: tuple[str, ...] = ()
        if isinstance(entries, ConfigMap):
            extra_skip = entries.skip
        pairs = entries.items() if isinstance(entries, Mapping) else entries
        out: dict[str, QuantConfig | None] = {}
        for pattern, value in pairs:
            if not isinstance(pattern, str) or not pattern:
                raise TypeError(f"module patterns must be non-empty strings, got {pattern!r}")
            if pattern in out:
                raise ValueError(f"pattern {pattern!r} is given twice")
            out[pattern] = _as_config(value, pattern)
        merged = extra_skip + tuple(p for p in _check_skip(skip) if p not in extra_skip)
        object.__setattr__(self, "_entries", out)
        object.__setattr__(self, "_skip", merged)

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("ConfigMap is immutable; build a new one (ConfigMap({**old, key: value}, skip=...))")

    # Mapping
    def __getitem__(self, pattern: str) -> QuantConfig | None:
        return self._entries[pattern]

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, ConfigMap):
            return list(self._entries.items()) == list(other._entries.items()) and self._skip == other._skip
        if isinstance(other, Mapping):
            return not self._skip and self._entries == dict(other.items())
        return NotImplemented

    def __hash__(self) -> int:
        return hash((tuple(self._entries.items()), self._skip))

    def __repr__(self) -> str:
        skip = f", skip={list(self._skip)!r}" if self._skip else ""
        return f"ConfigMap({self._entries!r}{skip})"

    @property
    def skip(self) -> tuple[str, ...]:
        """Patterns left in floating point whatever else matches them."""
        return self._skip

    @property
    def default(self) -> QuantConfig | None:
        """The ``"_default"`` entry (``None`` when absent: unmatched modules stay in floating point)."""
        return self._entries.get(DEFAULT_KEY)

    def resolve(self, model: nn.Module, modules: Mapping[str, nn.Module] | None = None) -> dict[str, QuantConfig]:
        """Module name -> QuantConfig of every module of ``model`` this map quantizes, in ``named_modules`` order.

        Args:
            model: the model whose quantizable modules (:func:`quantizable_modules`) the patterns are matched
                against.
            modules: other ``{name: module}`` of ``model`` to match instead (e.g. its already quantized layers,
                :func:`quantized_modules`, to ask which of them the map covers).

        Returns:
            ``{module name: QuantConfig}``; modules that stay in floating point are absent.

        Raises:
            ValueError: a pattern that matches nothing, an invalid regular expression, an unknown role, or two
                names of one shared module mapped to different configs.
        """
        return _resolve(model, self, modules)

    # JSON
    def to_dict(self) -> dict[str, Any]:
        """The map as plain JSON-ready data.

        Returns:
            ``{"map": {pattern: QuantConfig dict | None}, "skip": [patterns]}``, read back by :meth:`from_dict`.

        Raises:
            TypeError: an entry holds a config of another type than :class:`QuantConfig` (e.g. ``NF4Config``),
                which this JSON form does not carry.
        """
        other = [f"{k!r} ({type(v).__name__})" for k, v in self._entries.items()
                 if v is not None and not isinstance(v, QuantConfig)]
        if other:
            raise TypeError(f"ConfigMap.to_dict: {', '.join(other)} holds a config of another type than "
                            "QuantConfig, which the JSON form does not carry (it writes QuantConfig entries and None)")
        return {"map": {k: (None if v is None else v.to_dict()) for k, v in self._entries.items()},
                "skip": list(self._skip)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ConfigMap:
        """Inverse of :meth:`to_dict`.

        Args:
            d: ``{"map": {...}, "skip": [...]}`` (``skip`` optional).

        Returns:
            The ``ConfigMap``, equal to the one that was written.

        Raises:
            ValueError: ``d`` has no ``"map"`` key or keys other than ``"map"`` and ``"skip"``.
            TypeError: its ``"map"`` is not a mapping.
        """
        unknown = set(d) - {"map", "skip"}
        if unknown or "map" not in d:
            raise ValueError(f"a ConfigMap dict has the keys 'map' and 'skip', got {sorted(d)}")
        if not isinstance(d["map"], Mapping):
            raise TypeError(f"a ConfigMap dict's 'map' maps patterns to configs, got {type(d['map']).__name__}")
        return cls(d["map"], skip=d.get("skip") or ())

    def to_json(self) -> str:
        """:meth:`to_dict` as JSON text.

        Returns:
            One-line JSON object text.

        Raises:
            TypeError: an entry holds a config of another type than :class:`QuantConfig` (see :meth:`to_dict`).
        """
        return json.dumps(self.to_dict())

    @classmethod
    def from_json(cls, s: str) -> ConfigMap:
        """The map that JSON text of :meth:`to_json` describes.

        Args:
            s: JSON object text.

        Returns:
            The ``ConfigMap`` (see :meth:`from_dict`).
        """
        return cls.from_dict(json.loads(s))


def as_config_map(config_or_map: QuantConfig | int | Mapping[str, Any] | None, *,
                  skip: Iterable[str] | None = None) -> ConfigMap:
    """The :class:`ConfigMap` of what :func:`quantize_` takes.

    Args:
        config_or_map: a map (kept as it is), or one config / int bit-width / ``None`` for every module
            (becomes ``{"_default": config}``).
        skip: patterns added to the map's own ``skip``.

    Returns:
        The ``ConfigMap``.
    """
    if isinstance(config_or_map, Mapping):
        return ConfigMap(config_or_map, skip=skip)
    return ConfigMap({DEFAULT_KEY: _as_config(config_or_map, "<all>")}, skip=skip)


_NOTED_MISSING_ROLES: set[tuple[str, str]] = set()


class _Pattern:
    def __init__(self, pattern: str, model: nn.Module, all_names: list[str], optional_role: bool = False):
        self.text = pattern
        self.kind = "exact"
        self.prefixes: list[str] = []
        if pattern.startswith(REGEX_PREFIX):
            self.kind = "regex"
            try:
                self.regex = re.compile(pattern[len(REGEX_PREFIX):])
            except re.error as e:
                raise ValueError(f"pattern {pattern!r} is not a valid regular expression: {e}") from None
        elif pattern.startswith(ROLE_PREFIX):
            self.kind = "role"
            from ..models import model_roles

            role = pattern[len(ROLE_PREFIX):]
            if role not in _ROLES:
                raise ValueError(f"unknown role pattern {pattern!r}; accepted: " + ", ".join("@" + r for r in _ROLES))
            roles = model_roles(model)
            if role not in roles and optional_role and roles:
                # a role to leave out that the model lacks (skip=["@head"] on CLIPVisionModel): nothing to leave
                # out; noted once per model class and pattern so one recipe serves several architectures
                key = (type(model).__name__, pattern)
                if key not in _NOTED_MISSING_ROLES:
                    _NOTED_MISSING_ROLES.add(key)
                    warnings.warn(f"{pattern!r} left out: {type(model).__name__} has no {role} part (it has: "
                                  f"{', '.join('@' + r for r in roles)})", UserWarning, stacklevel=4)
                self.kind = "none"
                return
            if role not in roles:
                raise ValueError(
                    f"pattern {pattern!r}: {type(model).__name__} has no {role} part "
                    f"(it has: {', '.join('@' + r for r in roles) or 'no known roles - use explicit names'})"
                )
            self.prefixes = list(roles[role])
        # a role held only by parameters (Siglip2Model's head: logit_scale, logit_bias) has nothing to leave out
        if not any(self.matches(n) for n in all_names) and not (self.kind == "role" and optional_role):
            hint = difflib.get_close_matches(pattern, all_names, n=3)
            raise ValueError(
                f"pattern {pattern!r} matches no module of {type(model).__name__}"
                + (f"; did you mean {', '.join(map(repr, hint))}?" if hint else "")
                + " (patterns are exact module names, 're:<regex>' or '@vision/@projector/@language/@head')"
            )

    def matches(self, name: str) -> bool:
        if self.kind == "exact":
            return name == self.text or name.startswith(self.text + ".")
        if self.kind == "regex":
            return self.regex.fullmatch(name) is not None
        if self.kind == "none":
            return False
        return any(name == p or name.startswith(p + ".") for p in self.prefixes)


def names_by_module(model: nn.Module) -> dict[int, list[str]]:
    """``id(module) -> every name it is bound under`` (a shared module has several; ``named_modules()`` yields
    only its first), the root as ``""``.

    Args:
        model: the model.

    Returns:
        ``{id(module): [name, ...]}`` in ``named_modules(remove_duplicate=False)`` order.
    """
    names: dict[int, list[str]] = {}
    for n, m in model.named_modules(remove_duplicate=False):
        names.setdefault(id(m), []).append(n)
    return names


def swap_under_all_names(model: nn.Module, name: str, new: nn.Module,
                         aliases: Mapping[int, list[str]] | None = None) -> list[tuple[str, nn.Module]]:
    """Bind ``new`` under every name of the module now bound to ``name`` (:func:`swap_module` per name), so that a
    shared module is replaced by one module, not by one copy per name.

    The names are ``name`` and ``aliases[id(old)]`` (``old`` the module at ``name``; a table from
    :func:`names_by_module`, which a caller takes once, before its first swap), or ``model``'s own names of ``old``
    read now when ``aliases`` is ``None``. A name of the table that no longer holds ``old`` (swapped since the
    table was taken, below a module swapped since, or another module's once its ``id`` was reused) is left
    alone.

    Args:
        model: the root module ``name`` and the aliases are relative to.
        name: dotted submodule path of the module to replace.
        new: its replacement.
        aliases: ``id(module) -> names`` of ``model`` (see above); ``None`` reads it from ``model``.

    Returns:
        ``(name, replaced module)`` for each name swapped, in order (undo: rebind them in reverse).

    Raises:
        AttributeError: ``model`` has no submodule ``name``.
        ValueError: ``name`` is empty (the root cannot be swapped).
    """
    if not name:
        raise ValueError("swap_under_all_names needs a submodule name; the root module cannot be swapped")
    old = model.get_submodule(name)
    table = names_by_module(model) if aliases is None else aliases
    done: list[tuple[str, nn.Module]] = []
    names = list(table.get(id(old), ()))
    if name not in names:  # a module the table does not know (built since), or an id the table had for another
        names.insert(0, name)
    for alias in names:
        try:
            held = model.get_submodule(alias) if alias else None
        except AttributeError:  # a path through a module swapped since the table was taken
            continue
        if held is old:
            swap_module(model, alias, new)
            done.append((alias, old))
    return done


def _resolve(model: nn.Module, cmap: ConfigMap, targets: Mapping[str, nn.Module] | None = None
             ) -> dict[str, QuantConfig]:
    if targets is None:
        targets = quantizable_modules(model, QuantConfig)
    # a pattern naming any name of a shared module (listed once, under its first name) covers it, one object under
    # all its names: a skip pattern leaves it in floating point, a config pattern chooses its config
    aliases = names_by_module(model)
    every_name = [n for names in aliases.values() for n in names if n]

    def names_of(name: str) -> list[str]:
        return aliases.get(id(targets[name]), [name])

    # a role pattern only leaving modules out (in skip, or mapped to None / a float config) that the model lacks
    # is noted, not an error; a role to quantize that the model lacks raises
    skip_patterns = [_Pattern(p, model, every_name, optional_role=True) for p in cmap.skip]
    entries = [(_Pattern(p, model, every_name, optional_role=cfg is None or getattr(cfg, "is_float", False)), cfg)
               for p, cfg in cmap.items() if p != DEFAULT_KEY]
    for pat, cfg in entries:
        if cfg is not None and pat.kind != "none" and not any(
                _takes(cfg, m) and any(pat.matches(a) for a in names_of(n)) for n, m in targets.items()):
            raise ValueError(
                f"pattern {pat.text!r} matches modules but none of them is an nn.Linear or nn.Conv2d to quantize"
                + ("" if isinstance(cfg, QuantConfig) else f" with {type(cfg).__name__}")
                + _unquantizable_matches(model, [n for n in every_name if pat.matches(n)])
            )
    has_default = DEFAULT_KEY in cmap
    plan: dict[str, QuantConfig] = {}
    untaken: list[str] = []
    for name in targets:
        names = names_of(name)
        exact = [e for e in entries if e[0].kind == "exact" and e[0].text in names]
        if any(e[1] != exact[0][1] for e in exact[1:]):
            raise ValueError(f"{name!r} is one module bound under several names ({', '.join(map(repr, names))}) and "
                             f"the map gives it different configs under {', '.join(repr(e[0].text) for e in exact)}: "
                             "name it once")
        chosen = exact[0] if exact else next((e for e in entries if any(e[0].matches(a) for a in names)), None)
        cfg = chosen[1] if chosen is not None else (cmap.default if has_default else None)
        if cfg is None or getattr(cfg, "is_float", False) or any(
                p.matches(alias) for p in skip_patterns for alias in names):
            continue
        if _takes(cfg, targets[name]):
            plan[name] = cfg
        else:  # another config type (NF4Config: nn.Linear only) over a module its handler does not take
            untaken.append(f"{name} ({type(targets[name]).__name__}, {type(cfg).__name__})")
    if untaken:
        warnings.warn(f"{len(untaken)} module(s) stay in floating point, as their config's handler does not take "
                      f"their type: {', '.join(untaken[:4])}{', ...' if len(untaken) > 4 else ''}", UserWarning,
                      stacklevel=3)
    return plan


def _unquantizable_matches(model: nn.Module, names: list[str]) -> str:
    """What a config pattern matched when none of it is quantizable, for its error: the first modules with their
    classes, why the layers of an ``nn.MultiheadAttention`` stay float, and where embedding tables are
    quantized."""
    mods = [(n, model.get_submodule(n)) for n in names]
    mha = [n for n, m in model.named_modules(remove_duplicate=False) if isinstance(m, nn.MultiheadAttention)]
    out = ": it matches " + ", ".join(f"{n} ({type(m).__name__})" for n, m in mods[:4]) + (
        f" and {len(mods) - 4} more" if len(mods) > 4 else "")
    if any(n == a or n.startswith(a + ".") for n, _ in mods for a in mha):
        out += ("; nn.MultiheadAttention reads its weights (in_proj_weight, out_proj.weight) directly, so its layers "
                "stay in floating point")
    if any(isinstance(m, (nn.Embedding, QuantEmbedding)) for _, m in mods):
        out += "; embedding tables are quantized by medquant.quantize_embeddings_"
    return out


def resolve_configs(
    model: nn.Module,
    config_or_map: QuantConfig | int | Mapping[str, QuantConfig | int | None],
    *,
    skip: Iterable[str] | None = None,
    experts: bool = False,
) -> dict[str, QuantConfig]:
    """Which config each quantizable Linear / Conv2d gets (modules left in float are absent).

    This is the plan of the calibrating quantizers (GPTQ, AdaRound, sequential, shards), which work on Linear /
    Conv2d layers. By default MoE experts with 3-D weights the map covers are left out with a warning saying so
    (:func:`quantize_` quantizes them per expert; :meth:`ConfigMap.resolve` includes them); with
    ``experts=True`` the plan is :func:`quantize_`'s: such experts modules are in it (the caller quantizes them per
    expert: GPTQ unfolds them into one Linear per expert and projection,
    :meth:`~medquant.quant.experts.QuantExperts.unfolded`) and MoE routers stay in floating point unless named
    exactly (:func:`without_moe_routers`). Weight layers of other types the map covers (``Conv1d``, ``Conv3d``,
    ``ConvTranspose*d``, transformers' ``Conv1D``) are named in a warning, as by :func:`quantize_`.

    Args:
        model: the model.
        config_or_map: a :class:`ConfigMap`, a plain mapping of patterns, or one config (or int bit-width) for
            every module.
        skip: extra patterns left in float.
        experts: :func:`quantize_`'s MoE plan (experts modules in, routers float) instead of Linear / Conv2d
            layers only.

    Returns:
        ``{module name: QuantConfig}`` in ``named_modules`` order.

    Raises:
        ValueError: a pattern that matches nothing, an invalid regular expression, an unknown role, or two names
            of one shared module mapped to different configs.
    """
    cmap = as_config_map(config_or_map, skip=skip)
    targets = quantizable_modules(model, QuantConfig)
    plan = _resolve(model, cmap, targets)
    _warn_unhandled_layers(model, cmap, targets)
    if experts:
        return without_moe_routers(model, cmap, plan, stacklevel=3)
    moe = [n for n in plan if is_experts_module(model.get_submodule(n))]
    if moe:
        warnings.warn(f"{len(moe)} MoE experts module(s) with 3-D weights ({', '.join(moe[:3])}"
                      f"{', ...' if len(moe) > 3 else ''}) are not quantized by this calibration path (it "
                      "handles Linear / Conv2d layers); they stay in floating point: quantize them afterwards "
                      "with medquant.quantize_(model, config), which quantizes experts per expert", UserWarning,
                      stacklevel=2)
    return {n: c for n, c in plan.items() if n not in moe}


_NOTED_ROUTERS: weakref.WeakKeyDictionary[nn.Module, tuple[str, ...]] = weakref.WeakKeyDictionary()


def without_moe_routers(model: nn.Module, cmap: ConfigMap, plan: Mapping[str, Any], *,
                        stacklevel: int = 2) -> dict[str, Any]:
    """``plan`` without the MoE routers that stay in floating point: what :func:`quantize_` and quantize-on-load
    (:meth:`medquant.hf.MedQuantConfig.plan`) quantize.

    A router (:func:`~medquant.quant.experts.moe_routers`: ``gate`` / ``router`` / ``shared_expert_gate`` beside
    an experts module, or the layers inside such a module, e.g. Gemma 4's ``router.proj``) is dropped from the
    plan unless its name is a key of ``cmap`` (an exact name opts it in; a pattern, a role or ``"_default"``
    matching it does not). When the plan keeps something, one ``UserWarning`` lists the routers left in
    floating point (those already quantized are not listed); it is given once per model and list of routers, so
    quantize-on-load, which plans before loading and quantizes the experts after, warns once.

    Args:
        model: the model the plan is for.
        cmap: the config map the plan was resolved from.
        plan: ``{module name: config}``.
        stacklevel: the ``stacklevel`` the caller would give ``warnings.warn`` itself (2: the warning points at
            the caller's caller).

    Returns:
        The plan without the routers, in its order.
    """
    routers = [n for n in moe_routers(model) if n not in cmap]  # float by default; an exact name opts in
    out = {n: c for n, c in plan.items() if n not in routers}
    left = tuple(n for n in routers if not isinstance(model.get_submodule(n), QUANT_MODULES))
    if left and out and _NOTED_ROUTERS.get(model) != left:
        _NOTED_ROUTERS[model] = left
        warnings.warn(f"{len(left)} MoE router(s) stay in floating point (their top-k choice of experts is "
                      "discontinuous in their weights, and they are a tiny fraction of an MoE layer): "
                      f"{', '.join(left[:4])}{', ...' if len(left) > 4 else ''}; name one exactly in the "
                      "config map to quantize it (plain nn.Linear routers only)", UserWarning,
                      stacklevel=stacklevel + 1)
    return out


# ---------------------------------------------------------------------------------------------- quantize_
def quantize_(
    model: nn.Module,
    config_or_map: QuantConfig | int | Mapping[str, QuantConfig | int | None],
    *,
    skip: Iterable[str] | None = None,
    filter_fn: Callable[[nn.Module, str], bool] | None = None,
    progress: bool = False,
    requantize: bool = False,
) -> nn.Module:
    """Quantize ``model``'s Linear and Conv2d weights in place (see the module docstring for patterns).

    Nothing happens without a word: a layer the map covers that is already quantized raises ``ValueError``
    unless ``requantize=True`` (then it is quantized again from its dequantized weight, with a warning); a
    module bound to several names is quantized once and every name gets the one quantized module; subclasses
    of Linear / Conv2d that compute as their parent are quantized, others the map covers are reported in a
    warning; weight layers of other types the map covers (``Conv1d``, ``Conv3d``, ``ConvTranspose*d``, transformers'
    ``Conv1D``) stay in floating point and are named in a warning; a call that quantizes nothing warns.

    Hooks: the forward pre-hooks, forward hooks and backward hooks registered on a layer run around its quantized
    replacement too (the hook tables are shared, so the handles the user holds still remove them); torch's weight
    reparametrisation hooks (``weight_norm``, ``spectral_norm``, ``prune``) are not carried, their result being the
    weight that was quantized.

    Mixture-of-experts blocks: experts stored as 3-D parameters (transformers 5: Mixtral, Qwen-MoE, Llama 4 ...)
    are quantized per expert (:class:`~medquant.quant.experts.QuantExperts`; a pattern matches the experts module
    by its name, e.g. ``...mlp.experts``). Their routers (``gate`` / ``router`` / ``shared_expert_gate``, see
    :func:`~medquant.quant.experts.moe_routers`; also beside experts held as a ``ModuleList`` / ``ModuleDict``
    of one module per expert, whose Linear layers are quantized as usual) stay in floating point by default,
    with one warning listing them; a plain ``nn.Linear`` router named exactly in the map is quantized. Expert weights in a layout medquant
    does not reproduce stay in floating point and are named in a warning.

    Example::

        quantize_(vlm, {"@language": QuantConfig(bits=4), "@vision": None}, skip=["@head"])
        quantize_(vlm, ConfigMap({"@vision": None, "_default": QuantConfig(4)}, skip=["@head"]))

    Args:
        model: the model, changed in place.
        config_or_map: one :class:`QuantConfig` (or int bit-width) for every quantizable module, or a mapping /
            :class:`ConfigMap` from patterns (exact names, ``"re:<regex>"``, roles ``"@vision"``,
            ``"@projector"``, ``"@language"``, ``"@head"``, and ``"_default"``) to a config or ``None`` (float).
        skip: patterns left in floating point whatever else matches them (e.g. ``["@head"]``); a shared module
            is left out when a pattern matches any of its names.
        filter_fn: optional ``filter_fn(module, name) -> bool``; modules for which it is False are left as they
            are (float, or quantized as before: neither requantized nor refused as already quantized). A shared
            module is asked under each of its names and left as it is when any answer is False, as ``skip``
            does.
        progress: show a tqdm bar over the layers.
        requantize: quantize already quantized layers again from their dequantized weights (with a warning).

    Returns:
        ``model`` itself (quantized in place), for chaining.

    Raises:
        TypeError: ``model`` is not an ``nn.Module``, or a config of the wrong type.
        ValueError: the model is itself one Linear / Conv2d (``QuantLinear.from_float`` quantizes a single layer),
            a layer the map covers is a lazy module not yet materialized (``nn.LazyLinear`` before its first
            forward: run one forward pass first, or skip it) or has its weight or bias on the meta device,
            already quantized layers are covered and ``requantize`` is False (or, with it, a head tied to a
            quantized embedding would be requantized alone and untied), a pattern matches nothing,
            two names of one shared module are mapped to different configs, or a layer cannot be quantized (the
            message names it); the model is then left unchanged.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"quantize_ expects an nn.Module, got {type(model).__name__}")
    already = quantized_modules(model)
    others = unquantizable_subclasses(model)
    order = {n: i for i, (n, _) in enumerate(model.named_modules())}
    targets = dict(sorted({**quantizable_modules(model), **already, **others}.items(), key=lambda kv: order[kv[0]]))
    cmap = as_config_map(config_or_map, skip=skip)
    plan = _resolve(model, cmap, targets)
    if "" in plan:  # the model is itself one Linear / Conv2d: there is no parent to swap it in
        kind = "QuantConv2d" if isinstance(model, nn.Conv2d) else "QuantLinear"
        raise ValueError(f"the model passed to quantize_ is itself the layer ({type(model).__name__}); quantize_ "
                         "replaces submodules in place, so it needs a model holding the layer: quantize one layer "
                         f"with {kind}.from_float(layer, config), or wrap it (nn.Sequential(layer))")
    if filter_fn is not None:  # before the checks below: a layer filter_fn leaves out is neither redone nor reported
        every = names_by_module(model)  # a shared module is asked under each of its names, and kept only if all pass

        def kept(name: str) -> bool:
            mod = model.get_submodule(name)
            return all(filter_fn(mod, alias) for alias in every.get(id(mod), [name]))

        plan = {n: c for n, c in plan.items() if kept(n)}
    plan = without_moe_routers(model, cmap, plan, stacklevel=2)
    odd = unsupported_experts(model)
    if odd and plan:
        warnings.warn(f"{len(odd)} module(s) hold MoE expert weights in a layout medquant does not quantize and stay "
                      f"in floating point: {', '.join(odd[:4])}{', ...' if len(odd) > 4 else ''}", UserWarning,
                      stacklevel=2)
    redo = [n for n in plan if n in already]
    if redo and not requantize:
        raise ValueError(f"{len(redo)} layer(s) the config covers are already quantized ({', '.join(redo[:3])}"
                         f"{', ...' if len(redo) > 3 else ''}): pass requantize=True to quantize them again from "
                         "their dequantized weights, or skip them")
    tied = {h: e for h, e in tied_heads(model).items() if h in redo}
    if tied:
        head, emb = next(iter(tied.items()))
        raise ValueError(f"{head} shares its packed tensors with the quantized embedding {emb} (a tied head); "
                         "requantizing it alone would untie them (two copies, while the config says tied): skip "
                         f"it (skip=[{head!r}]), or dequantize_ the model first and quantize it again")
    if redo:
        warnings.warn(f"requantizing {len(redo)} already quantized layer(s) from their dequantized weights "
                      f"({', '.join(redo[:3])}{', ...' if len(redo) > 3 else ''})", UserWarning, stacklevel=2)
    reported = [n for n in plan if n in others]
    if reported:
        warnings.warn(f"{len(reported)} subclass(es) of Linear / Conv2d with their own forward, parameters or "
                      f"children are left in floating point: {', '.join(reported[:5])}", UserWarning, stacklevel=2)
        plan = {n: c for n, c in plan.items() if n not in others}
    _warn_unhandled_layers(model, cmap, targets, filter_fn)
    items = list(plan.items())
    if progress:
        from tqdm.auto import tqdm

        items = tqdm(items, desc="quantizing", unit="layer")
    # two phases: build every quantized layer first, swap only when all succeeded, so an error (NaN weights,
    # a bad channel_bits length...) leaves the model exactly as it was
    built = []
    for name, cfg in items:
        mod = model.get_submodule(name)
        if isinstance(mod, QUANT_MODULES):  # requantize=True
            mod = mod.to_float(mod.weight_dtype)
        built.append((name, quantize_module(mod, cfg, name=name)))
    if not built:
        warnings.warn(f"quantize_ quantized nothing in {type(model).__name__}: no nn.Linear / nn.Conv2d matched the "
                      "config (or all were skipped)", UserWarning, stacklevel=2)
    aliases = names_by_module(model)
    for name, q in built:
        carry_hooks(model.get_submodule(name), q)  # also for a handler's own module type (swap_module: medquant's)
        swap_under_all_names(model, name, q, aliases)  # a shared module stays one module
    if built:
        notify_quantized(model)  # also when only MoE experts were quantized
    return model


def quantized_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Name -> QuantLinear / QuantConv2d module.

    Args:
        model: the model to search.

    Returns:
        ``{module name: quantized module}`` in ``named_modules`` order (MoE ``QuantExperts`` are not listed).
    """
    return {n: m for n, m in model.named_modules() if isinstance(m, QUANT_MODULES)}


def dequantize_(model: nn.Module) -> nn.Module:
    """Replace every QuantLinear / QuantConv2d by the float layer it computes with (in place).

    The float weights are the dequantized ones, ``w^ = (u - z) * s`` per scale group (symmetric rows
    ``z = 2^(b-1)``; 1-bit symmetric ``(2u - 1) * s``), so the model computes what the quantized one did; biases
    are kept. Quantized MoE experts become the float experts module of their original class again, and quantized
    embedding tables (:func:`~medquant.quant.embeddings.quantize_embeddings_`) ``nn.Embedding`` tables holding
    ``e[i, j] = (u[i, j] - z) * s``; a head that shared a table's packed tensors becomes an ``nn.Linear`` whose
    ``weight`` *is* that table's (tied again, one tensor). A layer bound under several names becomes one float
    module bound under all of them, and every float module keeps its quantized layer's train / eval mode and its
    forward / backward hooks (shared tables, as in :func:`quantize_`). Each float parameter gets the
    ``requires_grad`` its float module's parameter of that name had before quantizing (a frozen weight stays
    frozen; recorded by :func:`swap_module` when the quantized module was bound, so a model loaded from a
    checkpoint, which has no record, gets ``to_float``'s flags: trainable Linear / Conv2d / Embedding
    parameters, frozen expert weights); a bias the quantized layer trains stays trainable. A transformers model
    that carried medquant's ``hf_quantizer`` (``from_pretrained`` of a medquant folder) and has nothing quantized
    left (no input quantizer either) loses it, its ``config.quantization_config`` and ``is_quantized``, as
    transformers' own ``model.dequantize()`` removes them.

    Args:
        model: the model, changed in place.

    Returns:
        ``model`` itself.
    """
    aliases = names_by_module(model)  # every name of every module, taken before anything is swapped

    def swap_everywhere(name: str, old: nn.Module, new: nn.Module) -> None:
        new.train(old.training)
        _restore_requires_grad(old, new)
        carry_hooks(old, new)
        swap_under_all_names(model, name, new, aliases)  # a shared module stays one module

    for name, experts in [(n, m) for n, m in model.named_modules() if isinstance(m, QuantExperts)]:
        swap_everywhere(name, experts, experts.to_float())
    ties = tied_heads(model)  # {head name: embedding name}, read while the packed tensors are still shared
    tables: dict[str, nn.Embedding] = {}
    for name, emb in [(n, m) for n, m in model.named_modules() if isinstance(m, QuantEmbedding)]:
        tables[name] = emb.to_float()
        swap_everywhere(name, emb, tables[name])
    for name, m in list(quantized_modules(model).items()):
        assert isinstance(m, QUANT_MODULES)
        layer = m.to_float()
        if name in ties:
            layer.weight = tables[ties[name]].weight  # the head and its table: one float tensor again
        swap_everywhere(name, m, layer)
    _drop_quantization_record(model)
    return model


def _drop_quantization_record(model: nn.Module) -> None:
    """A transformers model with nothing quantized left loses medquant's ``hf_quantizer``, its
    ``config.quantization_config`` and ``is_quantized``, as transformers' ``model.dequantize()`` removes them (its
    ``Trainer`` refuses to fine-tune a model flagged as quantized); kept while input quantizers remain."""
    from .activations import input_quantizers

    quantizer = getattr(model, "hf_quantizer", None)
    qc = getattr(getattr(model, "config", None), "quantization_config", None)
    method = qc.get("quant_method") if isinstance(qc, Mapping) else getattr(qc, "quant_method", None)
    if quantizer is None or str(getattr(method, "value", method)) != "medquant":
        return
    if any(isinstance(m, _QUANTIZED) for m in model.modules()) or input_quantizers(model):
        return
    remove = getattr(quantizer, "remove_quantization_config", None)
    if callable(remove):
        remove(model)
