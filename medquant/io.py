"""Save and load quantized models: safetensors + JSON, atomic writes, checksums, no pickle.

A saved directory holds

* ``model.safetensors`` - every tensor of the model's state dict (packed codes, scales, zeros, bit maps, float
  tensors; tied tensors stored once);
* ``medquant.json`` - format version, the SHA-256 and byte size of ``model.safetensors``, the model class, each
  quantized module's recipe (bits per row, scheme, scope, shapes) and optional JSON ``extras`` (e.g. a fitted
  ComplexityScorer's state);
* ``config.json`` - for Hugging Face models, their config, so the same class is rebuilt on load.

Every file is written to a temporary name in the same directory and renamed into place, so a failed save
leaves any earlier save intact. ``load`` verifies size and checksum before parsing a byte of tensor data and
raises :class:`CheckpointError` on a truncated or altered file.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_model, save_model
from torch import nn

from .kernels.layout import FORMAT_VERSION
from .quant.api import swap_module
from .quant.recipe import RecipeError, bit_map_matches, layer_from_recipe, model_recipe
from .version import __version__

WEIGHTS_NAME = "model.safetensors"
META_NAME = "medquant.json"
HF_CONFIG_NAME = "config.json"


class CheckpointError(RuntimeError):
    """A saved medquant model is missing, truncated, altered or of an unsupported format."""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _tmp_path(directory: Path, final_name: str) -> Path:
    fd, name = tempfile.mkstemp(prefix=f".{final_name}.", suffix=".tmp", dir=directory)
    os.close(fd)
    return Path(name)


def _write_text_tmp(directory: Path, final_name: str, text: str) -> Path:
    tmp = _tmp_path(directory, final_name)
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    return tmp


def _is_hf(model: nn.Module) -> bool:
    try:
        from transformers import PreTrainedModel
    except ImportError:  # pragma: no cover
        return False
    return isinstance(model, PreTrainedModel)


def save(model: nn.Module, directory: str | os.PathLike, *, extras: dict[str, Any] | None = None) -> Path:
    """Save ``model`` (quantized or not) to ``directory``. Returns the directory path.

    ``extras`` must be JSON-serialisable; it comes back from :func:`load_extras`.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"save expects an nn.Module, got {type(model).__name__}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tmps: list[tuple[Path, Path]] = []
    try:
        wtmp = _tmp_path(directory, WEIGHTS_NAME)
        save_model(model, str(wtmp), metadata={"format": "pt", "medquant_format_version": str(FORMAT_VERSION)})
        tmps.append((wtmp, directory / WEIGHTS_NAME))
        kind = "hf" if _is_hf(model) else "torch"
        meta = {
            "format_version": FORMAT_VERSION,
            "medquant_version": __version__,
            "weights": {"file": WEIGHTS_NAME, "sha256": _sha256(wtmp), "bytes": wtmp.stat().st_size},
            "model": {"kind": kind, "class": type(model).__name__, "module": type(model).__module__},
            "modules": model_recipe(model),
            "extras": extras or {},
        }
        try:
            meta_text = json.dumps(meta, indent=1)
        except TypeError as e:
            raise TypeError(f"extras must be JSON-serialisable: {e}") from None
        if kind == "hf":
            tmps.append((_write_text_tmp(directory, HF_CONFIG_NAME, model.config.to_json_string()),
                         directory / HF_CONFIG_NAME))
        tmps.append((_write_text_tmp(directory, META_NAME, meta_text), directory / META_NAME))
    except BaseException:
        for tmp, _ in tmps:
            tmp.unlink(missing_ok=True)
        for leftover in directory.glob(f".{WEIGHTS_NAME}.*.tmp"):
            leftover.unlink(missing_ok=True)
        raise
    for tmp, final in tmps:  # medquant.json last: a crash in between is caught by the checksum on load
        os.replace(tmp, final)
    return directory


def read_metadata(directory: str | os.PathLike) -> dict:
    """Parse and validate ``medquant.json`` (no tensor data is read)."""
    directory = Path(directory)
    mpath = directory / META_NAME
    if not mpath.is_file():
        raise CheckpointError(f"{directory} is not a saved medquant model: {META_NAME} is missing")
    try:
        meta = json.loads(mpath.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{mpath} is corrupted (not valid JSON: {e})") from None
    for key in ("format_version", "weights", "model", "modules"):
        if key not in meta:
            raise CheckpointError(f"{mpath} is incomplete: the '{key}' entry is missing")
    if not isinstance(meta["format_version"], int) or meta["format_version"] > FORMAT_VERSION:
        raise CheckpointError(
            f"{mpath} has format version {meta['format_version']!r}; this medquant reads versions <= {FORMAT_VERSION}"
        )
    return meta


def verify(directory: str | os.PathLike) -> dict:
    """Check the weights file's size and SHA-256 against ``medquant.json``; returns the metadata."""
    directory = Path(directory)
    meta = read_metadata(directory)
    w = meta["weights"]
    wpath = directory / w["file"]
    if not wpath.is_file():
        raise CheckpointError(f"{wpath} is missing")
    size = wpath.stat().st_size
    if size != w["bytes"]:
        raise CheckpointError(
            f"{wpath} is truncated or altered: {size} bytes on disk, {w['bytes']} bytes were saved"
        )
    digest = _sha256(wpath)
    if digest != w["sha256"]:
        raise CheckpointError(f"{wpath} is corrupted or was modified after saving: SHA-256 mismatch")
    return meta


def build_hf_model(directory: Path, meta: dict) -> nn.Module:
    """A fresh Hugging Face model (eval mode, initialised weights) of the saved class, built from the saved
    ``config.json`` of ``directory``; ``meta`` is the checkpoint's metadata (:func:`verify`)."""
    import transformers
    from transformers import AutoConfig

    cls_name = meta["model"]["class"]
    cls = getattr(transformers, cls_name, None)
    if cls is None:
        raise CheckpointError(
            f"the saved model is a {cls_name}, which this transformers {transformers.__version__} does not provide"
        )
    config = AutoConfig.from_pretrained(str(directory))
    model = cls._from_config(config)
    return model.eval()


def load(directory: str | os.PathLike, model: nn.Module | None = None, *, device: str | torch.device = "cpu",
         strict: bool = True) -> nn.Module:
    """Load a model saved by :func:`save`. Verifies the checksum first.

    Hugging Face models are rebuilt from their saved config into the same class. A plain ``nn.Module`` cannot
    be rebuilt from a file without code: pass ``model``, a float instance of the same architecture; its
    layers are replaced by the saved quantized ones and every tensor is loaded into it.
    """
    directory = Path(directory)
    meta = verify(directory)
    if model is None:
        if meta["model"]["kind"] != "hf":
            raise CheckpointError(
                f"{directory} holds a plain nn.Module ({meta['model']['class']}); rebuild it in code and pass it: "
                f"medquant.load(path, model={meta['model']['class']}(...))"
            )
        model = build_hf_model(directory, meta)
    for name, entry in meta["modules"].items():
        try:
            old = model.get_submodule(name)
        except AttributeError:
            raise CheckpointError(
                f"the saved model has a quantized module {name!r} that {type(model).__name__} does not have"
            ) from None
        try:
            shell = layer_from_recipe(entry)
        except RecipeError as e:
            raise CheckpointError(f"module {name!r} in {META_NAME} has an invalid recipe: {e}") from None
        device_of = next(iter(old.parameters()), None)
        swap_module(model, name, shell.to(device_of.device) if device_of is not None else shell)
    try:
        missing, unexpected = load_model(model, str(directory / meta["weights"]["file"]), strict=False)
    except (OSError, RuntimeError, ValueError, SafetensorError) as e:  # malformed or mismatched tensors
        raise CheckpointError(f"could not read {meta['weights']['file']}: {e}") from None
    if strict and (missing or unexpected):
        raise CheckpointError(
            f"saved tensors do not fit {type(model).__name__}: missing {sorted(missing)[:5]}, "
            f"unexpected {sorted(unexpected)[:5]}"
        )
    for name in meta["modules"]:
        if not bit_map_matches(model.get_submodule(name)):
            raise CheckpointError(f"module {name!r}: stored bit map disagrees with its recipe in {META_NAME}")
    return model.to(device).eval()


def load_extras(directory: str | os.PathLike) -> dict:
    return read_metadata(directory).get("extras", {})
