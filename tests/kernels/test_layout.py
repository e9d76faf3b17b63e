"""The packed layout (:mod:`medquant.kernels.layout`) against an independent numpy packer written from its rules.

Container layout (version 1): code ``k`` of a row sits in word ``k // v`` at bit ``(k % v) * c``, ``c`` the
container width (1, 2, 4, 4, 8, 8, 8, 8 for 1..8 bits) and ``v = 32 / c``. Dense layout (version 2, 3/5/6/7 bits):
code ``k`` occupies bits ``[k*b, (k+1)*b)`` of the row's bit stream, lowest bits first, continuing across words, and
stream bit ``p`` is bit ``p % 32`` of word ``p // 32`` (compressed-tensors' ``pack-quantized`` order). The oracle
sets every bit one at a time, so it shares no arithmetic with :func:`pack`.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from medquant.kernels.layout import DENSE_BITS, pack, padded_k, unpack

CONTAINER = {1: 1, 2: 2, 3: 4, 4: 4, 5: 8, 6: 8, 7: 8, 8: 8}


def numpy_pack(codes: np.ndarray, bits: int, dense: bool) -> np.ndarray:
    """``(n, K)`` codes -> ``(n, ceil(K * width / 32))`` int32 words, one bit at a time."""
    n, k = codes.shape
    width = bits if dense and bits in DENSE_BITS else CONTAINER[bits]
    out = np.zeros((n, -(-k * width // 32)), dtype=np.uint64)
    for r in range(n):
        for j in range(k):
            for t in range(bits):  # the bits above `bits` of a container stay 0
                if (int(codes[r, j]) >> t) & 1:
                    p = j * width + t
                    out[r, p // 32] |= np.uint64(1 << (p % 32))
    return out.astype(np.uint32).view(np.int32)


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("dense", [False, True])
def test_pack_matches_the_bitwise_oracle_and_round_trips(bits, dense):
    """Every width, K not a multiple of 32 nor of the group, odd N and empty dims: the words are the oracle's
    (then zeros for the padding) and ``unpack`` gives the codes back."""
    rng = np.random.default_rng(bits * 2 + dense)
    for n, k, gs in [(3, 45, 24), (1, 31, 32), (5, 100, 128), (7, 33, None), (0, 40, 32), (3, 0, 32), (0, 0, None)]:
        kp = padded_k(k, bits, gs, dense)
        assert kp >= k and (gs is None or kp % gs == 0)
        codes = np.zeros((n, kp), dtype=np.int64)
        codes[:, :k] = rng.integers(0, 2**bits, (n, k))
        codes[:, :k][:, :2] = 2**bits - 1  # all bits set: a sign or carry mistake shows
        words = pack(torch.from_numpy(codes), bits, dense=dense)
        want = numpy_pack(codes[:, :k], bits, dense)
        case = f"bits={bits} dense={dense} n={n} k={k} group={gs}"
        assert words.dtype == torch.int32 and words.shape[0] == n, case
        assert np.array_equal(words.numpy()[:, : want.shape[1]], want), case
        assert not words.numpy()[:, want.shape[1]:].any(), case  # padding codes are 0
        assert np.array_equal(unpack(words, bits, k, dense=dense).numpy(), codes[:, :k]), case
        assert np.array_equal(unpack(words, bits, dense=dense).numpy(), codes), case


@pytest.mark.parametrize("bits", DENSE_BITS)
def test_dense_words_are_compressed_tensors_words(bits):
    """compressed-tensors' own packer gives the same words (offset codes ``u = q + 2^(b-1)``), for K a multiple
    of 32 and not."""
    helpers = pytest.importorskip("compressed_tensors.compressors.pack_quantized.helpers")
    g = torch.Generator().manual_seed(bits)
    for k in (64, 50, 7):
        q = torch.randint(-(2 ** (bits - 1)), 2 ** (bits - 1), (3, k), generator=g)
        theirs = helpers.pack_to_int32(q.to(torch.int8), bits).to(torch.int32)
        codes = torch.zeros(3, padded_k(k, bits, None, dense=True), dtype=torch.int64)
        codes[:, :k] = q + 2 ** (bits - 1)
        ours = pack(codes, bits, dense=True)
        assert torch.equal(ours[:, : theirs.shape[1]], theirs), f"bits={bits} k={k}"


def test_non_contiguous_codes_and_words():
    """Strided codes pack like their contiguous copy; strided words unpack like theirs."""
    g = torch.Generator().manual_seed(3)
    for bits, dense in [(3, True), (4, False), (7, True), (5, False)]:
        codes = torch.randint(0, 2**bits, (64, 5), generator=g).t()  # (5, 64), column-major
        words = pack(codes, bits, dense=dense)
        assert torch.equal(words, pack(codes.contiguous(), bits, dense=dense))
        assert torch.equal(unpack(words[::2], bits, dense=dense), unpack(words, bits, dense=dense)[::2])
