"""One schema for what a checkpoint says about itself: ``medquant.json``, layer recipes, safetensors headers.

Every field is read once, here, into frozen dataclasses (:class:`CheckpointMeta`, :class:`LayerSpec`); anything
else (a missing or unknown key, a wrong type, a number out of range, a key given twice) raises
:class:`SchemaError` naming the file, the key path and what was expected. :meth:`LayerSpec.expected_tensors` gives
the name, dtype and shape of every tensor a recipe implies, in plain integers (nothing is allocated), so that
:func:`check_against_header` can compare a recipe with the safetensors header before a single tensor is built. For
a layer of ``out`` rows and ``k`` inputs (``k = in_channels / groups * kh * kw`` for convolutions) and each
bit-width ``b`` with ``n_b`` rows:

* ``b`` in 1..8: ``qweight_b`` int32 ``(n_b, K_b * c_b / 32)`` with ``c_b`` the container width (1, 2, 4 or 8
  bits) and ``K_b`` = ``k`` rounded up to a multiple of ``32 / c_b`` and of the group size (group scope); in a
  recipe with ``"layout": 2`` (format version 2) 3/5/6/7-bit rows are dense: ``c_b = b`` and ``K_b`` a multiple
  of 32 and of the group size;
  ``scales_b`` (and ``zeros_b`` when asymmetric) ``(1 | n_b, K_b / group_size | 1)`` in the scale dtype;
* ``b`` = 16 / 32: ``fweight_b`` float16 / float32 ``(n_b, k)``; ``b`` = 0: nothing;
* ``bit_map`` int8 ``(out,)`` when rows have different bit-widths; ``bias`` ``(out,)`` in ``dtype``.
"""
from __future__ import annotations

import json
import os
import re
import struct
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..kernels.layout import FORMAT_VERSION, padded_k, words_per_row
from ..quant.config import COMPUTE_DTYPES, FLOAT_BITS, QuantConfig
from .manifest import check_plain_name, no_duplicates

__all__ = ["CheckpointMeta", "LayerSpec", "ModelInfo", "SchemaError", "TensorInfo", "WeightsInfo",
           "check_against_header", "parse_layer", "parse_metadata", "read_header"]

FLOAT_DTYPES = ("float32", "float16", "bfloat16", "float64")
ST_DTYPES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16", "float64": "F64", "int32": "I32",
             "int8": "I8", "int16": "I16", "int64": "I64", "uint8": "U8", "bool": "BOOL"}
ST_SIZES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
            "U16": 2, "U32": 4, "U64": 8, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E4M3FNUZ": 1, "F8_E5M2FNUZ": 1,
            "F8_E8M0": 1, "C64": 8}
#: torch dtype name -> the safetensors dtype code ``medquant.save`` writes it as (every dtype it stores; the header
#: check reads each of these codes)
STORED_DTYPES = {"float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16", "int64": "I64",
                 "int32": "I32", "int16": "I16", "int8": "I8", "uint8": "U8", "bool": "BOOL", "uint16": "U16",
                 "uint32": "U32", "uint64": "U64", "float8_e4m3fn": "F8_E4M3", "float8_e5m2": "F8_E5M2",
                 "float8_e4m3fnuz": "F8_E4M3FNUZ", "float8_e5m2fnuz": "F8_E5M2FNUZ", "float8_e8m0fnu": "F8_E8M0",
                 "complex64": "C64"}
MAX_DIM = 2**31 - 1
MAX_HEADER = 100_000_000  # the safetensors library's own limit
#: dtypes a non-persistent floating buffer may be restored to
BUFFER_DTYPES = ("float16", "bfloat16", "float64")
_TOP_REQUIRED = ("format_version", "weights", "model", "modules")
_TOP_OPTIONAL = ("medquant_version", "extras", "buffer_dtypes", "shared_modules", "input_quantizers",
                 "shared_blocks")
_LINEAR_KEYS = ("in_features", "out_features")
_CONV_KEYS = ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups")
_COMMON_KEYS = ("type", "config", "bias", "dtype")
_CONFIG_KEYS = ("bits", "symmetric", "scope", "group_size", "scale_dtype", "channel_bits")
_CONFIG_OPTIONAL = ("compute_dtype",)  # written only when set (QuantConfig.to_dict)


class SchemaError(ValueError):
    """A checkpoint file does not follow the schema; the message names the file, the key and what was expected."""


class _At:
    """Where a value sits (file and key path), for error messages."""

    def __init__(self, file: str, path: str = "") -> None:
        self.file, self.path = file, path

    def __truediv__(self, key: Any) -> _At:
        return _At(self.file, f"{self.path}[{key!r}]" if self.path else repr(key))

    def fail(self, expected: str, got: Any) -> SchemaError:
        where = f"{self.file}, key {self.path}" if self.path else self.file
        shown = repr(got)
        return SchemaError(f"{where}: expected {expected}, got {shown[:80] + '...' if len(shown) > 80 else shown}")


def _obj(v: Any, at: _At, required: tuple[str, ...], optional: tuple[str, ...] = ()) -> dict[str, Any]:
    if not isinstance(v, dict):
        raise at.fail("an object", v)
    missing = [k for k in required if k not in v]
    if missing:
        raise at.fail(f"the key(s) {', '.join(missing)} (keys: {', '.join(required + optional)})", sorted(v))
    unknown = sorted(set(v) - set(required) - set(optional))
    if unknown:
        raise at.fail(f"only the keys {', '.join(required + optional)}", unknown)
    return v


def _int(v: Any, at: _At, lo: int = 1, hi: int = MAX_DIM) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise at.fail(f"an integer in {lo}..{hi}", v)
    return v


def _str(v: Any, at: _At, choices: tuple[str, ...] | None = None) -> str:
    if not isinstance(v, str) or (choices is not None and v not in choices):
        raise at.fail("a string" if choices is None else "one of " + ", ".join(map(repr, choices)), v)
    return v


def _pair(v: Any, at: _At, lo: int) -> tuple[int, int]:
    if isinstance(v, int) and not isinstance(v, bool):
        v = [v, v]
    if not isinstance(v, list) or len(v) != 2:
        raise at.fail(f"a pair of integers >= {lo}", v)
    return _int(v[0], at / 0, lo), _int(v[1], at / 1, lo)


def _config(v: Any, at: _At, out_rows: int) -> QuantConfig:
    d = _obj(v, at, _CONFIG_KEYS, _CONFIG_OPTIONAL)
    bits = d["bits"]
    if isinstance(bits, bool) or not isinstance(bits, int):
        raise (at / "bits").fail("an integer bit-width", bits)
    if d["symmetric"] is not None and not isinstance(d["symmetric"], bool):
        raise (at / "symmetric").fail("true, false or null", d["symmetric"])
    _str(d["scope"], at / "scope", ("tensor", "channel", "group"))
    _int(d["group_size"], at / "group_size")
    _str(d["scale_dtype"], at / "scale_dtype", ("float16", "bfloat16", "float32"))
    if "compute_dtype" in d:
        _str(d["compute_dtype"], at / "compute_dtype", COMPUTE_DTYPES)
    cb = d["channel_bits"]
    if cb is not None:
        if not isinstance(cb, list) or len(cb) != out_rows:
            raise (at / "channel_bits").fail(f"null or a list of {out_rows} bit-widths (one per output row)",
                                             cb if not isinstance(cb, list) else f"a list of {len(cb)}")
        for i, b in enumerate(cb):
            if isinstance(b, bool) or not isinstance(b, int):
                raise (at / "channel_bits" / i).fail("an integer bit-width", b)
    try:
        return QuantConfig.from_dict(dict(d))
    except (TypeError, ValueError) as e:
        raise at.fail(f"a valid QuantConfig ({e})", d) from None


@dataclass(frozen=True)
class TensorInfo:
    """A tensor as the safetensors header describes it.

    Attributes:
        dtype: the safetensors dtype name (``F32``, ``F16``, ``BF16``, ``I32``, ``I8``...).
        shape: the shape.
    """

    dtype: str  # safetensors name: F32, F16, BF16, I32, I8...
    shape: tuple[int, ...]


@dataclass(frozen=True)
class LayerSpec:
    """One parsed layer recipe (see :mod:`medquant.quant.recipe` for the keys).

    Attributes:
        name: the module name.
        type: ``QuantLinear``, ``QuantConv2d`` or ``QuantEmbedding``.
        config: the layer's ``QuantConfig``.
        bias: whether the layer has a bias.
        dtype: the bias dtype (or the weight dtype of layers without bias).
        weight_dtype: the dtype of the dequantized weight when it differs from ``dtype``.
        in_features: input features (input channels of a convolution; embedding width).
        out_features: output features (output channels; vocabulary size).
        kernel_size: a convolution's kernel size.
        stride: a convolution's stride.
        padding: a convolution's padding (pair or ``"same"`` / ``"valid"``).
        dilation: a convolution's dilation.
        groups: a convolution's groups.
        layout: 1 (4/8-bit containers) or 2 (3/5/6/7-bit rows stored densely, format version 2).
        tied_to: the QuantEmbedding whose tensors a QuantLinear head shares.
        raw: the recipe as read.
    """

    name: str
    type: str
    config: QuantConfig
    bias: bool
    dtype: str
    weight_dtype: str | None
    in_features: int
    out_features: int
    kernel_size: tuple[int, int] = (1, 1)
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] | str = (0, 0)
    dilation: tuple[int, int] = (1, 1)
    groups: int = 1
    layout: int = 1  # 2: 3/5/6/7-bit rows stored densely (format version 2)
    tied_to: str | None = None  # a QuantLinear head sharing this QuantEmbedding's tensors
    raw: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @property
    def k(self) -> int:
        """Columns of the weight matrix: ``in_features`` (convolutions: ``in / groups * kh * kw``)."""
        if self.type != "QuantConv2d":
            return self.in_features
        return self.in_features // self.groups * self.kernel_size[0] * self.kernel_size[1]

    def row_counts(self) -> dict[int, int]:
        """Bit-width -> number of rows (ascending bit-widths).

        Returns:
            The counts.
        """
        cb = self.config.channel_bits
        counts = Counter(cb) if cb is not None else Counter({self.config.bits: self.out_features})
        return dict(sorted(counts.items()))

    def expected_tensors(self) -> dict[str, TensorInfo]:
        """Tensor name (without the module prefix) -> dtype and shape, as the layer stores them.

        Returns:
            The expected tensors (packed codes, scales, zero points, float rows, bit map, bias).
        """
        cfg, k = self.config, self.k
        counts = self.row_counts()
        sd = ST_DTYPES[cfg.scale_dtype]
        out: dict[str, TensorInfo] = {}
        for b, nb in counts.items():
            if 1 <= b <= 8:
                dense = self.layout >= 2
                kp = padded_k(k, b, cfg.group_size if cfg.scope == "group" else None, dense)
                n_groups = kp // cfg.group_size if cfg.scope == "group" else 1
                n_scale_rows = 1 if cfg.scope == "tensor" else nb
                out[f"qweight_{b}"] = TensorInfo("I32", (nb, words_per_row(kp, b, dense)))
                out[f"scales_{b}"] = TensorInfo(sd, (n_scale_rows, n_groups))
                if not cfg.is_symmetric(b):
                    out[f"zeros_{b}"] = TensorInfo(sd, (n_scale_rows, n_groups))
            elif b in FLOAT_BITS:
                out[f"fweight_{b}"] = TensorInfo("F16" if b == 16 else "F32", (nb, k))
        if len(counts) > 1:
            out["bit_map"] = TensorInfo("I8", (self.out_features,))
        if self.bias:
            out["bias"] = TensorInfo(ST_DTYPES[self.dtype], (self.out_features,))
        return out


def parse_layer(entry: Any, name: str, file: str, key: str = "modules", *, allow_weight_dtype: bool = True
                ) -> LayerSpec:
    """Parse and check one layer recipe.

    Args:
        entry: the recipe (a JSON object).
        name: the module name.
        file: the file it comes from (for messages).
        key: the key path of the recipes in that file (for messages).
        allow_weight_dtype: accept a ``weight_dtype`` key.

    Returns:
        The :class:`LayerSpec`.

    Raises:
        SchemaError: a missing, unknown or ill-typed key, or values that do not fit together.
    """
    at = _At(file, key) / name
    if not isinstance(name, str) or not name or any(not part for part in name.split(".")):
        raise _At(file, key).fail("module names (dotted, no empty parts)", name)
    if not isinstance(entry, dict):
        raise at.fail("a recipe object", entry)
    kind = _str(entry.get("type"), at / "type", ("QuantLinear", "QuantConv2d", "QuantEmbedding"))
    shape_keys = _CONV_KEYS if kind == "QuantConv2d" else _LINEAR_KEYS
    optional = (("weight_dtype",) if allow_weight_dtype else ()) + ("layout",)
    optional += {"QuantLinear": ("tied_to",), "QuantEmbedding": ("padding_idx",)}.get(kind, ())
    d = _obj(entry, at, _COMMON_KEYS + shape_keys, optional)
    tied = d.get("tied_to")
    if tied is not None:
        _str(tied, at / "tied_to")
    if not isinstance(d["bias"], bool):
        raise (at / "bias").fail("true or false", d["bias"])
    layout = d.get("layout", 1)
    if isinstance(layout, bool) or not isinstance(layout, int) or layout not in (1, 2):
        raise (at / "layout").fail("1 or 2 (2: dense 3/5/6/7-bit codes, format version 2)", layout)
    dtype = _str(d["dtype"], at / "dtype", FLOAT_DTYPES)
    wd = d.get("weight_dtype")
    if wd is not None:
        _str(wd, at / "weight_dtype", FLOAT_DTYPES)
    if kind != "QuantConv2d":
        fin, fout = _int(d["in_features"], at / "in_features"), _int(d["out_features"], at / "out_features")
        cfg = _config(d["config"], at / "config", fout)
        if kind == "QuantEmbedding":
            if d["bias"] or cfg.channel_bits is not None:
                raise at.fail("a QuantEmbedding without bias and without channel_bits", entry)
            if not 1 <= cfg.bits <= 8:  # QuantEmbedding stores packed rows only (no float or pruned table)
                raise (at / "config" / "bits").fail("1..8 (a QuantEmbedding stores packed rows only)", cfg.bits)
            pidx = d.get("padding_idx")
            if pidx is not None:  # the rows nn.Embedding accepts (negative ones count from the end)
                _int(pidx, at / "padding_idx", -fout, fout - 1)
        return LayerSpec(name, kind, cfg, d["bias"], dtype, wd, fin, fout, layout=layout, tied_to=tied, raw=entry)
    cin, cout = _int(d["in_channels"], at / "in_channels"), _int(d["out_channels"], at / "out_channels")
    groups = _int(d["groups"], at / "groups")
    if cin % groups or cout % groups:
        raise (at / "groups").fail(f"a divisor of in_channels {cin} and out_channels {cout}", groups)
    ks = _pair(d["kernel_size"], at / "kernel_size", 1)
    stride = _pair(d["stride"], at / "stride", 1)
    dilation = _pair(d["dilation"], at / "dilation", 1)
    pad: tuple[int, int] | str
    if isinstance(d["padding"], str):
        pad = _str(d["padding"], at / "padding", ("same", "valid"))
        if pad == "same" and stride != (1, 1):
            raise (at / "padding").fail("'valid' or a pair of integers ('same' needs stride 1)", pad)
    else:
        pad = _pair(d["padding"], at / "padding", 0)
    if cin // groups * ks[0] * ks[1] > MAX_DIM:
        raise (at / "kernel_size").fail(f"a kernel of at most {MAX_DIM} weights per row", list(ks))
    cfg = _config(d["config"], at / "config", cout)
    return LayerSpec(name, kind, cfg, d["bias"], dtype, wd, cin, cout, ks, stride, pad, dilation, groups,
                     layout=layout, raw=entry)


@dataclass(frozen=True)
class WeightsInfo:
    """The weights file ``medquant.json`` records.

    Attributes:
        file: the file name (a plain name inside the folder).
        sha256: its SHA-256.
        bytes: its size.
    """
    file: str
    sha256: str
    bytes: int


@dataclass(frozen=True)
class ModelInfo:
    """The model class ``medquant.json`` records.

    Attributes:
        kind: ``"hf"`` (a transformers model, rebuilt from ``config.json``) or ``"torch"``.
        class_name: the class name.
        module: the class's module.
    """
    kind: str  # "hf" | "torch"
    class_name: str
    module: str


@dataclass(frozen=True)
class CheckpointMeta:
    """``medquant.json``, parsed (:func:`parse_metadata`).

    Attributes:
        format_version: the saved-format version (1 or 2).
        medquant_version: the medquant version that wrote it.
        weights: the weights file.
        model: the model class.
        modules: module name -> its parsed recipe.
        extras: the user's JSON extras.
        raw: the file's JSON as read.
        buffer_dtypes: floating buffers that are not in the weights file (non-persistent, e.g. rotary ``inv_freq``)
            and were not float32 when saved: name -> dtype name, restored on load.
        shared_modules: quantized layers registered under several names: every further name -> the recorded
            module it shares.
        shared_blocks: other modules registered under several names (a block run twice, ``layers[1] =
            layers[0]``): every further (outermost) name -> the first name; bound to that module again on load.
    """

    format_version: int
    medquant_version: str | None
    weights: WeightsInfo
    model: ModelInfo
    modules: dict[str, LayerSpec]
    extras: dict[str, Any]
    raw: dict[str, Any] = field(compare=False, repr=False)
    #: floating buffers that are not in the weights file (non-persistent, e.g. rotary ``inv_freq``) and were not
    #: float32 when saved: name -> dtype name, restored on load
    buffer_dtypes: dict[str, str] = field(default_factory=dict)
    #: quantized layers registered under several names: every further name -> the recorded module it shares
    shared_modules: dict[str, str] = field(default_factory=dict)
    #: other modules registered under several names: every further (outermost) name -> the first name
    shared_blocks: dict[str, str] = field(default_factory=dict)


def parse_metadata(text: bytes | str, file: str) -> CheckpointMeta:
    """Parse ``medquant.json`` (its bytes) against the schema.

    Args:
        text: the file's bytes (or text).
        file: the file name, for messages.

    Returns:
        The :class:`CheckpointMeta`.

    Raises:
        SchemaError: the file is not valid JSON, has a key twice, misses or mistypes a key, or has a newer format.
    """
    at = _At(file)
    try:
        if isinstance(text, bytes):
            text = text.decode("utf-8")
        raw = json.loads(text, object_pairs_hook=no_duplicates)
    except (UnicodeDecodeError, ValueError) as e:
        raise SchemaError(f"{file} is corrupted (not valid JSON: {e})") from None
    except RecursionError:
        raise SchemaError(f"{file} is corrupted (JSON nested too deeply to parse; medquant.json is a flat object of "
                          "recipes)") from None
    d = _obj(raw, at, _TOP_REQUIRED, _TOP_OPTIONAL)
    fv = d["format_version"]
    if isinstance(fv, bool) or not isinstance(fv, int) or fv < 1:
        raise (at / "format_version").fail("a positive integer", fv)
    if fv > FORMAT_VERSION:
        raise SchemaError(f"{file} has format version {fv}; this medquant reads versions <= {FORMAT_VERSION}")
    mv = d.get("medquant_version")
    if mv is not None:
        _str(mv, at / "medquant_version")
    w = _obj(d["weights"], at / "weights", ("file", "sha256", "bytes"))
    try:
        wfile = check_plain_name(w["file"], "weights.file")
    except ValueError as e:
        raise (at / "weights" / "file").fail("a plain file name inside the checkpoint folder", w["file"]) from e
    sha = _str(w["sha256"], at / "weights" / "sha256")
    if len(sha) != 64 or any(c not in "0123456789abcdef" for c in sha):
        raise (at / "weights" / "sha256").fail("64 lowercase hex digits", sha)
    nbytes = _int(w["bytes"], at / "weights" / "bytes", 8, 2**62)
    m = _obj(d["model"], at / "model", ("kind", "class", "module"))
    model = ModelInfo(_str(m["kind"], at / "model" / "kind", ("hf", "torch")), _str(m["class"], at / "model" / "class"),
                      _str(m["module"], at / "model" / "module"))
    if not model.class_name.isidentifier():
        raise (at / "model" / "class").fail("a class name", model.class_name)
    mods = d["modules"]
    if not isinstance(mods, dict):
        raise (at / "modules").fail("an object module name -> recipe", mods)
    modules = {name: parse_layer(entry, name, file) for name, entry in mods.items()}
    extras = d.get("extras", {})
    if not isinstance(extras, dict):
        raise (at / "extras").fail("an object", extras)
    bufs = d.get("buffer_dtypes", {})
    if not isinstance(bufs, dict):
        raise (at / "buffer_dtypes").fail("an object buffer name -> dtype name", bufs)
    for name, dt in bufs.items():
        _str(dt, at / "buffer_dtypes" / name, BUFFER_DTYPES)
    shared = d.get("shared_modules", {})
    if not isinstance(shared, dict):
        raise (at / "shared_modules").fail("an object module name -> the name of the module it shares", shared)
    for name, target in shared.items():
        if not isinstance(target, str) or target not in modules:
            raise (at / "shared_modules" / name).fail("the name of a module recorded in 'modules'", target)
        if name in modules or not name:
            raise (at / "shared_modules" / name).fail("a module name without a recipe of its own", name)
    blocks = d.get("shared_blocks", {})
    if not isinstance(blocks, dict):
        raise (at / "shared_blocks").fail("an object module name -> the name of the module it shares", blocks)
    for name, target in blocks.items():
        if not name or not isinstance(target, str) or not target or target == name:
            raise (at / "shared_blocks" / name).fail("the name of another module", target)
    return CheckpointMeta(fv, mv, WeightsInfo(wfile, sha, nbytes), model, modules, extras, raw, dict(bufs),
                          dict(shared), dict(blocks))


def read_header(path: str | os.PathLike) -> dict[str, TensorInfo]:
    """The tensors of a safetensors file from its header alone (8 + header bytes read, nothing allocated from it).

    ``__metadata__`` must be null or an object of strings. Every entry is checked for a known dtype, a non-negative
    shape and data offsets that lie inside the file and hold exactly ``numel * itemsize`` bytes; taken in the order of
    their offsets, the tensors must tile the data (the first begins at byte 0, each begins where the one before ends,
    the last ends at the end of the file). These are the safetensors loader's rules: no two tensors share bytes, no
    byte belongs to none, so a file that passes here is one the loader reads.

    Args:
        path: the safetensors file.

    Returns:
        Tensor name -> :class:`TensorInfo`.

    Raises:
        SchemaError: the file is too short, its header is not valid JSON or claims more bytes than the file has, an
            entry or ``__metadata__`` is malformed, or the tensors overlap, leave a gap or leave bytes after the last
            one.
    """
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise SchemaError(f"{path.name} is not a safetensors file (shorter than 8 bytes)")
        (n,) = struct.unpack("<Q", head)
        if n > min(size - 8, MAX_HEADER):
            raise SchemaError(f"{path.name}: the header claims {n} bytes, the file holds {size - 8}")
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=no_duplicates)
    except (UnicodeDecodeError, ValueError) as e:
        raise SchemaError(f"{path.name}: the safetensors header is not valid JSON ({e})") from None
    except RecursionError:
        raise SchemaError(f"{path.name}: the safetensors header is nested too deeply to parse (a safetensors header "
                          "is one object of tensor entries)") from None
    if not isinstance(header, dict):
        raise SchemaError(f"{path.name}: the safetensors header is not an object")
    data = size - 8 - n
    out: dict[str, TensorInfo] = {}
    spans: list[tuple[int, int, str]] = []
    for name, value in header.items():
        if name == "__metadata__":  # null or string -> string, as the safetensors loader reads it
            at = _At(path.name, "header") / name
            if value is not None and not isinstance(value, dict):
                raise at.fail("null or an object of strings", value)
            for k, v in (value or {}).items():
                _str(v, at / k)
            continue
        at = _At(path.name, "header") / name
        entry = _obj(value, at, ("dtype", "shape", "data_offsets"))
        dt = _str(entry["dtype"], at / "dtype", tuple(ST_SIZES))
        if not isinstance(entry["shape"], list):
            raise (at / "shape").fail("a list of sizes", entry["shape"])
        shape = tuple(_int(s, at / "shape" / i, 0, 2**62) for i, s in enumerate(entry["shape"]))
        offs = entry["data_offsets"]
        if not isinstance(offs, list) or len(offs) != 2:
            raise (at / "data_offsets").fail("[begin, end]", offs)
        a = _int(offs[0], at / "data_offsets" / 0, 0, data)
        b = _int(offs[1], at / "data_offsets" / 1, a, data)
        numel = 1
        for s in shape:
            numel *= s
        if (b - a) != numel * ST_SIZES[dt]:
            raise (at / "data_offsets").fail(f"{numel * ST_SIZES[dt]} bytes for shape {list(shape)} {dt}", b - a)
        out[name] = TensorInfo(dt, shape)
        spans.append((a, b, name))
    end = 0
    for a, b, name in sorted(spans):
        if a != end:
            raise (_At(path.name, "header") / name / "data_offsets").fail(
                f"to begin at byte {end}, where the tensor before it ends (tensors tile the data: none shares "
                "bytes with another, no byte belongs to none)", [a, b])
        end = b
    if end != data:
        raise SchemaError(f"{path.name}: the tensors end at byte {end} of {data} data bytes (bytes after the last "
                          "tensor: the file was altered or truncated differently than its header says)")
    return out


#: the leaf names of the tensors a quantized layer stores (a header holding one is checked against a recipe)
PACKED_TENSOR = re.compile(r"(qweight|scales|zeros|fweight)_\d+|bit_map")


def _check_ties(layers: dict[str, LayerSpec], recipe_file: str) -> None:
    """Each ``tied_to`` names a QuantEmbedding recorded beside the head, of the head's shape, config and layout (the
    head has no bias): the two share one set of tensors, so the recipes must imply the same ones."""
    for name, spec in layers.items():
        if spec.tied_to is None:
            continue
        where = f"{recipe_file}, key " + (_At(recipe_file, "modules") / name / "tied_to").path
        target = layers.get(spec.tied_to)
        if target is None or target.type != "QuantEmbedding":
            raise SchemaError(f"{where}: {spec.tied_to!r} is not a QuantEmbedding recorded in 'modules' (a head "
                              "recorded tied_to an embedding shares that embedding's packed tensors)")
        if ((spec.out_features, spec.in_features) != (target.out_features, target.in_features) or spec.bias
                or spec.config != target.config or spec.layout != target.layout):
            raise SchemaError(f"{where}: the head shares {spec.tied_to!r}'s tensors, so it needs the same shape "
                              f"({target.out_features} x {target.in_features}), the same config, the same layout "
                              f"({target.layout}) and no bias; its recipe has {spec.out_features} x "
                              f"{spec.in_features}, config {spec.config.to_dict()}, layout {spec.layout}, bias "
                              f"{spec.bias}")


def check_against_header(layers: dict[str, LayerSpec], header: dict[str, TensorInfo], file: str,
                         recipe_file: str, shared: dict[str, str] | None = None) -> None:
    """Every tensor each recipe implies is in the header with that dtype and shape, once, and no other.

    The header may hold no other quantized-layer tensor under a recorded layer's name, and no packed tensor
    (``qweight_b``, ``scales_b``, ``zeros_b``, ``fweight_b``, ``bit_map``) under a name no recipe records (a recipe
    removed from the file would otherwise let a load ignore them). A head recorded ``tied_to`` an embedding (a
    QuantEmbedding recorded beside it, of its shape, config and layout: checked first) shares its tensors, and a
    layer bound to further names (``shared``) is one layer: a shared tensor is stored once, under any of the names
    (safetensors keeps one of them), never under two (both would be read into the one tensor).

    Args:
        layers: module name -> parsed recipe.
        header: the safetensors header (:func:`read_header`).
        file: the weights file(s), for messages.
        recipe_file: the file the recipes come from, for messages.
        shared: further module name -> the recorded name of the layer it shares (``shared_modules``).

    Raises:
        SchemaError: naming the layer and the tensor that is missing, of another dtype or shape, stored twice or
            unexpected, or the ``tied_to`` that names no matching embedding.
    """
    _check_ties(layers, recipe_file)
    others: dict[str, list[str]] = {}  # recorded name -> the other names its tensors may be stored under
    for name, spec in layers.items():
        if spec.tied_to:
            others.setdefault(name, []).append(spec.tied_to)
            others.setdefault(spec.tied_to, []).append(name)
    for alias, name in (shared or {}).items():
        others.setdefault(name, []).append(alias)
    for name, spec in layers.items():
        expected = spec.expected_tensors()
        for t, info in expected.items():
            found = [k for k in [f"{n}.{t}" for n in [name, *others.get(name, ())]] if k in header]
            if not found:
                raise SchemaError(f"{recipe_file}: module {name!r} ({spec.type}, bits {spec.config.bits}"
                                  f"{', mixed' if spec.config.channel_bits else ''}) needs the tensor "
                                  f"{name}.{t} {info.dtype} {list(info.shape)}, which {file} does not hold")
            if len(found) > 1:
                raise SchemaError(f"{file} holds both {found[0]} and {found[1]}: {recipe_file} records them as one "
                                  "tensor (a tied head or a layer under several names), stored once; both would "
                                  "be read into it")
            got = header[found[0]]
            if got != info:
                raise SchemaError(f"{recipe_file}: module {name!r} needs {name}.{t} as {info.dtype} "
                                  f"{list(info.shape)}; {file} holds {got.dtype} {list(got.shape)} (the recipe and "
                                  "the tensors disagree)")
        prefixes = [name + "."] + [a + "." for a, n in (shared or {}).items() if n == name]
        for key in header:
            for prefix in prefixes:
                if key.startswith(prefix) and "." not in key[len(prefix):] and key[len(prefix):] not in expected:
                    raise SchemaError(f"{file} holds {key}, which the recipe of module {name!r} in {recipe_file} "
                                      f"does not have (expected only {', '.join(sorted(expected)) or 'no tensors'})")
    recorded = set(layers) | set(shared or {})
    for key in header:
        prefix, _, leaf = key.rpartition(".")
        if PACKED_TENSOR.fullmatch(leaf) and prefix not in recorded:
            raise SchemaError(f"{file} holds the packed tensor {key}, but {recipe_file} records no module {prefix!r} "
                              "(the recipes were edited or belong to another checkpoint)")
