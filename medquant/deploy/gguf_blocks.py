"""medquant weights as GGUF blocks (Q4_0, Q4_1, Q8_0): exact repacks, exact re-expressions, or refusals.

GGUF block types (32 weights per block, the block scale ``d`` and offset ``m`` stored as float16)::

    Q4_0  18 bytes: d, 16 bytes of codes      w_i = (q_i - 8) * d      q_i in 0..15
    Q4_1  20 bytes: d, m, 16 bytes of codes   w_i = q_i * d + m        q_i in 0..15
    Q8_0  34 bytes: d, 32 int8 codes          w_i = q_i * d            q_i in -128..127

4-bit codes: element ``i < 16`` of a block is the low nibble of code byte ``i``, element ``16 + i`` its high nibble.

medquant's codes ``u`` with scale ``s`` (and zero point ``z``) per group map onto these blocks as follows, the
scale of a group repeated for each of its 32-blocks (group size a multiple of 32; channel and tensor scope repeat
the one scale of the row / matrix):

* symmetric ``b <= 4`` bits (``w = (u - 2^(b-1)) * s``): Q4_0 with ``q = u - 2^(b-1) + 8``, ``d = s``; symmetric
  1-bit (``w = (2u - 1) * s``): ``q = 2u + 7``. Exact when ``s`` is a float16 number.
* symmetric ``b <= 8``: Q8_0 with ``q = u - 2^(b-1)`` (``2u - 1`` at 1 bit), ``d = s``.
* asymmetric ``b <= 3`` (``w = (u - z) * s``, ``u`` and ``z`` in ``0..2^b - 1``): Q4_0 with ``q = u - z + 8``
  (``u - z`` lies in ``-7..7``, so ``q`` in ``1..15``), ``d = s``. Exact when ``s`` is a float16 number.
* asymmetric ``b <= 4`` (needed at 4 bits: ``u - z`` spans ``-15..15``, beyond Q4_0's ``-8..7``): Q4_1 with
  ``q = u``, ``d = s``, ``m = -z * s`` rounded to float16 (near-exact; the error is measured).
* asymmetric ``b <= 7``: Q8_0 with ``q = u - z`` (in ``-127..127``), ``d = s`` (exact).
* pruned rows (0 bits): every type with ``d = 0`` (exact zeros).
* symmetric rows also fit Q4_1 (``q = u - 2^(b-1) + 8``, ``m = -8 d``, exact), so a layer mixing symmetric and
  asymmetric 4-bit rows is one Q4_1 tensor (asymmetric 1-3 bit rows with symmetric 1-4 bit rows: one Q4_0
  tensor), and a layer mixing 4- and 8-bit rows one Q8_0 tensor.

Not representable (refused unless promoted): asymmetric 8-bit, float rows inside an integer layer, group sizes
that are not a multiple of 32, and an input size ``K`` that is not a multiple of 32.

Every encoded tensor is decoded again by the ``gguf`` package's own dequantiser and compared with medquant's
dequantised weight: the largest absolute difference is the reported error (0.0 means bit-equal).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..quant.config import FLOAT_BITS

QK = 32  # weights per GGUF block of the Q4_0 / Q4_1 / Q8_0 types

#: the block types this exporter writes, in order of preference (smallest first)
BLOCK_TYPES = ("Q4_0", "Q4_1", "Q8_0")
#: bytes per 32-weight block
BLOCK_BYTES = {"Q4_0": 18, "Q4_1": 20, "Q8_0": 34}


def gguf_type(name: str):
    """The ``gguf.GGMLQuantizationType`` called ``name`` (``"Q4_0"``, ``"F32"``...)."""
    from gguf import GGMLQuantizationType

    return GGMLQuantizationType[name]


def fits(target: str, bits: int, symmetric: bool) -> bool:
    """Whether rows of ``bits`` bits (symmetric or not) are carried by block type ``target`` (module docstring)."""
    if bits == 0:
        return True
    if bits in FLOAT_BITS:
        return False
    if target == "Q4_0":
        return bits <= (4 if symmetric else 3)
    if target == "Q4_1":
        return bits <= 4
    if target == "Q8_0":
        return symmetric or bits <= 7
    raise ValueError(f"unknown block type {target!r}; accepted: {', '.join(BLOCK_TYPES)}")


@dataclass
class Blocks:
    """A weight ``(N, K)`` as GGUF block parameters before packing.

    Attributes:
        target: ``"Q4_0"``, ``"Q4_1"`` or ``"Q8_0"``.
        q: int16 codes ``(N, K)`` in the target's convention (module docstring).
        d: float32 block scales ``(N, K / 32)`` (the exact values; packing rounds them to float16).
        m: float32 block offsets ``(N, K / 32)`` (Q4_1 only).
    """

    target: str
    q: torch.Tensor
    d: torch.Tensor
    m: torch.Tensor | None = None

    def permute_rows(self, perm: torch.Tensor) -> Blocks:
        """The same blocks with rows reordered: row ``i`` of the result is row ``perm[i]``."""
        return Blocks(self.target, self.q.index_select(0, perm), self.d.index_select(0, perm),
                      None if self.m is None else self.m.index_select(0, perm))

    def scales_exact_in_fp16(self) -> bool:
        """Whether every ``d`` is a float16 number (then packing rounds no scale)."""
        return bool((self.d.half().float() == self.d).all())

    def offsets_exact_in_fp16(self) -> bool:
        """Whether every ``m`` is a float16 number (``True`` for blocks without offsets)."""
        return self.m is None or bool((self.m.half().float() == self.m).all())

    def pack(self) -> np.ndarray:
        """The GGUF bytes, ``(N, K / 32 * bytes_per_block)`` uint8 (little-endian float16 ``d`` / ``m``)."""
        n, k = self.q.shape
        nb = k // QK
        q = self.q.reshape(n, nb, QK)
        parts = [self.d.numpy().astype("<f2").view(np.uint8).reshape(n, nb, 2)]
        if self.target == "Q4_1":
            assert self.m is not None
            parts.append(self.m.numpy().astype("<f2").view(np.uint8).reshape(n, nb, 2))
        if self.target in ("Q4_0", "Q4_1"):
            if int(q.min()) < 0 or int(q.max()) > 15:
                raise ValueError(f"{self.target} codes must lie in 0..15")
            parts.append((q[..., :16] | (q[..., 16:] << 4)).to(torch.uint8).numpy())
        elif self.target == "Q8_0":
            if int(q.min()) < -128 or int(q.max()) > 127:
                raise ValueError("Q8_0 codes must lie in -128..127")
            parts.append(q.to(torch.int8).numpy().view(np.uint8))
        else:
            raise ValueError(f"unknown block type {self.target!r}")
        return np.ascontiguousarray(np.concatenate(parts, axis=-1).reshape(n, nb * BLOCK_BYTES[self.target]))


def block_params(p: torch.Tensor, scope: str, group_elems: int, n: int, k: int) -> torch.Tensor:
    """Per-scope parameters (scales or zero points, float32) -> one value per 32-block: ``(n, k / 32)``.

    Group scope repeats each group's value ``group_elems / 32`` times; channel ``(n, 1)`` and tensor ``(1, 1)``
    values are broadcast.
    """
    if scope == "group":
        return p.repeat_interleave(group_elems // QK, dim=1)[:, : k // QK].contiguous()
    return p.expand(n, k // QK).contiguous()


def row_group_blocks(layer: Any, bits: int, target: str) -> Blocks:
    """The rows of ``layer`` with ``bits`` bits as ``target`` blocks (the caller checked :func:`fits`)."""
    k = layer.k
    if bits == 0:
        n = layer.out_rows if not layer.mixed else int((layer.row_bits() == 0).sum())
        zero = torch.zeros(n, k // QK)
        fill = 8 if target == "Q4_0" else 0
        return Blocks(target, torch.full((n, k), fill, dtype=torch.int16), zero,
                      zero.clone() if target == "Q4_1" else None)
    pw = layer.packed_weight(bits)
    n = pw.n
    # on the CPU whatever device the layer is on: packing goes through numpy
    u = pw.codes()[:, :k].to("cpu", torch.int16)
    s = block_params(pw.scales.float().cpu(), pw.scope, pw.group_elems, n, k)
    blk = lambda t: t.repeat_interleave(QK, dim=1)  # per-block value -> per element
    if pw.symmetric:
        c = 2 * u - 1 if bits == 1 else u - (1 << (bits - 1))  # w = c * s
        if target == "Q4_0":
            return Blocks(target, c + 8, s)
        if target == "Q4_1":
            return Blocks(target, c + 8, s, -8.0 * s)
        return Blocks(target, c, s)
    z = block_params(pw.zeros.float().cpu(), pw.scope, pw.group_elems, n, k)
    if target == "Q4_0":  # b <= 3: u - z in -7..7
        return Blocks(target, u - blk(z).to(torch.int16) + 8, s)
    if target == "Q4_1":
        return Blocks(target, u, s, -z * s)
    if target == "Q8_0":
        return Blocks(target, u - blk(z).to(torch.int16), s)
    raise ValueError(f"asymmetric rows do not fit {target}")


def scope_problem(layer: Any) -> str | None:
    """Why the layer's groups cannot become 32-blocks, or None when they can."""
    if layer.k % QK:
        return f"input size {layer.k} is not a multiple of {QK}"
    cfg = layer.config
    if cfg.scope == "group" and cfg.group_size % QK:
        return f"group size {cfg.group_size} is not a multiple of {QK}"
    return None


def choose_target(layer: Any) -> str | None:
    """The first of :data:`BLOCK_TYPES` that carries every row group of ``layer``, or None."""
    if scope_problem(layer) is not None:
        return None
    cfg = layer.config
    for target in BLOCK_TYPES:
        if all(fits(target, b, cfg.is_symmetric(b) if 1 <= b <= 8 else True) for b in layer.bit_groups):
            return target
    return None


def layer_blocks(layer: Any, target: str) -> Blocks:
    """All rows of ``layer`` as ``target`` blocks (CPU tensors, whatever device the layer is on), row groups
    scattered back to the original row order."""
    if not layer.mixed:
        return row_group_blocks(layer, layer.bit_groups[0], target)
    n, k = layer.out_rows, layer.k
    q = torch.zeros(n, k, dtype=torch.int16)
    d = torch.zeros(n, k // QK)
    m = torch.zeros(n, k // QK) if target == "Q4_1" else None
    for b in layer.bit_groups:
        rows = torch.nonzero(layer.row_bits() == b).flatten()
        part = row_group_blocks(layer, b, target)
        q.index_copy_(0, rows, part.q)
        d.index_copy_(0, rows, part.d)
        if m is not None:
            assert part.m is not None
            m.index_copy_(0, rows, part.m)
    return Blocks(target, q, d, m)


def decode(data: np.ndarray, target: str) -> torch.Tensor:
    """GGUF bytes -> float32 weights, by the ``gguf`` package's own dequantiser (the reference decoder)."""
    from gguf.quants import dequantize

    return torch.from_numpy(np.ascontiguousarray(dequantize(data, gguf_type(target)), dtype=np.float32))


def requantize(w: torch.Tensor, target: str) -> np.ndarray:
    """Quantize a float weight ``(N, K)`` to ``target`` with the ``gguf`` package's own quantiser (lossy)."""
    from gguf.quants import quantize

    return quantize(w.float().numpy(), gguf_type(target))
