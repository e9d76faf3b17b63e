"""Edge inputs of the kernel helpers: malformed packed words, and per-row widths far above the float threshold."""
from __future__ import annotations

import re

import pytest
import torch

from medquant.kernels import fake_quantize_rows_reference
from medquant.kernels.layout import pack, unpack
from tests.kernels.kernel_helpers import bit_equal


@pytest.mark.parametrize("shape", [(), (8,), (2, 3, 4), (1, 2, 1, 4)])
@pytest.mark.parametrize("dense", [False, True])
def test_unpack_refuses_words_that_are_not_2d(shape, dense):
    """Words of any other rank were split with ``n, w = words.shape``: a bare 'not enough values to unpack'."""
    words = torch.zeros(shape, dtype=torch.int32)
    with pytest.raises(ValueError, match=r"2-D \(rows, words per row\).*got shape " + re.escape(str(shape))):
        unpack(words, 3, dense=dense)


def test_unpack_of_a_2d_view_still_matches_the_codes():
    """The rank check leaves 2-D words alone: a round trip gives the packed codes back."""
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 8, (3, 64), generator=g)
    for dense in (False, True):
        assert torch.equal(unpack(pack(codes, 3, dense=dense), 3, dense=dense), codes.to(torch.uint8))


@pytest.mark.parametrize("bits_value", [2**31, 2**31 + 4, 2**32 + 4, 2**62])
def test_triton_rows_wrapper_passes_huge_widths_through_like_the_reference(kernel_device, bits_value):
    """The Triton wrapper itself (output and straight-through mask) treats every width >= 16 as the torch
    reference does: the row is copied through and its mask is all True, however far the width is past int32."""
    from medquant.kernels.fakequant import fake_quantize_rows_triton

    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 37, generator=g)
    bits = torch.tensor([bits_value, 4, 8], dtype=torch.int64)
    y, mask = fake_quantize_rows_triton(x.to(kernel_device), bits, False, 1e-38, True)
    ref, ref_mask = fake_quantize_rows_reference(x, bits, False, eps=1e-38, return_mask=True)
    assert bit_equal(y.cpu(), ref)
    assert torch.equal(mask.cpu(), ref_mask)
    assert bit_equal(y[0].cpu(), x[0]) and bool(mask[0].all())
