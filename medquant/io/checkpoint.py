"""The checkpoint writer and reader: :func:`save`, :func:`load`, :func:`verify`, :func:`verify_pretrained`,
:func:`upgrade`, :func:`write_checkpoint` and the format-version helpers (:func:`format_version_of`,
:func:`dense_layouts`).

What a saved folder holds, and what a load checks, is described in :mod:`medquant.io`; the crash-safe folder switch
is :mod:`medquant.io.atomic`, the manifest :mod:`medquant.io.manifest`, the ``medquant.json`` schema
:mod:`medquant.io.schema`.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import stat
import sys
import types
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_model, save_model
from torch import nn

from ..kernels.layout import DENSE_BITS, FORMAT_VERSION
from ..quant.activations import input_quantizers, recorded_quantizers, set_input_quantizers
from ..quant.api import swap_module
from ..quant.experts import expand_recorded_experts, is_experts_module
from ..quant.hooks import MAKE_PERMANENT, forward_hooks
from ..quant.modules import (
    QUANT_LAYERS,
    QuantConv2d,
    QuantEmbedding,
    QuantLinear,
    tie_quantized_head,
    tied_heads,
    tied_to,
)
from ..quant.recipe import RecipeError, bit_map_matches, layer_from_recipe, model_recipe, shared_modules
from ..quant.size import covers_storage
from ..version import __version__
from . import atomic
from .manifest import (
    MANIFEST_NAME,
    ManifestError,
    check_plain_name,
    read_manifest,
    sha256_file,
    verify_files,
    write_manifest,
)
from .schema import (
    STORED_DTYPES,
    CheckpointMeta,
    LayerSpec,
    SchemaError,
    TensorInfo,
    check_against_header,
    parse_layer,
    parse_metadata,
    read_header,
)

__all__ = ["HF_CONFIG_NAME", "MANIFEST_NAME", "META_NAME", "WEIGHTS_NAME", "CheckpointError", "CheckpointWarning",
           "build_hf_model", "checkpoint_path", "dense_layouts", "format_version_of", "load", "load_extras",
           "read_metadata", "register_quantization_config", "remote_code_files", "remote_code_refusal", "save",
           "upgrade", "verify", "verify_pretrained", "write_checkpoint"]

WEIGHTS_NAME = "model.safetensors"
TOKENIZER_CONFIG_NAME = "tokenizer_config.json"
META_NAME = "medquant.json"
HF_CONFIG_NAME = "config.json"
GENERATION_CONFIG_NAME = "generation_config.json"
# the files every save owns: replaced or dropped by the next save (a stale weights file, shard or shard index beside
# the new weights would be read instead of them or with them). Everything else in the folder is carried over, except:
_OWNED = re.compile(r"model(-\d+-of-\d+)?\.safetensors(\.index\.json)?|medquant\.json|" + re.escape(MANIFEST_NAME))
# the other files of a transformers folder: owned only when the previous version was written by medquant as a
# transformers model (they are then its own: a user's config.json beside a plain nn.Module checkpoint is kept)
_HF_OWNED = re.compile(r"pytorch_model(-\d+-of-\d+)?\.bin(\.index\.json)?|config\.json|generation_config\.json")
_QUANT_TENSOR = re.compile(r"(qweight|scales|zeros|fweight)_\d+|bit_map")


class CheckpointError(RuntimeError, ValueError):
    """A saved medquant model is missing, truncated, altered, malformed or of an unsupported format."""


class CheckpointWarning(UserWarning):
    """A checkpoint loads, but less of it could be verified than medquant verifies today."""


def _is_hf(model: nn.Module) -> bool:
    try:
        from transformers import PreTrainedModel
    except ImportError:  # pragma: no cover
        return False
    return isinstance(model, PreTrainedModel)


def checkpoint_path(directory: Any) -> Path:
    """The folder path of a save, refusing paths that would write somewhere unintended.

    Refused: an empty path (it would mean the current folder), ``.``, the current folder or one above it, a file
    system root. Where the current folder was removed, an absolute path is checked against the roots only (a
    relative one raises ``FileNotFoundError``: it names nothing).

    Args:
        directory: the path given by the user.

    Returns:
        ``directory`` as a ``Path`` (not resolved).

    Raises:
        TypeError: ``directory`` is not a ``str`` or ``os.PathLike``.
        ValueError: it is empty, the current folder, a folder above it or a file system root.
    """
    if not isinstance(directory, (str, os.PathLike)):
        raise TypeError(f"a checkpoint path must be a str or os.PathLike, got {type(directory).__name__}")
    raw = os.fspath(directory)
    if isinstance(raw, bytes):
        raw = os.fsdecode(raw)
    if not raw.strip():
        raise ValueError("the checkpoint path is empty; give a folder name (an empty path would write into the "
                         "current folder)")
    path = Path(os.path.abspath(raw))  # a relative path needs the current folder (FileNotFoundError if removed)
    if atomic.is_current_or_above(path, atomic.current_folder()):
        raise ValueError(f"refusing to save into {raw!r} ({path}): it is the current folder, a folder above it or "
                         "a file system root; give the checkpoint its own folder")
    return Path(raw)


def _sort_safetensors_metadata(path: Path) -> None:
    """Rewrite a safetensors header's ``__metadata__`` with sorted keys, in place (the library writes it from a
    hash map, in a different order each time); the header keeps its length."""
    with open(path, "r+b") as f:
        head = f.read(8)
        n = int.from_bytes(head, "little")
        raw = f.read(n).decode("utf-8")
        prefix = '{"__metadata__":'
        if not raw.startswith(prefix):
            return
        meta, end = json.JSONDecoder().raw_decode(raw, len(prefix))
        if not isinstance(meta, dict):
            return
        new = json.dumps(dict(sorted(meta.items())), separators=(",", ":"), ensure_ascii=False)
        if len(new.encode("utf-8")) != len(raw[len(prefix):end].encode("utf-8")):
            return  # pragma: no cover - never seen: escaping differs; keep the library's bytes
        f.seek(8 + len(prefix.encode("utf-8")))
        f.write(new.encode("utf-8"))


def _owned(name: str) -> bool:
    return _OWNED.fullmatch(name) is not None


def _json_object(path: Path) -> dict | None:
    """A regular file's JSON object, or ``None`` (absent, a symlink, unreadable, not a JSON object)."""
    try:
        if not stat.S_ISREG(os.lstat(path).st_mode):
            return None
        d = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError):
        return None
    return d if isinstance(d, dict) else None


def _owned_in(old: Path) -> Callable[[str], bool]:
    """Which files of the previous version ``old`` a new save replaces or drops (the rest are carried over).

    Always the weights (``model*.safetensors`` and their index), ``medquant.json`` and the manifest. The other
    transformers file names (``config.json``, ``generation_config.json``, ``pytorch_model*.bin`` and their index)
    only when the previous version recorded them as its own: its ``medquant.json`` records a transformers model
    (``medquant.save`` wrote its ``config.json`` and, for a model that generates, its ``generation_config.json``:
    both are owned, so a save of another model does not keep them), or its ``config.json`` holds a medquant
    ``quantization_config`` (a transformers ``save_pretrained`` of a medquant model wrote the folder). Otherwise
    they are the user's files.
    """
    meta = _json_object(old / META_NAME)
    model = meta.get("model") if meta is not None else None
    hf_meta = isinstance(model, dict) and model.get("kind") == "hf"
    cfg = _json_object(old / HF_CONFIG_NAME)
    qc = cfg.get("quantization_config") if cfg is not None else None
    hf_saved = isinstance(qc, dict) and qc.get("quant_method") == "medquant"

    def owned(name: str) -> bool:
        if _owned(name):
            return True
        if hf_saved:
            return _HF_OWNED.fullmatch(name) is not None
        return hf_meta and name in (HF_CONFIG_NAME, GENERATION_CONFIG_NAME)

    return owned


@contextlib.contextmanager
def write_checkpoint(directory: str | os.PathLike, *, sort_metadata: bool = True) -> Iterator[Path]:
    """Context manager for every checkpoint writer: yields an empty folder to write the checkpoint's files into.

    When the block succeeds the manifest is written and ``directory`` is switched to the new folder in one atomic
    step (see :mod:`medquant.io.atomic`); when it raises, ``directory`` is left as it was.

    Args:
        directory: the checkpoint folder (checked by :func:`checkpoint_path`).
        sort_metadata: give the safetensors files the block wrote into the folder sorted header metadata (the same
            model then gives the same bytes). Files carried over from the previous version (hard links to its
            files, see :mod:`medquant.io.atomic`) keep their bytes.

    Yields:
        The new, empty folder (a sibling of ``directory``) to write into.
    """
    path = checkpoint_path(directory)

    def finalize(folder: Path) -> None:
        write_manifest(folder)

    with atomic.replace_directory(path, owned=_owned_in, finalize=finalize) as folder:
        yield folder
        # before the carry-over: a carried file shares its data with the previous version (which a link may keep)
        # and with the user's other links to it, so it is never changed in place
        for p in sorted(folder.glob("*.safetensors")) if sort_metadata else ():
            if p.is_file() and not p.is_symlink():
                _sort_safetensors_metadata(p)


def _write_text(path: Path, text: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)


def _recipes(model: nn.Module) -> dict[str, dict[str, Any]]:
    """``model_recipe`` plus ``weight_dtype`` where the reader would otherwise infer another dtype (layers without
    bias whose weights are not float32): the written bytes of every other layer stay as before."""
    modules = model_recipe(model)
    for name, entry in modules.items():
        m = model.get_submodule(name)
        wd = str(m.weight_dtype).replace("torch.", "")
        if wd != entry["dtype"]:
            entry["weight_dtype"] = wd
    return modules


def format_version_of(model: nn.Module) -> int:
    """The saved-format version ``model`` needs as its quantized layers are stored now (nothing is changed).

    Version 2 when a quantized layer holds a 3/5/6/7-bit row group in the dense layout (``stores_dense``), else 1:
    a file without dense rows has the bytes version 1 wrote. :func:`save` (after :func:`dense_layouts`) and the
    transformers ``quantization_config`` (:meth:`medquant.hf.MedQuantConfig.record`) both record this number.

    Args:
        model: any ``nn.Module``; its ``QuantLinear`` / ``QuantConv2d`` / ``QuantEmbedding`` layers are inspected.

    Returns:
        ``2`` (``FORMAT_VERSION``) or ``1``.
    """
    dense = any(isinstance(m, QUANT_LAYERS) and m.stores_dense for m in model.modules())
    return FORMAT_VERSION if dense else 1


def dense_layouts(model: nn.Module) -> int:
    """Re-pack, in place, every quantized layer whose 3/5/6/7-bit rows sit in 4/8-bit containers into the dense layout.

    Such layers were loaded from a version-1 file or built with ``layout=1``; the re-pack is exact (the same codes
    and scales), and as the dense rows run their own CPU kernels the layer's outputs may move in the last float32
    bits. A quantized head tied to a quantized embedding is tied again afterwards.

    Args:
        model: the model to re-pack (changed in place).

    Returns:
        :func:`format_version_of` the re-packed model: 2 when a layer now stores dense rows, else 1.
    """
    layers = [m for m in model.modules() if isinstance(m, QUANT_LAYERS)]
    ties = [(h, e) for h in layers for e in layers
            if isinstance(h, QuantLinear) and isinstance(e, QuantEmbedding) and tied_to(h, e)]
    for m in layers:
        if not m.dense and any(b in DENSE_BITS for b in m.bit_groups):
            m.to_layout(FORMAT_VERSION)
    for head, emb in ties:  # re-packing made new tensors: share them again
        tie_quantized_head(head, emb)
    return format_version_of(model)


# how a transformers model's quantized layers are recorded in its config.json: registered by medquant.hf (a layer
# above this package, imported by ``import medquant``), which owns the ``quantization_config`` format
_QUANTIZATION_CONFIG_WRITERS: list[Callable[[nn.Module], dict[str, Any]]] = []


def register_quantization_config(writer: Callable[[nn.Module], dict[str, Any]]) -> None:
    """Register ``writer(model)``, the ``quantization_config`` dict :func:`save` writes into the ``config.json`` of a
    transformers model that holds medquant-quantized layers (the last one registered is used).

    :mod:`medquant.hf` registers the recording of :class:`medquant.hf.MedQuantConfig` when ``medquant`` is imported,
    so that transformers' ``from_pretrained`` of a :func:`save` folder rebuilds the quantized layers.

    Args:
        writer: returns the JSON-serialisable ``quantization_config`` of a quantized model.
    """
    if writer not in _QUANTIZATION_CONFIG_WRITERS:
        _QUANTIZATION_CONFIG_WRITERS.append(writer)


def _hf_config_json(model: nn.Module, quantized: bool) -> str:
    """``config.json`` of a transformers model, with the ``quantization_config`` of its medquant-quantized layers.

    The config is the model's own (``model.config`` is not changed). When the model holds medquant-quantized
    layers, ``quantization_config`` records each one's recipe (:func:`register_quantization_config`) and ``dtype``
    the model's dtype, as :func:`medquant.hf.save_pretrained` writes them, so that transformers' ``from_pretrained`` of the folder rebuilds
    the quantized layers in the saved dtype (and checks the manifest and the recipes against the tensors) instead of
    building the float model and initialising those layers randomly. A
    medquant ``quantization_config`` left from an earlier quantization is dropped when no layer is quantized now.
    """
    text = model.config.to_json_string()  # type: ignore[union-attr,operator]
    d = json.loads(text)
    qc = d.get("quantization_config")
    if quantized and _QUANTIZATION_CONFIG_WRITERS:
        d["quantization_config"] = _QUANTIZATION_CONFIG_WRITERS[-1](model)
        # as transformers' save_pretrained records it: from_pretrained's default dtype="auto" reads it (without it,
        # the dtype of the first floating tensor in the file, e.g. float16 scales, would become the model's)
        d["dtype"] = str(model.dtype).replace("torch.", "")  # type: ignore[union-attr]
    elif isinstance(qc, dict) and qc.get("quant_method") == "medquant":
        del d["quantization_config"]
    else:
        return text
    return json.dumps(d, indent=2, sort_keys=True) + "\n"


def _save_remote_code(model: nn.Module, folder: Path) -> None:
    """Copy the code files of a model whose class came from a folder's own code (loaded through an Auto class with
    ``trust_remote_code=True``, which sets the class's ``_auto_class``) into ``folder``, with the files they import
    relatively, and record the class in the config's ``auto_map``, as transformers' ``save_pretrained`` does
    (``custom_object_save``), so that the folder reloads without the source folder."""
    from transformers.dynamic_module_utils import custom_object_save

    config: Any = model.config
    if getattr(type(config), "_auto_class", None) is not None:  # as the config's own save_pretrained does
        custom_object_save(config, folder, config=config)
    if getattr(type(model), "_auto_class", None) is not None:
        custom_object_save(model, folder, config=config)


def _can_generate(model: nn.Module) -> bool:
    can = getattr(model, "can_generate", None)
    return callable(can) and bool(can()) and getattr(model, "generation_config", None) is not None


def _generation_config_json(model: nn.Module) -> str | None:
    """``generation_config.json`` of a transformers model that generates, as its ``save_pretrained`` writes it (the
    settings that differ from the defaults, keys sorted); ``None`` for a model that does not generate."""
    if not _can_generate(model):
        return None
    return model.generation_config.to_json_string(use_diff=True, keys_to_pop=["compile_config"])  # type: ignore


@contextlib.contextmanager
def _tied_heads_stored_once(model: nn.Module) -> Iterator[None]:
    """While the block runs, the packed tensors a quantized head shares with its quantized embedding are left out of
    ``model.state_dict()``: they are stored once, under the embedding's names, where transformers'
    ``from_pretrained`` reads them (the recipe records the head ``tied_to`` the embedding, and both loaders tie the
    head again). Without this, safetensors keeps the alphabetically first name (``lm_head.*``)."""
    hidden: list[nn.Module] = []
    keys: list[str] = []
    for head_name, emb_name in tied_heads(model).items():
        head, emb = model.get_submodule(head_name), model.get_submodule(emb_name)
        for b, t in head._buffers.items():
            if t is not None and emb._buffers.get(b) is t and b not in head._non_persistent_buffers_set:
                head._non_persistent_buffers_set.add(b)
                hidden.append(head)
                keys.append(b)
    try:
        yield
    finally:
        for head, b in zip(hidden, keys):
            head._non_persistent_buffers_set.discard(b)


@contextlib.contextmanager
def _shared_stored_once(model: nn.Module) -> Iterator[None]:
    """While the block runs, ``model.state_dict()`` leaves out the tensors of a quantized layer under its further
    names (``shared_modules``): they are stored once, under the name ``modules`` records, where transformers'
    ``from_pretrained`` reads them. Without this, safetensors keeps the alphabetically first name, and
    ``from_pretrained`` of a folder whose further name sorts first refused it (the recorded name's tensors
    missing). Likewise the tensors of any other module under its further names (``shared_blocks``: a block run
    twice), stored once under its first name, as ``medquant.json`` records it (without this, a block whose first
    name sorts after a further one, ``layers[10] = layers[2]``, had its float tensors under the further name and
    its quantized layers under the first)."""
    aliases = {alias + ".": name + "." for alias, name in {**shared_modules(model), **_shared_blocks(model)}.items()}

    def drop(module: nn.Module, state: dict, prefix: str, local_metadata: Any) -> None:
        if prefix:
            return
        whole = dict(state)  # a further name may lead to a name that is itself a further one (a block shared inside
        # a shared block): compared with the state as it was, every further name goes and the first name stays
        for key in [k for k in state if any(k.startswith(a) for a in aliases)]:
            alias = next(a for a in aliases if key.startswith(a))
            kept = whole.get(aliases[alias] + key[len(alias):])
            t = state[key]
            if kept is not None and kept.data_ptr() == t.data_ptr() and kept.shape == t.shape:  # one tensor
                del state[key]

    handle = model.register_state_dict_post_hook(drop) if aliases else None
    try:
        yield
    finally:
        if handle is not None:
            handle.remove()


@contextlib.contextmanager
def _views_stored_whole(model: nn.Module) -> Iterator[None]:
    """While the block runs, ``model.state_dict()`` gives every tensor that is a view of part of a larger storage
    (``nn.Parameter(pos_embed[:, :n])``) as a copy of its own (one copy for all the names of one view).

    safetensors' ``save_model`` refuses a tensor whose storage no tensor of the state dict covers whole ("None is
    covering the entire storage"), and so does its ``load_model`` for the model it loads into; a view whose storage
    another tensor covers was stored only under that tensor's name, so it did not load into a model whose tensors
    each have their own storage. Tensors that cover their storage (:func:`medquant.quant.size.covers_storage`: every
    tensor of a model built or loaded as usual) are left as they are (tied ones are stored once). Registered after
    the other state-dict hooks of a save, it runs after them."""

    def copy_views(module: nn.Module, state: dict, prefix: str, local_metadata: Any) -> None:
        if prefix:
            return
        copies: dict[tuple, torch.Tensor] = {}
        for key, t in state.items():
            if t.device.type == "meta" or covers_storage(t):
                continue
            view = (t.device, t.data_ptr(), t.dtype, tuple(t.shape), t.stride())
            if view not in copies:
                copies[view] = t.clone(memory_format=torch.contiguous_format)
            state[key] = copies[view]

    handle = model.register_state_dict_post_hook(copy_views)
    try:
        yield
    finally:
        handle.remove()


def _check_json_keys(value: Any, where: str) -> None:
    """Refuse dict keys that JSON would turn into strings (``{0: x}`` comes back as ``{"0": x}``), naming where."""
    if isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, str):
                raise TypeError(f"{where} has the key {k!r} ({type(k).__name__}): extras are stored as JSON, whose "
                                f"keys are strings, so it would come back as {json.dumps(str(k))}; use string keys")
            _check_json_keys(v, f"{where}[{k!r}]")
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _check_json_keys(v, f"{where}[{i}]")


def check_saved_hooks(model: nn.Module, writer: str = "medquant.save") -> None:
    """Refuse, or warn about, the forward hooks on ``model`` that a checkpoint of it would lose.

    A checkpoint stores tensors (and medquant's own records); a forward hook or pre-hook is Python that runs around
    a module, so the model loaded from the file runs without it (:func:`medquant.quant.hooks.forward_hooks` lists
    them by what installed them):

    * the sites of an :class:`~medquant.adaptive.AdaptiveQuantizer` that is not itself part of the saved model
      (``medquant.save(aq.model)``; ``medquant.save(aq)`` keeps its bit map and sites in its state): refused;
    * torch's legacy ``prune`` / ``weight_norm`` / ``spectral_norm`` reparametrisations, whose state dict holds
      ``weight_orig`` and ``weight_mask`` (``weight_g`` and ``weight_v``) and no ``weight``: refused (the folder
      would not load into the model it came from);
    * tensors computed through ``torch.nn.utils.parametrize`` (``parametrizations.weight_norm`` /
      ``spectral_norm`` / ``orthogonal``, a ``register_parametrization``): no hook, but the same loss - the state
      dict holds ``parametrizations.<tensor>.original*`` and not the tensor, so a model of the architecture
      (``from_pretrained``: freshly initialised) does not get it: refused; except, for a transformers model, the
      parametrizations its class builds itself from its config (Wav2Vec2 / HuBERT / WavLM's weight norm on
      ``pos_conv_embed.conv``: the same module name, tensors and parametrization classes in a model built from
      ``model.config``), which a model of the architecture has again and reads from the file;
    * any other hook (a user's): a ``UserWarning`` naming it, as the loaded model runs without it;
    * input quantizers (recorded in the checkpoint and attached again) and hooks known to change nothing: accepted.

    Args:
        model: the model about to be saved.
        writer: the saving function, for the messages.

    Raises:
        ValueError: an AdaptiveQuantizer's sites or a reparametrisation (hook-based or ``parametrize``), naming
            each module and how to save the model (nothing is written).
    """
    from torch.nn.utils import parametrize

    inside = {id(m) for m in model.modules()}
    hooks = forward_hooks(model)
    adaptive = [h for h in hooks if h.owner == "adaptive" and id(h.installer) not in inside]
    reparam = [h for h in hooks if h.owner == "reparametrization"]
    if adaptive:
        raise ValueError(
            f"{writer} stores tensors, and {len(adaptive)} module(s) of this model are sites of an AdaptiveQuantizer "
            f"that is not part of it ({'; '.join(h.describe() for h in adaptive[:8])}): the per-sample activation "
            "bits would be lost. Accepted: save the AdaptiveQuantizer itself (medquant.save(aq, path): its bit map "
            "and sites are in its state; load it into AdaptiveQuantizer(model, bit_map=..., sites=...)), or call "
            "aq.remove() first and save the model it returns (weights quantized, activations float)")
    if reparam:
        raise ValueError(
            f"{writer} stores the state dict, and {len(reparam)} module(s) compute their weight through a torch "
            f"reparametrisation ({'; '.join(h.describe() for h in reparam[:8])}): the file would hold its parts "
            "(weight_orig and weight_mask, weight_g and weight_v) and no weight, and would not load into the model. "
            f"Accepted: {MAKE_PERMANENT}")
    parametrized = [(n, m) for n, m in model.named_modules() if parametrize.is_parametrized(m)]
    if parametrized and _is_hf(model):  # the architecture's own (Wav2Vec2's weight_norm): rebuilt with the model
        native = _native_parametrizations(model)
        parametrized = [(n, m) for n, m in parametrized if _parametrizations_of(m) != native.get(n)]
    if parametrized:
        listed = "; ".join(f"{n or '(model)'}: {', '.join(m.parametrizations)}" for n, m in parametrized[:8])
        raise ValueError(
            f"{writer} stores the state dict, and {len(parametrized)} module(s) compute tensors through "
            f"torch.nn.utils.parametrize ({listed}{' ...' if len(parametrized) > 8 else ''}): the file would hold "
            "their parts (parametrizations.<tensor>.original*) and not the tensors, so a model of the architecture "
            "loaded from it would not get them (from_pretrained initialises them afresh). Accepted: make them "
            "permanent first (torch.nn.utils.parametrize.remove_parametrizations(module, 'weight'), which keeps the "
            "weight they compute)")
    user = [h for h in hooks if h.owner == "user"]
    if user:
        _warn(f"{writer}: {len(user)} forward hook(s) are not saved ({'; '.join(h.describe() for h in user[:8])}"
              f"{' ...' if len(user) > 8 else ''}): the model loaded from the folder runs without them; build what "
              "they compute into the model's layers to keep it", UserWarning)


def _parametrizations_of(module: nn.Module) -> dict[str, list[str]]:
    """``{tensor name: [class name of each parametrization, in order]}`` of a ``torch.nn.utils.parametrize``d
    module (empty when it has none)."""
    from torch.nn.utils import parametrize

    if not parametrize.is_parametrized(module):
        return {}
    tables: Any = module.parametrizations
    return {t: [type(p).__qualname__ for p in plist] for t, plist in tables.items()}


def _native_parametrizations(model: nn.Module) -> dict[str, dict[str, list[str]]]:
    """The ``torch.nn.utils.parametrize`` parametrizations a transformers model of ``model``'s class builds itself
    from ``model.config`` (Wav2Vec2's ``pos_conv_embed.conv`` weight norm): module name ->
    :func:`_parametrizations_of`, read from a fresh model built on the meta device (no memory is allocated).
    Empty when the model cannot be built so (every parametrization then counts as added)."""
    import copy

    try:
        with torch.device("meta"), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            cls: Any = type(model)
            fresh = cls._from_config(copy.deepcopy(model.config))
    except Exception:  # noqa: BLE001 - a class that cannot be rebuilt from its config alone: nothing is native
        return {}
    return {n: p for n, m in fresh.named_modules() if (p := _parametrizations_of(m))}


def _shared_blocks(model: nn.Module) -> dict[str, str]:
    """``{further name: first name}`` of every module bound under several names (``layers[1] = layers[0]``), the
    outermost such names only (a shared block's submodules follow it), leaving out the quantized layers
    :func:`~medquant.quant.recipe.shared_modules` records. safetensors stores a shared tensor once, under its first
    name: the load binds the further names to the first name's module again."""
    first: dict[int, str] = {}
    out: dict[str, str] = {}
    quantized = shared_modules(model)
    for name, m in model.named_modules(remove_duplicate=False):
        if id(m) not in first:
            first[id(m)] = name
            continue
        holds_tensors = next(m.parameters(), None) is not None or next(m.buffers(), None) is not None
        if holds_tensors and name not in quantized and not any(name.startswith(a + ".") for a in out):
            out[name] = first[id(m)]
    return out


def _bind_shared_blocks(model: nn.Module, shared: Mapping[str, str], swap: Callable[[str, nn.Module], None]
                        ) -> None:
    """Bind each further name of ``shared_blocks`` (``medquant.json``, checked by the schema) to its first name's
    module, through ``swap`` (undone by the caller on a refusal)."""
    for alias, name in shared.items():
        try:
            target, at_alias = model.get_submodule(name), model.get_submodule(alias)
        except AttributeError:
            raise CheckpointError(f"{META_NAME}: module {alias!r} shares {name!r} in the saved model, but "
                                  f"{type(model).__name__} has no module under one of these names") from None
        if at_alias is target:
            continue
        if type(at_alias) is not type(target):
            raise CheckpointError(f"{META_NAME}: module {alias!r} shares {name!r} in the saved model (one "
                                  f"{type(target).__name__} under both names), but the model holds a "
                                  f"{type(at_alias).__name__} at {alias!r}")
        swap(alias, target)


def save(model: nn.Module, directory: str | os.PathLike, *, extras: dict[str, Any] | None = None) -> Path:
    """Save ``model`` (quantized or not) to the folder ``directory`` (see :mod:`medquant.io`).

    Layers holding 3/5/6/7-bit rows in version-1 containers are re-packed densely first, in place
    (:func:`dense_layouts`: format version 2, the same codes and scales); ``format_version`` is 2 only when a layer
    stores dense rows, else 1. The folder is replaced as one unit (:func:`write_checkpoint`).

    Args:
        model: the model; a transformers ``PreTrainedModel`` also gets its ``config.json`` (with a medquant
            ``quantization_config`` when it holds quantized layers, so that ``from_pretrained`` rebuilds them) and,
            when it generates, its ``generation_config.json``.
        directory: the checkpoint folder.
        extras: JSON-serialisable data stored beside the model (it comes back from :func:`load_extras`; dict
            keys must be strings, which JSON keeps; tuples come back as lists).

    Returns:
        The folder path.

    Raises:
        TypeError: ``model`` is not an ``nn.Module``, it holds bitsandbytes layers (NF4 / 8-bit: see
            :class:`medquant.qlora.QLoRAAdapter` for saving those), or ``extras`` is not a JSON-serialisable dict
            with string keys, or a tensor of the model has a dtype safetensors does not store (complex128,
            complex32, float4: the message names it and the dtypes stored).
        ValueError: ``directory`` is refused by :func:`checkpoint_path` (or is, after its symlinks, the current
            folder, a folder above it or a root: :func:`medquant.io.atomic.replace_directory`), tensors of the
            model are on the meta device, or forward hooks the file would lose change what it computes
            (:func:`check_saved_hooks`: an AdaptiveQuantizer's sites, a torch reparametrisation; other hooks are
            warned about).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"save expects an nn.Module, got {type(model).__name__}")
    path = checkpoint_path(directory)
    if extras is not None and not isinstance(extras, dict):
        raise TypeError(f"extras must be a dict, got {type(extras).__name__}")
    bnb_layers = [n for n, m in model.named_modules() if type(m).__module__.startswith("bitsandbytes")]
    if bnb_layers:
        # their state dict holds bitsandbytes' packed bytes under the float weights' names: a folder that no loader
        # here can read back
        raise TypeError(f"save does not store bitsandbytes layers ({len(bnb_layers)}, e.g. {bnb_layers[0]!r}: NF4 "
                        "from NF4Config or QLoRAAdapter); save a QLoRA adapter with QLoRAAdapter.save (its base is "
                        "NF4-quantized again from the float model at load), or QLoRAAdapter.merge() / "
                        "requantize(...) it first and save that model")
    state = model.state_dict()
    on_meta = [k for k, t in state.items() if t.device.type == "meta"]
    if on_meta:
        raise ValueError(f"{len(on_meta)} tensor(s) of the model are on the meta device (not loaded), e.g. "
                         f"{on_meta[0]}: load or materialise them before saving")
    unstored = [(k, str(t.dtype).replace("torch.", "")) for k, t in state.items()
                if str(t.dtype).replace("torch.", "") not in STORED_DTYPES]
    if unstored:
        raise TypeError(f"save stores tensors with safetensors, which has no dtype for {len(unstored)} tensor(s) of "
                        f"the model: {', '.join(f'{k} ({d})' for k, d in unstored[:8])}; the dtypes it stores are "
                        f"{', '.join(STORED_DTYPES)}: cast those tensors to one of them before saving")
    check_saved_hooks(model)
    kind = "hf" if _is_hf(model) else "torch"
    _check_json_keys(extras or {}, "extras")
    try:
        extras_text = json.dumps(extras or {})
    except (TypeError, ValueError) as e:
        raise TypeError(f"extras must be JSON-serialisable: {e}") from None
    version = dense_layouts(model)
    with write_checkpoint(path) as folder:
        wpath = folder / WEIGHTS_NAME
        with _tied_heads_stored_once(model), _shared_stored_once(model), _views_stored_whole(model):
            save_model(model, str(wpath), metadata={"format": "pt", "medquant_format_version": str(version)})
        _sort_safetensors_metadata(wpath)
        meta = {
            "format_version": version,
            "medquant_version": __version__,
            "weights": {"file": WEIGHTS_NAME, "sha256": sha256_file(wpath), "bytes": wpath.stat().st_size},
            "model": {"kind": kind, "class": type(model).__name__, "module": type(model).__module__},
            "modules": _recipes(model),
            "extras": json.loads(extras_text),
        }
        bufs = _buffer_dtypes(model)
        if bufs:
            meta["buffer_dtypes"] = bufs
        shared = shared_modules(model)
        if shared:  # a quantized layer under several names: stored once, bound to every name again on load
            meta["shared_modules"] = shared
        blocks = _shared_blocks(model)
        if blocks:  # any other module under several names (a block run twice): the same
            meta["shared_blocks"] = blocks
        acts = input_quantizers(model)
        if acts:  # static activation quantizers (learned rounding's act_bits): attached again on load
            meta["input_quantizers"] = {n: q.as_dict() for n, q in acts.items()}
        if kind == "hf":
            _save_remote_code(model, folder)  # before config.json: it may complete the config's auto_map
            _write_text(folder / HF_CONFIG_NAME, _hf_config_json(model, quantized=bool(meta["modules"])))
            generation = _generation_config_json(model)
            if generation is not None:
                _write_text(folder / GENERATION_CONFIG_NAME, generation)
        _write_text(folder / META_NAME, json.dumps(meta, indent=1))
    return path


# ---------------------------------------------------------------------------------------------------------- reading
@dataclass(frozen=True)
class _Opened:
    root: Path  # the resolved folder every file is read from
    meta: CheckpointMeta
    header: dict[str, TensorInfo]
    manifest: dict[str, Any] | None


def _regular(root: Path, name: str) -> Path:
    """``root/name`` for a plain ``name`` that is a regular file (not a symlink) inside ``root``."""
    try:
        check_plain_name(name, "a checkpoint file name")
    except ValueError as e:
        raise CheckpointError(str(e)) from None
    p = root / name
    if not os.path.lexists(p):
        raise CheckpointError(f"{p} is missing")
    if not stat.S_ISREG(os.lstat(p).st_mode):
        raise CheckpointError(f"{p} is not a regular file (symlinks and folders are not read from checkpoints)")
    return p


def _warn(message: str, category: type[Warning]) -> None:
    """``warnings.warn`` attributed to the first caller outside the medquant package (the user's ``load`` /
    ``verify`` / ``from_pretrained`` call), however many medquant frames lie between (``atomic.read_stable``'s
    re-reads add some)."""
    package = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep
    frame: types.FrameType | None = sys._getframe(1)
    level = 2  # _warn's caller
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(package):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, category, stacklevel=level)


def _legacy_warning(directory: Path, what: str) -> None:
    _warn(f"{directory} has no {MANIFEST_NAME} (saved by an older medquant, or by a plain save_pretrained "
                  f"instead of medquant.hf.save_pretrained): {what}; `medquant upgrade {directory}` adds one",
          CheckpointWarning)


def _checkpoint_folder(path: Path) -> Path:
    """The folder ``path`` names now (the version folder behind a checkpoint link); it must exist and be a folder."""
    root = atomic.resolve(path)
    if not os.path.lexists(root):
        raise CheckpointError(atomic.dangling_message(path) or f"{path} does not exist")
    if not root.is_dir():
        raise CheckpointError(f"{path} is not a folder; a medquant checkpoint is a folder")
    return root


def _not_medquant(path: str | os.PathLike, root: Path) -> str:
    """The error for a folder without ``medquant.json``; one with a transformers ``config.json`` (written by
    ``save_pretrained``) is named as such, with the loader that reads it."""
    msg = f"{path} is not a saved medquant model: {META_NAME} is missing"
    if os.path.lexists(root / HF_CONFIG_NAME):
        msg += (f"; it has a transformers {HF_CONFIG_NAME} (a save_pretrained folder): load it with "
                "AutoModel...from_pretrained(path) after import medquant")
    return msg


def _open(directory: str | os.PathLike) -> _Opened:
    path = Path(directory)
    root = _checkpoint_folder(path)
    try:
        manifest = read_manifest(root)
        if manifest is not None:
            verify_files(root, manifest)
    except ManifestError as e:  # name the user's path, not the version folder behind it
        raise CheckpointError(str(e).replace(str(root), str(path))) from None
    if manifest is None:
        _legacy_warning(path, "only its weights are verified")
    if not os.path.lexists(root / META_NAME):
        raise CheckpointError(_not_medquant(path, root))
    mpath = _regular(root, META_NAME)
    try:
        meta = parse_metadata(mpath.read_bytes(), META_NAME)
    except SchemaError as e:
        raise CheckpointError(str(e)) from None
    wpath = _regular(root, meta.weights.file)
    size = wpath.stat().st_size
    if manifest is not None:
        listed = manifest["files"]
        for name in (META_NAME, meta.weights.file) + ((HF_CONFIG_NAME,) if meta.model.kind == "hf" else ()):
            if name not in listed:
                raise CheckpointError(f"{path}: {name} is not listed in {MANIFEST_NAME}")
        if listed[meta.weights.file]["sha256"] != meta.weights.sha256 or size != meta.weights.bytes:
            raise CheckpointError(f"{root / META_NAME}: its weights entry disagrees with {meta.weights.file} and "
                                  f"{MANIFEST_NAME}")
    else:
        if size != meta.weights.bytes:
            raise CheckpointError(f"{wpath} is truncated or altered: {size} bytes on disk, {meta.weights.bytes} "
                                  "bytes were saved")
        if sha256_file(wpath) != meta.weights.sha256:
            raise CheckpointError(f"{wpath} is corrupted or was modified after saving: SHA-256 mismatch")
    try:
        header = read_header(wpath)
        check_against_header(meta.modules, header, meta.weights.file, META_NAME, meta.shared_modules)
    except SchemaError as e:
        raise CheckpointError(str(e)) from None
    return _Opened(root, meta, header, manifest)


def read_metadata(directory: str | os.PathLike) -> dict:
    """``medquant.json`` of a checkpoint, parsed and checked against the schema (no tensor data read, no checksum).

    Read again when a save switched the folder during the read (the version resolved may have been removed
    meanwhile; :func:`medquant.io.atomic.read_stable`).

    Args:
        directory: the checkpoint folder.

    Returns:
        ``medquant.json`` as a dict.

    Raises:
        CheckpointError: the file is missing or does not follow the schema.
    """
    return atomic.read_stable(directory, lambda root: _read_metadata_once(Path(directory)), error=CheckpointError)


def _read_metadata_once(directory: Path) -> dict:
    root = _checkpoint_folder(directory)
    if not os.path.lexists(root / META_NAME):
        raise CheckpointError(_not_medquant(directory, root))
    try:
        return parse_metadata(_regular(root, META_NAME).read_bytes(), META_NAME).raw
    except SchemaError as e:
        raise CheckpointError(str(e)) from None


def verify(directory: str | os.PathLike) -> dict:
    """Check a checkpoint without loading it.

    Checked: the manifest (every file's size and SHA-256) or, for older saves, the weights' size and SHA-256;
    ``medquant.json`` against the schema; every recipe against the safetensors header. All of one version: a save
    that switches the folder during the checks makes them run again on the new version
    (:func:`medquant.io.atomic.read_stable`), so the old manifest is never checked against new files.

    Args:
        directory: the checkpoint folder.

    Returns:
        The metadata (``medquant.json`` as a dict).

    Raises:
        CheckpointError: what is missing, altered or malformed (raised by the checks); or saves switched the folder
            during each of three reads.
    """
    return _open_stable(directory).meta.raw


def _open_stable(directory: str | os.PathLike) -> _Opened:
    """:func:`_open`, read again when a save switched the folder during the read (its files are then of one
    version, :func:`medquant.io.atomic.read_stable`)."""
    return atomic.read_stable(directory, lambda root: _open(directory), error=CheckpointError)


def _module_files(ref: Any) -> list[str]:
    """The Python files an ``auto_map`` entry names: ``"module.Class"`` -> ``module.py``; ``"repo--module.Class"``
    (code kept in another Hub repository) -> ``module.py (from repo)``; a tokenizer's ``[slow, fast]`` pair gives
    both (``None`` entries skipped)."""
    refs = ref if isinstance(ref, (list, tuple)) else [ref]
    files = []
    for r in refs:
        if not isinstance(r, str) or "." not in r:
            continue
        repo, _, local = r.rpartition("--")
        name = local.rsplit(".", 1)[0].replace(".", "/") + ".py"
        files.append(f"{name} (from {repo})" if repo else name)
    return files


def _remote_code(folder: Path) -> dict[str, list[str]]:
    """The JSON file -> the Python files its ``auto_map`` names for code transformers does not provide
    (:func:`remote_code_files`); only files with some."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING
    from transformers.models.auto.tokenization_auto import TOKENIZER_MAPPING_NAMES, tokenizer_class_from_name

    found: dict[str, list[str]] = {}
    cfg = _json_object(folder / HF_CONFIG_NAME) or {}
    model_type = cfg.get("model_type")
    known_type = isinstance(model_type, str) and model_type in CONFIG_MAPPING
    auto_map = cfg.get("auto_map")
    if isinstance(auto_map, dict) and not known_type:
        found[HF_CONFIG_NAME] = [f for ref in auto_map.values() for f in _module_files(ref)]
    tok_cfg = _json_object(folder / TOKENIZER_CONFIG_NAME) or {}
    tok_map = tok_cfg.get("auto_map")
    tok_ref = tok_map.get("AutoTokenizer") if isinstance(tok_map, dict) else tok_map
    if tok_ref:
        tok_class = tok_cfg.get("tokenizer_class")
        names = [tok_class, tok_class.removesuffix("Fast"), f"{tok_class}Fast"] if isinstance(tok_class, str) else []
        local = any(tokenizer_class_from_name(n) is not None for n in names) or (
            known_type and model_type in TOKENIZER_MAPPING_NAMES)
        if not local:
            found[TOKENIZER_CONFIG_NAME] = _module_files(tok_ref)
    return {k: list(dict.fromkeys(v)) for k, v in found.items() if v}


def remote_code_files(directory: str | os.PathLike) -> list[str]:
    """The Python files of a Hugging Face folder that transformers would run to load it (``trust_remote_code``).

    They are the modules its ``config.json`` ``auto_map`` names when its ``model_type`` is not one transformers
    provides (transformers then builds the config and the model from the folder's own code: CheXagent, RadFM,
    MiniCPM-V...), and those its ``tokenizer_config.json`` ``auto_map`` names when the tokenizer class is not one
    transformers provides. Only JSON is read: no code runs. A folder whose ``model_type`` transformers knows loads
    with transformers' own classes without its code (as ``from_pretrained`` does without ``trust_remote_code``).

    Args:
        directory: the folder.

    Returns:
        The file names (``modeling_x.py``; ``module.py (from owner/repo)`` for code another repository holds), each
        once, in ``auto_map`` order; empty when loading the folder runs no code of its own.
    """
    return list(dict.fromkeys(f for files in _remote_code(Path(directory)).values() for f in files))


def remote_code_refusal(directory: str | os.PathLike, option: str) -> str | None:
    """The one-line refusal of a folder whose loading would run its own Python code, ``None`` when it runs none.

    Args:
        directory: the folder.
        option: how the user allows it (``"--trust-remote-code"``, ``"trust_remote_code=True"``).

    Returns:
        ``"<folder> ships its own Python code (<files> named by the auto_map of config.json) ...; pass <option> if
        you trust it"``, or ``None`` when :func:`remote_code_files` finds none.
    """
    found = _remote_code(Path(directory))
    if not found:
        return None
    named = "; ".join(f"{', '.join(files)} named by the auto_map of its {src}" for src, files in found.items())
    return (f"{directory} ships its own Python code ({named}) for a model or tokenizer that transformers does not "
            f"provide: loading it would run that code; pass {option} if you trust the folder and its code")


def _remote_auto_class(config: Any, class_name: str) -> Any:
    """The transformers Auto class whose ``auto_map`` entry in ``config`` names the class ``class_name`` (the folder's
    own code); ``None`` when no entry names it or this transformers lacks that Auto class."""
    import transformers

    for key, ref in (getattr(config, "auto_map", None) or {}).items():
        refs = ref if isinstance(ref, (list, tuple)) else [ref]
        if any(isinstance(r, str) and r.rsplit(".", 1)[-1] == class_name for r in refs):
            auto = getattr(transformers, key, None)
            if auto is not None and hasattr(auto, "from_config") and key != "AutoConfig":
                return auto
    return None


def build_hf_model(directory: Path, meta: Mapping, *, trust_remote_code: bool = False) -> nn.Module:
    """A fresh Hugging Face model of the saved class, built from the saved ``config.json`` of ``directory``.

    The model is in eval mode with initialised weights; :func:`load` then loads the saved tensors into it. A class
    transformers does not provide, whose code the folder holds (``config.json`` ``auto_map``: the model was loaded
    with ``trust_remote_code=True`` and :func:`save` copied its code files), is built from that code through the
    Auto class its ``auto_map`` names it under, only with ``trust_remote_code``.

    Args:
        directory: the checkpoint folder.
        meta: the checkpoint's metadata (:func:`verify`).
        trust_remote_code: run the folder's own code (``configuration_*.py``, ``modeling_*.py``) when the saved
            class is not one of transformers'.

    Returns:
        The model.

    Raises:
        CheckpointError: this transformers has no such model class (and the folder holds no code for it, or
            ``trust_remote_code`` is false: the message names the files), or ``config.json`` is not a valid config.
    """
    import transformers
    from transformers import AutoConfig

    cls_name = meta["model"]["class"]
    cls: Any = getattr(transformers, cls_name, None)
    root = atomic.resolve(directory)
    _regular(root, HF_CONFIG_NAME)
    remote = not isinstance(cls, type) or not issubclass(cls, transformers.PreTrainedModel)
    if remote:
        if not remote_code_files(root):
            raise CheckpointError(
                f"the saved model is a {cls_name}, which this transformers {transformers.__version__} does not provide"
            )
        if not trust_remote_code:
            raise CheckpointError(f"the saved model is a {cls_name}, which transformers does not provide: "
                                  f"{remote_code_refusal(directory, 'trust_remote_code=True')}")
    try:
        config = AutoConfig.from_pretrained(str(root), trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{root / HF_CONFIG_NAME} is not a valid transformers config: {e}") from None
    if remote:
        auto = _remote_auto_class(config, cls_name)
        if auto is None:
            raise CheckpointError(f"{root / HF_CONFIG_NAME}: no auto_map entry of a transformers Auto class names "
                                  f"the saved class {cls_name}")
        model = auto.from_config(config, trust_remote_code=True)
        if type(model).__name__ != cls_name:
            raise CheckpointError(f"{root / HF_CONFIG_NAME}: its auto_map builds a {type(model).__name__}, the saved "
                                  f"model is a {cls_name}")
        return model.eval()
    model = cls._from_config(config)
    return model.eval()


def _fits(old: nn.Module, spec: LayerSpec) -> bool:
    """Whether the model's layer at a recipe's name is of the recipe's kind. Shapes are the saved ones (checked
    against the weights' header): a pruned model's layers may still have their unpruned shapes here."""
    if spec.type == "QuantLinear":
        return isinstance(old, (nn.Linear, QuantLinear))
    if spec.type == "QuantEmbedding":
        return isinstance(old, (nn.Embedding, QuantEmbedding))
    return isinstance(old, (nn.Conv2d, QuantConv2d))


# the floating-point and complex safetensors codes -> torch dtype name (the dtypes :func:`_restore_dtypes` gives back)
_DTYPE_OF = {code: name for name, code in STORED_DTYPES.items()
             if name.startswith(("float", "bfloat", "complex")) and hasattr(torch, name)}


def _buffer_dtypes(model: nn.Module) -> dict[str, str]:
    """Floating buffers the weights file does not hold (non-persistent, e.g. rotary ``inv_freq``) whose dtype is
    not float32 (a model cast with ``.to(torch.bfloat16)``): name -> dtype name, so ``load`` restores them."""
    stored = set(model.state_dict())
    return {n: str(b.dtype).replace("torch.", "") for n, b in model.named_buffers()
            if n not in stored and b.is_floating_point() and b.dtype != torch.float32}


def _restore_buffer_dtypes(model: nn.Module, buffer_dtypes: Mapping[str, str]) -> None:
    for name, dt in buffer_dtypes.items():
        try:
            t = model.get_buffer(name)
        except AttributeError:
            continue  # a buffer the rebuilt model does not have: nothing to restore
        if t.is_floating_point():
            t.data = t.data.to(getattr(torch, dt))


def _file_kind(code: str) -> str:
    """The kind of a safetensors dtype code: ``"floating-point"``, ``"complex"``, ``"bool"`` or ``"integer"``."""
    if code.startswith(("F", "BF")):
        return "floating-point"
    if code.startswith("C"):
        return "complex"
    return "bool" if code == "BOOL" else "integer"


def _tensor_kind(t: torch.Tensor) -> str:
    if t.is_floating_point():
        return "floating-point"
    if t.is_complex():
        return "complex"
    return "bool" if t.dtype == torch.bool else "integer"


def _check_kinds(model: nn.Module, state: Mapping[str, torch.Tensor], header: Mapping[str, TensorInfo],
                 file: str) -> None:
    """Every tensor of the file is of the kind (floating-point, integer, bool) of the model's tensor it loads into.

    A load copies with casting: an integer tensor read into a float parameter (a header whose ``F32`` was edited to
    ``I32``, the same byte count) or floats into packed integer codes would load as garbage. Widths may differ
    within a kind (a float32 model loads bfloat16 weights in their saved dtype, integer buffers keep theirs)."""
    for key, info in header.items():
        t = state.get(key)
        if t is None:
            continue
        got, want = _file_kind(info.dtype), _tensor_kind(t)
        if got != want:
            raise CheckpointError(f"{file} holds {key} as {info.dtype} ({got}); {type(model).__name__} expects a "
                                  f"{want} tensor there ({str(t.dtype).replace('torch.', '')}): loading it would "
                                  "convert its values to another kind, so it is refused (the file was altered, or it "
                                  "belongs to another model)")


def _restore_dtypes(model: nn.Module, header: dict[str, TensorInfo]) -> None:
    """Floating-point (float8 included) and complex parameters and buffers take the dtype they were saved in (a
    bfloat16 model comes back bfloat16 even when the instance passed in, or built from the config, is float32)."""
    for name, t in list(model.named_parameters(remove_duplicate=False)) + list(
            model.named_buffers(remove_duplicate=False)):
        info = header.get(name)
        if info is None or info.dtype not in _DTYPE_OF or not (t.is_floating_point() or t.is_complex()):
            continue
        dtype = getattr(torch, _DTYPE_OF[info.dtype])
        if t.dtype != dtype:
            t.data = t.data.to(dtype)


def _restore_generation_config(model: nn.Module, opened: _Opened) -> None:
    """Give a transformers model that generates the ``generation_config.json`` its save wrote (verified with the
    manifest, which lists it), as ``from_pretrained`` does; without one the model keeps the generation config
    derived from ``config.json``. Unlisted files (added after the save) are not read."""
    listed = opened.manifest["files"] if opened.manifest is not None else {}
    if GENERATION_CONFIG_NAME not in listed or not _can_generate(model):
        return
    from transformers import GenerationConfig

    _regular(opened.root, GENERATION_CONFIG_NAME)
    try:
        model.generation_config = GenerationConfig.from_pretrained(str(opened.root))  # type: ignore[assignment]
    except (OSError, ValueError, TypeError) as e:
        raise CheckpointError(f"{opened.root / GENERATION_CONFIG_NAME} is not a valid generation config: {e}"
                              ) from None


def _aliases(model: nn.Module, meta: CheckpointMeta, header: Mapping[str, TensorInfo]) -> dict[str, list[str]]:
    """Recorded module name -> the further names bound to the same quantized layer on load.

    Those of ``shared_modules``; for checkpoints saved before it was recorded, also the model's own further names of
    a recorded module (``self.b = self.a``) under which the file holds no tensor (the layer was shared when saved)."""
    out: dict[str, list[str]] = {}
    for alias, name in meta.shared_modules.items():
        out.setdefault(name, []).append(alias)
    names: dict[int, list[str]] = {}
    for n, m in model.named_modules(remove_duplicate=False):
        names.setdefault(id(m), []).append(n)
    for name in meta.modules:
        try:
            group = names.get(id(model.get_submodule(name)), [])
        except AttributeError:
            continue
        for alias in group:
            if alias == name or alias in meta.modules or alias in meta.shared_modules or alias in out.get(name, ()):
                continue
            if not any(k.startswith(alias + ".") for k in header):
                out.setdefault(name, []).append(alias)
    return out


def _load_once(path: Path, model: nn.Module | None, device: str | torch.device, strict: bool,
               trust_remote_code: bool = False) -> nn.Module:
    opened = _open(path)
    meta, root = opened.meta, opened.root
    if model is None:
        if meta.model.kind != "hf":
            raise CheckpointError(
                f"{path} holds a plain nn.Module ({meta.model.class_name}); rebuild it in code and pass it: "
                f"medquant.load(path, model={meta.model.class_name}(...))"
            )
        model = build_hf_model(root, meta.raw, trust_remote_code=trust_remote_code)
    elif (type(model).__name__, type(model).__module__) != (meta.model.class_name, meta.model.module):
        # names and shapes are checked below; another class with the same names may still compute otherwise
        _warn(f"{path} was saved from {meta.model.module}.{meta.model.class_name}; loading it into a "
              f"{type(model).__module__}.{type(model).__name__} (its tensor names and shapes must match, but its "
              "forward may differ from the saved model's)", UserWarning)
    swapped: list[tuple[str, nn.Module]] = []  # (name, the module it replaced): undone if a check below fails
    # float MoE experts modules, which the expansion below replaces by QuantExperts shells: put back on a refusal
    experts = {n: m for n, m in model.named_modules(remove_duplicate=False) if is_experts_module(m)}

    def swap(name: str, new: nn.Module) -> None:
        swapped.append((name, model.get_submodule(name)))
        swap_module(model, name, new)

    try:
        _bind_shared_blocks(model, meta.shared_blocks, swap)  # a block saved under several names: one module again
        expand_recorded_experts(model, meta.modules)  # MoE experts: their per-expert layers become modules
        aliases = _aliases(model, meta, opened.header)
        for name, spec in meta.modules.items():
            try:
                old = model.get_submodule(name)
            except AttributeError:
                raise CheckpointError(
                    f"the saved model has a quantized module {name!r} that {type(model).__name__} does not have"
                ) from None
            if not _fits(old, spec):
                raise CheckpointError(f"{META_NAME}: module {name!r} records a {spec.type}, which does not fit the "
                                      f"model's {type(old).__name__} at that name")
            try:
                shell = layer_from_recipe(spec.raw)
            except RecipeError as e:
                raise CheckpointError(f"module {name!r} in {META_NAME} has an invalid recipe: {e}") from None
            device_of = next(iter(old.parameters()), None)
            shell = shell.to(device_of.device) if device_of is not None else shell
            swap(name, shell)
            for alias in aliases.get(name, ()):  # a layer saved under several names: one module again
                try:
                    at_alias = model.get_submodule(alias)
                except AttributeError:
                    raise CheckpointError(f"{META_NAME}: the quantized module {name!r} is shared under the name "
                                          f"{alias!r}, which {type(model).__name__} does not have") from None
                if at_alias is not shell and not _fits(at_alias, spec):
                    raise CheckpointError(f"{META_NAME}: module {alias!r} shares the {spec.type} {name!r}, which "
                                          f"does not fit the model's {type(at_alias).__name__} at that name")
                swap(alias, shell)
        for name, spec in meta.modules.items():  # tied heads share their embedding's tensors before they are read
            if spec.tied_to:
                emb = model.get_submodule(spec.tied_to) if spec.tied_to in meta.modules else None
                if not isinstance(emb, QuantEmbedding):
                    raise CheckpointError(f"{META_NAME}: module {name!r} is tied to {spec.tied_to!r}, which is not "
                                          "a quantized embedding of this checkpoint")
                try:
                    tie_quantized_head(model.get_submodule(name), emb)  # type: ignore[arg-type]
                except (TypeError, ValueError) as e:
                    raise CheckpointError(f"{META_NAME}: module {name!r} cannot share {spec.tied_to!r}'s tensors: "
                                          f"{e}") from None
        state = model.state_dict()
        for key, info in opened.header.items():  # float tensors: shapes checked before anything is read
            t = state.get(key)
            if t is not None and tuple(t.shape) != info.shape:
                pruned = isinstance(meta.raw.get("extras"), dict) and "prune" in meta.raw["extras"]
                raise CheckpointError(
                    f"{meta.weights.file} holds {key} with shape {list(info.shape)}; {type(model).__name__} has "
                    f"{list(t.shape)} there" + (
                        ": the folder was written by medquant.prune.save_pruned, whose layer shapes the model's "
                        "config does not describe - load it with medquant.prune.load_pruned" if pruned else
                        " (a model pruned with medquant.prune has layer shapes its config may not describe: save it "
                        "with medquant.prune.save_pruned and load it with load_pruned)"))
        _check_kinds(model, state, opened.header, meta.weights.file)
        acts = _recorded_input_quantizers(model, meta.raw)
        if meta.model.kind == "hf":  # last: it sets the model's generation config only when it does not refuse
            _restore_generation_config(model, opened)
    except BaseException:
        for name, old in reversed(swapped):  # a refused load leaves a passed model as it was given
            swap_module(model, name, old)
        for name, old in experts.items():  # then the expanded experts (also after a failure midway through)
            if model.get_submodule(name) is not old:
                swap_module(model, name, old)
        raise
    _restore_dtypes(model, opened.header)
    _restore_buffer_dtypes(model, meta.buffer_dtypes)
    try:
        with _views_stored_whole(model):  # safetensors reads the model's state dict too
            missing, unexpected = load_model(model, str(root / meta.weights.file), strict=False)
    except (OSError, RuntimeError, ValueError, SafetensorError) as e:  # malformed or mismatched tensors
        raise CheckpointError(f"could not read {meta.weights.file}: {e}") from None
    if strict and (missing or unexpected):
        raise CheckpointError(
            f"saved tensors do not fit {type(model).__name__}: missing {sorted(missing)[:5]}, "
            f"unexpected {sorted(unexpected)[:5]}"
        )
    for name in meta.modules:
        if not bit_map_matches(model.get_submodule(name)):  # type: ignore[arg-type]
            raise CheckpointError(f"module {name!r}: stored bit map disagrees with its recipe in {META_NAME}")
    set_input_quantizers(model, acts)  # the saved model's activation quantizers, and no others
    return model.to(device).eval()


def _recorded_input_quantizers(model: nn.Module, raw: Mapping[str, Any]) -> dict[str, Any]:
    """The input quantizers ``medquant.json`` records (``"input_quantizers"``), built and checked, not attached."""
    records = raw.get("input_quantizers", {})
    if not isinstance(records, dict):
        raise CheckpointError(f"{META_NAME}: input_quantizers must be an object, got {type(records).__name__}")
    try:
        return recorded_quantizers(model, records, META_NAME)
    except (TypeError, ValueError) as e:
        raise CheckpointError(str(e)) from None


def load(directory: str | os.PathLike, model: nn.Module | None = None, *, device: str | torch.device = "cpu",
         strict: bool = True, trust_remote_code: bool = False) -> nn.Module:
    """Load a model saved by :func:`save`, after checking it whole (see :mod:`medquant.io`).

    Hugging Face models are rebuilt from their saved config into the same class. A plain ``nn.Module`` cannot
    be rebuilt from a file without code: pass ``model``, a float instance of the same architecture; its
    layers are replaced by the saved quantized ones and every tensor is loaded into it (in the saved dtype).
    A save that switches the folder while it is read makes the load read the new version, whole
    (:func:`medquant.io.atomic.read_stable`: also when the folder is a real folder, read at its own path, which a
    save exchanges with its new folder, so that the files read after the switch came from the new version); a
    failed read is repeated only
    when the folder was switched during it.

    Args:
        directory: the checkpoint folder.
        model: for plain ``nn.Module`` checkpoints, a float instance of the saved architecture (changed in place;
            a load refused by the checks made before any tensor is read leaves it as it was given: the same module
            objects, MoE experts modules included, the same tensors and generation config). A model of
            another class than the saved one (class name and module, as recorded in ``medquant.json``) loads when
            its tensor names and shapes fit, with a ``UserWarning`` naming both classes.
        device: where the tensors are loaded.
        strict: every tensor of the model must be in the file and every tensor of the file in the model.
        trust_remote_code: rebuild a model whose class transformers does not provide from the code the folder
            holds (:func:`save` copies the ``configuration_*.py`` / ``modeling_*.py`` files of a model loaded with
            ``trust_remote_code=True``); off by default: running a folder's code is the caller's decision.

    Returns:
        The loaded model (``model`` itself when given), on ``device``, in eval mode.

    Raises:
        CheckpointError: the checkpoint is missing, altered, malformed, of a newer format, or does not fit
            ``model``; or saves switched the folder during each of three reads
            (:func:`medquant.io.atomic.read_stable`); or the saved class is the folder's own code and
            ``trust_remote_code`` is false (the message names its files).
    """
    path = Path(directory)
    return atomic.read_stable(path, lambda root: _load_once(path, model, device, strict, trust_remote_code),
                              error=CheckpointError)


def load_extras(directory: str | os.PathLike) -> dict:
    """The JSON ``extras`` of a save (the checkpoint is verified first, as by :func:`verify`).

    Args:
        directory: the checkpoint folder.

    Returns:
        The ``extras`` dict given to :func:`save` (empty when none was).
    """
    return _open_stable(directory).meta.extras


# ------------------------------------------------------------------------------------------- transformers folders
def _weight_files(root: Path) -> list[str]:
    index = root / (WEIGHTS_NAME + ".index.json")
    if os.path.lexists(index):
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            names = sorted(set(weight_map.values()))
        except (ValueError, KeyError, TypeError, AttributeError, RecursionError) as e:
            raise CheckpointError(f"{index} is malformed: {e}") from None
        for n in names:
            try:
                check_plain_name(n, f"{index.name} weight_map entry")
            except ValueError as e:
                raise CheckpointError(str(e)) from None
        return names
    return [WEIGHTS_NAME]


def verify_pretrained(directory: str | os.PathLike, modules: Mapping[str, Any], *, quantized: bool = True,
                      files: bool = True, tensors: bool = True,
                      key_map: Callable[[str], str] | None = None) -> None:
    """The checks of :func:`load` for a folder read by transformers' ``from_pretrained``.

    ``files``: its manifest when it has one (the files transformers reads must be listed and match; other listed
    files are checked when present). ``quantized`` (a pre-quantized checkpoint): each recipe of
    ``quantization_config.modules`` against the schema, and with ``tensors`` against the safetensors headers
    (shapes, dtypes, bits, scheme, scope: every packed buffer present) and no packed tensor in the files for a module
    the config does not record. The files are all of one version: a save that switches the folder during the checks
    makes them run again on the new version (:func:`medquant.io.atomic.read_stable`).

    Args:
        directory: the folder.
        modules: ``quantization_config.modules`` (module name -> recipe).
        quantized: whether the folder holds a pre-quantized model (else only its files are checked).
        files: check the manifest.
        tensors: check the recipes against the safetensors headers (else only against the schema).
        key_map: turns a checkpoint key into the model's name for it (transformers renames keys of some models on
            load: ``save_pretrained`` writes ViT's ``vit.layers.0.attention.k_proj`` as
            ``vit.encoder.layer.0.attention.attention.key``); ``None``: the renaming ``from_pretrained`` applies for
            the class ``config.json`` names (:func:`medquant.models.checkpoint_renaming` of that class built on
            the meta device; keys are names where transformers does not provide the class or renames nothing).

    Raises:
        CheckpointError: a file, recipe or tensor that does not match, or a tensor stored in two weight files (or
            under two keys that ``key_map`` gives one name); or saves switched the folder during each of three
            reads.
    """
    atomic.read_stable(directory, lambda root: _verify_pretrained_once(directory, root, modules, quantized, files,
                                                                       tensors, key_map), error=CheckpointError)


def _stored_names(root: Path) -> Callable[[str], str] | None:
    """Stored tensor name -> the model's name, as ``from_pretrained`` renames them for the class the folder's
    ``config.json`` names (its first ``architectures`` entry, built on the meta device); ``None`` (names as stored)
    for a class transformers does not provide (the folder's own code is not run), a config transformers cannot
    read, or a transformers without renaming."""
    import transformers

    from ..models import checkpoint_renaming

    try:
        cfg = transformers.AutoConfig.from_pretrained(str(root), trust_remote_code=False)
    except (OSError, ValueError, KeyError, TypeError):
        return None
    arch = (getattr(cfg, "architectures", None) or [None])[0]
    cls = getattr(transformers, arch, None) if isinstance(arch, str) else None
    if cls is None or not hasattr(cls, "_from_config"):
        return None
    try:
        with torch.device("meta"):
            model = cls._from_config(cfg)
    except (ValueError, TypeError, AttributeError, ImportError, RuntimeError):
        return None
    return checkpoint_renaming(model)


def _verify_pretrained_once(directory: str | os.PathLike, root: Path, modules: Mapping[str, Any], quantized: bool,
                            files: bool, tensors: bool, key_map: Callable[[str], str] | None) -> None:
    """:func:`verify_pretrained` of the folder ``directory`` resolved to, ``root``."""
    dangling = atomic.dangling_message(directory)
    if dangling is not None:
        raise CheckpointError(dangling)
    weight_files = _weight_files(root)
    if files:
        try:
            manifest = read_manifest(root)
        except ManifestError as e:
            raise CheckpointError(str(e)) from None
        if manifest is not None:
            listed = manifest["files"]
            index = [WEIGHTS_NAME + ".index.json"] if weight_files != [WEIGHTS_NAME] else []
            needed = [HF_CONFIG_NAME] + weight_files + index
            for name in needed:
                if name not in listed:
                    raise CheckpointError(f"{Path(directory) / name} is not listed in {MANIFEST_NAME}")
            present = {n: e for n, e in listed.items() if n in needed or os.path.lexists(root / n)}
            try:  # the hub cache holds symlinks to blobs: follow them here, transformers reads them anyway
                verify_files(root, {"files": present}, follow_symlinks=True)
            except ManifestError as e:
                raise CheckpointError(str(e).replace(str(root), str(directory))) from None
        elif quantized:
            _legacy_warning(Path(directory), "its files are not verified, only the recipes against the tensors")
    if not quantized:
        return
    where = f"{HF_CONFIG_NAME} quantization_config"
    try:
        layers = {name: parse_layer(e, name, HF_CONFIG_NAME, "quantization_config.modules")
                  for name, e in modules.items()}
        if not tensors:
            return
        if key_map is None:
            key_map = _stored_names(root)
        header: dict[str, TensorInfo] = {}
        held_by: dict[str, str] = {}  # a tensor in two shards: which copy is read is the index's choice, refused
        for f in weight_files:
            p = root / f
            if not p.is_file():
                raise CheckpointError(f"{Path(directory) / f} is missing")
            for key, info in read_header(p).items():
                name = key_map(key) if key_map is not None else key
                if name in held_by:
                    raise CheckpointError(f"{name} is stored twice, in {held_by[name]} and {f}: a tensor is stored "
                                          "in one weight file (only one copy would be read, and checked)")
                header[name], held_by[name] = info, f
        check_against_header(layers, header, ", ".join(weight_files), where)
    except SchemaError as e:
        raise CheckpointError(str(e)) from None
    for key in header:
        prefix, _, leaf = key.rpartition(".")
        if _QUANT_TENSOR.fullmatch(leaf) and prefix not in layers:
            raise CheckpointError(f"{', '.join(weight_files)} holds the packed tensor {key}, but {where}.modules "
                                  f"records no module {prefix!r} (the config was edited or belongs to another "
                                  "checkpoint)")


# ------------------------------------------------------------------------------------------------------- upgrade
class _SwitchedBeforeRewrite(Exception):
    """Raised inside :func:`upgrade`'s rewrite (under the save lock) when a save switched the folder after the
    checks: the rewrite is abandoned (nothing published) and the upgrade starts again on the new version."""


def _upgrade_check(path: Path) -> tuple[Path, bool]:
    """:func:`upgrade`'s reads: (the version folder checked, whether it lacks a valid manifest). Raises
    :class:`CheckpointError` as :func:`upgrade` says."""
    root = _checkpoint_folder(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CheckpointWarning)
        if os.path.lexists(root / META_NAME):
            _open(path)
        else:
            if not os.path.lexists(root / HF_CONFIG_NAME):
                raise CheckpointError(f"{path} is not a medquant checkpoint: it has neither {META_NAME} nor "
                                      f"{HF_CONFIG_NAME}")
            try:
                cfg = json.loads(_regular(root, HF_CONFIG_NAME).read_text(encoding="utf-8"))
                qc = cfg.get("quantization_config") or {}
            except (ValueError, AttributeError, RecursionError) as e:
                raise CheckpointError(f"{root / HF_CONFIG_NAME} is not valid JSON: {e}") from None
            if not isinstance(qc, dict) or qc.get("quant_method") != "medquant" or not isinstance(
                    qc.get("modules"), dict):
                raise CheckpointError(f"{path} is not a medquant checkpoint: no {META_NAME} and no medquant "
                                      f"quantization_config in {HF_CONFIG_NAME}")
            verify_pretrained(root, qc["modules"])
    try:
        manifest = read_manifest(root)
    except ManifestError:
        manifest = None
    return root, manifest is None  # with a manifest, _open / verify_pretrained checked it


def upgrade(directory: str | os.PathLike) -> Path:
    """Rewrite a checkpoint saved before manifests existed in today's form (the same files plus the manifest).

    A file a save owns (the weights and their index, ``medquant.json``, a transformers ``config.json``) that is a
    symlink to a regular file, as the checks and transformers read it, is copied with its content, so that the
    folder holds it and the manifest lists it; every other symlink stays the same link. The rewrite goes behind the crash-safe folder switch, after verifying what it can: the weights' SHA-256 of a
    ``medquant.save`` folder, the recipes against the tensors of a ``medquant.hf.save_pretrained`` folder. A folder
    that already has a valid manifest is left as it is. All of one version: the checks are read again when a save
    switches the folder during them (:func:`medquant.io.atomic.read_stable`), and the rewrite copies the files
    under the save lock only when the folder is still the version checked; when a save switched it between the
    checks and the rewrite, nothing is written and the upgrade starts again on the new version (a save's version
    has a manifest, so it is left as it is). The old version is never published over a newer one.

    Args:
        directory: the checkpoint folder.

    Returns:
        The folder path.

    Raises:
        CheckpointError: the folder is no medquant checkpoint, or it fails the checks; or saves switched the folder
            during each of three reads, or between the checks and the rewrite three times.
    """
    path = Path(directory)
    for _attempt in range(3):
        root, legacy, checked = atomic.read_stable(
            path, lambda root: (*_upgrade_check(path), atomic.identity(path)), error=CheckpointError)
        if not legacy:
            return path
        try:
            with write_checkpoint(path, sort_metadata=False) as folder:
                # under the save lock: no save switches it from here on. A save over a version link changes the
                # folder's name, one over a real folder (exchanged at ``path``) only its identity
                if atomic.identity(path) != checked:
                    raise _SwitchedBeforeRewrite
                owned = _owned_in(root)
                for dirpath, dirs, names in os.walk(root):
                    rel = Path(dirpath).relative_to(root)
                    (folder / rel).mkdir(parents=True, exist_ok=True)
                    for n in names + [d for d in dirs if os.path.islink(os.path.join(dirpath, d))]:
                        src = Path(dirpath) / n
                        if rel == Path(".") and n == MANIFEST_NAME:
                            continue
                        # a file the checks read through a symlink (the weights, config.json), which a save owns:
                        # its content, so that the folder keeps it (and its manifest lists it); any other symlink
                        # stays the link it is
                        follow = rel == Path(".") and owned(n) and src.is_file()
                        shutil.copy2(src, folder / rel / n, follow_symlinks=follow)
        except _SwitchedBeforeRewrite:
            continue
        return path
    raise CheckpointError(f"{path} was switched to a new version by a save between the checks and the rewrite "
                          "of each of 3 upgrades; upgrade it again once the saves have stopped")
