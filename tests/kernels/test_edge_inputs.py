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


@pytest.mark.parametrize("bits_value", [2**31, 2**31 + 4, 2**32 + 4, 2**62, 2**63 - 1, 2**64 + 4, 2**100])
def test_huge_widths_in_a_list_pass_through_like_the_tensor(bits_value):
    """A list of widths with one far past int32 (it was built as int32: 'value cannot be converted to type int32
    without overflow', and past int64 'Overflow when unpacking long long') gives what the int64 tensor of the same
    widths gives (the row copied, mask all True) and what plain copying gives, in the reference and the public op."""
    from medquant.kernels import fake_quantize_rows

    g = torch.Generator().manual_seed(2)
    x = torch.randn(3, 37, generator=g)
    as_list = [bits_value, 4, 8]
    as_tensor = torch.tensor([min(bits_value, 2**63 - 1), 4, 8], dtype=torch.int64)
    for sym in (False, True):
        ref, ref_mask = fake_quantize_rows_reference(x, as_tensor, sym, return_mask=True)
        out, mask = fake_quantize_rows_reference(x, as_list, sym, return_mask=True)
        assert bit_equal(out, ref) and torch.equal(mask, ref_mask)
        assert bit_equal(out[0], x[0]) and bool(mask[0].all())
        assert bit_equal(fake_quantize_rows(x, as_list, sym, backend="torch"), ref)
        assert bit_equal(fake_quantize_rows(x, as_tensor, sym, backend="torch"), ref)


def test_list_widths_quantize_like_the_tensor():
    """Ordinary widths given as a list, a tuple, numpy ints or 0-d tensors quantize exactly as the int tensor."""
    import numpy as np

    g = torch.Generator().manual_seed(3)
    x = torch.randn(4, 29, generator=g)
    widths = [3, 16, 8, 2]
    ref = fake_quantize_rows_reference(x, torch.tensor(widths), False)
    for given in (widths, tuple(widths), [np.int64(b) for b in widths], [torch.tensor(b) for b in widths]):
        assert bit_equal(fake_quantize_rows_reference(x, given, False), ref), given


@pytest.mark.parametrize("bad", [[4.7, 4, 8], [4.0, 4, 8], [True, 4, 8], ["4", 4, 8], [[4], 4, 8]])
def test_non_integer_widths_in_a_list_are_refused_like_the_tensor(bad):
    """A float tensor or a bool tensor of widths is refused with a TypeError; the same widths in a list were
    silently truncated (4.7 -> 4 bits) or taken as 1 bit (True)."""
    from medquant.kernels import fake_quantize_rows

    x = torch.randn(3, 8)
    with pytest.raises(TypeError, match=r"bits_per_row.*integer.*got"):
        fake_quantize_rows_reference(x, bad, False)
    with pytest.raises(TypeError, match=r"bits_per_row.*integer.*got"):
        fake_quantize_rows(x, bad, False, backend="torch")


def test_huge_negative_width_in_a_list_is_a_value_error():
    """Widths below the accepted range, however far, are a ValueError naming the accepted range."""
    x = torch.randn(2, 8)
    for low in (-(2**40), -(2**70)):
        with pytest.raises(ValueError, match=r"accepted: 1\.\.8"):
            fake_quantize_rows_reference(x, [low, 4], False)
