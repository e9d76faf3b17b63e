"""``PackedWeight``: one packed row group of a quantized weight, the argument of :func:`packed_linear`.

A quantized layer stores, per bit-width ``b`` (a *row group*, layout in :mod:`medquant.kernels.layout`), the
packed codes, their scales and (asymmetric) zero points. ``PackedWeight`` carries exactly that, validated once
when it is built, so the kernels, the references and the quantized modules pass one object instead of nine
arguments; it is spelled out into positional tensors only at the ``torch.ops.medquant.packed_linear`` call, whose
schema needs them.

Dequantised, column ``j`` of row ``n`` is ``(u[n, j] - z) * s`` with ``s``/``z`` of group ``j // group_elems``,
``z = 2^(b-1)`` for symmetric rows, and ``(2u - 1) * s`` for 1-bit symmetric rows.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .layout import DENSE_BITS, dequantize_codes, is_dense, padded_k, storage_bits, unpack, words_per_row

#: dtypes of scales and zero points (zero points are integers stored in the scale dtype)
PARAM_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
PACKED_SCOPES = ("tensor", "channel", "group")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


@dataclass(frozen=True, eq=False)
class PackedWeight:
    """A packed row group: ``n`` rows of ``k`` weights quantized to ``bits`` bits.

    Attributes:
        qweight: int32 words ``(n, K_pad * storage_bits / 32)``, codes packed along K: the version-1 container
            layout, or (``dense`` and ``bits`` in 3, 5, 6, 7) the version-2 dense bit stream.
        scales: ``(n, K_pad / group_elems)`` (group scope), ``(n, 1)`` (channel) or ``(1, 1)`` (tensor).
        zeros: zero points of the scales' shape and dtype (asymmetric), or None (symmetric: ``z = 2^(b-1)``).
        bits: 1..8.
        symmetric: symmetric codes (implicit zero point) or asymmetric (stored zero points).
        scope: "tensor", "channel" or "group".
        group_elems: K elements per scale along a row (``K_pad`` for channel and tensor scope).
        k: real number of input elements (columns past ``k`` are padding).
        dense: the layer uses the version-2 dense layout (only changes 3-, 5-, 6- and 7-bit row groups).

    Building one validates shapes, dtypes and devices (``TypeError`` / ``ValueError`` naming the field). It cannot
    validate the ``dense`` flag itself: words carry no mark of their layout, so a flag that does not match how the
    words were packed is caught only where the two layouts need different word counts for this ``k``, ``bits``
    and group size. Where the counts coincide (among others, channel-scope rows of 3 bits with K in 17..24, 5 bits
    with K in 17..20, 6 bits with K in 21..24, 7 bits with K in 25..28) the row group is accepted and its codes are
    misread; take the flag from where the words come from (a saved layer's format version: 2 is dense, see
    :mod:`medquant.kernels.layout`).

    Raises:
        TypeError: a field of the wrong type (``qweight`` not a 2-D int32 tensor, ``bits`` not an int...).
        ValueError: a value out of range or shapes that do not agree with ``bits``, ``scope``, ``group_elems``
            and ``k`` (the message names the field).
    """

    qweight: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor | None
    bits: int
    symmetric: bool
    scope: str
    group_elems: int
    k: int
    dense: bool = False

    def __post_init__(self) -> None:
        check_packed_weight(self.qweight, self.scales, self.zeros, self.bits, self.symmetric, self.scope,
                            self.group_elems, self.k, self.dense)

    @property
    def is_dense(self) -> bool:
        """Whether the codes are stored as a dense bit stream (version 2) rather than in containers."""
        return is_dense(self.bits, self.dense)

    @property
    def n(self) -> int:
        """Rows (output features) of the group."""
        return self.qweight.shape[0]

    @property
    def k_pad(self) -> int:
        """K padded for the layout: ``words per row * 32 / storage_bits``."""
        return self.qweight.shape[1] * 32 // storage_bits(self.bits, self.dense)

    @property
    def device(self) -> torch.device:
        """The device of the packed words (scales and zero points are on the same one)."""
        return self.qweight.device

    def describe(self) -> str:
        """One line naming the row group's shape and layout (what the kernels' warnings print).

        Returns:
            ``"packed_linear N=.. K=.. bits=.. symmetric|asymmetric scope=group(G)|channel|tensor"``.
        """
        scope = f"group({self.group_elems})" if self.scope == "group" else self.scope
        return (f"packed_linear N={self.n} K={self.k} bits={self.bits} "
                f"{'symmetric' if self.symmetric else 'asymmetric'} scope={scope}")

    def codes(self) -> torch.Tensor:
        """The unpacked unsigned codes ``(n, K_pad)`` uint8 (padding included).

        Returns:
            ``(n, K_pad)`` uint8 codes ``u`` in ``[0, 2^bits - 1]``.
        """
        return unpack(self.qweight, self.bits, dense=self.dense)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The dense weights ``(n, k)`` in ``dtype``: ``(u - z) * s`` (class docstring), float32 arithmetic.

        Args:
            dtype: floating dtype of the result (the arithmetic is float32 whatever it is).

        Returns:
            ``(n, k)`` weights, padding columns dropped.

        Raises:
            TypeError: ``dtype`` is not a floating dtype (integers, bool and complex would truncate the weights).
        """
        return dequantize_codes(self.codes(), self.scales, self.zeros, self.bits, self.symmetric, self.scope,
                                self.group_elems, self.k, dtype=dtype)


def check_packed_weight(qweight, scales, zeros, bits, symmetric, scope, group_elems, k, dense=False) -> None:
    """Validate the fields of a :class:`PackedWeight` (shapes follow :mod:`medquant.kernels.layout`).

    The word count is checked against ``k``, ``bits``, the group size and ``dense``; a wrong ``dense`` flag is
    detected only when it changes that count (the words themselves cannot tell the layouts apart).
    """
    if not _is_int(bits):
        raise TypeError(f"bits must be an int, got {bits!r}")
    if not 1 <= bits <= 8:
        raise ValueError(f"bits={bits} out of range: the kernels quantize to 1..8 bits")
    if not isinstance(symmetric, bool):
        raise TypeError(f"symmetric must be a bool, got {symmetric!r}")
    if not isinstance(qweight, torch.Tensor) or qweight.dtype != torch.int32 or qweight.dim() != 2:
        raise TypeError("qweight must be a 2-D int32 tensor of packed codes (rows, K_pad * storage_bits / 32)")
    if not isinstance(dense, bool):
        raise TypeError(f"dense must be a bool, got {dense!r}")
    if scope not in PACKED_SCOPES:
        raise ValueError(f"scope={scope!r} is not supported; accepted: {', '.join(PACKED_SCOPES)}")
    if not _is_int(k) or k < 0:
        raise ValueError(f"k must be a non-negative int, got {k!r}")
    if not _is_int(group_elems) or group_elems <= 0:
        raise ValueError(f"group_elems must be a positive int, got {group_elems!r}")
    n, words = qweight.shape
    want = padded_k(k, bits, group_elems if scope == "group" else None, dense)
    if words != words_per_row(want, bits, dense):
        form = "dense" if is_dense(bits, dense) else f"{storage_bits(bits)}-bit containers"
        raise ValueError(f"qweight has {words} words per row, but K={k} packed at {bits} bits ({form}) needs "
                         f"K_pad={want}, {words_per_row(want, bits, dense)} words: wrong bits, K or group size, or "
                         f"a dense flag that does not match the words (the dense {DENSE_BITS}-bit layout is format "
                         f"version 2; a wrong flag is caught only where the two layouts' word counts differ, so it "
                         f"must come from the format, not from this check)")
    kp = want
    if not isinstance(scales, torch.Tensor) or scales.dtype not in PARAM_DTYPES or scales.dim() != 2:
        raise TypeError("scales must be a 2-D float16/bfloat16/float32 tensor")
    if scope == "tensor":
        if tuple(scales.shape) != (1, 1):
            raise ValueError(f"tensor scope expects (1, 1) scales, got {tuple(scales.shape)}")
    elif scope == "channel":
        if tuple(scales.shape) != (n, 1):
            raise ValueError(f"channel scope expects ({n}, 1) scales, got {tuple(scales.shape)}")
    else:
        if kp % group_elems:
            raise ValueError(f"K_pad={kp} is not a multiple of the group size {group_elems}")
        if tuple(scales.shape) != (n, kp // group_elems):
            raise ValueError(f"group scope with {group_elems} elements per group expects scales of shape "
                             f"({n}, {kp // group_elems}), got {tuple(scales.shape)}")
    if symmetric:
        if zeros is not None:
            raise ValueError("symmetric rows use the implicit zero point 2^(b-1): pass zeros=None")
    else:
        if zeros is None:
            raise ValueError("asymmetric rows need their zero points (zeros is None)")
        if not isinstance(zeros, torch.Tensor) or zeros.shape != scales.shape:
            raise ValueError(f"zeros must have the shape of scales {tuple(scales.shape)}")
        if zeros.dtype not in PARAM_DTYPES:
            raise TypeError("zeros must be float16/bfloat16/float32 (integers stored in the scale dtype)")
    if scales.device != qweight.device or (zeros is not None and zeros.device != qweight.device):
        devs = {str(t.device) for t in (qweight, scales) + ((zeros,) if zeros is not None else ())}
        raise ValueError(f"all tensors must be on one device, got {sorted(devs)}")
