"""Quantization configuration.

``QuantConfig`` is a frozen dataclass: it is hashable, compares by value and round-trips through JSON
(``to_dict`` / ``from_dict``), which is what lets a quantized model be saved with the exact recipe of every
module and rebuilt from it.

Bit-width conventions
---------------------
* ``bits`` in 1..8: integer quantization.
* ``bits`` 16 or 32: leave the weights in floating point (``quantize_`` skips such modules; inside a
  mixed-precision layer, a row with 16 bits is stored in float16 and a row with 32 bits in float32).
* ``bits`` 0: pruned (the weights are all zero and nothing but the bit map is stored).

Schemes
-------
* symmetric: ``q_max = 2^(b-1) - 1``, ``s = max(absmax / q_max, eps)``, ``q = clamp(round(w/s), -q_max, q_max)``.
  Symmetric 2-bit is therefore *ternary* {-1, 0, 1}; symmetric 1-bit is ``sign(w) * max(mean|w|, eps)`` with
  ``sign(0) = +1``.
* asymmetric: the range is widened to include zero, ``s = max((max' - min') / (2^b - 1), eps)``,
  ``z = clamp(round(-min'/s), 0, 2^b - 1)``, ``q = clamp(round(w/s) + z, 0, 2^b - 1)``, ``w^ = (q - z) * s``.
* ``symmetric=None`` (the default) picks asymmetric for ``b <= 3`` and symmetric above, per bit-width, so
  that one config serves every row of a mixed-precision layer.

``eps`` is the smallest positive value of the scale dtype, applied after the division (an all-zero group gets
``s = eps``, never a scale that rounds to 0); scales are rounded to the scale dtype before the codes are computed.
"""
from __future__ import annotations

import dataclasses
import json
import operator
from collections.abc import Mapping
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from typing import Any

import torch

FLOAT_BITS = (16, 32)
INT_BITS = tuple(range(1, 9))
VALID_BITS = (0,) + INT_BITS + FLOAT_BITS
SCOPES = ("tensor", "channel", "group")
SCALE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
COMPUTE_DTYPES = ("bfloat16", "float16", "float32")


def _check_bits(bits: Any, what: str) -> int:
    if isinstance(bits, bool):  # True would silently be 1 bit
        raise TypeError(f"{what} must be an integer bit-width, got {bits!r}")
    if not isinstance(bits, int):
        try:
            as_int = int(bits)
        except (TypeError, ValueError, OverflowError):  # OverflowError: int(float("inf"))
            raise TypeError(f"{what} must be an integer, got {bits!r}") from None
        if as_int != bits:
            raise ValueError(f"{what} must be an integer, got {bits!r}")
        bits = as_int
    if bits not in VALID_BITS:
        raise ValueError(
            f"{what}={bits} is not supported: use 1..8 for integer quantization, 16 or 32 to keep floating point, "
            f"or 0 for pruned"
        )
    return bits


def _check_group_size(group_size: Any) -> int:
    """``group_size`` as a positive ``int`` (NumPy / torch integer scalars are taken); bools and floats refused."""
    try:
        gs = None if isinstance(group_size, bool) else operator.index(group_size)
    except TypeError:
        gs = None
    if gs is None or gs <= 0:
        raise ValueError(f"group_size must be a positive integer, got {group_size!r}")
    return gs


def _channel_bits_entries(channel_bits: Any) -> list:
    """The entries of ``channel_bits`` (a tuple / list / 1-D tensor or array), in row order, not yet checked.

    Unordered or scalar values (a set, a dict, a string, one int) are refused: they give no bit-width per row.
    """
    if isinstance(channel_bits, (str, bytes, AbstractSet, Mapping)) or not hasattr(channel_bits, "__iter__"):
        raise TypeError(f"channel_bits must be a sequence with one bit-width per output row (tuple, list, 1-D "
                        f"tensor or array), got {type(channel_bits).__name__} {channel_bits!r}")
    ndim = getattr(channel_bits, "ndim", 1)
    if ndim != 1:
        raise ValueError(f"channel_bits must be one-dimensional (one entry per output row), got a "
                         f"{type(channel_bits).__name__} of shape {tuple(channel_bits.shape)}")
    if isinstance(channel_bits, torch.Tensor):  # tolist keeps 4.5 a float and True a bool: checked, not truncated
        return channel_bits.tolist()
    return list(channel_bits)


@dataclass(frozen=True)
class QuantConfig:
    """How to quantize the weights of one module.

    Args:
        bits: default bit-width of every output channel (see module docstring).
        symmetric: ``True``/``False`` forces the scheme; ``None`` = asymmetric for <= 3 bits, symmetric above.
        scope: ``"tensor"`` (one scale), ``"channel"`` (one per output row) or ``"group"`` (one per
            ``group_size`` consecutive input elements of each row; K is zero-padded to a multiple of it).
        group_size: input elements per scale when ``scope == "group"``.
        scale_dtype: storage dtype of scales and zero points: ``"float16"`` (default), ``"bfloat16"``, ``"float32"``
            (or the torch dtype).
        channel_bits: optional per-output-channel bit-widths (mixed precision inside the layer), a tuple with one
            entry per output row; overrides ``bits`` row by row. Rows are grouped by bit-width and each group is
            packed at its own width.
        compute_dtype: activation dtype of the CPU kernels for this module (``"bfloat16"``, ``"float16"``,
            ``"float32"``); ``None`` (default) follows ``medquant.kernels.set_cpu_compute_dtype`` (bfloat16 where
            the CPU has native bf16, else float32). Outputs keep the caller's dtype. Left out of :meth:`to_dict`
            when ``None``, so recipes without it read and write as before.

    Raises:
        TypeError: ``bits`` (or a ``channel_bits`` entry) is not an integer, ``symmetric`` is not a bool / None,
            or ``channel_bits`` is not an ordered sequence (a set, dict, string or single int).
        ValueError: a bit-width outside {0, 1..8, 16, 32}, an unknown ``scope``, ``scale_dtype`` or
            ``compute_dtype``, a ``group_size`` that is not a positive integer, or an empty or not one-dimensional
            ``channel_bits``.
    """

    bits: int = 4
    symmetric: bool | None = None
    scope: str = "group"
    group_size: int = 128
    scale_dtype: str = "float16"
    channel_bits: tuple[int, ...] | None = None
    compute_dtype: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "bits", _check_bits(self.bits, "bits"))
        if self.symmetric is not None and not isinstance(self.symmetric, bool):
            raise TypeError(f"symmetric must be True, False or None (auto), got {self.symmetric!r}")
        if self.scope not in SCOPES:
            raise ValueError(f"scope={self.scope!r} is not supported; accepted: {', '.join(SCOPES)}")
        object.__setattr__(self, "group_size", _check_group_size(self.group_size))
        if isinstance(self.scale_dtype, torch.dtype):  # torch.float16 -> "float16", as compute_dtype accepts it
            object.__setattr__(self, "scale_dtype", str(self.scale_dtype).removeprefix("torch."))
        if not isinstance(self.scale_dtype, str) or self.scale_dtype not in SCALE_DTYPES:
            raise ValueError(
                f"scale_dtype={self.scale_dtype!r} is not supported; accepted: {', '.join(SCALE_DTYPES)}"
            )
        if self.channel_bits is not None:
            entries = _channel_bits_entries(self.channel_bits)
            if len(entries) == 0:
                raise ValueError("channel_bits must have one entry per output channel, got an empty sequence")
            cb = tuple(_check_bits(b, "channel_bits entry") for b in entries)
            object.__setattr__(self, "channel_bits", cb)
        if self.compute_dtype is not None:
            name = str(self.compute_dtype).removeprefix("torch.")
            if name not in COMPUTE_DTYPES:
                raise ValueError(f"compute_dtype={self.compute_dtype!r} is not supported; accepted: "
                                 f"{', '.join(COMPUTE_DTYPES)} or None")
            object.__setattr__(self, "compute_dtype", name)

    # ------------------------------------------------------------------ helpers
    def __getattr__(self, name: str) -> Any:
        """Only reached for a missing attribute: ``quant_method`` is what transformers reads from a
        ``quantization_config``, so a QuantConfig passed there gets an error naming the config to pass instead."""
        if name == "quant_method":
            raise AttributeError(
                "QuantConfig is medquant's per-layer config, not a transformers quantization_config (it has no "
                "quant_method): pass from_pretrained(..., quantization_config=medquant.MedQuantConfig(QuantConfig(...)))"
                ", or quantize the loaded model with medquant.quantize_(model, QuantConfig(...))")
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def is_symmetric(self, bits: int | None = None) -> bool:
        """Scheme used for rows of ``bits`` bits (default: ``self.bits``).

        Args:
            bits: the row's bit-width; ``None`` means ``self.bits``.

        Returns:
            ``self.symmetric`` when it is set, else ``bits > 3`` (asymmetric at 1..3 bits, symmetric above).
        """
        b = self.bits if bits is None else bits
        return self.symmetric if self.symmetric is not None else b > 3

    @property
    def torch_scale_dtype(self) -> torch.dtype:
        """``scale_dtype`` as a torch dtype (``torch.float16``, ``torch.bfloat16`` or ``torch.float32``)."""
        return SCALE_DTYPES[self.scale_dtype]

    @property
    def is_float(self) -> bool:
        """True when nothing is quantized (all rows 16/32 bits)."""
        if self.channel_bits is not None:
            return all(b in FLOAT_BITS for b in self.channel_bits)
        return self.bits in FLOAT_BITS

    def row_bits(self, out_features: int) -> torch.Tensor:
        """Per-row bit-widths as an int tensor of length ``out_features``.

        Args:
            out_features: output channels (rows) of the module the config is applied to.

        Returns:
            ``(out_features,)`` int16 tensor: ``channel_bits`` when given, else ``bits`` repeated.

        Raises:
            ValueError: ``channel_bits`` does not have exactly ``out_features`` entries.
        """
        if self.channel_bits is None:
            return torch.full((out_features,), self.bits, dtype=torch.int16)
        if len(self.channel_bits) != out_features:
            raise ValueError(
                f"channel_bits has {len(self.channel_bits)} entries but the module has {out_features} output "
                f"channels: give exactly one bit-width per output channel"
            )
        return torch.tensor(self.channel_bits, dtype=torch.int16)

    def replace(self, **changes: Any) -> QuantConfig:
        """A copy with some fields changed, validated like a new config (``dataclasses.replace``).

        Args:
            **changes: field name -> new value, e.g. ``bits=3`` or ``group_size=64``.

        Returns:
            The new ``QuantConfig``; ``self`` is unchanged (frozen).
        """
        return dataclasses.replace(self, **changes)

    # ------------------------------------------------------------------ JSON
    def to_dict(self) -> dict[str, Any]:
        """The fields as a JSON-ready dict (``channel_bits`` as a list; ``compute_dtype`` left out when None).

        Returns:
            ``{"bits": ..., "symmetric": ..., "scope": ..., "group_size": ..., "scale_dtype": ...,
            "channel_bits": ...}``, which :meth:`from_dict` reads back to an equal config.
        """
        d = dataclasses.asdict(self)
        if d["channel_bits"] is not None:
            d["channel_bits"] = list(d["channel_bits"])
        if d["compute_dtype"] is None:
            del d["compute_dtype"]  # a run-time choice: recipes without it keep their exact form
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> QuantConfig:
        """The config a dict of :meth:`to_dict` describes; missing fields take their defaults.

        Args:
            d: field name -> value (``channel_bits`` may be a list).

        Returns:
            The validated ``QuantConfig``.

        Raises:
            TypeError: ``d`` is not a mapping, or a value the constructor rejects with a TypeError.
            ValueError: ``d`` has keys that are not fields (the message lists the accepted ones), or a value
                the constructor rejects.
        """
        if not isinstance(d, Mapping):
            raise TypeError(f"a QuantConfig dict maps field names to values, got {type(d).__name__} {d!r}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown QuantConfig fields {sorted(unknown)}; accepted: {sorted(known)}")
        return cls(**d)  # the constructor takes channel_bits as a list and checks it

    def to_json(self) -> str:
        """:meth:`to_dict` as a JSON string.

        Returns:
            One-line JSON object text.
        """
        return json.dumps(self.to_dict())

    @classmethod
    def from_json(cls, s: str) -> QuantConfig:
        """The config a JSON string of :meth:`to_json` describes.

        Args:
            s: JSON object text.

        Returns:
            The validated ``QuantConfig`` (see :meth:`from_dict`).
        """
        return cls.from_dict(json.loads(s))
