"""Sequential (layer-by-layer) post-training quantization for models that do not fit on the compute device.

``quantize_sequential(model, config_or_map, ...)`` gives exactly the model ``quantize_(model, config_or_map)``
gives (same plan - MoE experts with 3-D weights quantized per expert inside their block, routers left in float;
with ``per_block_fn`` too, which may calibrate the experts first - same QuantLinear / QuantConv2d, bit-identical
buffers: round-to-nearest, ``u = clamp(round(w/s) + z, 0, 2^b - 1)``, is computed per layer, so the order of layers
cannot change a code), but holds only one decoder / vision block in
floating point on the compute device at a time:

1. the plan is resolved on the skeleton (patterns, roles and ``skip`` exactly as :func:`medquant.quantize_`);
2. the blocks are the entries of :func:`medquant.models.vision_layers` then
   :func:`medquant.models.language_model_layers` (vision first: its output feeds the language model), or the
   names given in ``blocks=``;
3. for each block, in order: its float weights are moved to ``device`` - from the model's own (CPU) weights, or read from a
   safetensors ``checkpoint`` when the model was built on the meta device (``accelerate.init_empty_weights()``) -
   ``per_block_fn(block, inputs)`` runs if given, the block's planned layers are quantized, and the block moves to
   ``offload_device``;
   (the modules outside the blocks - embeddings, norms, projector, ``lm_head``... - are processed first, leaf
   by leaf, the same way; with ``outside_fn``, their planned Linear / Conv2d layers stay in float there and are
   calibrated later - see below).

Calibrating the layers outside the blocks (``outside_fn``, block-by-block GPTQ): each such layer is handed to
``outside_fn`` as an :class:`OutsideLayer` once its inputs are those of the final model, in call order: the ones
the forward calls before a block group's first block (a patch embedding, a VLM's projector feeding the language
stack) just before that group's capture pass, the rest (``lm_head``) after the last block. A pass up to the group's
first block (after the last block: a whole forward) counts each one's calls per batch; then each layer's own passes
run the batches up to its last call (the layer itself and what follows do not run), with the finished blocks and
the modules outside the blocks each on the compute device only while it runs, as in the capture passes below. The
layer comes to the compute device for ``outside_fn``'s computation (block-by-block GPTQ: the float layer, its
Hessian and a float32 working copy of its weight - for a 150k x 4096 ``lm_head`` about 2.4 GB each for the layer and
the copy, less than one float block of a large model plus its activations) and its quantized result goes to
``offload_device``.

Peak memory on the compute device: one float block plus its calibration activations (calibrating: plus, only
while it runs in a capture pass, one finished block of an earlier stack or one module outside the blocks; plus the
tensors owned by modules that hold blocks, below). With ``outside_fn``, the pass over the finished model that
counts the calls of the layers left after the last block runs the whole forward, so it computes the model's output
(``lm_head``'s batch x tokens x vocabulary logits) once per calibration batch, as whole-model GPTQ's call count does;
the layers' own passes stop before them. With a meta skeleton and a checkpoint, peak host memory is the
quantized result plus one float block (``benchmarks/memory.py`` measures it).

Calibration (for activation-aware methods): with ``calib_inputs`` (one ``model(**batch)`` keyword dict or a list
of them) and ``per_block_fn``, the inputs of each block are captured and passed as :class:`BlockInputs`. A block's
keyword arguments (attention masks, rotary position embeddings, window ``cu_seqlens``...) are recorded in one
forward pass in which the not-yet-processed blocks are replaced by recorders that pass the hidden states through;
its hidden-state input is the output of the already *quantized* previous block (the GPTQ/AWQ convention: each
block is calibrated on the activations the quantized model will actually feed it). Where the model changes the
hidden states between two blocks of a stack - seen in the recording pass as block ``i + 1`` receiving something
other than the hidden states block ``i``'s pass-through recorder returned (Qwen3-VL adds a deepstack image
feature after each of its first text layers, IDEFICS runs a gated cross-attention layer before every
``cross_layer_interval``-th text layer, Mllama normalises and adds tile position embeddings between its local and
global vision transformers, one stack) - the output of block ``i`` is not block ``i + 1``'s input: the blocks from
``i + 1`` on are recorded again, in a pass that runs the blocks before them quantized (one more pass per such
point; a change that leaves the recorded values equal is taken for none). A model whose code needs more than
the hidden states from a block cannot run with recorders (Swin's stages return a tuple its encoder unpacks; Swin
V2, FocalNet and Donut's stages return the downsampled sizes the encoder reads next): when the recording pass
fails, its blocks are recorded one at a time, each in a pass that runs the blocks before it quantized and stops at
it (a pass per block; an error in that pass is the model's own and propagates). The finished (quantized) blocks
of the earlier stacks run in that pass - the vision tower whose output the language stack reads - each moved to
the compute device just before each of its calls and back to ``offload_device`` right after, so at most one of them
is there at a time (two transfers of a quantized block per calibration batch). The modules outside the blocks do the
same: each of the largest submodules holding no block (``embed_tokens``, ``rotary_emb``, ``norm``, a vision
``embeddings`` module with its class token and children, the projector, ``lm_head``) lives on ``offload_device`` and
is on the compute device only during each of its calls (a forward pre-hook moves it there, a forward hook back;
``Module.to``, so a tied ``lm_head.weight is embed_tokens.weight`` moves in place and stays tied). Not moved: the
tensors owned by a module that holds blocks (a class token or position embedding on the vision model itself,
LLaVA-NeXT's ``image_newline``) stay on the compute device while calibrating - their owner's forward runs the
blocks - and go to ``offload_device`` at the end; a tensor of an outside module that a block-holding parent reads
outside that module's forward would be found on ``offload_device``. The capture pass stops at the group's last
block (its recorder raises a private exception), so what follows it - the final norm, ``lm_head`` and its batch x
tokens x vocabulary logits - never runs.

A module bound under several names (one module object, in one block or in several) is quantized once, where its
first name is reached, and the quantized module is bound under every name, as :func:`medquant.quantize_` does
(round-to-nearest does not depend on where it is done; ``per_block_fn`` sees it in float in its first block only).

All or nothing: when the call raises (an error in a later block, ``per_block_fn`` failing, an interrupt), the model
is put back exactly as it was - the same modules and tensor objects under every name (so the same values, devices,
hooks), the same train / eval modes - before the exception propagates. No tensor is copied for this: the model's own
tensors are never changed (a block's tensors are moved or read from the checkpoint into new tensors; one already on
the compute device stays bound when nothing will move it, or is bound as a new tensor object sharing its storage
when the block moves to ``offload_device`` afterwards, or - with ``per_block_fn``, which may change float weights in
place - is copied), and the call keeps them until it returns. The cost: peak host memory is the float model plus the
quantized result where the model starts with real weights (the float tensors of finished blocks are released only at
the end); a meta skeleton holds no float tensors, so streaming from a checkpoint keeps its peak. With
``per_block_fn`` and a model already on the compute device, one float block more is there while it is processed.
"""
from __future__ import annotations

import contextlib
import functools
import inspect
import json
import math
import os
import warnings
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..models.blocks import block_stacks
from ..quant.api import (
    names_by_module,
    notify_quantized,
    quantize_module,
    resolve_configs,
    swap_under_all_names,
)
from ..quant.config import QuantConfig
from ..quant.experts import is_experts_module
from ..quant.modules import QUANT_LAYERS
from ._forward import run_calibration_batch, short_names

__all__ = ["BlockInputs", "CheckpointSource", "OutsideLayer", "quantize_sequential"]


# ---------------------------------------------------------------------------------------------- weights on disk
_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "BOOL": torch.bool}


class CheckpointSource:
    """Float tensors by name from a safetensors checkpoint, read one at a time.

    The source is a ``.safetensors`` file, a directory holding ``model.safetensors``, or a directory with a
    sharded ``model.safetensors.index.json``; a directory holding both is read from ``model.safetensors``, as
    ``from_pretrained`` reads it.

    Each tensor is read with plain file reads into its own buffer (no memory map), so the process holds exactly
    the tensors it keeps: reading a checkpoint block by block does not leave the pages of blocks already
    processed resident (a memory-mapped file would count every page it touched in the resident set).

    With ``rename``, the tensors are named as the model names them rather than as the checkpoint stores them:
    :meth:`keys`, ``in`` and :meth:`get` take the model's names (:meth:`stored_name` gives the stored one back).
    For a Hugging Face model, :func:`medquant.models.checkpoint_renaming` is the renaming ``from_pretrained``
    applies (a VLM saved in its older layout: ``language_model.model.layers.0...`` read as
    ``model.language_model.layers.0...``)::

        source = CheckpointSource(folder, rename=checkpoint_renaming(skeleton))

    Args:
        path: the file or directory.
        rename: stored tensor name -> the name to read it under; ``None`` (the default): the stored names.

    Raises:
        FileNotFoundError: ``path`` does not exist, or a directory holds no ``model.safetensors`` (index).
        ValueError: a file whose safetensors header is corrupted or which is truncated, an index that is not JSON
            or has no ``weight_map`` of file names; two stored tensors that ``rename`` gives the same name.
    """

    def __init__(self, path: str | os.PathLike, rename: Callable[[str], str] | None = None) -> None:
        path = Path(path)
        if path.is_dir():
            index = path / "model.safetensors.index.json"
            single = path / "model.safetensors"
            if single.is_file():  # before the index, as from_pretrained looks for them
                files = [single]
            elif index.is_file():
                files = sorted({path / f for f in self._index_files(index)})
            else:
                raise FileNotFoundError(f"{path} holds neither model.safetensors nor model.safetensors.index.json")
        elif path.is_file():
            files = [path]
        else:
            raise FileNotFoundError(f"checkpoint {path} does not exist")
        self.path = path
        self.files = files  # the safetensors files read, in order
        self._entries: dict[str, tuple[Path, int, dict]] = {}
        self._stored: dict[str, str] = {}  # name read under -> stored name, where they differ
        self._renamed: dict[str, str] = {}  # stored name -> name read under, where they differ
        for f in files:
            data_start, header = self._header(f)
            for k, info in header.items():
                if k == "__metadata__":
                    continue
                name = k if rename is None else rename(k)
                if name in self._entries:
                    raise ValueError(f"{path}: the stored tensors {self.stored_name(name)!r} and {k!r} are both read "
                                     f"as {name!r}; one name cannot hold two tensors")
                self._entries[name] = (f, data_start, info)
                if name != k:
                    self._stored[name] = k
                    self._renamed[k] = name

    @staticmethod
    def _index_files(index: Path) -> list[str]:
        """The file names of a ``model.safetensors.index.json`` (the values of its ``weight_map``), checked."""
        try:
            data = json.loads(index.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{index} is not valid JSON: {e}") from None
        weight_map = data.get("weight_map") if isinstance(data, dict) else None
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise ValueError(f"{index} is not a safetensors index: it needs a \"weight_map\" object of tensor name -> "
                             "file name (as from_pretrained reads it)")
        return list(weight_map.values())

    @staticmethod
    def _header(f: Path) -> tuple[int, dict]:
        size = f.stat().st_size
        with open(f, "rb") as fh:
            raw = fh.read(8)
            n = int.from_bytes(raw, "little") if len(raw) == 8 else -1
            if n <= 0 or n + 8 > size:
                raise ValueError(f"{f} is not a safetensors file (bad header length)")
            try:
                header = json.loads(fh.read(n))
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise ValueError(f"{f} has a corrupted safetensors header: {e}") from None
        if not isinstance(header, dict):  # a corrupted file, as the documented ValueError says
            raise ValueError(  # noqa: TRY004
                f"{f} has a corrupted safetensors header: a JSON {type(header).__name__}, not an object of "
                "tensor entries")
        for k, info in header.items():
            if k == "__metadata__":
                continue
            why = CheckpointSource._bad_entry(info)
            if why:
                raise ValueError(f"{f} has a corrupted safetensors header: tensor {k!r}: {why}")
            if info["data_offsets"][1] + 8 + n > size:
                raise ValueError(f"{f} is truncated: tensor {k!r} lies beyond the end of the file")
        return 8 + n, header

    @staticmethod
    def _bad_entry(info: Any) -> str:
        """What is wrong with one tensor entry of a safetensors header (``""``: nothing): it must be an object with
        ``dtype`` (a string), ``shape`` (non-negative integers) and ``data_offsets`` (``[begin, end]``, integers,
        ``0 <= begin <= end``) whose byte count is the shape's element count times the dtype's size (for the dtypes
        read here)."""
        if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= info.keys():
            return "an entry needs dtype, shape and data_offsets"
        dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        ints = (lambda xs: isinstance(xs, list) and all(isinstance(x, int) and not isinstance(x, bool) and x >= 0
                                                         for x in xs))
        if not isinstance(dtype, str) or not ints(shape) or not ints(offsets) or len(offsets) != 2 \
                or offsets[0] > offsets[1]:
            return (f"dtype {dtype!r}, shape {shape!r}, data_offsets {offsets!r} (expected a dtype name, non-negative "
                    "integer sizes and [begin, end] with 0 <= begin <= end)")
        torch_dtype = _ST_DTYPES.get(dtype)
        if torch_dtype is not None:
            want = math.prod(shape) * torch_dtype.itemsize
            if offsets[1] - offsets[0] != want:
                return (f"{offsets[1] - offsets[0]} bytes of data for shape {shape} of {dtype} ({want} bytes "
                        "expected)")
        return ""

    def keys(self) -> set[str]:
        """The tensor names of the checkpoint (all shards).

        Returns:
            The set of names, as in the model's state dict (after ``rename``, when given).
        """
        return set(self._entries)

    def __contains__(self, key: str) -> bool:
        return key in self._entries

    def stored_name(self, key: str) -> str:
        """The name under which the checkpoint stores the tensor read as ``key``.

        Args:
            key: the tensor's name (after ``rename``).

        Returns:
            The stored name (``key`` itself where ``rename`` kept it, or for a name the checkpoint lacks).
        """
        return self._stored.get(key, key)

    def shape(self, key: str) -> tuple[int, ...]:
        """The stored shape of the tensor read as ``key``, from its file's header (no tensor data read).

        Args:
            key: the tensor's name (after ``rename``).

        Returns:
            The shape.

        Raises:
            KeyError: no tensor of that name.
        """
        entry = self._entries.get(key)
        if entry is None:
            raise KeyError(f"no tensor {key!r} in the checkpoint {self.path}")
        return tuple(entry[2]["shape"])

    def _describe(self, key: str) -> str:
        stored = self._stored.get(key)
        return f"{key!r}" if stored is None else f"{key!r} (stored as {stored!r})"

    def get(self, key: str) -> torch.Tensor:
        """Read one tensor from disk into its own CPU buffer.

        Args:
            key: the tensor's name (the model's name, with ``rename``).

        Returns:
            The tensor, with the stored dtype and shape.

        Raises:
            KeyError: no tensor of that name (the message says so when ``key`` is a stored name read under
                another one).
            ValueError: a dtype this reader does not support, or the file ends before the tensor's data.
        """
        entry = self._entries.get(key)
        if entry is None:
            other = self._renamed.get(key)
            where = f"; the checkpoint stores a tensor under that name, read as {other!r}" if other else ""
            raise KeyError(f"no tensor {key!r} in the checkpoint {self.path}{where}")
        f, data_start, info = entry
        dtype = _ST_DTYPES.get(info["dtype"])
        if dtype is None:
            raise ValueError(f"tensor {self._describe(key)} in {f} has dtype {info['dtype']}, which is not supported "
                             f"here; accepted: {', '.join(_ST_DTYPES)}")
        begin, end = info["data_offsets"]
        shape = tuple(info["shape"])
        if end == begin:
            return torch.empty(shape, dtype=dtype)
        buf = bytearray(end - begin)
        with open(f, "rb") as fh:
            fh.seek(data_start + begin)
            if fh.readinto(buf) != len(buf):
                raise ValueError(f"{f} is truncated while reading {self._describe(key)}")
        return torch.frombuffer(buf, dtype=dtype).reshape(shape)


# ---------------------------------------------------------------------------------------------- helpers
def _to(obj: Any, device: torch.device) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, Mapping):
        return type(obj)({k: _to(v, device) for k, v in obj.items()}) if isinstance(obj, dict) else obj
    if isinstance(obj, (list, tuple)) and not hasattr(obj, "_fields"):
        return type(obj)(_to(v, device) for v in obj)
    return obj


def _shared_to(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``t`` on ``device`` as ``Module.to`` moves it: a parameter in place (its ``data``), so a parameter bound in
    several modules (``lm_head.weight is embed_tokens.weight``) stays one object, wherever it is moved from (a
    new parameter where the two devices' tensor types cannot share one, as to ``meta``); any other tensor as a new
    tensor (``t`` itself when it is already there)."""
    if isinstance(t, nn.Parameter):
        moved = t.data.to(device)
        if moved.data_ptr() == t.data_ptr() and moved.device == t.device:
            return t
        if torch._has_compatible_shallow_copy_type(t, moved):
            t.data = moved
            return t
        return nn.Parameter(moved, requires_grad=t.requires_grad)  # e.g. to "meta": a new one, as Module.to does
    return t.to(device)


def _tied_map(model: nn.Module) -> dict[str, str]:
    """Both directions of Hugging Face tied-weight keys (``lm_head.weight`` <-> ``embed_tokens.weight``), of the
    model and of every Hugging Face model inside it (a classifier wrapping a VLM: ``vlm.lm_head.weight``), under
    their full names."""
    tied: dict[str, str] = {}
    for prefix, mod in model.named_modules():
        keys = getattr(mod, "all_tied_weights_keys", None)
        if not keys or not isinstance(keys, dict):
            continue
        p = f"{prefix}." if prefix else ""
        for t, src in keys.items():
            tied.setdefault(p + t, p + src)
    return {**tied, **{s: t for t, s in tied.items()}}


def _aliases(model: nn.Module) -> dict[str, list[str]]:
    """Full tensor name -> the other names of the same tensor: names bound to one parameter / buffer object and the
    Hugging Face tied-weight keys (:func:`_tied_map`), closed transitively (BART-style models tie ``shared``, both
    ``embed_tokens`` and ``lm_head``; ``safetensors.torch.save_model`` keeps one of those names)."""
    parent: dict[str, str] = {}

    def find(x: str) -> str:
        while parent.setdefault(x, x) != x:
            x = parent[x]
        return x

    first: dict[int, str] = {}
    named = [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]
    for name, t in named:
        parent[find(name)] = find(first.setdefault(id(t), name))
    for a, b in _tied_map(model).items():
        parent[find(a)] = find(b)
    groups: dict[str, list[str]] = {}
    for name in list(parent):
        groups.setdefault(find(name), []).append(name)
    return {n: [m for m in g if m != n] for g in groups.values() if len(g) > 1 for n in g}


def _local_tensors(module: nn.Module) -> list[tuple[str, str, torch.Tensor]]:
    """(kind, name, tensor) of a module's own (non-recursive) parameters and buffers."""
    out = [("param", n, p) for n, p in module._parameters.items() if p is not None]
    out += [("buffer", n, b) for n, b in module._buffers.items() if b is not None]
    return out


class _Materializer:
    """Brings a module's tensors to a device: moves real ones, reads meta ones from the checkpoint.

    The model's own tensors (``originals``) are never changed, so that :class:`_Undo` can put them back unchanged:
    one moved to the device is a new tensor anyway; one already there stays bound with ``keep=True`` (nothing will
    move it or change it in place), else it gets a new tensor object sharing its storage (a later ``module.to``
    then swaps the new object's data, not the original's), or a copy with ``copy=True`` (for code that changes
    the float weights in place). A tensor bound in several places of the model gets one new tensor for all."""

    def __init__(self, model: nn.Module, source: CheckpointSource | None, originals: Collection[int] = ()) -> None:
        self.model = model
        self.source = source
        self.tied = _aliases(model)
        self.done: dict[str, torch.Tensor] = {}  # full key -> materialized tensor, to re-tie shared weights
        self.originals = originals
        counts: dict[int, int] = {}
        for m in model.modules():
            for _, _, t in _local_tensors(m):
                counts[id(t)] = counts.get(id(t), 0) + 1
        self.multi = {i for i, c in counts.items() if c > 1}
        self.fresh: dict[int, torch.Tensor] = {}  # id of a tensor bound in several places -> its new tensor

    def _read(self, key: str, like: torch.Tensor) -> torch.Tensor:
        src = self.source
        if src is None:
            raise ValueError(f"{key} is on the meta device and no checkpoint was given: pass "
                             "checkpoint='path/to/model.safetensors' (or a directory) to stream weights from disk")
        found = next((k for k in (key, *self.tied.get(key, ())) if k in src), None)
        if found is not None:  # the name itself, or another name of the same tensor (safetensors keeps one)
            t = src.get(found)
        else:
            raise ValueError(f"the checkpoint {src.path} has no tensor {key!r} (the model's state-dict names must "
                             "match the checkpoint's, or CheckpointSource(path, rename=...) map them to them: "
                             "medquant.models.checkpoint_renaming(model) for transformers' renaming; or save it "
                             "with safetensors.torch.save_model(model, file))")
        if tuple(t.shape) != tuple(like.shape):
            raise ValueError(f"checkpoint tensor {src._describe(found)} has shape {tuple(t.shape)}, the model "
                             f"expects {tuple(like.shape)}")
        return t

    def _moved(self, t: torch.Tensor, device: torch.device, copy: bool, keep: bool) -> torch.Tensor:
        """``t`` on ``device``; an original tensor as a new object (a copy with ``copy``) unless ``keep`` lets it
        stay."""
        if id(t) not in self.originals:
            return t.to(device)
        if id(t) in self.fresh:  # a parameter moves in place: every module binding it (a tied lm_head) keeps it
            self.fresh[id(t)] = _shared_to(self.fresh[id(t)], device)
            return self.fresh[id(t)]
        new = t.detach().to(device)
        if new.data_ptr() == t.data_ptr() and new.device == t.device:
            if keep and not copy:
                return t
            new = new.clone() if copy else t.detach()
        if id(t) in self.multi:
            self.fresh[id(t)] = new
        return new

    def shared(self, module: nn.Module) -> list[nn.Parameter]:
        """The parameters of ``module`` (and its submodules) that other modules bind too (tied or shared weights,
        moved in place): the caller sends them back to ``offload_device`` itself, as the module may be swapped
        out by its quantized version while another module (a tied ``embed_tokens``) still holds them."""
        ids = {id(x) for x in (*self.fresh.values(), *self.done.values())}
        return [p for p in module.parameters() if id(p) in ids]

    def module(self, module: nn.Module, prefix: str, device: torch.device, recurse: bool = True,
               copy: bool = False, keep: bool = True) -> None:
        """Materialize/move ``module`` (and, with ``recurse``, its submodules) to ``device``; ``prefix`` is its
        full name in the model. The model's own tensors already on ``device``: copied with ``copy``, else bound
        again as they are with ``keep``, else as new tensor objects sharing their storage."""
        subs = module.named_modules() if recurse else [("", module)]
        for sub_name, sub in subs:
            full = f"{prefix}.{sub_name}" if sub_name else prefix
            for kind, name, t in _local_tensors(sub):
                key = f"{full}.{name}" if full else name
                tied_done = next((a for a in self.tied.get(key, ()) if a in self.done), None)
                if tied_done is not None and t.device.type == "meta":
                    new = _shared_to(self.done[tied_done], device)
                else:
                    new = self._read(key, t).to(device=device, dtype=t.dtype) if t.device.type == "meta" \
                        else self._moved(t, device, copy, keep)
                if kind == "param":
                    if not isinstance(new, nn.Parameter):
                        new = nn.Parameter(new, requires_grad=t.requires_grad)
                        if id(t) in self.fresh:  # the next module binding ``t`` (a tied lm_head) gets this one
                            self.fresh[id(t)] = new  # parameter, not a parameter of its own over the same data
                    sub._parameters[name] = new
                else:
                    sub._buffers[name] = new
                if key in self.tied:  # only tied tensors are remembered (anything else would stay alive)
                    self.done[key] = new


class _Undo:
    """The model as :func:`quantize_sequential` (or :func:`medquant.calibrate.awq.awq_quantize_`) found it, to put
    back when it fails.

    Holds, for every module, its own parameter, buffer and child bindings (the objects themselves: no copy of any
    tensor) and its train / eval mode, and the instance ``save_pretrained`` of the root. The sequential pass never
    changes these objects (:class:`_Materializer` binds new tensor objects, the quantized layers are new modules),
    so :meth:`restore` gives back exactly the model of before: the same modules, tensors, hooks and modes. A caller
    that does change some of the model's tensors in place (the whole-model AWQ fold) first hands them to
    :meth:`keep_values`: their values are copied (to the CPU) and :meth:`restore` copies them back into the same
    tensor objects."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.records = [(m, dict(m._parameters), dict(m._buffers), dict(m._modules), m.training)
                        for m in model.modules()]
        self.own = {id(m): (p, b) for m, p, b, _, _ in self.records}
        self.tensors = {id(t) for _, p, b, _, _ in self.records for t in (*p.values(), *b.values()) if t is not None}
        self.save = model.__dict__.get("save_pretrained", _Undo)  # set by the on_quantized hook (transformers)
        self.values: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # id -> (tensor, copy of its values)

    def keep_values(self, tensors: Iterable[torch.Tensor]) -> None:
        """Copy the values of ``tensors`` (which the caller is about to change in place) to the CPU, once per
        tensor object, for :meth:`restore` to write back (bit for bit: same dtype)."""
        for t in tensors:
            if id(t) not in self.values:
                self.values[id(t)] = (t, t.detach().to("cpu", copy=True))

    def release(self, modules: Iterable[nn.Module], live: nn.Module) -> None:
        """Give the ``modules`` no longer in ``live`` (float layers swapped out) their original tensors back, which
        drops the materialized copies they held."""
        kept = {id(m) for m in live.modules()}
        for m in modules:
            if id(m) not in kept and id(m) in self.own:
                params, buffers = self.own[id(m)]
                m._parameters.update(params)
                m._buffers.update(buffers)

    def restore(self) -> None:
        """Bind every module's original parameters, buffers and children again, with its original mode, and write
        the values kept by :meth:`keep_values` back into their tensors."""
        for m, params, buffers, children, training in self.records:
            m._parameters.clear()
            m._parameters.update(params)
            m._buffers.clear()
            m._buffers.update(buffers)
            m._modules.clear()
            m._modules.update(children)
            m.training = training
        with torch.no_grad():
            for t, saved in self.values.values():
                t.copy_(saved)
        if self.save is _Undo:
            self.model.__dict__.pop("save_pretrained", None)
        else:
            self.model.__dict__["save_pretrained"] = self.save


def _quantize_in(model: nn.Module, module: nn.Module, prefix: str, plan: Mapping[str, QuantConfig],
                 aliases: Mapping[int, list[str]]) -> None:
    """Swap the planned Linear / Conv2d layers under ``module`` (full name ``prefix``) for quantized ones, each
    under every name ``aliases`` gives its module in ``model`` (a shared module stays one module, as
    :func:`medquant.quantize_` binds it)."""
    start = prefix + "." if prefix else ""
    for name, cfg in plan.items():
        if name == prefix:
            if isinstance(module, (nn.Linear, nn.Conv2d)):
                raise ValueError(f"{name}: a block cannot itself be a single Linear/Conv2d")
            continue
        if not name.startswith(start):
            continue
        rel = name[len(start):]
        mod = module.get_submodule(rel)
        if isinstance(mod, (nn.Linear, nn.Conv2d)) or is_experts_module(mod):  # else already quantized
            swap_under_all_names(model, name, quantize_module(mod, cfg, name=name), aliases)


# ---------------------------------------------------------------------------------------------- calibration
@dataclass
class BlockInputs:
    """Calibration inputs of one block, one entry per calibration batch.

    ``block(*args[i], **kwargs[i])`` reproduces the call the model makes; ``hidden_states[i]`` is ``args[i][0]``.
    ``configs`` maps the block's planned layers (names relative to the block) to their QuantConfig.

    Attributes:
        name: the block's module name in the model (``model.layers.3``).
        args: positional arguments of each recorded call (the hidden states first).
        kwargs: keyword arguments of each recorded call (attention mask, position embeddings...).
        configs: planned layer name (relative to the block) -> its ``QuantConfig``.
    """

    name: str
    args: list[tuple] = field(default_factory=list)
    kwargs: list[dict] = field(default_factory=list)
    configs: dict[str, QuantConfig] = field(default_factory=dict)

    @property
    def hidden_states(self) -> list[torch.Tensor]:
        """The block's input hidden states, one per calibration batch (``args[i][0]``)."""
        return [a[0] for a in self.args]

    @torch.no_grad()
    def run(self, block: nn.Module) -> list[torch.Tensor]:
        """The block's outputs (hidden states) on every calibration batch.

        Args:
            block: the block module (float or partly quantized), on the device of the recorded inputs.

        Returns:
            One output tensor per calibration batch (the first element when the block returns a tuple).
        """
        outs = []
        for a, k in zip(self.args, self.kwargs):
            o = block(*a, **k)
            outs.append(o[0] if isinstance(o, (tuple, list)) else o)
        return outs


class _Stop(Exception):
    pass


def _recorder(store: dict, name: str, stop: bool, *args, **kwargs):
    if not args:
        if "hidden_states" not in kwargs:
            raise ValueError(f"block {name} was called without a positional hidden-state argument")
        hs = kwargs.pop("hidden_states")
        args = (hs,)
    for k, v in kwargs.items():  # a KV cache (``past_key_values``, or ``cache`` in some VLM forwards) would grow
        if k in ("past_key_values", "past_key_value", "cache") or hasattr(v, "get_seq_length"):
            kwargs[k] = None      # with every re-run of a block and change its attention: never record one
    store.setdefault(name, []).append((args, kwargs))
    if stop:
        raise _Stop
    return args[0]


def _capture(model: nn.Module, group: Sequence[str], batches: Sequence[dict], device: torch.device
             ) -> dict[str, list[tuple[tuple, dict]]]:
    """Record the call of every block of ``group`` for each batch (blocks replaced by pass-through recorders)."""
    store: dict[str, list] = {}
    blocks = [model.get_submodule(n) for n in group]
    for i, (n, b) in enumerate(zip(group, blocks)):
        b.forward = functools.partial(_recorder, store, n, i == len(group) - 1)
    accepts_cache = "use_cache" in inspect.signature(model.forward).parameters
    try:
        with torch.no_grad():
            for i, batch in enumerate(batches):
                kw = _to(dict(batch), device)
                if accepts_cache:
                    kw.setdefault("use_cache", False)
                try:
                    run_calibration_batch(model, batch, i, f"blocks {', '.join(group[:3])}"
                                          f"{', ...' if len(group) > 3 else ''} (recording their inputs)",
                                          passthrough=(_Stop,), call=lambda m, _, kw=kw: m(**kw))
                except _Stop:
                    pass
    finally:
        for b in blocks:
            del b.forward
    missing = [n for n in group if len(store.get(n, [])) != len(batches)]
    if missing and not any(store.get(n) for n in group):
        raise _never_ran(model, group)
    if missing:
        raise RuntimeError(f"blocks {missing[:3]} were not called once per calibration batch by "
                           f"{type(model).__name__}.forward; pass blocks= explicitly")
    return store


def _never_ran(model: nn.Module, group: Sequence[str], before: str | None = None) -> RuntimeError:
    """The error for a block stack the calibration batches never run (``before``: the later block they ran
    instead): a VLM's vision tower given text-only batches."""
    where = f" (the forward ran {before} instead)" if before else ""
    return RuntimeError(
        f"the calibration batches never ran blocks {short_names(list(group))}{where}, so they cannot be calibrated "
        f"block by block: a vision tower, for instance, runs only on batches with images. Give batches with the "
        f"inputs that run them (pixel_values...; --calib-images on the command line), or leave the stack in "
        f"floating point (skip=['@vision'] for a VLM's vision tower, with its projector: skip=['@vision', "
        f"'@projector']; --skip @vision @projector on the command line); nothing was quantized")


def _capture_group(model: nn.Module, group: Sequence[str], batches: Sequence[dict], device: torch.device
                   ) -> tuple[dict[str, list[tuple[tuple, dict]]], int, bool]:
    """The recorded calls of ``group``, how many of its leading blocks can be calibrated from them (each on the
    previous block's output, :func:`_chained`), and whether the pass with recorders failed. When the model cannot
    run with pass-through recorders - its code needs more than the hidden states from a block (Swin's encoder
    unpacks a stage's tuple, Swin V2's reads the downsampled sizes a stage returns) - only the first block is
    recorded (the blocks before it run for real); the caller records the rest one block at a time as well (no
    second failing pass); an error there is the model's own (a bad batch) and propagates."""
    try:
        store = _capture(model, group, batches, device)
    except ValueError:  # the forward failed (run_calibration_batch's error); a block not called is no such case
        if len(group) == 1:
            raise
        return _capture(model, group[:1], batches, device), 1, True
    return store, _chained(group, store), False


def _chained(group: Sequence[str], store: Mapping[str, list[tuple[tuple, dict]]]) -> int:
    """How many leading blocks of ``group`` take, on every batch, the hidden states the block before them returned.

    The recorders of :func:`_capture` return their input, so block ``i + 1`` received exactly what block ``i``
    returned when its recorded hidden states equal block ``i``'s; they differ when the model changed them between
    the two calls (Qwen3-VL adds a deepstack image feature after each of its first text layers, IDEFICS runs a
    gated cross-attention layer before every ``cross_layer_interval``-th one). The blocks from there on are
    captured anew once the ones before are quantized (their inputs cannot be computed from the previous block's
    output alone)."""
    for i in range(1, len(group)):
        for (prev, _), (cur, _) in zip(store[group[i - 1]], store[group[i]]):
            a, b = prev[0], cur[0]
            if a is b:
                continue
            if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape
                    and a.dtype == b.dtype and torch.equal(a, b)):
                return i
    return len(group)


@dataclass
class OutsideLayer:
    """A planned Linear / Conv2d outside the blocks, handed to ``quantize_sequential``'s ``outside_fn``.

    ``module`` is the float layer (its weights materialized); :meth:`run` runs the calibration batches through the
    model - the blocks and the layers before it as they will be in the final model (quantized), each on the compute
    device only while it runs - and calls ``hook`` with every input the layer gets.

    Attributes:
        name: the layer's module name in the model (``model.multi_modal_projector.linear_1``, ``lm_head``).
        module: the float layer.
        config: its ``QuantConfig``.
        calls: how many times each calibration batch calls the layer (counted in a pass before).
        _passes: internal: runs the calibration passes for :meth:`run` (built by :func:`quantize_sequential`; not
            meant to be constructed by callers).
    """

    name: str
    module: nn.Module
    config: QuantConfig
    calls: list[int]
    _passes: Callable[[nn.Module, Callable[[int, tuple, dict], None]], None] = field(repr=False)

    def run(self, hook: Callable[[int, tuple, dict], None]) -> None:
        """Run the calibration batches, calling ``hook(batch_index, args, kwargs)`` with each call of the layer.

        Each batch stops at the layer's last call (the layer itself and what follows it do not run). Afterwards the
        layer is on the compute device (until ``outside_fn`` returns), for the caller's computation.

        Args:
            hook: called with the index of the calibration batch and the layer's positional and keyword arguments.

        Raises:
            ValueError: a batch that does not run (its message names the batch).
        """
        self._passes(self.module, hook)


def _batches_through(model: nn.Module, batches: Sequence[dict], device: torch.device, what: str,
                     before: Callable[[int], bool]) -> None:
    """Run ``model(**batch)`` for each batch for which ``before(i)`` is true (no cache; a :class:`_Stop` raised by a
    hook ends the batch)."""
    accepts_cache = "use_cache" in inspect.signature(model.forward).parameters
    with torch.no_grad():
        for i, batch in enumerate(batches):
            if not before(i):
                continue
            kw = _to(dict(batch), device)
            if accepts_cache:
                kw.setdefault("use_cache", False)
            try:
                run_calibration_batch(model, batch, i, what, passthrough=(_Stop,), call=lambda m, _, kw=kw: m(**kw))
            except _Stop:
                pass


def _stop_at(model: nn.Module, stop: str | None) -> Any:
    """A forward pre-hook on block ``stop`` that ends the pass there (a no-op handle for ``None``)."""
    if stop is None:
        return contextlib.nullcontext()

    def halt(mod: nn.Module, args: tuple) -> None:
        raise _Stop
    return model.get_submodule(stop).register_forward_pre_hook(halt, prepend=True)


def _outside_calls(model: nn.Module, names: Sequence[str], batches: Sequence[dict], device: torch.device,
                   group: Sequence[str] | None, later: Sequence[str] = ()) -> list[tuple[str, list[int]]]:
    """The layers of ``names`` that the forward calls before the first block of ``group`` (``None``: in the whole
    forward), in the order of their first call, each with its number of calls per batch. A block of ``later`` (not
    yet processed: possibly still on the meta device) called first means the batches never run ``group``: refused
    (:func:`_never_ran`)."""
    stop = group[0] if group else None
    counts = {n: [0] * len(batches) for n in names}
    first: list[str] = []
    current = [0]
    reached: list[str] = []

    def ahead(mod: nn.Module, args: tuple, name: str) -> None:
        reached.append(name)
        raise _Stop

    def make(n: str):
        def count(mod: nn.Module, args: tuple) -> None:
            if n not in first:
                first.append(n)
            counts[n][current[0]] += 1
        return count

    def before(i: int) -> bool:
        current[0] = i
        return True

    handles = [model.get_submodule(n).register_forward_pre_hook(make(n)) for n in names]
    handles += [model.get_submodule(b).register_forward_pre_hook(functools.partial(ahead, name=b), prepend=True)
                for b in later if b != stop]
    try:
        with _stop_at(model, stop):
            _batches_through(model, batches, device, f"layers {short_names(names)} (counting their calls)", before)
    finally:
        for h in handles:
            h.remove()
    if reached and group:
        raise _never_ran(model, group, reached[0])
    return [(n, counts[n]) for n in first]


def _outside_passes(model: nn.Module, name: str, counts: Sequence[int], batches: Sequence[dict],
                    device: torch.device, offload: torch.device, running: Sequence[nn.Module], stop: str | None,
                    layer: nn.Module, hook: Callable[[int, tuple, dict], None]) -> None:
    """:meth:`OutsideLayer.run`: the batches that call ``layer``, each stopped at its last call; then ``layer`` to
    ``device``."""
    state = [0, 0]  # batch, calls seen in it

    def before(i: int) -> bool:
        state[:] = [i, 0]
        return counts[i] > 0

    def record(mod: nn.Module, args: tuple, kwargs: dict) -> None:
        hook(state[0], args, kwargs)
        state[1] += 1
        if state[1] >= counts[state[0]]:
            raise _Stop

    handle = layer.register_forward_pre_hook(record, with_kwargs=True)
    try:
        with _on_device_while_running(running, device, offload), _stop_at(model, stop):
            _batches_through(model, batches, device, f"layer {name} (recording its inputs)", before)
    finally:
        handle.remove()
    _move_local(layer, device)


# ---------------------------------------------------------------------------------------------- main entry point
def quantize_sequential(
    model: nn.Module,
    config_or_map: QuantConfig | int | Mapping[str, QuantConfig | int | None],
    calib_inputs: Mapping[str, Any] | Sequence[Mapping[str, Any]] | None = None,
    *,
    skip: Iterable[str] | None = None,
    device: str | torch.device | None = None,
    offload_device: str | torch.device | None = "cpu",
    checkpoint: str | os.PathLike | CheckpointSource | None = None,
    blocks: Sequence[str] | Sequence[Sequence[str]] | None = None,
    per_block_fn: Callable[[nn.Module, BlockInputs], None] | None = None,
    progress: bool = False,
    process_rest: bool = True,
    outside_fn: Callable[[OutsideLayer], nn.Module | None] | None = None,
) -> nn.Module:
    """Quantize ``model`` block by block (in place); same result as ``quantize_(model, config_or_map, skip=skip)``.

    Args:
        model: float model, with real weights or built on the meta device (then give ``checkpoint``).
        config_or_map: one config or configs by pattern, as :func:`medquant.quantize_`.
        calib_inputs: keyword inputs of ``model(**batch)`` (one dict or a list); needed with ``per_block_fn``.
        skip: patterns left in float, as :func:`medquant.quantize_`.
        device: compute device (default CUDA when available, else CPU).
        offload_device: where processed blocks and the modules outside the blocks go, the latter also between
            their calls while calibrating (default ``"cpu"``; ``None`` keeps everything on ``device``).
        checkpoint: safetensors file / directory / :class:`CheckpointSource` holding the float weights of meta
            tensors, under the model's own state-dict names.
        blocks: block names (one list, or a list of lists in forward order); default :func:`medquant.models.block_stacks`.
        per_block_fn: ``fn(block, BlockInputs)`` called with the float block on ``device`` before its layers are
            quantized (activation-aware scaling, statistics...). It may change the block's float weights.
        progress: tqdm progress bar over blocks.
        process_rest: also process the modules outside the listed blocks (default). ``False`` touches only the
            listed blocks - how :func:`medquant.calibrate.quantize_shard` splits the blocks between processes.
        outside_fn: ``fn(OutsideLayer)`` for each planned Linear / Conv2d outside the blocks (a patch embedding,
            the projector, ``lm_head``...), instead of round-to-nearest: it runs the layer's calibration calls
            (:meth:`OutsideLayer.run`) and returns the quantized layer (``None``: round-to-nearest). Each such layer
            stays in float until the point of the forward where its inputs are those of the final model: before
            the capture pass of the first block group it feeds (with ``per_block_fn``), else after the last
            block (module docstring). Needs ``calib_inputs``.

    Returns:
        ``model``, quantized (the blocks on ``offload_device``); a module bound under several names is one quantized
        module under all of them.

    Raises:
        TypeError: ``model`` is not an ``nn.Module``, or ``calib_inputs`` is not a dict / non-empty list of dicts.
        ValueError: ``per_block_fn`` or ``outside_fn`` without ``calib_inputs`` or with ``process_rest=False``, a
            block name that is not a module of the model, or no blocks found.
        RuntimeError: calibrating, a block stack the batches never run (a VLM's vision tower given text-only
            batches: leave it out with ``skip=["@vision"]``), or blocks not called once per batch.

    A block stack with no layer to quantize (every layer skipped) is not calibrated (with ``process_rest``): its
    modules are handled as those outside the blocks (their weights read from ``checkpoint``), so batches that never
    run it are accepted.

    Any exception raised part way (by a block, ``per_block_fn``, the checkpoint, a ``KeyboardInterrupt``) leaves
    the model exactly as it was before the call (module docstring), then propagates.
    """
    return _quantize_sequential(model, config_or_map, calib_inputs, skip=skip, device=device,
                                offload_device=offload_device, checkpoint=checkpoint, blocks=blocks,
                                per_block_fn=per_block_fn, progress=progress, process_rest=process_rest,
                                outside_fn=outside_fn)


def _quantize_sequential(
    model: nn.Module,
    config_or_map: QuantConfig | int | Mapping[str, QuantConfig | int | None],
    calib_inputs: Mapping[str, Any] | Sequence[Mapping[str, Any]] | None = None,
    *,
    skip: Iterable[str] | None = None,
    device: str | torch.device | None = None,
    offload_device: str | torch.device | None = "cpu",
    checkpoint: str | os.PathLike | CheckpointSource | None = None,
    blocks: Sequence[str] | Sequence[Sequence[str]] | None = None,
    per_block_fn: Callable[[nn.Module, BlockInputs], None] | None = None,
    progress: bool = False,
    process_rest: bool = True,
    outside_fn: Callable[[OutsideLayer], nn.Module | None] | None = None,
    foreign: Sequence[str] = (),
) -> nn.Module:
    """:func:`quantize_sequential`, leaving the blocks ``foreign`` alone: they are another process's
    (:func:`medquant.calibrate.quantize_shard`), neither processed as blocks nor, with ``process_rest``, as modules
    outside the blocks - their tensors are not read from ``checkpoint`` (a meta skeleton keeps them on the meta
    device) and their layers are not quantized."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"quantize_sequential expects an nn.Module, got {type(model).__name__}")
    device = torch.device(device) if device is not None else torch.device(
        "cuda" if torch.cuda.is_available() else "cpu")
    offload = torch.device(offload_device) if offload_device is not None else device
    for fn, what in ((per_block_fn, "per_block_fn"), (outside_fn, "outside_fn")):
        if fn is not None and not process_rest:
            raise ValueError(f"{what} needs the whole model to compute activations: use process_rest=True")
        if fn is not None and calib_inputs is None:
            raise ValueError(f"{what} needs calib_inputs (keyword inputs of model(**batch)) to compute the "
                             "activations it is given")
    batches: list[dict] = []
    if calib_inputs is not None:
        batches = [calib_inputs] if isinstance(calib_inputs, Mapping) else list(calib_inputs)
        if not batches or not all(isinstance(b, Mapping) for b in batches):
            raise TypeError("calib_inputs must be a dict of model(**inputs) keyword arguments or a non-empty list "
                            "of such dicts")
    source = checkpoint if isinstance(checkpoint, CheckpointSource) or checkpoint is None \
        else CheckpointSource(checkpoint)

    # quantize_'s plan: MoE experts with 3-D weights quantized per expert inside their block (a per_block_fn may
    # calibrate them first: GPTQ's unfolds them into per-expert layers), routers left in float
    plan = resolve_configs(model, config_or_map, skip=skip, experts=True)
    experts = {n: c for n, c in plan.items() if is_experts_module(model.get_submodule(n))}
    if blocks is None:
        groups = block_stacks(model)
    elif blocks and isinstance(blocks[0], str):
        groups = [list(blocks)]
    else:
        groups = [list(g) for g in blocks]
    names = {n for n, _ in model.named_modules()}
    for g in groups:
        for n in g:
            if n not in names:
                raise ValueError(f"block {n!r} is not a module of {type(model).__name__}")
    if not groups:
        raise ValueError(f"found no decoder or vision blocks in {type(model).__name__}: pass blocks=[names of "
                         "the repeated blocks] (e.g. 'encoder.layers.0', ...)")
    block_names = [n for g in groups for n in g]
    foreign = [n for n in foreign if n not in block_names]
    outside = [n for n in experts if not n.startswith(tuple(b + "." for b in [*block_names, *foreign]))]
    if outside and process_rest:  # else the modules outside the blocks are not this call's (quantize_shard)
        warnings.warn(f"{len(outside)} MoE experts module(s) with 3-D weights outside the blocks "
                      f"({', '.join(outside[:3])}{', ...' if len(outside) > 3 else ''}) stay in floating point: "
                      "quantize them afterwards with medquant.quantize_(model, config)", UserWarning, stacklevel=2)
    plan = {n: c for n, c in plan.items() if n not in outside and not (n + ".").startswith(
        tuple(b + "." for b in foreign))}
    if process_rest:
        # a stack with nothing to quantize (a VLM's vision tower under skip=["@vision"]) is not calibrated: its
        # modules are handled as those outside the blocks (weights read, nothing quantized), so batches that
        # never run it (text-only calibration) do not have to
        groups = [g for g in groups if any(k.startswith(b + ".") for b in g for k in plan)] or groups[:1]
        block_names = [n for g in groups for n in g]

    undo = _Undo(model)
    try:
        _run(model, groups, block_names, plan, batches, per_block_fn, source, device, offload, process_rest,
             progress, undo, outside_fn, foreign)
    except BaseException:
        undo.restore()  # all or nothing: the blocks already done get their float layers and weights back
        raise
    notify_quantized(model)  # its layers were swapped inside blocks, below the root
    return model


def _run(model: nn.Module, groups: list[list[str]], block_names: list[str], plan: Mapping[str, QuantConfig],
         batches: list[dict], per_block_fn: Callable[[nn.Module, BlockInputs], None] | None,
         source: CheckpointSource | None, device: torch.device, offload: torch.device, process_rest: bool,
         progress: bool, undo: _Undo, outside_fn: Callable[[OutsideLayer], nn.Module | None] | None = None,
         foreign: Sequence[str] = ()) -> None:
    """The body of :func:`quantize_sequential` (which undoes it when it raises); the blocks ``foreign`` are not
    touched (not even as modules outside the blocks)."""
    calibrate = per_block_fn is not None
    mat = _Materializer(model, source, undo.tensors)
    aliases = names_by_module(model)
    rest = _rest_leaves(model, [*block_names, *foreign]) if process_rest else []
    # the planned Linear / Conv2d layers outside the blocks that outside_fn calibrates: kept in float until then
    deferred = [n for n in rest if n in plan and isinstance(model.get_submodule(n), (nn.Linear, nn.Conv2d))] \
        if outside_fn is not None else []
    units, pinned = _outside_units(model, block_names) if calibrate or deferred else ([], set())
    done: list[str] = []

    def calibrate_outside(group: list[str] | None) -> None:
        """Calibrate (``outside_fn``) the deferred layers the forward calls before the first block of ``group``
        (``None``: all of them), one at a time in call order, each in passes that run the layers before it already
        quantized."""
        if not deferred:
            return
        stop = group[0] if group else None

        def running() -> list[nn.Module]:
            return [model.get_submodule(n) for n in (*units, *done)]
        with _on_device_while_running(running(), device, offload):
            order = _outside_calls(model, deferred, batches, device, group,
                                   [b for b in block_names if b not in done] if group else ())
        assert outside_fn is not None
        for name, counts in order:
            leaf = model.get_submodule(name)
            layer = OutsideLayer(name, leaf, plan[name], counts, functools.partial(
                _outside_passes, model, name, counts, batches, device, offload, running(), stop))
            q = outside_fn(layer)
            _move_local(leaf, offload)  # OutsideLayer.run left it on the device
            if q is None:
                q = quantize_module(leaf, plan[name], name=name)
            swap_under_all_names(model, name, q, aliases)
            _move_local(q, offload)
            undo.release([leaf], model)
            deferred.remove(name)
    # the modules outside the blocks first, leaf by leaf, each to the device, quantized and back to offload (the
    # capture passes then run them already quantized, so blocks see the activations of the final quantized model);
    # a module holding blocks keeps its own tensors on the device while calibrating (its forward runs the blocks)
    for n in rest:
        leaf = model.get_submodule(n)
        mat.module(leaf, n, device, recurse=False, keep=offload == device)
        shared = mat.shared(leaf) if n not in pinned else []
        if n not in deferred:
            _quantize_in_leaf(model, n, plan, aliases)
        undo.release([leaf], model)
        if n not in pinned:
            _move_local(model.get_submodule(n), offload)
        for p in shared:  # a tied lm_head quantized: embed_tokens' weight, moved with it, goes back too
            _shared_to(p, offload)

    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(block_names), desc="sequential quantization", unit="block")
    try:
        pending = [list(g) for g in groups]
        while pending:
            group = pending.pop(0)
            store: dict[str, list[tuple[tuple, dict]]] = {}
            if calibrate:  # the deferred layers upstream of the group first: the group sees them quantized
                calibrate_outside(group)
                # the capture pass runs the modules outside the blocks and the finished (quantized) blocks (of
                # earlier stacks: the vision tower feeding the language stack; of this stack: those before a point
                # where the model changes the hidden states between two blocks), each on the device only while it
                # runs; it stops at the group's last block (no final norm, no lm_head logits)
                running = [model.get_submodule(n) for n in units] + [model.get_submodule(n) for n in done]
                with _on_device_while_running(running, device, offload):
                    store, cut, alone = _capture_group(model, group, batches, device)
                if cut < len(group):  # the rest is captured again once the blocks before it are quantized (one
                    # block at a time where the model cannot run with recorders)
                    group, rest_of_group = group[:cut], group[cut:]
                    pending[:0] = [[n] for n in rest_of_group] if alone else [rest_of_group]
            hidden: list[torch.Tensor] | None = None
            for name in group:
                block = model.get_submodule(name)
                float_modules = list(block.modules())
                # calibrating, the block works on copies of the model's own tensors (per_block_fn may change them
                # in place, e.g. AWQ's scales): the originals stay as they were, for the undo
                mat.module(block, name, device, copy=calibrate, keep=offload == device)
                shared = mat.shared(block)
                start = name + "."
                inputs = None
                if per_block_fn is not None:
                    calls = store[name]
                    args = [(h,) + tuple(c[0][1:]) for h, c in zip(hidden, calls)] if hidden is not None \
                        else [c[0] for c in calls]
                    inputs = BlockInputs(name, args, [c[1] for c in calls],
                                         {k[len(start):]: v for k, v in plan.items() if k.startswith(start)})
                    per_block_fn(block, inputs)
                _quantize_in(model, block, name, plan, aliases)
                undo.release(float_modules, model)  # the float layers swapped out drop their materialized weights
                if inputs is not None and name != group[-1]:  # the next block is calibrated on what the quantized
                    hidden = inputs.run(block)      # block outputs (the next group's inputs are captured anew)
                block.to(offload)
                for p in shared:  # bound elsewhere too, the block's float layer swapped out
                    _shared_to(p, offload)
                done.append(name)
                if bar is not None:
                    bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    calibrate_outside(None)  # the rest (lm_head), on the finished model
    for n in list(deferred):  # never called by the calibration batches: round-to-nearest, as without outside_fn
        leaf = model.get_submodule(n)
        _quantize_in_leaf(model, n, plan, aliases)
        undo.release([leaf], model)
    for n in pinned:
        _move_local(model.get_submodule(n), offload)


@contextlib.contextmanager
def _on_device_while_running(blocks: Sequence[nn.Module], device: torch.device, offload: torch.device
                             ) -> Iterator[None]:
    """Within the block: each of ``blocks`` (finished blocks and the modules outside the blocks, on ``offload``; none
    holding another) is moved to ``device`` (``Module.to``: a tied parameter moves in place, for every module
    binding it) just before each of its calls - before any other forward pre-hook of it - and back to ``offload``
    right after, so at most one of them is on ``device`` at a time, whatever the order or number of their calls; on
    exit (an error or the capture's early stop included) all of them are on ``offload``. The cost: two transfers of
    a module per call (per calibration batch), instead of holding them on ``device`` for the whole capture."""
    if device == offload or not blocks:
        yield
        return

    def bring(m: nn.Module, args: tuple) -> None:
        m.to(device)

    def send_back(m: nn.Module, args: tuple, out: Any) -> None:
        m.to(offload)

    handles = []
    try:
        for b in blocks:
            handles.append(b.register_forward_pre_hook(bring, prepend=True))
            handles.append(b.register_forward_hook(send_back))
        yield
    finally:
        for h in handles:
            h.remove()
        for b in blocks:
            b.to(offload)


def _move_local(module: nn.Module, device: torch.device) -> None:
    """Move a module's own parameters and buffers (not its submodules') to ``device`` as ``Module.to`` does: a
    parameter in place (a tied one moves for every module binding it and stays tied), a buffer rebound. Only for
    tensors of the call's own (never the model's originals, which :class:`_Undo` puts back)."""
    for kind, name, t in _local_tensors(module):
        if kind == "param":
            moved = _shared_to(t, device)
            if isinstance(moved, nn.Parameter):  # always, for a parameter
                module._parameters[name] = moved
        else:
            module._buffers[name] = t.to(device)
    if isinstance(module, QUANT_LAYERS):  # its compute dtype and kernels: to the new tensors
        module.refresh_kernels()


def _outside_units(model: nn.Module, block_names: Sequence[str]) -> tuple[list[str], set[str]]:
    """The modules outside the blocks, grouped for moving while they run: ``units``, the largest submodules that
    hold no block (``model.embed_tokens``, ``lm_head``, a vision ``embeddings`` module with its class token and
    children), those holding tensors, in definition order; and ``pinned``, the modules that hold blocks and tensors
    of their own (a class token on the vision model itself), which cannot leave the device while their forward -
    which runs the blocks - may read them."""
    blocks = set(block_names)
    prefixes = tuple(n + "." for n in block_names)
    holders = {""}  # the modules holding blocks: every prefix of a block name
    for b in block_names:
        parts = b.split(".")
        holders.update(".".join(parts[:i]) for i in range(1, len(parts)))
    units: list[str] = []
    pinned: set[str] = set()
    for name, mod in model.named_modules():
        if name in blocks or name.startswith(prefixes):
            continue
        if name in holders:
            if _local_tensors(mod):
                pinned.add(name)
        elif name.rpartition(".")[0] in holders and any(_local_tensors(m) for m in mod.modules()):
            units.append(name)
    return units, pinned


def _rest_leaves(model: nn.Module, block_names: Sequence[str]) -> list[str]:
    """Modules outside the blocks that hold tensors of their own, in definition order."""
    prefixes = tuple(n + "." for n in block_names)
    blocks = set(block_names)
    out = []
    for name, mod in model.named_modules():
        if name in blocks or name.startswith(prefixes):
            continue
        if _local_tensors(mod):
            out.append(name)
    return out


def _quantize_in_leaf(model: nn.Module, name: str, plan: Mapping[str, QuantConfig],
                      aliases: Mapping[int, list[str]]) -> None:
    cfg = plan.get(name)
    mod = model.get_submodule(name)
    if cfg is not None and isinstance(mod, (nn.Linear, nn.Conv2d)):
        swap_under_all_names(model, name, quantize_module(mod, cfg, name=name), aliases)
