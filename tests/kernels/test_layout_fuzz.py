"""Seeded fuzzing of :func:`pack` / :func:`unpack`, and the dense words against compressed-tensors' packer.

Independent reference: a row's words, read as unsigned little-endian 32-bit integers, are joined into one Python
integer ``S`` (word ``w`` at bits ``[32 w, 32 w + 32)``); the layout puts code ``k`` at ``(S >> (k * width)) &
(2^b - 1)`` with ``width`` the container width (version 1) or ``b`` (dense, version 2), and every other bit of
``S`` is 0. compressed-tensors' ``pack_to_int32`` (the ``pack-quantized`` format) packs the same bit stream for
every width 1..8, so its words are the first ``ceil(K * b / 32)`` of ours, padding bits included.
"""
from __future__ import annotations

import math
import random

import pytest
import torch

from medquant.kernels.layout import DENSE_BITS, pack, padded_k, unpack

CONTAINER = {1: 1, 2: 2, 3: 4, 4: 4, 5: 8, 6: 8, 7: 8, 8: 8}


def stream_codes(words: torch.Tensor, width: int, bits: int, count: int) -> tuple[list[list[int]], list[int]]:
    """Per row: the first ``count`` codes read from the row's bit stream, and the stream with those bits cleared."""
    codes, rest = [], []
    for row in words.tolist():
        s = sum((w & 0xFFFFFFFF) << (32 * i) for i, w in enumerate(row))
        got = [(s >> (j * width)) & ((1 << bits) - 1) for j in range(count)]
        for j, u in enumerate(got):
            s &= ~(u << (j * width))
        codes.append(got)
        rest.append(s)
    return codes, rest


def fuzz_cases(bits: int, dense: bool):
    """``(n, k, group_size, codes)`` cases: K = 1, K just below / above a block, rows 0 / 1 / a few, codes all at
    the maximum ``2^b - 1`` (every position) and random codes with random positions forced to the maximum."""
    rng = random.Random(1000 * bits + dense)
    top = (1 << bits) - 1
    shapes = [(1, 1, None), (0, 1, None), (1, 31, None), (1, 33, None), (0, 0, None), (2, 0, 32), (1, 32, 32),
              (3, 7, 128), (1, 65, 64), (4, 95, None)]
    shapes += [(rng.choice([0, 1, 1, 2, 3, 5]), rng.randint(1, 200), rng.choice([None, 32, 64, 128, 24]))
               for _ in range(14)]
    for n, k, gs in shapes:
        yield n, k, gs, [[top] * k for _ in range(n)]  # the largest code in every position
        codes = [[rng.randint(0, top) for _ in range(k)] for _ in range(n)]
        for row in codes:
            for j in rng.sample(range(k), k // 3):
                row[j] = top
        yield n, k, gs, codes


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("dense", [False, True])
def test_fuzz_pack_unpack_round_trip_and_bit_positions(bits, dense):
    """Every width and layout: the words hold code ``k`` at stream bits ``[k w, k w + b)`` and nothing else (the
    padding is 0), have the documented shape, and ``unpack`` (with and without ``k``) gives the codes back."""
    width = bits if dense and bits in DENSE_BITS else CONTAINER[bits]
    block = 32 if dense and bits in DENSE_BITS else 32 // width
    n_cases = 0
    for n, k, gs, rows in fuzz_cases(bits, dense):
        case = f"bits={bits} dense={dense} n={n} k={k} group={gs}"
        kp = padded_k(k, bits, gs, dense)
        assert kp >= k and kp % block == 0 and (gs is None or kp % gs == 0) and kp - k < math.lcm(block, gs or 1)
        codes = torch.zeros(n, kp, dtype=torch.int64)
        if n and k:
            codes[:, :k] = torch.tensor(rows, dtype=torch.int64)
        words = pack(codes, bits, dense=dense)
        assert words.dtype == torch.int32 and tuple(words.shape) == (n, kp * width // 32), case
        got, rest = stream_codes(words, width, bits, k)
        assert got == rows, case
        assert all(r == 0 for r in rest), case  # container high bits and padding codes are 0
        back = unpack(words, bits, k, dense=dense)
        assert back.dtype == torch.uint8 and torch.equal(back.long(), codes[:, :k]), case
        assert torch.equal(unpack(words, bits, dense=dense).long(), codes), case
        n_cases += 1
    assert n_cases == 48


def ct_pack():
    return pytest.importorskip("compressed_tensors.compressors.pack_quantized.helpers")


@pytest.mark.parametrize("bits", range(1, 9))
def test_dense_words_equal_compressed_tensors_bit_for_bit(bits):
    """For every width compressed-tensors packs (1..8): ``pack_to_int32`` of the signed values ``q`` equals the
    first ``ceil(K b / 32)`` words of :func:`pack` of ``u = q + 2^(b-1)`` (dense for 3/5/6/7, the container layout
    is the same stream for 1/2/4/8), including the zero bits padding the last word; the rest of our row is 0; and
    :func:`unpack` reads compressed-tensors' words (zero-extended to whole blocks) back to ``u``."""
    helpers = ct_pack()
    g = torch.Generator().manual_seed(100 + bits)
    half = 1 << (bits - 1)
    for n, k in [(1, 1), (3, 7), (2, 31), (2, 32), (1, 33), (4, 50), (2, 64), (3, 97), (1, 200), (0, 40)]:
        for extreme in (False, True):
            q = torch.randint(-half, half, (n, k), generator=g)
            if extreme:  # the largest code (q = 2^(b-1) - 1) in every position, and the smallest in row 0
                q.fill_(half - 1)
                if n:
                    q[0] = -half
            theirs = helpers.pack_to_int32(q.to(torch.int8), bits)
            need = -(-k * bits // 32)
            case = f"bits={bits} n={n} k={k} extreme={extreme}"
            assert theirs.dtype == torch.int32 and tuple(theirs.shape) == (n, need), case
            kp = padded_k(k, bits, None, dense=True)
            codes = torch.zeros(n, kp, dtype=torch.int64)
            codes[:, :k] = q + half
            ours = pack(codes, bits, dense=True)
            assert torch.equal(ours[:, :need], theirs), case
            assert not ours[:, need:].any(), case
            full = torch.zeros_like(ours)
            full[:, :need] = theirs
            assert torch.equal(unpack(full, bits, k, dense=True).long(), codes[:, :k]), case
            if n:  # and their unpacker reads our words
                back = helpers.unpack_from_int32(ours[:, :need].contiguous(), bits, torch.Size((n, k)))
                assert torch.equal(back.long(), q), case
