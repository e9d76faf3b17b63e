"""The packed weight layout: ONE definition, used by the torch reference, the Triton kernels and the files.

A leaf module (it imports only ``torch`` and ``math``): the quantizer (:mod:`medquant.quant.core`), the quantized
modules, the kernels and the save/load code all read the layout from here.

FORMAT_VERSION = 1
==================

A quantized weight matrix ``W`` of shape ``(N, K)`` (``N`` output rows, ``K`` input elements; a Conv2d weight
``(O, I, kh, kw)`` is viewed as ``(O, I*kh*kw)``) is stored per *row group*: all rows that share a bit-width
``b`` form one group, kept in ascending row order. For each group with integer bits ``b`` in 1..8:

* **codes** — unsigned integers ``u`` in ``[0, 2^b - 1]``. Dequantisation is always ``w^ = (u - z) * s``:
  asymmetric rows store their zero point ``z``; symmetric rows use the implicit ``z = 2^(b-1)`` (the signed
  value ``q`` in ``[-q_max, q_max]`` is stored as ``u = q + 2^(b-1)``). 1-bit symmetric (``sign(w)*mean|w|``)
  is the one exception: ``w^ = (2u - 1) * s``.
* **container** — ``b`` in {1, 2, 4, 8} is stored at its own width; 3 -> 4 bits; 5, 6, 7 -> 8 bits
  (no dense packing). ``container_bits(b)`` below is the rule.
* **words** — codes are packed along K into ``int32`` words, ``32 / container`` values per word, the lowest
  K index in the lowest bits: value ``k`` of a row sits in word ``k // vpw`` at bit offset
  ``(k % vpw) * container``. Words are signed int32 (two's complement); readers mask after shifting.
* **padding** — K is zero-padded to ``K_pad``, the next multiple of ``lcm(group_size, vpw)`` (group scope) or of
  ``vpw`` (other scopes); for the usual group sizes 32/64/128 that is simply a multiple of the group size.
  Padded codes are 0 and are ignored by every reader (activations are never padded: kernels mask on K).
  Packed tensor shape: ``(n_rows, K_pad // vpw)``, dtype int32.
* **scales** — shape ``(n_rows, n_groups)`` with ``n_groups = K_pad // group_size`` for group scope, 1 for
  channel scope; tensor scope stores ``(1, 1)``. Default dtype float16 (bf16/fp32 allowed).
* **zeros** — same shape and dtype as the scales, only for asymmetric rows (integers, exact in fp16 for b <= 8).
* **bit map** — an int8 vector of length N with every row's bits, stored only when the layer mixes bit-widths.
  Rows with 0 bits (pruned) store nothing; rows with 16/32 bits store float16/float32 values.

Outputs of the row groups are scattered back to the original row order.

Dequantisation of one row group (:func:`dequantize_codes`), with ``g(j) = j // group_elems`` the group of column
``j`` (``group_elems = K_pad`` for channel scope, one scale for the whole matrix for tensor scope)::

    asymmetric:            w^[n, j] = (u[n, j] - z[n, g(j)]) * s[n, g(j)]
    symmetric, b >= 2:     w^[n, j] = (u[n, j] - 2^(b-1)) * s[n, g(j)]
    symmetric, b == 1:     w^[n, j] = (2 u[n, j] - 1) * s[n, g(j)]

computed in float32 and cast to the requested dtype; the padded columns ``j >= k`` are dropped.
"""
from __future__ import annotations

import math

import torch

FORMAT_VERSION = 1
WORD_BITS = 32


def container_bits(bits: int) -> int:
    """Storage width of a ``bits``-bit code (1, 2, 4 or 8)."""
    if bits in (1, 2, 4, 8):
        return bits
    if bits == 3:
        return 4
    if bits in (5, 6, 7):
        return 8
    raise ValueError(f"no packed container for {bits}-bit codes; packed codes have 1..8 bits")


def values_per_word(bits: int) -> int:
    return WORD_BITS // container_bits(bits)


def padded_k(k: int, bits: int, group_size: int | None) -> int:
    """K padded to a multiple of both the group size (if any) and the values per int32 word (their lcm)."""
    step = values_per_word(bits)
    if group_size is not None:
        step = math.lcm(step, group_size)
    return -(-k // step) * step


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack unsigned codes ``(n, K_pad)`` (any integer dtype, values in [0, 2^bits-1]) into int32 words.

    ``K_pad`` must be a multiple of ``values_per_word(bits)``. Returns ``(n, K_pad // vpw)`` int32.
    """
    if codes.dim() != 2:
        raise ValueError(f"pack expects a 2-D (rows, K) tensor of codes, got shape {tuple(codes.shape)}")
    if codes.dtype.is_floating_point or codes.dtype == torch.bool:
        raise TypeError(f"pack expects integer codes, got {codes.dtype}")
    cb = container_bits(bits)
    vpw = WORD_BITS // cb
    n, kp = codes.shape
    if kp % vpw:
        raise ValueError(f"K={kp} is not a multiple of {vpw} values per word for {bits}-bit codes; pad it first")
    c = codes.to(torch.int64)
    if c.numel() and (int(c.min()) < 0 or int(c.max()) > (1 << bits) - 1):
        raise ValueError(f"codes out of range for {bits} bits: expected 0..{(1 << bits) - 1}")
    shifts = torch.arange(vpw, device=codes.device, dtype=torch.int64) * cb
    words = (c.view(n, kp // vpw, vpw) << shifts).sum(dim=-1)  # < 2^32, exact in int64
    # map [0, 2^32) onto int32 two's complement
    words = torch.where(words >= 2**31, words - 2**32, words)
    return words.to(torch.int32)


def unpack(words: torch.Tensor, bits: int, k: int | None = None) -> torch.Tensor:
    """Inverse of :func:`pack`: ``(n, W)`` int32 -> ``(n, W * vpw)`` uint8 codes (int16 never needed: b <= 8).

    If ``k`` is given the result is cut to the first ``k`` columns (dropping the padding).
    """
    if words.dtype != torch.int32:
        raise TypeError(f"packed words must be int32, got {words.dtype}")
    cb = container_bits(bits)
    vpw = WORD_BITS // cb
    n, w = words.shape
    shifts = torch.arange(vpw, device=words.device, dtype=torch.int32) * cb
    mask = (1 << cb) - 1
    codes = (words.unsqueeze(-1) >> shifts) & mask
    codes = codes.reshape(n, w * vpw).to(torch.uint8)
    if k is not None:
        codes = codes[:, :k]
    return codes


def expand_params(p: torch.Tensor, scope: str, group_elems: int, n: int, k_pad: int) -> torch.Tensor:
    """Per-scope parameters (scales or zero points) -> one value per element of an ``(n, k_pad)`` matrix.

    Group scope: ``p`` is ``(n, k_pad / group_elems)`` and column ``j`` takes ``p[:, j // group_elems]``;
    channel ``(n, 1)`` and tensor ``(1, 1)`` parameters are broadcast.
    """
    if scope == "group":
        return p.repeat_interleave(group_elems, dim=1)
    return p.expand(n, k_pad)


def dequantize_codes(
    codes: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    bits: int,
    symmetric: bool,
    scope: str,
    group_elems: int,
    k: int,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Codes ``(N, K_pad)`` -> float weights ``(N, k)`` following the layout's ``(u - z) * s`` rule.

    ``w^ = (u - z) * s`` (asymmetric), ``(u - 2^(b-1)) * s`` (symmetric), ``(2u - 1) * s`` (1-bit symmetric),
    with ``s``/``z`` of group ``j // group_elems``; float32 arithmetic, result in ``dtype``, padding dropped.
    """
    n, kp = codes.shape
    sf = expand_params(scales.float(), scope, group_elems, n, kp)
    u = codes.float()
    if symmetric:
        if bits == 1:
            w = (2 * u - 1) * sf
        else:
            w = (u - 2 ** (bits - 1)) * sf
    else:
        w = (u - expand_params(zeros.float(), scope, group_elems, n, kp)) * sf
    return w[:, :k].to(dtype)
