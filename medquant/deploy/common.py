"""What every export backend needs, independent of the target format.

* :func:`quantized_layers` lists a model's medquant-quantized layers (``QuantLinear`` / ``QuantConv2d``) by name;
  :func:`layer_scheme` describes one as a string (``"int4 asym g128"``, ``"int8 sym channel"``,
  ``"mixed {3: 10 rows, 4: 22 rows}"``).
* :func:`check_native` refuses models holding modules a format has no tensors for (medquant wrappers other
  than the quantized layers, e.g. quantized MoE experts; parametrized layers; unmerged PEFT adapters and
  bitsandbytes layers, whose tensors are not the model's own weights), models with tensors on the ``meta`` device
  (:func:`check_materialised`: no data to write), and models whose layers quantize
  their input activations (:func:`check_no_input_quantizers`) or carry other forward hooks that change what they
  compute (:func:`check_forward_hooks`: an ``AdaptiveQuantizer``'s sites, user hooks, torch's ``prune`` /
  ``weight_norm`` reparametrisations; :func:`forward_hooks` lists them).
* :func:`check_mixed` refuses layers whose rows carry different bit-widths, integer ones among them (no runtime
  format stores per-row bits), unless ``promote=True``, naming every such layer and its scheme in the
  :class:`ExportError`; a layer of float and pruned rows only is written as its float weight.
* :func:`layer_weight` returns one layer's weight as a single uniform block of codes, scales and zero points
  (:class:`UniformWeight`): a copy of the stored row group (exact), or, for a mixed layer with ``promote=True``,
  every row requantized to the layer's largest integer bit-width, with the largest absolute weight change.
* :func:`float_tensors` returns every other tensor of the model under the name the model's ``state_dict`` gives
  it (the Hugging Face checkpoint names for a transformers model), tied duplicates dropped.
* :func:`parse_size` (from the registry) reads ``max_shard_size``-style byte counts (``"5GB"``).
* :func:`copy_tokenizer_files` copies the tokenizer / processor files of a source folder
  (:func:`source_folder`: an explicit folder, or ``model.name_or_path`` when that is a local folder).
* :func:`check_export_folder` refuses a compressed-tensors output folder the export may not replace (an earlier
  export carries :data:`EXPORT_MARKER` in its safetensors metadata); :func:`export_target` follows a symlinked
  output path to the folder it names.

Dequantised weight (the layout's rule, which every exporter must reproduce): with ``g(j)`` the scale group of
column ``j``::

    asymmetric:         w[n, j] = (u[n, j] - z[n, g(j)]) * s[n, g(j)]
    symmetric, b >= 2:  w[n, j] = (u[n, j] - 2^(b-1)) * s[n, g(j)]
    symmetric, b == 1:  w[n, j] = (2 u[n, j] - 1) * s[n, g(j)]
"""
from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import nn

from ..kernels.layout import dequantize_codes
from ..quant.config import FLOAT_BITS
from ..quant.core import quantize
from ..quant.hooks import HOOK_OWNERS, MAKE_PERMANENT, ModuleHook, forward_hooks  # noqa: F401  (ModuleHook: re-exported)
from ..quant.modules import QUANT_MODULES, QuantEmbedding
from .registry import ExportError, link_target, output_file_path, parse_size  # noqa: F401  (parse_size: re-exported)

T = TypeVar("T")
#: a ``QuantLinear`` / ``QuantConv2d`` (typed loosely: their row-group buffers are registered by name)
QuantLayer = Any

#: storage buffers of a quantized layer (its bias is exported as a normal tensor)
QUANT_BUFFER_PREFIXES = ("qweight_", "scales_", "zeros_", "fweight_", "bit_map", "rows_")

#: tokenizer and processor files that a serving runtime reads next to the weights
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model", "vocab.json",
    "vocab.txt", "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json",
    "preprocessor_config.json", "processor_config.json", "video_preprocessor_config.json",
)


def quantized_layers(model: nn.Module) -> list[tuple[str, QuantLayer]]:
    """``(name, layer)`` of every medquant-quantized layer, in module order."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, QUANT_MODULES)]


def is_integer_bits(bits: int) -> bool:
    return 1 <= bits <= 8


def scheme_string(bits: int, symmetric: bool, scope: str, group_size: int) -> str:
    """``"int4 sym g128"``, ``"int8 asym channel"``, ``"int3 asym tensor"``; ``"float16"``; ``"pruned"``."""
    if bits in FLOAT_BITS:
        return f"float{bits}"
    if bits == 0:
        return "pruned"
    where = f"g{group_size}" if scope == "group" else scope
    return f"int{bits} {'sym' if symmetric else 'asym'} {where}"


def row_counts(layer: QuantLayer) -> dict[int, int]:
    """Rows per bit-width of a quantized layer, e.g. ``{3: 10, 4: 22}``."""
    rb = layer.row_bits()
    return {b: int((rb == b).sum()) for b in layer.bit_groups}


def layer_scheme(layer: QuantLayer) -> str:
    """A quantized layer's scheme as text; a mixed layer lists rows per bit-width: ``"mixed {3: 10 rows, 4: 22
    rows} asym g128"`` (the scheme words of the layer's largest integer bit-width)."""
    cfg = layer.config
    if not layer.mixed:
        b = layer.bit_groups[0]
        return scheme_string(b, cfg.is_symmetric(b), cfg.scope, cfg.group_size)
    rows = ", ".join(f"{b}: {n} rows" for b, n in row_counts(layer).items())
    ints = [b for b in layer.bit_groups if is_integer_bits(b)]
    tail = scheme_string(max(ints), cfg.is_symmetric(max(ints)), cfg.scope, cfg.group_size).split(" ", 1)[1] \
        if ints else ""
    return f"mixed {{{rows}}}" + (f" {tail}" if tail else "")


def is_float_layer(layer: QuantLayer) -> bool:
    """True when a quantized layer holds no integer rows (all rows float or pruned): export it as a float weight."""
    return not any(is_integer_bits(b) for b in layer.bit_groups)


def mixed_layers(model: nn.Module) -> list[tuple[str, QuantLayer]]:
    """The quantized layers whose rows do not all share one bit-width and that hold integer rows (a layer of only
    float and pruned rows is its dequantised float weight, which every format stores as float exactly)."""
    return [(name, m) for name, m in quantized_layers(model) if m.mixed and not is_float_layer(m)]


def check_mixed(model: nn.Module, promote: bool, format: str) -> list[str]:
    """Refuse per-row mixed bit-widths unless ``promote``; return the names of the mixed layers.

    Raises:
        ExportError: ``promote`` is False and some layers mix bit-widths; the message lists each layer with its
            rows per bit-width.
    """
    mixed = mixed_layers(model)
    if mixed and not promote:
        listed = "; ".join(f"{name}: {layer_scheme(m)}" for name, m in mixed)
        raise ExportError(
            f"format={format!r} stores one bit-width per layer, but {len(mixed)} layer(s) mix bit-widths row by "
            f"row: {listed}. Pass promote=True (command line: --promote) to requantize every row of such a layer "
            f"to the layer's largest integer bit-width (lossy, reported per layer), or quantize with one "
            f"bit-width per layer")
    return [name for name, _ in mixed]


def quantized_embeddings(model: nn.Module) -> list[tuple[str, QuantLayer]]:
    """``(name, table)`` of every ``QuantEmbedding`` (packed embedding rows, :func:`medquant.quantize_embeddings_`);
    ``table.dequantized_weight(dtype)`` is the ``(num_embeddings, embedding_dim)`` table it looks rows up in."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, QuantEmbedding)]


#: packages whose modules hold tensors that are not the model's own weights: PEFT (``PeftModel`` and unmerged
#: adapter layers: ``base_layer`` / ``lora_A`` / ``lora_B``) and bitsandbytes (``Linear4bit`` / ``Linear8bitLt``: a
#: packed integer weight and its quantization state)
FOREIGN_PACKAGES = ("peft", "bitsandbytes")


_FOREIGN_ADVICE = {
    "peft": "PEFT adapters: merge them into the layers with merge_and_unload() and export the model it returns",
    "bitsandbytes": "bitsandbytes Linear4bit / Linear8bitLt layers: dequantize them (medquant.qlora.nf4_dequantize_ "
                    "for Linear4bit) and quantize with medquant",
}


def foreign_modules(model: nn.Module, allow: tuple[type, ...] = ()) -> list[tuple[str, str]]:
    """``(name, class)`` of the modules an export cannot write as the model's own layers: medquant modules other
    than ``QuantLinear`` / ``QuantConv2d`` and the classes in ``allow`` (e.g. quantized MoE experts, fake-quantization
    parametrizations, ``QuantEmbedding`` unless allowed), layers with a ``torch.nn.utils.parametrize``
    parametrization (their weight is computed, not stored), and the modules of :data:`FOREIGN_PACKAGES` (a
    ``PeftModel`` and its unmerged adapter layers; bitsandbytes 4-bit / 8-bit layers)."""
    from torch.nn.utils import parametrize

    out = []
    for name, m in model.named_modules():
        if isinstance(m, QUANT_MODULES + tuple(allow)):
            continue
        package = type(m).__module__.split(".")[0]
        if package == "medquant" or package in FOREIGN_PACKAGES or parametrize.is_parametrized(m):
            out.append((name, type(m).__name__))
    return out


def input_quantizers(model: nn.Module) -> list[tuple[str, str]]:
    """``(name, scheme)`` of the modules whose input activations are fake-quantized by an
    :class:`~medquant.calibrate.InputQuantizer` attached as a forward pre-hook (``adaround_quantize_(act_bits=...)``,
    ``attach_input_quantizers``), e.g. ``("model.layers.0.self_attn.q_proj", "8-bit asym per-tensor")``.

    Args:
        model: the model to inspect.

    Returns:
        The modules with an active quantizer hook, in module order (a hook removed with
        ``module.input_quantizer_handle.remove()`` is not listed, though the attribute stays).
    """
    from ..quant.activations import input_quantizers as active

    return [(name, f"{q.bits}-bit {'sym' if q.symmetric else 'asym'} per-tensor") for name, q in active(model).items()]


def check_no_input_quantizers(model: nn.Module, format: str, accepted: str = "",
                              keeps: Callable[[str, nn.Module], bool] | None = None) -> None:
    """Refuse a model whose layers quantize their inputs (:func:`input_quantizers`): the export writes the weights
    only, so the file would compute ``W x`` where medquant computes ``W Q(x)``, another model.

    Args:
        model: the model to export.
        format: the format name, for the message.
        accepted: a format-specific alternative appended to the message (e.g. ONNX's own static activations).
        keeps: ``keeps(name, module)`` is True for a module whose forward hooks the file carries (a traced
            module of the ONNX export): its input quantizer is not refused. None: the file carries no hook.

    Raises:
        ExportError: some modules carry an input quantizer; the message names each with its scheme, says that the
            format carries weight-only quantization, and how to remove the quantizers to export the weights alone.
    """
    found = input_quantizers(model)
    if keeps is not None:
        mods = dict(model.named_modules())
        found = [(n, s) for n, s in found if not keeps(n, mods[n])]
    if found:
        listed = "; ".join(f"{n or '(model)'}: {s}" for n, s in found[:8]) + \
            (f" and {len(found) - 8} more" if len(found) > 8 else "")
        raise ExportError(
            f"format={format!r} writes weight-only quantized layers, but {len(found)} module(s) fake-quantize their "
            f"input activations with an InputQuantizer forward pre-hook (adaround_quantize_(act_bits=...)), which "
            f"the file cannot carry: {listed}. Written without them it would compute with float activations, not "
            f"the model medquant computes. Accepted: a model without input quantizers - to export the weights "
            f"alone, remove them first (module.input_quantizer_handle.remove() on each listed module; the "
            f"calibration records keep their parameters for attach_input_quantizers)" + (f"; {accepted}" if accepted
                                                                                        else ""))


_HOOK_ADVICE = {
    "adaptive": "an AdaptiveQuantizer chooses each sample's activation bits per call, which no export format "
                "carries: call remove() on the AdaptiveQuantizer (it returns the model, weights quantized, "
                "activations float) and export that, or export the model's weights without wrapping it",
    "input": "an InputQuantizer fake-quantizes the module's input: remove it "
             "(module.input_quantizer_handle.remove())",
    "reparametrization": "a torch.nn.utils reparametrisation computes the weight from other tensors "
                         "(weight_orig and weight_mask, weight_g and weight_v), which the state dict holds instead "
                         f"of the weight: {MAKE_PERMANENT}",
    "user": "a forward hook or pre-hook can change the module's output or input, which the file cannot compute: "
            "remove it (handle.remove() on the handle register_forward_hook / register_forward_pre_hook returned) "
            "to export the weights alone, or build what it computes into the model's layers",
}
_LOST_HANDLES = ("without the handle (a hook registered without keeping it, a copy of a wrapped model), "
                 "medquant.quant.hooks.forward_hooks(model) lists the hooks and .remove() on each takes it off")


def check_forward_hooks(model: nn.Module, format: str, keeps: Callable[[str, nn.Module], bool] | None = None,
                        writes: str = "", accepted: str = "", input_accepted: str = "") -> None:
    """Refuse a model whose forward hooks (:func:`forward_hooks`) change what it computes where the file would drop
    them: a weight-only file carries tensors, not the Python a module runs around its forward.

    Refused, naming each module and hook: input quantizers (:func:`check_no_input_quantizers`, its message);
    the sites of an :class:`~medquant.adaptive.AdaptiveQuantizer` (its bits are chosen per call: always refused);
    any other forward hook or pre-hook (a user's, torch's ``prune`` / ``weight_norm`` reparametrisations) on a
    module whose hooks the file does not carry. Accepted: hooks known to change nothing (transformers' output
    recorders and ``enable_input_require_grads``, the input cast of medquant's ONNX simulation), and backward and
    state-dict hooks (not forward hooks).

    Args:
        model: the model to export.
        format: the format name, for the messages.
        keeps: ``keeps(name, module)`` is True for a module whose forward hooks the file carries (the ONNX export
            traces the modules it keeps); None: the file carries no hook (weight-only formats).
        writes: what the format writes of a model, for the message (default: its weights only, no hooks).
        accepted: what else the format accepts, appended to the message (e.g. which hooks ONNX traces).
        input_accepted: appended to the message about input quantizers (:func:`check_no_input_quantizers`).

    Raises:
        ExportError: as above; the message names every such module with the kind of hook and what installed it,
            says why the file cannot carry it and what is accepted (how to remove it).
    """
    check_no_input_quantizers(model, format, input_accepted, keeps)
    mods = dict(model.named_modules())
    found = [h for h in forward_hooks(model) if h.owner == "adaptive" or (
        h.owner != "harmless" and not (keeps is not None and keeps(h.module, mods[h.module])))]
    if not found:
        return
    listed = "; ".join(h.describe() for h in found[:8]) + (f" and {len(found) - 8} more" if len(found) > 8 else "")
    owners = [o for o in HOOK_OWNERS if any(h.owner == o for h in found)]
    writes = writes or "writes the model's weights only, not the forward hooks that run around its modules"
    raise ExportError(
        f"format={format!r} {writes}, so {len(found)} forward hook(s) that change what the model computes "
        f"would be lost: {listed}. Written without them the file would compute another model. "
        f"Accepted: modules without such forward hooks (backward and state-dict hooks are fine) - "
        + "; ".join(_HOOK_ADVICE[o] for o in owners) + f"; {_LOST_HANDLES}" + (f"; {accepted}" if accepted else ""))


def check_materialised(model: nn.Module, format: str) -> None:
    """Refuse a model some of whose parameters or buffers hold no data: tensors on the ``meta`` device (a skeleton
    built with ``init_empty_weights`` or under ``torch.device("meta")``, weights a ``device_map`` offloaded), whose
    values the file cannot hold.

    Args:
        model: the model to export.
        format: the format name, for the message.

    Raises:
        ExportError: naming the tensors (the first eight) and how to export such a model.
    """
    empty = [name for name, t in (*model.named_parameters(remove_duplicate=False),
                                  *model.named_buffers(remove_duplicate=False)) if t.is_meta]
    if empty:
        listed = ", ".join(empty[:8]) + (f" ... ({len(empty)} tensors)" if len(empty) > 8 else "")
        raise ExportError(f"format={format!r} writes the model's tensors, but {len(empty)} of them are on the meta "
                          f"device and hold no data: {listed}. Accepted: a model whose weights are all loaded (on the "
                          "CPU or one GPU; not a skeleton built with init_empty_weights / torch.device('meta'), nor "
                          "weights a device_map offloaded to disk): load it whole, e.g. from_pretrained(..., "
                          "device_map='cpu'), then quantize and export it")


def check_native(model: nn.Module, format: str, allow: tuple[type, ...] = ()) -> None:
    """Raise :class:`ExportError` listing :func:`foreign_modules` (the format has no tensors for them), tensors without
    data (:func:`check_materialised`), or the modules
    with input quantizers or other forward hooks a weight-only file drops (:func:`check_forward_hooks`); a backend
    that writes some other medquant module itself (e.g. ``QuantEmbedding`` as a float table) passes it in ``allow``.

    Args:
        model: the model to export.
        format: the format name, for the messages.
        allow: medquant module classes the backend writes itself.

    Raises:
        ExportError: as above, naming the modules.
    """
    check_materialised(model, format)
    check_forward_hooks(model, format)
    found = foreign_modules(model, allow)
    if found:
        listed = "; ".join(f"{n or '(model)'}: {c}" for n, c in found[:8]) + (" ..." if len(found) > 8 else "")
        found_names = {name for name, _ in found}
        packages = {type(m).__module__.split(".")[0] for n, m in model.named_modules() if n in found_names}
        advice = [_FOREIGN_ADVICE[p] for p in FOREIGN_PACKAGES if p in packages]
        raise ExportError(
            f"format={format!r} writes the model's own layers, but {len(found)} module(s) are medquant wrappers, "
            f"parametrized layers or other libraries' layers it has no tensors for: {listed}. Remove them first ("
            + "; ".join(advice + ["detach fake quantization, or keep such layers out of quantize_"])
            + "); quantized MoE experts are not supported by this format's export yet")


@dataclass
class UniformWeight:
    """One layer's weight as a single block of codes: every row the same bits, scheme, scope and group size.

    Attributes:
        codes: unsigned codes ``(N, K_pad)`` uint8 (columns ``>= k`` are padding, code 0).
        scales: float32, ``(N, K_pad / group_size)`` (group), ``(N, 1)`` (channel) or ``(1, 1)`` (tensor); the
            stored scales converted to float32 (exact).
        zeros: float32 integer zero points of the scales' shape (asymmetric), or None (symmetric: ``2^(b-1)``).
        bits, symmetric, scope: the scheme.
        group_size: K elements per scale (``K_pad`` for channel and tensor scope).
        k: real input size.
        how: ``"exact repack"`` (the stored codes) or ``"lossy requantization"`` (a promoted mixed layer).
        max_abs_error: largest ``|new - stored|`` over the dequantised weight (0.0 when exact).
        note: what was done (the promotion).
    """

    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor | None
    bits: int
    symmetric: bool
    scope: str
    group_size: int
    k: int
    how: str = "exact repack"
    max_abs_error: float = 0.0
    note: str = ""

    @property
    def n(self) -> int:
        return self.codes.shape[0]

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The dense ``(N, k)`` weight by the layout's rule (module docstring), float32 arithmetic."""
        return dequantize_codes(self.codes, self.scales, self.zeros, self.bits, self.symmetric, self.scope,
                                self.group_size, self.k, dtype=dtype)

    def scheme(self) -> str:
        return scheme_string(self.bits, self.symmetric, self.scope, self.group_size)


def _from_packed(layer: QuantLayer, b: int) -> UniformWeight:
    pw = layer.packed_weight(b)
    zeros = None if pw.zeros is None else pw.zeros.float()
    return UniformWeight(pw.codes(), pw.scales.float(), zeros, b, pw.symmetric, pw.scope, pw.group_elems, pw.k)


@torch.no_grad()
def layer_weight(layer: QuantLayer, promote: bool = False) -> UniformWeight | None:
    """The layer's weight as one :class:`UniformWeight`, or None for a layer without integer rows (float/pruned).

    A layer with one integer bit-width is returned exactly as stored; a layer without integer rows (float and
    pruned rows, mixed or not) is None, with or without ``promote``. A mixed layer with integer rows raises
    :class:`ExportError` unless ``promote``; promoted, its largest integer bit-width ``B`` becomes the layer's: rows
    already at ``B`` keep their codes and scales (group/channel scope), every other row (fewer bits, float or
    pruned) is quantized again at ``B`` bits from its dequantised values, with the layer's scope, group size and
    the symmetry medquant uses at ``B`` bits, padded along K like the stored ``B``-bit rows (the layer's layout:
    dense 3/5/6/7-bit rows pad K to a multiple of 32 and of the group size); tensor scope has one scale for the
    whole matrix, so all rows are quantized again.
    """
    if not layer.mixed:
        b = layer.bit_groups[0]
        return _from_packed(layer, b) if is_integer_bits(b) else None
    ints = [b for b in layer.bit_groups if is_integer_bits(b)]
    if not ints:  # float and pruned rows only: the float weight, nothing to requantize
        return None
    if not promote:
        raise ExportError(f"layer mixes bit-widths ({layer_scheme(layer)}); pass promote=True to requantize it")
    top = max(ints)
    cfg = replace(layer.config, bits=top, channel_bits=None)
    w = layer.dequantized_weight(torch.float32)
    if cfg.scope == "tensor":
        q = quantize(w, cfg, top)
        out = UniformWeight(q.codes, q.scales.float(), None if q.zeros is None else q.zeros.float(), top,
                            q.symmetric, q.scope, q.group_size, q.k)
    else:
        kept = _from_packed(layer, top)
        rows_top = torch.nonzero(layer.row_bits() == top).flatten()
        others = torch.nonzero(layer.row_bits() != top).flatten()
        # padded like the stored row group (K padded to the lcm of the group size and the top width's packing
        # block: dense 3/5/6/7-bit rows pad to a multiple of 32), so both blocks have the same columns and groups
        q = quantize(w.index_select(0, others), cfg, top, dense=layer.dense)
        if q.codes.shape[1] != kept.codes.shape[1] or q.scales.shape[1] != kept.scales.shape[1]:
            raise ExportError(f"cannot promote {layer_scheme(layer)}: the requantized rows have {q.codes.shape[1]} "
                              f"padded columns / {q.scales.shape[1]} scales per row, the stored {top}-bit rows "
                              f"{kept.codes.shape[1]} / {kept.scales.shape[1]} (an unsupported storage layout)")
        n = layer.out_rows
        codes = torch.zeros(n, kept.codes.shape[1], dtype=torch.uint8)
        scales = torch.zeros(n, kept.scales.shape[1], dtype=torch.float32)
        codes.index_copy_(0, rows_top, kept.codes)
        codes.index_copy_(0, others, q.codes)
        scales.index_copy_(0, rows_top, kept.scales)
        scales.index_copy_(0, others, q.scales.float())
        zeros = None
        if kept.zeros is not None:
            zeros = torch.zeros_like(scales)
            zeros.index_copy_(0, rows_top, kept.zeros)
            assert q.zeros is not None  # same symmetry as the kept rows
            zeros.index_copy_(0, others, q.zeros.float())
        out = UniformWeight(codes, scales, zeros, top, kept.symmetric, kept.scope, kept.group_size, kept.k)
    out.how = "lossy requantization"
    out.max_abs_error = float((out.dequantize(torch.float32) - w).abs().max())
    out.note = f"promoted from {layer_scheme(layer)} to {top} bits"
    return out


def _is_quant_storage(key: str, quant_names: set[str]) -> bool:
    prefix, _, leaf = key.rpartition(".")
    return prefix in quant_names and leaf.startswith(QUANT_BUFFER_PREFIXES)


def float_tensors(model: nn.Module) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Every tensor of ``model.state_dict()`` except the quantized layers' (and quantized embeddings') codes, scales,
    zero points, float rows and bit maps (their biases stay), as contiguous CPU tensors.

    Returns:
        ``(tensors, dropped)``: ``dropped`` names the tensors left out because they share storage with an
        earlier one (tied weights, e.g. an LM head tied to the input embeddings): formats store them once.
    """
    quant_names = {name for name, _ in quantized_layers(model) + quantized_embeddings(model)}
    seen: dict[tuple, str] = {}
    tensors: dict[str, torch.Tensor] = {}
    dropped: list[str] = []
    for key, t in model.state_dict(keep_vars=False).items():
        if _is_quant_storage(key, quant_names):
            continue
        ident = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype) \
            if t.numel() else None
        if ident is not None and ident in seen:
            dropped.append(key)
            continue
        if ident is not None:
            seen[ident] = key
        tensors[key] = t.detach().cpu().contiguous()
    return tensors, dropped


def head_is_tied(model: nn.Module) -> bool:
    """True when the model's output embedding is a float layer sharing its weight with the input embedding."""
    get_out = getattr(model, "get_output_embeddings", None)
    get_in = getattr(model, "get_input_embeddings", None)
    if get_out is None or get_in is None:
        return False
    try:
        out, inp = get_out(), get_in()
    except (AttributeError, NotImplementedError):
        return False
    if out is None or inp is None or isinstance(out, QUANT_MODULES):
        return False
    w_out, w_in = getattr(out, "weight", None), getattr(inp, "weight", None)
    return isinstance(w_out, torch.Tensor) and isinstance(w_in, torch.Tensor) and \
        w_out.untyped_storage().data_ptr() == w_in.untyped_storage().data_ptr()


def source_folder(model: nn.Module, source: str | Path | None) -> Path | None:
    """The folder to copy tokenizer / processor files from: ``source`` if given (must be a folder), else
    ``model.name_or_path`` when that is a local folder, else None."""
    if source is not None:
        folder = Path(source)
        if not folder.is_dir():
            raise ExportError(f"source={str(source)!r} is not a folder (it should hold the tokenizer / processor "
                              "files to copy next to the export)")
        return folder
    name = getattr(model, "name_or_path", None) or getattr(getattr(model, "config", None), "_name_or_path", None)
    if name and Path(name).is_dir():
        return Path(name)
    return None


def copy_tokenizer_files(source: Path | None, dest: Path, skip: Iterable[str] = ()) -> list[str]:
    """Copy the :data:`TOKENIZER_FILES` present in ``source`` into ``dest``; returns the copied file names."""
    if source is None:
        return []
    skip = set(skip)
    copied = []
    for fname in TOKENIZER_FILES:
        src = source / fname
        if fname not in skip and src.is_file():
            shutil.copyfile(src, dest / fname)
            copied.append(fname)
    return copied


def progress(items: Iterable[T], total: int | None = None, desc: str = "export", enabled: bool = False,
             unit: str = "layer") -> Iterator[T]:
    """``items`` wrapped in a tqdm bar when ``enabled`` (command line), else unchanged."""
    if not enabled:
        yield from items
        return
    from tqdm.auto import tqdm

    yield from tqdm(items, total=total, desc=desc, unit=unit)


def gguf_output_path(path: str | os.PathLike, overwrite: bool) -> Path:
    """The file a GGUF export writes: ``path`` itself when it ends in ``.gguf``, else ``path/model.gguf``.

    Raises:
        ExportError: the file's path is a folder (``path`` ends in ``.gguf`` and is a folder, or ``path`` holds a
            folder ``model.gguf``); ``path`` (without ``.gguf``, naming a folder) is a file; the file exists and
            ``overwrite`` is False.
    """
    return output_file_path(path, overwrite, suffix=".gguf", format="gguf")


#: the entry medquant's compressed-tensors export writes into the metadata of every safetensors file it writes
#: (besides safetensors' ``"format": "pt"``): what marks a folder as an earlier export of its own
EXPORT_MARKER = ("medquant.export", "compressed-tensors")
#: the files an export writes, besides its safetensors shards (:data:`_SHARD`)
EXPORT_FILES = frozenset({"config.json", "generation_config.json", "model.safetensors", "model.safetensors.index.json",
                          *TOKENIZER_FILES})
_SHARD = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")
_EXPORT_LAYOUT = ("a config.json whose quantization_config has quant_method 'compressed-tensors' and format "
                  "'pack-quantized', model.safetensors or model-NNNNN-of-NNNNN.safetensors shards each carrying "
                  f"the safetensors metadata entry {EXPORT_MARKER[0]!r}: {EXPORT_MARKER[1]!r} that medquant's "
                  "export writes, and no other entries than the files the export writes (config.json, "
                  "generation_config.json, the weights with model.safetensors.index.json, tokenizer / processor "
                  "files, a remote-code model's .py files)")


def _entry(p: Path) -> str:
    """A folder entry's name as the messages show it: ``name/`` for a folder, ``name (a symbolic link)``,
    ``name (not a plain file)``."""
    if p.is_symlink():
        return f"{p.name} (a symbolic link)"
    return p.name + ("/" if p.is_dir() else "" if p.is_file() else " (not a plain file)")


def _some(names: list[str], at_most: int = 8) -> str:
    return ", ".join(names[:at_most]) + (f" ... ({len(names)} entries)" if len(names) > at_most else "")


def safetensors_metadata(file: Path) -> dict[str, str] | None:
    """The ``__metadata__`` of a safetensors file, read from its header alone (8 bytes: the header's length ``n``,
    little-endian; then ``n`` bytes of JSON); ``{}`` when the header has none, None when ``file`` is not a readable
    safetensors file (too short, a header length above 100 MB or past the file's end, not a JSON object)."""
    try:
        with open(file, "rb") as f:
            head = f.read(8)
            if len(head) != 8:
                return None
            n = int.from_bytes(head, "little")
            if not 2 <= n <= 100_000_000 or n > os.fstat(f.fileno()).st_size - 8:
                return None
            header = json.loads(f.read(n).decode("utf-8"))
    except (OSError, ValueError):  # ValueError: UnicodeDecodeError and JSONDecodeError
        return None
    if not isinstance(header, dict):
        return None
    meta = header.get("__metadata__", {})
    return meta if isinstance(meta, dict) else None


def _not_an_export(folder: Path) -> str | None:
    """Why the non-empty ``folder`` is not recognisably an earlier export of :func:`export_compressed_tensors`, or
    None when it is one: it holds only regular files named as the export names its files (:data:`EXPORT_FILES`,
    ``model-NNNNN-of-NNNNN.safetensors`` shards, and ``*.py`` code files when its ``config.json`` has an
    ``auto_map``: the code of a remote-code model), among them ``config.json`` whose ``quantization_config`` has
    ``quant_method: "compressed-tensors"`` and format ``pack-quantized``, and ``model.safetensors`` or shards,
    every one of which carries :data:`EXPORT_MARKER` in its safetensors metadata (what the export writes; a
    pack-quantized folder of the same file names written by another tool, such as a Hub checkpoint that
    llm-compressor saved, lacks it)."""
    code = _has_auto_map(folder / "config.json")  # an export of a remote-code model carries its code files
    other = sorted(_entry(p) for p in folder.iterdir()
                   if p.is_symlink() or not p.is_file() or not (p.name in EXPORT_FILES or _SHARD.fullmatch(p.name)
                                                                or (code and p.suffix == ".py")))
    if other:
        return f"the export does not write {_some(other)}"
    config = folder / "config.json"
    if not config.is_file():
        return "it has no config.json"
    try:
        qc = json.loads(config.read_text(encoding="utf-8")).get("quantization_config")
    except (OSError, ValueError, AttributeError) as e:  # AttributeError: JSON that is not an object
        return f"its config.json is not a readable JSON object ({type(e).__name__})"
    if not isinstance(qc, dict):
        return "its config.json has no quantization_config"
    if qc.get("quant_method") != "compressed-tensors":
        return f"its config.json's quantization_config has quant_method {qc.get('quant_method')!r}"
    if qc.get("format") != "pack-quantized":
        return f"its config.json's quantization_config has format {qc.get('format')!r}"
    weights = sorted(p.name for p in folder.iterdir() if p.name == "model.safetensors" or _SHARD.fullmatch(p.name))
    if not weights:
        return "it has no model.safetensors (nor model-NNNNN-of-NNNNN.safetensors shards)"
    key, value = EXPORT_MARKER
    for name in weights:
        meta = safetensors_metadata(folder / name)
        if meta is None:
            return f"its {name} is not a readable safetensors file"
        if meta.get(key) != value:
            return (f"its {name} carries no medquant export marker (the safetensors metadata entry {key!r}: "
                    f"{value!r}, which every export of medquant writes): it was not written by medquant's export "
                    "(a pack-quantized folder saved by another tool, e.g. llm-compressor, or an export of a "
                    "medquant before the marker)")
    return None


def _has_auto_map(config: Path) -> bool:
    """Whether ``config`` is a readable JSON object with a non-empty ``auto_map`` (a model whose code is files of its
    folder)."""
    try:
        data = json.loads(config.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and isinstance(data.get("auto_map"), dict) and bool(data["auto_map"])


def export_target(path: Path) -> Path:
    """The folder an export to ``path`` writes: ``path`` itself, or, when ``path`` is a symbolic link, the folder
    it resolves to (every link followed, as the kernel follows them: ``os.path.realpath``). The link is kept as it
    is; the target is checked (:func:`check_export_folder`) and replaced, its temporary folder made beside it.

    Raises:
        ExportError: ``path`` is a link to something missing (a dangling link: the export does not create a
            link's target), or a loop of links.
    """
    return link_target(path, "folder") if path.is_symlink() else path


def check_export_folder(path: Path, overwrite: bool) -> None:
    """Refuse an output ``path`` that the export may not replace: a file; a non-empty folder that is not an earlier
    export (:func:`_not_an_export`; whatever ``overwrite`` says, naming what it holds and what ``overwrite``
    accepts); an earlier export without ``overwrite``. An empty folder, or a missing one, is written. A symbolic
    link is checked at its target (:func:`export_target`, which also refuses a dangling link). (The command line
    checks ``OUT`` with it before it loads the model.)

    Raises:
        ExportError: as above.
    """
    path = export_target(path)  # the messages name the folder checked: a link's target
    if path.exists() and not path.is_dir():
        raise ExportError(f"{path} exists and is not a folder; the export is a folder")
    if not path.is_dir():
        return
    entries = sorted(_entry(p) for p in path.iterdir())
    if not entries:
        return
    why = _not_an_export(path)
    if why is not None:
        raise ExportError(f"{path} is not empty and not an earlier compressed-tensors export: it holds "
                          f"{_some(entries)}; "
                          f"{why}. The export replaces its output folder as a whole, so it replaces only an empty "
                          f"folder or, with overwrite=True (command line: --overwrite), an earlier export "
                          f"({_EXPORT_LAYOUT}); it never deletes other files: choose another path or remove the "
                          "folder yourself")
    if not overwrite:
        raise ExportError(f"{path} is not empty (an earlier compressed-tensors export); pass overwrite=True "
                          "(command line: --overwrite) to replace it")
