"""The packed weight layout: ONE definition, used by the torch reference, the Triton kernels and the files.

A leaf module (it imports only ``torch``, ``math`` and ``sys``): the quantizer (:mod:`medquant.quant.core`), the quantized
modules, the kernels and the save/load code all read the layout from here.

FORMAT_VERSION = 2 adds the *dense* layout for the widths that do not divide 32 (3, 5, 6 and 7 bits; next section
but one); everything else is version 1, unchanged. A row group says which it uses (``dense``); a file is
version 2 only when one of its layers stores a dense row group, so files without one are byte-identical to
version 1.

FORMAT_VERSION 1 (container layout)
===================================

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

FORMAT_VERSION 2: the dense layout (3, 5, 6, 7 bits)
====================================================

A row group of ``b`` in :data:`DENSE_BITS` may store its codes *densely*: the codes of a row form one bit
stream, code ``k`` at stream bits ``[k*b, (k+1)*b)``, the lowest bits first, continuing across word boundaries;
stream bit ``p`` is bit ``p % 32`` of word ``p // 32``. So every 32 codes fill exactly ``b`` int32 words (a
*block*), and code ``k`` is::

    p = k * b;  w = p // 32;  o = p % 32
    u = (word[w] >> o) & (2^b - 1)                                   if o + b <= 32
    u = ((word[w] >> o) | (word[w + 1] << (32 - o))) & (2^b - 1)     otherwise (words read as unsigned)

This is the bit order of compressed-tensors' ``pack-quantized`` format (``pack_to_int32``: values offset to
``u = q + 2^(b-1)``, packed along K, ``ceil(K*b/32)`` words per row), so its words are these words.
Padding: K is zero-padded to ``K_pad``, the next multiple of ``lcm(group_size, 32)`` (group scope) or of 32;
packed shape ``(n_rows, K_pad * b / 32)``. Scales, zero points and the bit map are as in version 1. For ``K``
a multiple of 32 the words equal compressed-tensors' exactly; otherwise its words are the first
``ceil(K*b/32)`` of each row. A 3-bit weight takes 3/32 of a word instead of 4/32, a 5- or 6-bit weight
5/32 or 6/32 instead of 8/32.
"""
from __future__ import annotations

import math
import sys

import torch

FORMAT_VERSION = 2
WORD_BITS = 32
#: widths stored densely (bit stream across words) in a version-2 row group
DENSE_BITS = (3, 5, 6, 7)


def container_bits(bits: int) -> int:
    """Version-1 storage width of a ``bits``-bit code (1, 2, 4 or 8).

    Args:
        bits: code width, 1..8. 1, 2, 4 and 8 fill a 32-bit word exactly; 3 is stored in 4 bits and 5..7 in 8.

    Returns:
        The container width in bits: 1, 2, 4 or 8.

    Raises:
        ValueError: ``bits`` is outside 1..8.
    """
    if bits in (1, 2, 4, 8):
        return bits
    if bits == 3:
        return 4
    if bits in (5, 6, 7):
        return 8
    raise ValueError(f"no packed container for {bits}-bit codes; packed codes have 1..8 bits")


def is_dense(bits: int, dense: bool) -> bool:
    """Whether a row group of ``bits`` bits of a layer using the dense layout (``dense``) is stored densely."""
    return bool(dense) and bits in DENSE_BITS


def storage_bits(bits: int, dense: bool = False) -> int:
    """Bits one code takes in memory: ``bits`` when stored densely, else its container width."""
    return bits if is_dense(bits, dense) else container_bits(bits)


def values_per_word(bits: int) -> int:
    """Codes per int32 word in the version-1 container layout."""
    return WORD_BITS // container_bits(bits)


def values_per_block(bits: int, dense: bool = False) -> int:
    """Codes per block of whole words: 32 (in ``bits`` words) when dense, else the codes of one word."""
    return WORD_BITS if is_dense(bits, dense) else values_per_word(bits)


def words_per_row(k_pad: int, bits: int, dense: bool = False) -> int:
    """int32 words of one packed row of ``k_pad`` codes: ``k_pad * storage_bits / 32``."""
    return k_pad * storage_bits(bits, dense) // WORD_BITS


def padded_k(k: int, bits: int, group_size: int | None, dense: bool = False) -> int:
    """K padded to a multiple of both the group size (if any) and the codes per block (their lcm)."""
    step = values_per_block(bits, dense)
    if group_size is not None:
        step = math.lcm(step, group_size)
    return -(-k // step) * step


def _to_int32(words: torch.Tensor) -> torch.Tensor:
    """int64 values in [0, 2^32) -> int32 two's complement."""
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def pack(codes: torch.Tensor, bits: int, dense: bool = False) -> torch.Tensor:
    """Pack unsigned codes ``(n, K_pad)`` (any integer dtype, values in [0, 2^bits-1]) into int32 words.

    Container layout: code ``j`` of a row sits in word ``j // v`` at bit offset ``(j % v) * c``, with
    ``c = container_bits(bits)`` and ``v = 32 / c``. Dense layout: each block of 32 codes is one stream of
    ``32 * bits`` bits over ``bits`` words, code ``i`` at stream bits ``[i*bits, (i+1)*bits)``.

    Args:
        codes: ``(n, K_pad)`` integer tensor, values in ``[0, 2^bits - 1]``; ``K_pad`` a multiple of
            ``values_per_block(bits, dense)`` (pad with :func:`padded_k` first).
        bits: code width, 1..8.
        dense: use the dense bit stream when ``bits`` is in :data:`DENSE_BITS` (3, 5, 6, 7); ignored for
            other widths, which the container layout already stores without waste.

    Returns:
        ``(n, K_pad * storage_bits(bits, dense) / 32)`` int32 words (the unsigned 32-bit pattern viewed as int32).

    Raises:
        ValueError: ``codes`` is not 2-D, ``K_pad`` is not a whole number of blocks, or a code is out of range.
        TypeError: ``codes`` is floating point or boolean.
    """
    if codes.dim() != 2:
        raise ValueError(f"pack expects a 2-D (rows, K) tensor of codes, got shape {tuple(codes.shape)}")
    if codes.dtype.is_floating_point or codes.dtype == torch.bool:
        raise TypeError(f"pack expects integer codes, got {codes.dtype}")
    vpb = values_per_block(bits, dense)
    n, kp = codes.shape
    if kp % vpb:
        raise ValueError(f"K={kp} is not a multiple of {vpb} codes per block for {bits}-bit codes; pad it first")
    c = codes.to(torch.int64)
    if c.numel() and (int(c.min()) < 0 or int(c.max()) > (1 << bits) - 1):
        raise ValueError(f"codes out of range for {bits} bits: expected 0..{(1 << bits) - 1}")
    if is_dense(bits, dense):
        blocks = c.view(n, kp // WORD_BITS, WORD_BITS)
        out = torch.zeros(n, kp // WORD_BITS, bits, dtype=torch.int64, device=codes.device)
        for i in range(WORD_BITS):  # code i of a block: stream bits [i*b, (i+1)*b)
            w, o = divmod(i * bits, WORD_BITS)
            out[:, :, w] += (blocks[:, :, i] << o) & 0xFFFFFFFF
            if o + bits > WORD_BITS:
                out[:, :, w + 1] += blocks[:, :, i] >> (WORD_BITS - o)
        return _to_int32(out.view(n, kp * bits // WORD_BITS))
    cb = container_bits(bits)
    shifts = torch.arange(vpb, device=codes.device, dtype=torch.int64) * cb
    words = (c.view(n, kp // vpb, vpb) << shifts).sum(dim=-1)  # < 2^32, exact in int64
    return _to_int32(words)


def _unpack_dense(words: torch.Tensor, bits: int) -> torch.Tensor:
    """The dense bit stream of ``(n, W)`` words -> ``(n, W * 32 / bits)`` uint8 codes.

    Code ``i`` of a row occupies bits ``[i * b, (i + 1) * b)`` of the row's stream, lowest bits first, continuing
    across words. On a little-endian machine the words' bytes are that stream in order, so every 8 codes are
    ``b`` consecutive bytes: they are joined into one integer ``v`` (int32 for b = 3, int64 above) and code ``j``
    of the 8 is ``(v >> (j * b)) & (2^b - 1)``. A big-endian machine takes the word-wise route.
    """
    n, w = words.shape
    mask = (1 << bits) - 1
    if n == 0:  # no rows: view(n, -1, bits) cannot infer its -1
        return torch.empty(0, w * 32 // bits, dtype=torch.uint8, device=words.device)
    if sys.byteorder == "little":
        by = words.contiguous().view(torch.uint8).view(n, -1, bits)  # (n, K/8, b) bytes per 8 codes
        wide = torch.int32 if bits * 8 <= 31 else torch.int64
        v = by[:, :, 0].to(wide)
        for t in range(1, bits):
            v = v | (by[:, :, t].to(wide) << (8 * t))
        codes = torch.empty(n, v.shape[1], 8, dtype=torch.uint8, device=words.device)
        for j in range(8):
            codes[:, :, j] = (v >> (j * bits)) & mask
        return codes.view(n, -1)
    blk = words.view(n, w // bits, bits).to(torch.int64) & 0xFFFFFFFF
    cols = []
    for i in range(WORD_BITS):
        wi, o = divmod(i * bits, WORD_BITS)
        val = blk[:, :, wi] >> o
        if o + bits > WORD_BITS:
            val = val | (blk[:, :, wi + 1] << (WORD_BITS - o))
        cols.append(val & mask)
    return torch.stack(cols, dim=-1).reshape(n, w // bits * WORD_BITS).to(torch.uint8)


def unpack(words: torch.Tensor, bits: int, k: int | None = None, dense: bool = False) -> torch.Tensor:
    """Inverse of :func:`pack`: ``(n, W)`` int32 -> ``(n, K_pad)`` uint8 codes (int16 never needed: b <= 8).

    Args:
        words: ``(n, W)`` int32 words written by :func:`pack` with the same ``bits`` and ``dense``.
        bits: code width, 1..8.
        k: keep the first ``k`` columns (drops the padding), ``0 <= k <= K_pad``; ``None`` keeps all ``K_pad``.
        dense: the words hold the dense bit stream (see :func:`pack`).

    Returns:
        ``(n, k or K_pad)`` uint8 codes.

    Raises:
        TypeError: ``words`` is not int32.
        ValueError: ``words`` is not 2-D, dense words whose row is not a whole number of ``bits``-word blocks, or
            ``k`` negative or more than the ``K_pad`` codes the words hold.
    """
    if words.dtype != torch.int32:
        raise TypeError(f"packed words must be int32, got {words.dtype}")
    if words.dim() != 2:
        raise ValueError(f"unpack expects 2-D (rows, words per row) int32 words as pack writes them, got shape "
                         f"{tuple(words.shape)} ({words.dim()}-D); view a single row as (1, W)")
    n, w = words.shape
    dense_words = is_dense(bits, dense)
    if dense_words and w % bits:
        raise ValueError(f"{w} words per row is not a whole number of {bits}-word blocks of dense {bits}-bit codes")
    if k is not None:
        k_pad = w * WORD_BITS // (bits if dense_words else container_bits(bits))
        if not 0 <= k <= k_pad:
            raise ValueError(f"k={k} out of range: {w} words per row hold {k_pad} {bits}-bit codes "
                             f"({'dense' if dense_words else 'container'} layout), so 0 <= k <= {k_pad}")
    if dense_words:
        codes = _unpack_dense(words, bits)
    else:
        cb = container_bits(bits)
        vpw = WORD_BITS // cb
        shifts = torch.arange(vpw, device=words.device, dtype=torch.int32) * cb
        mask = (1 << cb) - 1
        codes = ((words.unsqueeze(-1) >> shifts) & mask).reshape(n, w * vpw).to(torch.uint8)
    if k is not None:
        codes = codes[:, :k]
    return codes


def symmetric_params(bits: int) -> tuple[float, float]:
    """``(a, z)`` of a symmetric ``bits``-bit row: its weights are ``w = (u - z) * (a s)`` with ``z = 2^(b-1)``,
    ``a = 1``; 1-bit rows ``(2u - 1) * s`` = ``(u - 1/2) * (2 s)``: ``z = 1/2``, ``a = 2`` (both exact in float32).
    The one statement of the symmetric zero point that the reference and every CPU kernel read."""
    return (2.0, 0.5) if bits == 1 else (1.0, float(2 ** (bits - 1)))


def expand_params(p: torch.Tensor, scope: str, group_elems: int, n: int, k_pad: int) -> torch.Tensor:
    """Per-scope parameters (scales or zero points) -> one value per element of an ``(n, k_pad)`` matrix.

    Group scope: ``p`` is ``(n, k_pad / group_elems)`` and column ``j`` takes ``p[:, j // group_elems]``;
    channel ``(n, 1)`` and tensor ``(1, 1)`` parameters are broadcast.
    """
    if scope == "group":
        return p.repeat_interleave(group_elems, dim=1)
    return p.expand(n, k_pad)


def check_float_dtype(dtype, what: str) -> None:
    """Refuse a result dtype that is not a floating ``torch.dtype``: dequantized values cast to an integer, bool or
    complex dtype would be truncated (mostly 0) or changed, silently.

    Args:
        dtype: the requested dtype.
        what: the caller, named in the message.

    Raises:
        TypeError: ``dtype`` is not a floating ``torch.dtype``.
    """
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"{what}: dtype must be a floating torch.dtype (float16, bfloat16, float32, float64), got "
                        f"{dtype!r}: another dtype would truncate the dequantized values")


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
    with ``s``/``z`` of group ``j // group_elems``; float32 arithmetic, result in ``dtype`` (a floating dtype: an
    integer, bool or complex one raises ``TypeError``, as the weights would be truncated), padding dropped.
    """
    check_float_dtype(dtype, "dequantize_codes")
    n, kp = codes.shape
    sf = expand_params(scales.float(), scope, group_elems, n, kp)
    u = codes.float()
    if symmetric:
        a, z = symmetric_params(bits)
        w = (u - z) * (a * sf)
    else:
        assert zeros is not None, "asymmetric rows need their zero points"
        w = (u - expand_params(zeros.float(), scope, group_elems, n, kp)) * sf
    return w[:, :k].to(dtype)
