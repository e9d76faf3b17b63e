"""``format="compressed-tensors"``: a Hugging Face folder that vLLM, SGLang and transformers load.

The folder holds ``config.json`` (the model's configuration plus a ``quantization_config`` with
``quant_method: "compressed-tensors"`` and format ``pack-quantized``), safetensors weights (one file, or shards
of at most ``max_shard_size`` with ``model.safetensors.index.json``; every file's safetensors metadata is
``{"format": "pt", "medquant.export": "compressed-tensors"}``, the marker by which ``overwrite=True`` recognises an
earlier export), ``generation_config.json``, the tokenizer / processor files of the source folder and, for a model
whose class comes from its folder's own code (loaded with ``trust_remote_code=True``), that code with its
``auto_map`` entries.

Weights of a quantized ``Linear`` layer with ``N`` rows, ``K`` inputs and ``b`` bits (1..8):

* ``weight_packed`` int32 ``(N, ceil(K * b / 32))``: signed codes ``q = u - 2^(b-1)`` stored as ``q + 2^(b-1)``
  (so medquant's unsigned code ``u`` itself), packed densely along K: code ``j`` occupies bits
  ``j*b .. j*b + b - 1`` of the row's bit stream, 32 bits per word, lowest bits first (a 3-bit code may
  straddle two words). Packed with the compressed-tensors package's own ``pack_to_int32``.
* ``weight_scale`` ``(N, K / g)`` (group), ``(N, 1)`` (channel) or ``(1,)`` (tensor), float32 by default
  (medquant's float16 scales widen exactly).
* ``weight_zero_point`` (asymmetric only): ``zp = z - 2^(b-1)``, int32 packed along N (``(ceil(N * b / 32), K /
  g)``) for group / channel, int8 ``(1,)`` for tensor.
* ``weight_shape`` int64 ``[N, K]``.

The runtime's dequantisation ``(q - zp) * s = (u - z) * s`` is medquant's, so every integer scheme is an exact
repack, except:

* symmetric 1-bit, ``w = (2u - 1) * s``: written as symmetric 2-bit with ``q = 2u - 1`` in {-1, +1} and the same
  scale (exact re-expression);
* group scope with ``K`` not a multiple of the group size ``g`` (medquant zero-pads K; the format needs whole
  groups): written with group size ``gcd(K, g)``, each scale repeated ``g / gcd(K, g)`` times (exact
  re-expression);
* per-row mixed bit-widths: refused (the error lists the layers) unless ``promote=True``, which requantizes every
  row of such a layer to its largest bit-width (lossy, the largest weight change reported per layer);
* quantized ``Linear`` layers whose rows are all float or pruned: written as float weights (their dequantised
  values) and listed in ``ignore``;
* quantized ``Conv2d`` layers (the format packs Linear weights): written as float weights (their dequantised
  values), not listed in ``ignore`` (the ``"Linear"`` target never matches a convolution; compressed-tensors' own
  config builder does not list one either).

Quantized input embeddings (:func:`medquant.quantize_embeddings_`) are written, by default
(``embeddings="float"``), as their dequantised float table (same values; every runtime reads it). With
``embeddings="packed"`` the table is packed like a Linear weight (``weight_packed`` / ``weight_scale`` /
``weight_zero_point`` / ``weight_shape``, an exact repack) in a config group whose ``targets`` name the embedding
module: compressed-tensors decompresses it, and transformers loads such a folder with
``CompressedTensorsConfig(dequantize=True)`` only (its default compressed load has no packed ``Embedding``);
a serving runtime needs compressed-tensors embedding support. A quantized head tied to the embeddings
(:func:`medquant.tie_quantized_head`) is packed as its own layer either way (the format has no tied packed weights),
with ``tie_word_embeddings`` set to false.

Every ``Linear`` the medquant model keeps in floating point (a vision tower, a projector, the LM head) is listed in
the ``ignore`` list of the configuration and stored as float, and so is every float MoE router (a module whose class
compressed-tensors' ``get_vllm_module_type`` calls ``Linear``: ``*Router*``, ``*Gating*``, ``*Gate``; vLLM builds
routers as linear layers), as compressed-tensors' own config builder lists them.

The runtime holds ``weight_scale`` in the model's dtype (transformers and vLLM load in the ``config.json`` dtype
by default, which records the model's own ``dtype`` as ``save_pretrained`` does, not a stale ``model.config``
value): when that is float16 / bfloat16 and some packed layer's scales are not values of it (medquant's float16
scales in a bfloat16 model), they are rounded on load and the loaded weights differ from medquant's by about one
rounding of that dtype; the report notes those layers (the rows' ``how`` and ``max_abs_error`` describe the folder
itself). Scales that are values of the dtype load as medquant's ``dequantized_weight(dtype)`` exactly.

With several config groups (layers of different schemes), the report notes the layers that transformers'
``CompressedTensorsConfig(dequantize=True)`` loader misreads: it decompresses every layer with ``group_0``'s scheme
(transformers 5, compressed-tensors 0.20.1), so the other groups' layers load with wrong weights, silently when
the shapes fit. Its default (compressed) loader and vLLM match each layer to its own group; asymmetric schemes and
packed embeddings need the ``dequantize=True`` loader, so such an export has no correct transformers load path.

Tensor names are those ``save_pretrained`` writes (the checkpoint names runtimes read), not the in-memory ones:
transformers 5 converts checkpoint weights on load (per-expert MoE weights fused into 3-D ``experts.gate_up_proj`` /
``down_proj``, VLM prefixes such as ``language_model.model.`` renamed to ``model.language_model.``) and reverts that
on save. The float tensors go through transformers' own ``revert_weight_conversion``; a packed layer's tensors
``<layer>.weight_packed`` etc. get the same renamings; a packed layer whose weight a converter transforms on save is
refused. ``ignore`` and ``targets`` keep the in-memory module names, which compressed-tensors matches against the
model transformers builds. Float MoE experts written per expert do not load with transformers' compressed-tensors
loader (5.25: its expert merge dequantizes packed experts only); the report notes converted tensors.

With ``verify=True`` (default) each packed layer is decompressed with the compressed-tensors package's own
decompressor and compared with medquant's dequantised weight; the report's ``max_abs_error`` is that measured
difference. A layer that decompressor cannot read is refused naming it (compressed-tensors 0.20.1 fails on 4-bit
asymmetric group layers of at most 8 output rows, whose zero points pack into a single int32 row: transformers'
``dequantize=True`` loader could not load the folder); ``verify=False`` writes such layers unchecked and notes them.
"""
from __future__ import annotations

import copy
import json
import math
import os
import re
import shutil
import tempfile
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..io.atomic import exchange_paths, is_current_or_above
from ..quant.modules import QuantConv2d, QuantEmbedding, QuantLinear, tied_heads
from .common import (
    EXPORT_MARKER,
    UniformWeight,
    check_export_folder,
    check_mixed,
    check_native,
    copy_tokenizer_files,
    export_target,
    float_tensors,
    head_is_tied,
    is_float_layer,
    layer_scheme,
    layer_weight,
    parse_size,
    progress,
    quantized_embeddings,
    quantized_layers,
    source_folder,
)
from .registry import (
    ExportError,
    ExportReport,
    LayerExport,
    made_folders,
    publish_mode,
    register_export_format,
)

FORMAT = "compressed-tensors"
DEFAULT_MAX_SHARD_SIZE = "5GB"
SCALE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
EMBEDDINGS = ("float", "packed")


@dataclass
class PackedLayer:
    """One layer in the format: its tensors (local names) and its weight scheme."""

    tensors: dict[str, torch.Tensor]
    bits: int
    symmetric: bool
    strategy: str  # "group", "channel" or "tensor"
    group_size: int | None
    how: str
    note: str

    def scheme_key(self) -> tuple:
        return (self.bits, self.symmetric, self.strategy, self.group_size)

    def target(self) -> str:
        where = f"group {self.group_size}" if self.strategy == "group" else self.strategy
        return f"pack-quantized int{self.bits} {'sym' if self.symmetric else 'asym'} {where}"


def pack_layer(uw: UniformWeight, n: int, k: int, scale_dtype: torch.dtype = torch.float32) -> PackedLayer:
    """The format's tensors for one uniform weight (see the module docstring for the layout)."""
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    bits, sym, how, notes = uw.bits, uw.symmetric, uw.how, [uw.note] if uw.note else []
    u = uw.codes[:, :k].to(torch.int32)
    if sym and bits == 1:  # (2u - 1) * s == q * s with q in {-1, +1}: a symmetric 2-bit code
        q = 2 * u - 1
        bits = 2
        if how == "exact repack":
            how = "exact re-expression"
        notes.append("symmetric 1-bit written as symmetric 2-bit codes {-1, +1} (same values)")
    else:
        q = u - 2 ** (bits - 1)
    scales, zeros = uw.scales, uw.zeros
    group_size: int | None = None
    if uw.scope == "group":
        g = uw.group_size
        gk = math.gcd(k, g)
        if gk != g:
            scales = scales.repeat_interleave(g // gk, dim=1)
            zeros = None if zeros is None else zeros.repeat_interleave(g // gk, dim=1)
            if how == "exact repack":
                how = "exact re-expression"
            notes.append(f"K={k} is not a multiple of the group size {g}: group size {gk}, scales repeated")
        scales, zeros = scales[:, : k // gk], None if zeros is None else zeros[:, : k // gk]
        group_size = gk
    elif uw.scope == "tensor":
        scales, zeros = scales.reshape(1), None if zeros is None else zeros.reshape(1)
    tensors = {"weight_packed": pack_to_int32(q.to(torch.int8).contiguous(), bits),
               "weight_scale": scales.to(scale_dtype).contiguous(),
               "weight_shape": torch.tensor([n, k], dtype=torch.int64)}
    if zeros is not None:
        zp = (zeros - 2 ** (bits - 1)).to(torch.int8)
        tensors["weight_zero_point"] = zp.contiguous() if uw.scope == "tensor" else \
            pack_to_int32(zp, bits, packed_dim=0).contiguous()
    return PackedLayer(tensors, bits, sym, uw.scope, group_size, how, "; ".join(notes))


def _single_word_zero_points(layer: PackedLayer) -> bool:
    """True for the layers whose tensors compressed-tensors 0.20.1's own decompressor cannot read: 4-bit zero points
    packed along N into a single int32 row (``N <= 8``) with more than one group. Its ``unpack_from_int32`` views the
    transposed ``(groups, 1)`` words as bytes, which ``Tensor.view`` refuses (``RuntimeError``: stride of the last
    dimension not 1)."""
    zp = layer.tensors.get("weight_zero_point")
    return layer.bits == 4 and layer.strategy == "group" and zp is not None and zp.ndim == 2 and zp.shape[0] == 1 \
        and zp.shape[1] > 1


def _unreadable_message(unreadable: list[tuple[str, PackedLayer, str]]) -> str:
    """The refusal for layers whose tensors compressed-tensors' own decompressor fails on (``verify=True``)."""
    listed = "; ".join(f"{name} ({pl.target()}, {int(pl.tensors['weight_shape'][0])} rows)"
                       for name, pl, _ in unreadable[:8]) + (" ..." if len(unreadable) > 8 else "")
    known = any(_single_word_zero_points(pl) for _, pl, _ in unreadable)
    why = (" compressed-tensors 0.20.1 fails on 4-bit asymmetric group layers of at most 8 output rows (e.g. a "
           "classifier head with few classes): their zero points pack into a single int32 row, which its "
           "unpack_from_int32 cannot view as bytes." if known else "")
    return (f"compressed-tensors' own decompressor cannot read {len(unreadable)} packed layer(s): {listed} "
            f"({unreadable[0][2]}).{why} transformers' CompressedTensorsConfig(dequantize=True) loader, the one that "
            "reads asymmetric schemes, decompresses with it, so the folder would not load. Accepted: those layers "
            "symmetric or with channel scope (or another bit-width), or kept float (skip them when quantizing, e.g. "
            "skip=['classifier']); verify=False writes the folder anyway (for a runtime with its own reader), "
            "the layers noted in the report. Nothing was written")


def quantization_args(layer: PackedLayer):
    """compressed-tensors' ``QuantizationArgs`` of a packed layer."""
    from compressed_tensors.quantization import QuantizationArgs

    return QuantizationArgs(num_bits=layer.bits, type="int", symmetric=layer.symmetric, strategy=layer.strategy,
                            group_size=layer.group_size)


def decompress_layer(layer: PackedLayer) -> torch.Tensor:
    """The weight that compressed-tensors' own decompressor reads back from the layer's tensors."""
    from compressed_tensors.compressors.pack_quantized import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationScheme

    scheme = QuantizationScheme(targets=["Linear"], weights=quantization_args(layer))
    return PackedQuantizationCompressor.decompress(dict(layer.tensors), scheme)["weight"]


def _unwrapped(model: nn.Module) -> nn.Module:
    """The model a wrapper holds as its single child, as transformers' ``save_pretrained`` (``unwrap_model``) writes
    it: ``torch.compile``'s ``OptimizedModule`` (``model._orig_mod``) and ``nn.DataParallel`` /
    ``DistributedDataParallel`` (``model.module``), also nested; any other module is returned as it is. Its
    tensor and module names are the checkpoint's, without the wrapper's ``_orig_mod.`` / ``module.`` prefix."""
    for _ in range(16):  # wrappers nest a few levels at most
        inner = getattr(model, "_orig_mod", None) if type(model).__name__ == "OptimizedModule" else None
        if isinstance(inner, nn.Module):
            model = inner
        elif isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            model = model.module
        else:
            break
    return model


def _refuse_current_folder(path: Path) -> None:
    """Refuse an output ``path`` that is the current folder (``.``, ``""``, its absolute path or a symlink to it), a
    folder above it or a file system root, as medquant's checkpoint save does: the finished export is swapped in for
    ``path`` as a whole and the old folder removed (``overwrite=True``), and its temporary folder is made beside it."""
    cwd = Path(os.getcwd())
    real_cwd = Path(os.path.realpath(cwd))
    for p, here in ((Path(os.path.abspath(path)), cwd), (Path(os.path.realpath(path)), real_cwd)):
        if is_current_or_above(p, here):
            raise ExportError(f"refusing to export into {str(path)!r} ({p}): it is the current folder, a folder above "
                              "it or a file system root (the export replaces its output folder as a whole); give "
                              "the export its own folder")


def _check_options(model: nn.Module, path: Path, promote: Any, max_shard_size: Any, scale_dtype: Any,
                   overwrite: Any, source: Any) -> tuple[int, torch.dtype]:
    _refuse_current_folder(path)
    for name, value in (("promote", promote), ("overwrite", overwrite)):
        if not isinstance(value, bool):
            raise ExportError(f"{name} must be True or False, got {value!r}")
    shard = parse_size(max_shard_size)
    if scale_dtype not in SCALE_DTYPES:
        raise ExportError(f"scale_dtype must be one of {', '.join(SCALE_DTYPES)}, got {scale_dtype!r}")
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_dict") or not hasattr(model, "state_dict"):
        raise ExportError(f"format={FORMAT!r} writes a Hugging Face folder and needs a transformers model "
                          f"(with .config); got {type(model).__name__}")
    src = source_folder(model, source)  # checks an explicit source
    if src is not None and path.exists():  # overwrite=True replaces path whole: never with what the export reads
        there, holds = path.resolve(), src.resolve()
        if there == holds or there in holds.parents:
            raise ExportError(f"{path} holds the source folder {src} (source=, or model.name_or_path): the export "
                              "replaces the output folder as a whole, which would delete it; choose an output "
                              "folder outside it")
    check_export_folder(path, overwrite)
    return shard, SCALE_DTYPES[scale_dtype]


def _float_rows(model: nn.Module, exported_float: dict[str, str], tensors: dict[str, torch.Tensor]) -> \
        list[LayerExport]:
    """Report rows for float Linear / Conv2d / Embedding weights (not quantized by medquant)."""
    rows = []
    for name, m in model.named_modules():
        if isinstance(m, (QuantLinear, QuantConv2d, QuantEmbedding)) or \
                not isinstance(m, (nn.Linear, nn.Conv2d, nn.Embedding)):
            continue
        key = f"{name}.weight"
        t = tensors.get(key)
        note = exported_float.get(name, "")
        if t is None:
            note = "tied to the input embeddings (stored once)"
            dtype = str(m.weight.dtype).replace("torch.", "")
        else:
            dtype = str(t.dtype).replace("torch.", "")
        rows.append(LayerExport(name, dtype, dtype, "float", 0.0, note))
    return rows


def _write_shards(tensors: dict[str, torch.Tensor], folder: Path, max_shard: int, show: bool) -> list[str]:
    from safetensors.torch import save_file

    shards: list[dict[str, torch.Tensor]] = [{}]
    sizes = [0]
    for key, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and sizes[-1] + nbytes > max_shard:
            shards.append({})
            sizes.append(0)
        shards[-1][key] = t
        sizes[-1] += nbytes
    if len(shards) == 1:
        names = ["model.safetensors"]
    else:
        names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    for fname, shard in progress(zip(names, shards), total=len(shards), desc="writing", enabled=show, unit="file"):
        save_file(shard, str(folder / fname), metadata={"format": "pt", EXPORT_MARKER[0]: EXPORT_MARKER[1]})
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(sizes)},
                 "weight_map": {key: fname for fname, shard in zip(names, shards) for key in shard}}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True))
        names.append("model.safetensors.index.json")
    return names


def _logical_shape(m: nn.Module) -> tuple[int, ...] | None:
    """The weight shape a Linear / Embedding layer (float or medquant-quantized) stands for, else None."""
    if isinstance(m, (nn.Linear, QuantLinear)):
        return (m.out_features, m.in_features)
    if isinstance(m, (nn.Embedding, QuantEmbedding)):
        return (m.num_embeddings, m.embedding_dim)
    return None


def _check_config_describes_weights(model: Any) -> None:
    """The written ``config.json`` must build the model the weights belong to: a model built from it (on the meta
    device, no memory) has the same Linear / Embedding shapes as ``model``. It does not after structured pruning
    that differs between blocks, or pruning that did not update the config (``from_pretrained`` would then fail
    on size mismatches, and so would a serving runtime)."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(type(model), "_from_config"):
        return
    try:
        with torch.device("meta"):
            skeleton = type(model)._from_config(copy.deepcopy(config))
    except Exception as e:  # noqa: BLE001 - a model class that cannot be rebuilt from its config is not checked
        warnings.warn(f"compressed-tensors export: could not rebuild {type(model).__name__} from its config to check "
                      f"the written config.json against the weights ({type(e).__name__}: {e})", UserWarning,
                      stacklevel=3)
        return
    built = dict(skeleton.named_modules())
    differ = []
    for name, m in model.named_modules():
        have = _logical_shape(m)
        other = built.get(name)
        want = _logical_shape(other) if other is not None else None
        if have is not None and want is not None and have != want:
            differ.append(f"{name} {list(have)} (config: {list(want)})")
    if differ:
        raise ExportError(f"{type(model).__name__}'s config.json does not describe its weights: {len(differ)} "
                          f"layer(s) differ, e.g. {'; '.join(differ[:4])}. A transformers config holds one head count "
                          "and feed-forward size for every block, so a model whose blocks were pruned differently "
                          "(or pruned without updating the config) cannot be written as a transformers folder; "
                          "prune every block alike (StructuredPruner with one ratio) or export with "
                          "medquant.save / medquant.prune.save_pruned. Nothing was written")


def _save_config(model: Any, folder: Path, tied: bool) -> None:
    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    config.architectures = [type(model).__name__]  # as save_pretrained records it
    dtype = _model_dtype(model)
    if dtype is not None:  # the model's own dtype, as save_pretrained records it (not a stale config value)
        config.dtype = str(dtype).removeprefix("torch.")
    if getattr(type(model), "_auto_class", None) is not None:
        # a class from the source folder's own code (trust_remote_code): its code files and auto_map entry go with
        # the export, as save_pretrained writes them (the config's own code is written by config.save_pretrained)
        from transformers.dynamic_module_utils import custom_object_save

        custom_object_save(model, folder, config=config)
    if not tied:  # a quantized or untied head must not be re-tied to the embeddings on load
        for cfg in (config, getattr(config, "text_config", None), getattr(config, "get_text_config", lambda: None)()):
            if cfg is not None and getattr(cfg, "tie_word_embeddings", False):
                cfg.tie_word_embeddings = False
    config.save_pretrained(str(folder))
    gen = getattr(model, "generation_config", None)
    if gen is not None and getattr(model, "can_generate", lambda: False)():
        gen.save_pretrained(str(folder))


def _model_dtype(model: Any) -> torch.dtype | None:
    """The dtype the written ``config.json`` records, as ``save_pretrained`` records it: the model's ``dtype`` (that
    of its first floating-point parameter), whatever ``model.config`` holds (a model moved with ``.to(dtype)`` keeps
    its config's old value, or none); the config's own ``dtype`` / ``torch_dtype`` for a model without one."""
    try:
        value = getattr(model, "dtype", None)
    except StopIteration:  # transformers' dtype property on a model without floating-point parameters
        value = None
    if not (isinstance(value, torch.dtype) and value.is_floating_point):
        config = getattr(model, "config", None)
        value = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
        if isinstance(value, str):
            value = getattr(torch, value.removeprefix("torch."), None)
    return value if isinstance(value, torch.dtype) and value.is_floating_point else None


def _config_dtype(model: Any) -> torch.dtype | None:
    """The half-precision dtype (float16 / bfloat16) the written ``config.json`` records (:func:`_model_dtype`):
    transformers (``dtype="auto"``, its default) and vLLM (``--dtype auto``) load the model in it; None for float32
    or no dtype."""
    value = _model_dtype(model)
    return value if value in (torch.float16, torch.bfloat16) else None


def _representable(scales: torch.Tensor, dtype: torch.dtype) -> bool:
    """True when every scale is a ``dtype`` value. The runtime casts ``weight_scale`` to the model's dtype
    (compressed-tensors initializes it in the weight's dtype) and computes ``(q - zp) * s`` in it; with
    representable scales that is medquant's float32 weight rounded once to ``dtype`` (``|q - zp| < 2^8`` times a
    scale of at most 11 significant bits is exact in float32), i.e. medquant's own ``dequantized_weight(dtype)``."""
    s = scales.float()
    return bool(torch.equal(s.to(dtype).float(), s))


def _ordered_groups(groups: dict[tuple, list[str]]) -> list[tuple[tuple, list[str]]]:
    """The config groups in the order they are written (``group_0`` first): most layers first, ties in module
    order."""
    return sorted(groups.items(), key=lambda kv: -len(kv[1]))


def _vllm_linear(m: nn.Module) -> bool:
    """True for a module that compressed-tensors / vLLM match as ``Linear``: an ``nn.Linear`` (or a medquant
    ``QuantLinear``), or a module whose class name makes compressed-tensors' ``get_vllm_module_type`` call it
    ``"Linear"``: MoE routers (``*Router*``, ``*Gating*``, ``*Gate`` not followed by a lower-case letter, e.g.
    ``Qwen3MoeTopKRouter``), which vLLM builds as linear layers and compressed-tensors' own config builder
    (``QuantizationConfig.from_pretrained``) therefore lists in ``ignore`` when they stay float."""
    if isinstance(m, (nn.Linear, QuantLinear)):
        return True
    name = type(m).__name__
    try:
        from compressed_tensors.quantization.quant_config import get_vllm_module_type
    except ImportError:  # the same rule, for a compressed-tensors without the helper
        return "ExpertMLP" not in name and ("Router" in name or "Gating" in name
                                            or re.search(r"Gate(?![a-z])", name) is not None)
    return get_vllm_module_type(name) == "Linear"


def _init_weights_note(model: nn.Module, packed: list[str]) -> str | None:
    """The packed Linear layers that transformers' default (compressed) loader cannot build: its compressed load
    replaces a Linear's ``weight`` by ``weight_packed`` / ``weight_scale`` and then runs the model's weight
    initialisation, in which some models' ``_init_weights`` read ``module.weight`` of every Linear (SigLIP's
    ``lecun_normal_``: Gemma 3, PaliGemma, SigLIP towers), an ``AttributeError`` (transformers 5). Found by running
    the ``_init_weights`` of each packed layer's nearest transformers ``PreTrainedModel`` on a Linear without a
    weight, on the meta device; ``dequantize=True`` decompresses the weights first and loads."""
    try:
        from transformers import PreTrainedModel
    except ImportError:  # pragma: no cover - compressed-tensors export needs transformers' config classes anyway
        return None
    owners = {n: m for n, m in model.named_modules() if isinstance(m, PreTrainedModel)}
    crashes: dict[str, bool] = {}
    failing: dict[str, list[str]] = {}
    for name in packed:
        owner = max((o for o in owners if not o or name.startswith(o + ".")), key=len, default=None)
        if owner is None:
            continue
        if owner not in crashes:
            stand_in = nn.Linear(2, 2, device="meta")
            del stand_in.weight
            try:
                owners[owner]._init_weights(stand_in)
                crashes[owner] = False
            except AttributeError:
                crashes[owner] = True
            except Exception:  # noqa: BLE001 - anything else is not this known failure
                crashes[owner] = False
        if crashes[owner]:
            failing.setdefault(owner, []).append(name)
    if not failing:
        return None
    where = "; ".join(f"{type(owners[o]).__name__} ({o or 'the model'}: {len(ns)} layer(s))"
                      for o, ns in failing.items())
    return (f"transformers' default (compressed) load of this folder fails with AttributeError: the weight "
            f"initialisation of {where} reads the weight of Linear layers that the compressed load has replaced "
            "by packed tensors (a transformers limitation). Load it with "
            "from_pretrained(..., quantization_config=CompressedTensorsConfig(dequantize=True)), which decompresses "
            "the weights first, or serve it with vLLM")


def _dequantize_loader_note(groups: dict[tuple, list[str]]) -> str | None:
    """With several config groups, the layers that transformers' ``CompressedTensorsConfig(dequantize=True)``
    loader misreads: it decompresses every non-expert layer with one scheme, that of the first group whose targets
    do not name MoE experts (``group_0`` here), so the layers of the other groups load with wrong weights (or fail
    on a shape), without an error in the first case (transformers 5, compressed-tensors 0.20.1)."""
    ordered = _ordered_groups(groups)
    if len(ordered) < 2:
        return None
    others = [n for _, names in ordered[1:] for n in names]
    listed = ", ".join(others[:6]) + (f" ... ({len(others)} layers)" if len(others) > 6 else "")
    return (f"{len(ordered)} config groups: transformers' CompressedTensorsConfig(dequantize=True) loader "
            f"decompresses every layer with group_0's scheme, so the layers of the other group(s) ({listed}) load "
            "with wrong weights, silently when the shapes happen to fit. vLLM, and transformers' default "
            "(compressed) loader for symmetric schemes, read each layer with its own group; an asymmetric or "
            "packed-embedding export with several schemes has no correct transformers load path: give every "
            "layer one scheme for that")


def _reverse_transforms(model: Any) -> tuple[list[Any], list[Any]] | None:
    """transformers' reverse weight transforms for ``model`` as ``save_pretrained`` builds them
    (``transformers.core_model_loading.revert_weight_conversion``): the model's ``_weight_conversions`` (set by
    ``from_pretrained``), else the class's default conversion mapping without legacy renamings and without
    ``PrefixChange``; reversed in order and each reversed. Returns ``(renamings, converters)``, or None when there is
    no conversion (or a transformers without weight conversions)."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import PrefixChange, WeightConverter, WeightRenaming
    except ImportError:
        return None
    conversions = getattr(model, "_weight_conversions", None)
    if conversions is None:
        conversions = [c for c in get_model_conversion_mapping(model, add_legacy=False)
                       if not isinstance(c, PrefixChange)]
    if not conversions:
        return None
    reverse = [c.reverse_transform() for c in conversions[::-1]]
    return ([c for c in reverse if isinstance(c, WeightRenaming)],
            [c for c in reverse if isinstance(c, WeightConverter)])


def _checkpoint_names(model: Any, tensors: dict[str, torch.Tensor], packed: dict[str, dict[str, torch.Tensor]]
                      ) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The tensors to write under the names ``save_pretrained`` writes (the checkpoint names runtimes read).

    transformers 5 converts checkpoint weights on load (e.g. per-expert MoE ``experts.{e}.gate_proj.weight`` /
    ``up_proj`` / ``down_proj`` fused into 3-D ``experts.gate_up_proj`` / ``down_proj``; VLM prefixes such as
    ``language_model.model.`` renamed to ``model.language_model.``) and ``save_pretrained`` reverts that with
    ``revert_weight_conversion``. The float tensors ``tensors`` go through that same function. A packed layer's
    tensors ``<module>.weight_packed`` etc. (``packed``: module name -> local tensors) are renamed with its
    renamings only, as ``save_pretrained`` renames every key that no converter matches; a layer whose weight a
    converter transforms (fused, split or permuted in the checkpoint) is refused, as its packed codes cannot be
    converted.

    Returns ``(tensors by checkpoint name, converted)``: the tensors sorted as ``save_pretrained`` sorts them
    (transformers' ``dot_natural_key``), and the in-memory names of the float tensors a converter (not a plain
    renaming) turned into other tensors (e.g. fused MoE experts split per expert)."""
    transforms = _reverse_transforms(model)
    if transforms is None:
        out = {**tensors, **{f"{m}.{k}": t for m, local in packed.items() for k, t in local.items()}}
        return out, []
    from transformers.core_model_loading import (
        apply_converters,
        apply_renamings,
        dot_natural_key,
        revert_weight_conversion,
    )

    renamings, converters = transforms
    out = {}
    for m, local in packed.items():
        for key in [f"{m}.weight"] + [f"{m}.{k}" for k in local]:
            _, pattern = apply_converters(key, converters)
            if pattern is not None:
                raise ExportError(f"{m}: transformers converts this layer's weight on save ({type(model).__name__}'s "
                                  f"checkpoint format, pattern {pattern!r}), which packed codes cannot go through; "
                                  "keep this layer float (skip it when quantizing). Nothing was written")
        for k, t in local.items():
            out[apply_renamings(f"{m}.{k}", renamings)] = t
    try:
        floats = revert_weight_conversion(model, dict(tensors))
    except Exception as e:
        raise ExportError(f"transformers could not revert {type(model).__name__}'s weight conversion on the float "
                          f"tensors ({type(e).__name__}: {e}), so their checkpoint names are unknown. Nothing was "
                          "written") from e
    clash = sorted(set(floats) & set(out))
    if clash:
        raise ExportError(f"checkpoint names written twice (float and packed): {', '.join(clash[:4])}; nothing "
                          "was written")
    out.update(floats)
    converted = [k for k in tensors if apply_converters(k, converters)[1] is not None]
    return dict(sorted(out.items(), key=lambda kv: dot_natural_key(kv[0]))), converted


def _quantization_config(groups: dict[tuple, list[str]], args: dict[tuple, Any], ignore: list[str],
                         embeddings: set[str] | None = None):
    from compressed_tensors.quantization import QuantizationConfig, QuantizationScheme

    embeddings = embeddings or set()

    # one Linear scheme: "Linear" (every Linear not ignored); several: each group names its layers. Packed
    # embeddings are always named ("Embedding" would also match float embeddings such as a vision tower's)
    linear_groups = sum(1 for names in groups.values() if any(n not in embeddings for n in names))
    config_groups = {}
    for i, (key, names) in enumerate(_ordered_groups(groups)):
        tables = [n for n in names if n in embeddings]
        if linear_groups == 1:
            targets = (["Linear"] if len(tables) < len(names) else []) + tables
        else:
            targets = list(names)
        config_groups[f"group_{i}"] = QuantizationScheme(targets=targets, weights=args[key])
    return QuantizationConfig(config_groups=config_groups, format="pack-quantized",
                              quantization_status="compressed", ignore=ignore)


def _move_into_place(new: Path, path: Path) -> None:
    """Put the finished folder ``new`` at ``path``; an existing ``path`` (``overwrite=True``) is never lost.

    Where Linux's ``renameat2(RENAME_EXCHANGE)`` works the two folders are swapped in one step and the old one (now
    at ``new``) is removed; elsewhere the old folder is renamed aside first, the new one renamed in, and the old one
    put back if that fails. A failure leaves ``path`` as it was (the caller removes ``new``)."""
    if not os.path.lexists(path):
        os.replace(new, path)
        return
    if exchange_paths(new, path):
        shutil.rmtree(new, ignore_errors=True)  # the old export, swapped out
        return
    aside = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
    os.rmdir(aside)  # a free name beside path, for the old folder
    os.replace(path, aside)
    try:
        os.replace(new, path)
    except BaseException:
        os.replace(aside, path)
        raise
    shutil.rmtree(aside, ignore_errors=True)


def export_compressed_tensors(model: nn.Module, path: str | Path, *, promote: bool = False,
                              max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE, scale_dtype: str = "float32",
                              source: str | Path | None = None, verify: bool = True, overwrite: bool = False,
                              progress_bar: bool = False, embeddings: str = "float") -> ExportReport:
    """Write ``model`` (a transformers model, medquant-quantized) as a compressed-tensors ``pack-quantized`` folder.

    Args:
        model: a transformers model whose Linear layers medquant quantized (other layers stay float); a model
            inside ``torch.compile`` (``OptimizedModule``) or ``nn.DataParallel`` / ``DistributedDataParallel``
            is written as the model itself, as ``save_pretrained`` (``unwrap_model``) writes it.
        path: the output folder (created, with any missing parents; empty, or an earlier export with
            ``overwrite``; not the current folder, a folder above it or a file system root, also through a
            symlink). A symbolic link to a folder is kept: the export is written into the folder it names (every
            link followed, ``os.path.realpath``), which is checked and replaced as ``path`` would be; a link to
            a missing folder is refused. Written to a temporary folder beside the folder and moved into place at
            the end, so a failed export leaves no half-written folder; the parent folders it had to create are
            removed again, folders that existed before are kept.
        promote: requantize layers with per-row mixed bit-widths to their largest bit-width (else refused).
        max_shard_size: largest safetensors file, bytes or ``"5GB"`` / ``"500MB"``; above it the weights are
            sharded with ``model.safetensors.index.json``.
        scale_dtype: dtype of ``weight_scale``: ``"float32"`` (default; exact for medquant's float16 / bfloat16
            scales), ``"float16"`` or ``"bfloat16"`` (exact only when medquant's scales have that dtype; a scale
            beyond the dtype's range raises :class:`ExportError` naming the layer).
        source: folder to copy tokenizer / processor files from (default: ``model.name_or_path`` when it is a
            local folder).
        verify: decompress every packed layer with compressed-tensors' own decompressor and report the largest
            difference from medquant's dequantised weight (raises ``ExportError`` if an exact row differs, or
            naming the layers the decompressor cannot read, e.g. compressed-tensors 0.20.1 on 4-bit asymmetric
            group layers of at most 8 output rows; ``verify=False`` writes those and notes them).
        overwrite: replace ``path`` when it is an earlier export of this function (swapped in whole at the end:
            a failed export leaves the old folder as it was). Recognised by what the export writes: a
            ``config.json`` whose ``quantization_config`` has ``quant_method: "compressed-tensors"`` and format
            ``pack-quantized``; ``model.safetensors`` or ``model-NNNNN-of-NNNNN.safetensors`` shards, every one
            carrying the export's marker in its safetensors metadata (``"medquant.export":
            "compressed-tensors"``, :data:`~medquant.deploy.common.EXPORT_MARKER`, written next to ``"format":
            "pt"`` into every weight file); and no entries but the files the export writes (``config.json``,
            ``generation_config.json``, the weights with ``model.safetensors.index.json``, the tokenizer /
            processor files of :data:`~medquant.deploy.common.TOKENIZER_FILES`, ``*.py`` code files when the
            ``config.json`` has an ``auto_map``; plain files, no folders or links). Any other non-empty folder (a
            training folder, a medquant checkpoint, an export with files added, a pack-quantized folder of the
            same file names written by another tool such as a Hub checkpoint saved by llm-compressor, an export of
            a medquant before the marker) is refused whatever ``overwrite`` says, the error naming what it holds,
            what is missing and what ``overwrite`` accepts: choose another path or remove the folder yourself. The
            check runs again just before the move into place.
        progress_bar: tqdm bars while packing and writing.
        embeddings: how quantized input embeddings (``QuantEmbedding``) are written: ``"float"`` (default) as
            their dequantised table, which every runtime reads; ``"packed"`` packed like a Linear weight (exact
            repack, named in a config group's targets), which transformers loads only with
            ``CompressedTensorsConfig(dequantize=True)`` and a serving runtime only with compressed-tensors
            embedding support (noted in the report).

    Returns:
        The :class:`ExportReport`: one row per Linear / Conv2d / Embedding weight (exact repack, exact
        re-expression, lossy requantization or float).

    Raises:
        ExportError: a bad option (among them a ``path`` that is the current folder, one above it or a root, a
            non-empty folder that is not an earlier export, or an earlier export without ``overwrite``), a
            model without quantized layers (or with only quantized embeddings and ``embeddings="float"``), layers
            the format has no tensors for (:func:`~medquant.deploy.common.check_native`: e.g. unmerged PEFT
            adapters, bitsandbytes ``Linear4bit``), mixed
            layers without ``promote``, layers with input quantizers (``adaround_quantize_(act_bits=...)``: the
            folder holds weight-only quantization), other forward hooks that change what the model computes (an
            ``AdaptiveQuantizer``'s, a user's, torch's ``prune`` / ``weight_norm``:
            :func:`~medquant.deploy.common.check_forward_hooks`), or a failed verification; nothing is written.
    """
    path = Path(path)
    model = _unwrapped(model)  # the names save_pretrained writes: the model's own, not a wrapper's
    max_shard, sdtype = _check_options(model, path, promote, max_shard_size, scale_dtype, overwrite, source)
    # a symbolic link is kept: the export is written into (and replaces) the folder it names
    target = export_target(path)
    if not isinstance(verify, bool) or not isinstance(progress_bar, bool):
        raise ExportError("verify and progress_bar must be True or False")
    if not isinstance(embeddings, str) or embeddings not in EMBEDDINGS:
        raise ExportError(f"embeddings must be 'float' or 'packed', got {embeddings!r}")
    quant = quantized_layers(model)
    tables = quantized_embeddings(model)
    if not quant and tables and embeddings == "float":
        raise ExportError(f"{type(model).__name__} has only quantized embeddings ("
                          f"{', '.join(n for n, _ in tables)}), which embeddings='float' (the default) writes as "
                          "float tables: nothing would be packed. Pass embeddings='packed' to pack them, or "
                          "quantize Linear layers too (medquant.quantize_)")
    if not quant and not tables:
        raise ExportError(f"{type(model).__name__} has no medquant-quantized layers: quantize it first "
                          "(medquant.quantize_), or save the float model with save_pretrained")
    check_native(model, FORMAT, allow=(QuantEmbedding,))
    check_mixed(model, promote, FORMAT)
    _check_config_describes_weights(model)
    tensors, dropped = float_tensors(model)
    packed_tensors: dict[str, dict[str, torch.Tensor]] = {}
    rows: list[LayerExport] = []
    groups: dict[tuple, list[str]] = {}
    args: dict[tuple, Any] = {}
    exported_float: dict[str, str] = {}
    runtime_dtype = _config_dtype(model)
    rounded_on_load: list[str] = []
    unreadable: list[tuple[str, PackedLayer, str]] = []  # layers compressed-tensors' decompressor fails on
    unread_unverified: list[str] = []  # verify=False: layers of the known failure (_single_word_zero_points)
    for name, table in tables if embeddings == "float" else ():  # what every runtime reads
        w = table.dequantized_weight(table.weight_dtype).detach().cpu().contiguous()
        tensors[f"{name}.weight"] = w
        exported_float[name] = "a quantized embedding"
        rows.append(LayerExport(name, layer_scheme(table), str(w.dtype).replace("torch.", ""), "float", 0.0,
                                "quantized embedding written as its dequantised table (same values; runtimes "
                                "read float embeddings; pass embeddings='packed' to write it packed)"))
    to_pack: list[tuple[str, Any]] = list(quant) + (list(tables) if embeddings == "packed" else [])
    packed_tables = {name for name, _ in tables} if embeddings == "packed" else set()
    layer: Any
    for name, layer in progress(to_pack, total=len(to_pack), desc="packing", enabled=progress_bar):
        scheme = layer_scheme(layer)
        uw = None if is_float_layer(layer) else layer_weight(layer, promote=promote)
        if uw is None or isinstance(layer, QuantConv2d):
            why = "no integer rows" if uw is None else "compressed-tensors packs Linear weights only"
            w = layer.weight.detach().cpu().contiguous()
            tensors[f"{name}.weight"] = w
            exported_float[name] = why
            rows.append(LayerExport(name, scheme, str(w.dtype).replace("torch.", ""), "float", 0.0,
                                    f"written as its dequantised float weight ({why})"))
            continue
        pl = pack_layer(uw, layer.out_rows, layer.k, sdtype)
        if not torch.isfinite(pl.tensors["weight_scale"]).all():
            raise ExportError(f"{name}: scales up to {float(uw.scales.abs().max()):.4g} overflow "
                              f"scale_dtype={scale_dtype!r} (largest finite value "
                              f"{torch.finfo(sdtype).max:.6g}); use scale_dtype='float32' (the default) or "
                              f"'bfloat16'. Nothing was written")
        err: float | None = uw.max_abs_error if uw.how != "exact repack" else 0.0
        if verify:
            ref = layer.dequantized_weight(torch.float32).cpu()
            try:
                got = decompress_layer(pl).float()
            except Exception as e:  # noqa: BLE001 - the package's own reader fails on the layer's tensors
                unreadable.append((name, pl, f"{type(e).__name__}: {e}"))
                continue
            measured = float((got - ref).abs().max()) if ref.numel() else 0.0
            if pl.how != "lossy requantization" and sdtype == torch.float32 and measured != 0.0:
                raise ExportError(f"{name}: compressed-tensors decompresses a weight that differs from medquant's "
                                  f"by {measured:.3g}; this is a bug in the export, nothing was written")
            err = measured
        how, note = pl.how, pl.note
        if how != "lossy requantization" and sdtype != torch.float32 and (not verify or err):
            # the runtime dequantises in the scale dtype: exact only with float32 scales
            how = "near-exact"
            note = "; ".join(x for x in (note, (f"weight_scale stored as {scale_dtype}: the runtime computes "
                                         f"(q - zp) * s in {scale_dtype}")) if x)
            err = err if verify else None
        if not verify and _single_word_zero_points(pl):
            unread_unverified.append(name)
        if runtime_dtype is not None and not _representable(pl.tensors["weight_scale"], runtime_dtype):
            rounded_on_load.append(name)
        key = pl.scheme_key()
        groups.setdefault(key, []).append(name)
        args[key] = quantization_args(pl)
        packed_tensors[name] = dict(pl.tensors)
        rows.append(LayerExport(name, scheme, pl.target(), how, err, note))
    if unreadable:
        raise ExportError(_unreadable_message(unreadable))
    if not groups:
        raise ExportError("no layer could be packed (every quantized layer is float, pruned or a Conv2d); "
                          "nothing to export in pack-quantized form")
    # float Linear layers (and quantized layers written as float) are left alone by the runtime
    packed_names = {n for names in groups.values() for n in names}
    # and float MoE routers, which compressed-tensors / vLLM match as Linear too (compressed-tensors' own builder
    # lists them)
    ignore = [n for n, m in model.named_modules() if n not in packed_names and _vllm_linear(m)]
    qconfig = _quantization_config(groups, args, ignore, packed_tables)
    # the names save_pretrained writes (transformers' reverted weight conversions), in its order
    written, converted = _checkpoint_names(model, tensors, packed_tensors)
    tied = head_is_tied(model)
    with made_folders(target.parent):  # a failed export removes the parent folders it created
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
        try:
            _save_config(model, tmp, tied)
            from compressed_tensors.compressors import ModelCompressor

            ModelCompressor(quantization_config=qconfig).update_config(str(tmp))
            files = ["config.json"] + (["generation_config.json"] if (tmp / "generation_config.json").exists()
                                       else [])
            files += _write_shards(written, tmp, max_shard, progress_bar)
            files += copy_tokenizer_files(source_folder(model, source), tmp, skip=files)
            files += sorted(p.name for p in tmp.glob("*.py"))  # a remote-code model's code (_save_config)
            publish_mode(tmp)
            check_export_folder(target, overwrite)  # again: the folder may have changed during the export
            _move_into_place(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    rows += _float_rows(model, exported_float, tensors)
    order_rows = {n: i for i, (n, _) in enumerate(model.named_modules())}
    rows.sort(key=lambda r: order_rows.get(r.name, len(order_rows)))
    layer_types = (nn.Linear, nn.Conv2d, nn.Embedding, QuantLinear, QuantConv2d, QuantEmbedding)
    n_other = sum(1 for key in tensors if not key.endswith(".weight") or key[:-7] not in order_rows
                  or not isinstance(model.get_submodule(key[:-7]), layer_types))
    notes = [f"{len(groups)} compressed-tensors config group(s): "
             + "; ".join(f"{args[k].num_bits}-bit {'sym' if args[k].symmetric else 'asym'} {args[k].strategy}"
                         + (f" {args[k].group_size}" if args[k].group_size else "") + f" ({len(v)} layers)"
                         for k, v in groups.items()),
             f"ignore list (float Linear layers and MoE routers): {len(ignore)}",
             f"{n_other} other tensors (norms, biases, buffers) copied as stored"]
    if converted:
        notes.append(f"{len(converted)} float tensor(s) ({', '.join(converted[:2])}"
                     f"{' ...' if len(converted) > 2 else ''}) written in the checkpoint layout save_pretrained "
                     "writes (transformers' reverted weight conversion, e.g. fused MoE experts split per expert), "
                     "the layout vLLM reads and Hub checkpoints have. Float MoE experts in that layout do not load "
                     "with transformers' compressed-tensors loader (transformers 5.25, either mode: its expert "
                     "merge dequantizes packed experts only); load the folder with vLLM")
    if dropped:
        notes.append(f"stored once (tied): {', '.join(dropped)}")
    if packed_tables:
        notes.append(f"packed embedding(s) {', '.join(sorted(packed_tables))}: transformers loads this folder with "
                     "CompressedTensorsConfig(dequantize=True) only (its compressed load has no packed Embedding); "
                     "a serving runtime needs compressed-tensors embedding support")
    heads = [n for n, h in tied_heads(model).items() if h in packed_tables]
    if heads:
        notes.append(f"{', '.join(heads)}: tied to a packed embedding in medquant, written as its own packed copy "
                     "(the format has no tied packed weights)")
    notes += fused_scheme_notes(rows)
    if rounded_on_load:
        dt = str(runtime_dtype).replace("torch.", "")
        notes.append(f"config dtype {dt}: runtimes (transformers, vLLM) hold weight_scale in the model's dtype, and "
                     f"the scales of {len(rounded_on_load)} packed layer(s) ({', '.join(rounded_on_load[:3])}"
                     f"{' ...' if len(rounded_on_load) > 3 else ''}) are not {dt} values, so they are rounded to "
                     f"{dt} on load and the loaded weights differ from medquant's by about one {dt} rounding "
                     f"(the max |err| column measures the folder's own scales). For medquant's exact weights load "
                     f"in float32 (or float16 with float16 scales), or quantize with QuantConfig(scale_dtype="
                     f"'{dt}')")
    if unread_unverified:
        notes.append(f"{', '.join(unread_unverified)}: 4-bit asymmetric group layer(s) of at most 8 output rows, "
                     "whose zero points pack into a single int32 row; compressed-tensors' own decompressor (0.20.1), "
                     "which transformers' CompressedTensorsConfig(dequantize=True) loader uses, fails on them "
                     "(written unchecked: verify=False)")
    loader_note = _dequantize_loader_note(groups)
    if loader_note:
        notes.append(loader_note)
    init_note = _init_weights_note(model, [n for n in packed_tensors if n not in packed_tables])
    if init_note:
        notes.append(init_note)
    report = ExportReport(FORMAT, str(path), rows, files, notes)
    counts = Counter(r.how for r in rows)
    if counts.get("lossy requantization"):
        report.notes.append(f"{counts['lossy requantization']} layer(s) requantized (promote=True): see max |err|")
    return report


#: sibling projections that vLLM / SGLang fuse into one layer (one scheme for all of them)
FUSED = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


def fused_scheme_notes(rows: list[LayerExport]) -> list[str]:
    """A note for each group of sibling projections (``q/k/v_proj``, ``gate/up_proj``) written with different
    schemes (or some float): serving runtimes fuse them into one layer and need one scheme."""
    target = {r.name: r.target for r in rows}
    notes = []
    for names in FUSED:
        parents = {n.rpartition(".")[0] for n in target if n.rpartition(".")[2] == names[0]}
        for parent in sorted(parents):
            members = [f"{parent}.{m}" for m in names if f"{parent}.{m}" in target]
            kinds = {target[m] for m in members}
            if len(kinds) > 1:
                notes.append(f"{parent}: {', '.join(names)} have different schemes ("
                             + "; ".join(f"{m.rpartition('.')[2]}: {target[m]}" for m in members)
                             + "); vLLM and SGLang fuse them into one layer and need one scheme")
    return notes


def _backend(model: nn.Module, path: Path, **options: Any) -> ExportReport:
    allowed = {"promote", "max_shard_size", "scale_dtype", "source", "verify", "overwrite", "progress_bar",
               "embeddings"}
    unknown = sorted(set(options) - allowed)
    if unknown:
        raise ExportError(f"format={FORMAT!r} does not take option(s) {', '.join(unknown)}; accepted: "
                          f"{', '.join(sorted(allowed))}")
    return export_compressed_tensors(model, path, **options)


register_export_format(FORMAT, _backend, requires=("compressed_tensors", "safetensors"),
                       description="Hugging Face folder, pack-quantized int1-8 (vLLM, SGLang, transformers)")
