"""Independent numpy reference for the packed layout and quantization formulas (SPEC section 1).

Written from the SPEC text, sharing no code with medquant: used as the oracle in the quant tests.
"""
from __future__ import annotations

import numpy as np

CONTAINER = {1: 1, 2: 2, 3: 4, 4: 4, 5: 8, 6: 8, 7: 8, 8: 8}


DENSE = (3, 5, 6, 7)  # widths a layout-2 (format version 2) layer stores as one bit stream per row


def np_unpack(words: np.ndarray, bits: int, k: int, dense: bool = False) -> np.ndarray:
    """int32 words (n, W) -> codes (n, k), lowest K index in the lowest bits.

    ``dense`` (3/5/6/7 bits): the row's words form one little-endian bit stream (bit ``p`` of the stream is bit
    ``p % 32`` of word ``p // 32``) and code ``j`` is stream bits ``j*b .. j*b + b - 1``; read bit by bit here.
    """
    if dense and bits in DENSE:
        w = words.astype(np.int64) & 0xFFFFFFFF
        n = w.shape[0]
        stream = ((w[:, :, None] >> np.arange(32)) & 1).reshape(n, -1)  # (n, W*32) bits, stream order
        n_codes = stream.shape[1] // bits
        per_code = stream[:, : n_codes * bits].reshape(n, n_codes, bits)
        return (per_code << np.arange(bits)).sum(-1)[:, :k]
    cb = CONTAINER[bits]
    vpw = 32 // cb
    w = words.astype(np.int64) & 0xFFFFFFFF  # unsigned view
    n = w.shape[0]
    out = np.zeros((n, w.shape[1] * vpw), dtype=np.int64)
    for j in range(vpw):
        out[:, j::vpw] = (w >> (j * cb)) & ((1 << cb) - 1)
    return out[:, :k]


def np_dequant(codes, scales, zeros, bits, symmetric, scope, group_size, k):
    """(u - z) * s per element; z = 2^(b-1) for symmetric (1-bit symmetric: (2u-1)*s)."""
    n = codes.shape[0]
    s = np.asarray(scales, dtype=np.float64)
    if scope == "group":
        col_group = np.arange(k) // group_size
        s_full = s[:, col_group]
    else:
        s_full = np.broadcast_to(s, (n, k))  # (n, 1) per channel or (1, 1) per tensor
    u = codes.astype(np.float64)
    if symmetric:
        if bits == 1:
            return (2 * u - 1) * s_full
        return (u - 2 ** (bits - 1)) * s_full
    z = np.asarray(zeros, dtype=np.float64)
    z_full = z[:, np.arange(k) // group_size] if scope == "group" else np.broadcast_to(z, (n, k))
    return (u - z_full) * s_full


def np_dequant_layer(layer) -> np.ndarray:
    """Dense float64 weight of a QuantLinear/QuantConv2d, read from its stored buffers only."""
    cfg = layer.config
    sd = {k_: v.detach().cpu() for k_, v in layer.state_dict().items()}
    n, k = layer.out_rows, layer.k
    if cfg.channel_bits is None:
        row_bits = np.full(n, cfg.bits)
    else:
        row_bits = sd["bit_map"].numpy().astype(np.int64)
    w = np.zeros((n, k))
    for b in sorted(set(row_bits.tolist())):
        rows = np.nonzero(row_bits == b)[0]
        if 1 <= b <= 8:
            codes = np_unpack(sd[f"qweight_{b}"].numpy(), b, k, getattr(layer, "layout_version", 1) >= 2)
            sym = cfg.symmetric if cfg.symmetric is not None else b > 3
            zeros = sd[f"zeros_{b}"].float().numpy() if not sym else None
            w[rows] = np_dequant(codes, sd[f"scales_{b}"].float().numpy(), zeros, b, sym, cfg.scope,
                                 cfg.group_size, k)
        elif b in (16, 32):
            w[rows] = sd[f"fweight_{b}"].double().numpy()
    return w
