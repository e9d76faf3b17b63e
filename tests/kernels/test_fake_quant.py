"""Fake-quant kernels (interpreted on CPU) against the torch references: bit-exact values and STE gradients."""
from __future__ import annotations

import pytest
import torch

from medquant.kernels import (
    fake_quantize_rows,
    fake_quantize_rows_reference,
    fake_quantize_static,
    fake_quantize_static_reference,
)
from medquant.quant import QuantConfig
from medquant.quant.core import compute_qparams, fake_quantize
from tests.kernels.kernel_helpers import bit_equal


def _rows_input(dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 300, generator=g) * torch.tensor([1, 0.01, 100, 1, 1, 3, 1, 1e-30])[:, None]
    x[3] = 0.0                       # all-zero row: s = eps, exact zeros, no NaN
    x[4] = 2.5                       # constant row
    x[6] = x[6].abs() + 0.1          # positive row: range widened to include 0
    return x.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("symmetric", [False, True])
def test_rows_bit_exact(kernel_device, dtype, symmetric):
    x = _rows_input(dtype).to(kernel_device)
    bits = torch.tensor([2, 3, 4, 8, 5, 32, 6, 16] if not symmetric else [2, 3, 4, 8, 5, 32, 7, 16])
    y = fake_quantize_rows(x, bits, symmetric, backend="triton")
    ref = fake_quantize_rows_reference(x.cpu(), bits, symmetric)
    assert bit_equal(y.cpu(), ref)
    assert torch.isfinite(y).all()
    assert bool((y[3] == 0).all()) and bit_equal(y[5].cpu(), x[5].cpu()) and bit_equal(y[7].cpu(), x[7].cpu())


def test_rows_one_bit_asymmetric_and_levels(kernel_device):
    x = _rows_input().to(kernel_device)
    bits = [1, 2, 3, 4, 5, 6, 7, 8]
    y = fake_quantize_rows(x, bits, False, backend="triton")
    assert bit_equal(y.cpu(), fake_quantize_rows_reference(x.cpu(), bits, False))
    for r, b in enumerate(bits):  # at most 2^b distinct levels per row
        assert y[r].unique().numel() <= 2**b


def test_rows_ties_round_half_to_even(kernel_device):
    # row range [-10, 5] with 4 bits -> s = 1 exactly; quarter steps hit every kind of tie
    x = (torch.arange(-40, 21).float() * 0.25).repeat(2, 1).to(kernel_device)
    for sym, bits in [(False, [4, 4]), (True, [5, 5])]:
        y = fake_quantize_rows(x, bits, sym, backend="triton")
        assert bit_equal(y.cpu(), fake_quantize_rows_reference(x.cpu(), bits, sym))
    y = fake_quantize_rows(x, [4, 4], False, backend="triton")
    assert y[0, 40 + 2].item() == 0.0 and y[0, 40 + 6].item() == 2.0  # 0.5 -> 0, 1.5 -> 2


def test_rows_long_rows_use_several_chunks(kernel_device):
    x = torch.randn(2, 8192 + 77).to(kernel_device)
    x[1, -1] = 40.0  # the extreme value sits in the last chunk
    for sym in (False, True):
        y = fake_quantize_rows(x, [3, 8], sym, backend="triton")
        assert bit_equal(y.cpu(), fake_quantize_rows_reference(x.cpu(), [3, 8], sym))


def test_rows_nd_input_and_gradients(kernel_device):
    x = (torch.randn(4, 3, 5, 7) * 2).to(kernel_device).requires_grad_(True)
    bits = [2, 4, 8, 32]
    for mask in (False, True):
        x.grad = None
        y = fake_quantize_rows(x, bits, False, mask_outside=mask, backend="triton")
        assert y.shape == x.shape
        g = torch.randn_like(y)
        y.backward(g)
        if not mask:
            assert bit_equal(x.grad, g)  # straight through
        else:
            _, inside = fake_quantize_rows_reference(x.detach().cpu(), bits, False, return_mask=True)
            assert bit_equal(x.grad.cpu(), g.cpu() * inside.to(g.dtype))


def test_rows_mask_matches_reference_when_clamping(kernel_device):
    # symmetric rows clamp nothing by construction, but tiny eps-dominated rows do; compare the masks directly
    from medquant.kernels.fakequant import fake_quantize_rows_triton

    x = _rows_input()
    x[0, 0] = -1e3  # asymmetric: z rounding can push the top code past 2^b - 1
    for sym in (False, True):
        bits = torch.tensor([2, 3, 4, 8, 5, 32, 6, 16])
        _, m_k = fake_quantize_rows_triton(x.to(kernel_device), bits.to(kernel_device), sym, 1e-38, True)
        _, m_r = fake_quantize_rows_reference(x, bits, sym, eps=1e-38, return_mask=True)
        assert torch.equal(m_k.cpu(), m_r)


CONFIGS = [
    QuantConfig(4, scope="group", group_size=32),
    QuantConfig(2, scope="channel"),
    QuantConfig(3, scope="group", group_size=64),
    QuantConfig(8, scope="tensor", symmetric=False),
    QuantConfig(8, scope="channel", scale_dtype="bfloat16"),
    QuantConfig(1, scope="group", group_size=128, symmetric=True),
    QuantConfig(6, scope="group", group_size=128, scale_dtype="float32", symmetric=False),
]


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: f"{c.bits}b-{c.scope}{c.group_size if c.scope == 'group' else ''}"
                         f"-{c.scale_dtype}-{'sym' if c.is_symmetric() else 'asym'}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_static_matches_core_fake_quantize(kernel_device, cfg, dtype):
    w = (torch.randn(17, 100, generator=torch.Generator().manual_seed(1)) * 0.3).to(dtype)
    s, z, _ = compute_qparams(w, cfg.bits, cfg.is_symmetric(), cfg.scope, cfg.group_size, cfg.torch_scale_dtype)
    gs = cfg.group_size if cfg.scope == "group" else None
    y = fake_quantize_static(w.to(kernel_device), s.to(kernel_device), None if z is None else z.to(kernel_device),
                             cfg.bits, cfg.is_symmetric(), gs, backend="triton")
    assert bit_equal(y.cpu(), fake_quantize(w, cfg))
    assert bit_equal(y.cpu(), fake_quantize_static_reference(w, s, z, cfg.bits, cfg.is_symmetric(), gs))


def test_static_gradients_match_core_ste(kernel_device):
    cfg = QuantConfig(3, scope="group", group_size=32)
    w = torch.randn(9, 70)
    s, z, _ = compute_qparams(w, 3, False, "group", 32, torch.float16)
    s_small = (s.float() * 0.5).half()  # halve the scales so the clamp cuts values off
    for mask in (False, True):
        wk = w.clone().to(kernel_device).requires_grad_(True)
        y = fake_quantize_static(wk, s_small.to(kernel_device), z.to(kernel_device), 3, False, 32,
                                 mask_outside=mask, backend="triton")
        y.sum().backward()
        _, inside = fake_quantize_static_reference(w, s_small, z, 3, False, 32, return_mask=True)
        assert bool((~inside).any())
        expected = inside.float() if mask else torch.ones_like(w)
        assert torch.equal(wk.grad.cpu(), expected)
    # with the true scales, masking matches core.fake_quantize(mask_outside=True)
    wk = w.clone().to(kernel_device).requires_grad_(True)
    fake_quantize_static(wk, s.to(kernel_device), z.to(kernel_device), 3, False, 32, mask_outside=True,
                         backend="triton").sum().backward()
    wc = w.clone().requires_grad_(True)
    fake_quantize(wc, cfg, mask_outside=True).sum().backward()
    assert torch.equal(wk.grad.cpu(), wc.grad)


def test_static_ties_round_half_to_even(kernel_device):
    x = (torch.arange(-24, 25).float() * 0.25).reshape(1, -1).to(kernel_device)
    s = torch.full((1, 1), 0.5, device=kernel_device)  # x / s = k / 2: every half-integer is a tie
    y = fake_quantize_static(x, s, None, 8, True, backend="triton")
    assert bit_equal(y.cpu(), (torch.round(x.cpu() / 0.5) + 0.0) * 0.5)


def test_bad_inputs_are_rejected(kernel_device):
    x = torch.randn(4, 10, device=kernel_device)
    with pytest.raises(ValueError, match="bits_per_row has values"):
        fake_quantize_rows(x, [2, 9, 4, 4], False, backend="triton")
    with pytest.raises(ValueError, match="bits_per_row has values"):
        fake_quantize_rows(x, [1, 4, 4, 4], True, backend="torch")
    with pytest.raises(ValueError, match="one entry per row"):
        fake_quantize_rows(x, [2, 4], False, backend="triton")
    with pytest.raises(TypeError, match="float16, bfloat16, float32 or float64"):
        fake_quantize_rows(x.int(), [2, 4, 4, 4], False)
    with pytest.raises(TypeError, match="float16, bfloat16 or float32"):  # the kernels take no float64
        fake_quantize_rows(x.double(), [2, 4, 4, 4], False, backend="triton")
    with pytest.raises(TypeError, match="float16, bfloat16 or float32"):
        fake_quantize_static(x.double(), torch.ones(4, 1, device=kernel_device), None, 4, True)
    s = torch.ones(4, 1, device=kernel_device)
    with pytest.raises(ValueError, match="zero points"):
        fake_quantize_static(x, s, None, 4, False, backend="triton")
    with pytest.raises(ValueError, match="out of range"):
        fake_quantize_static(x, s, None, 0, True, backend="triton")
    with pytest.raises(ValueError, match="group scales"):
        fake_quantize_static(x, s, None, 4, True, group_size=4, backend="triton")


def test_rows_float64_is_quantized_in_float32():
    """float64 rows (the adaptive quantizer accepts them) take the float32 arithmetic and come back as float64;
    ``"auto"`` runs the torch reference for them, also where the Triton kernels would run."""
    x = torch.randn(5, 33, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    bits = [1, 3, 8, 16, 32]
    y = fake_quantize_rows(x, bits, False)
    assert y.dtype == torch.float64
    ref = fake_quantize_rows_reference(x.float(), bits, False).double()
    assert torch.equal(y[:3], ref[:3])
    assert torch.equal(y[3:], x[3:])  # passthrough keeps the float64 values, not their float32 rounding


def _same_with_nan(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal values, NaN in the same places (the NaN bit patterns may differ)."""
    return torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(nan=0.0), b.nan_to_num(nan=0.0))


def test_nan_and_inf_propagate_as_in_the_reference(kernel_device):
    """A NaN / inf input (or a zero / infinite static scale) gives what the torch reference gives: NaN where it
    does. Triton's min / max drop a NaN operand by default, so the kernels turned a NaN into a clamp bound and
    quantized the rest of its row with a NaN-free range."""
    inf, nan = float("inf"), float("nan")
    x = torch.tensor([[nan, 1, 2, 3], [inf, 1, 2, 3], [-inf, 1, 2, 3], [inf, -inf, nan, 0], [1.5, -2.5, 0.5, 3.0]])
    x = x.to(kernel_device)
    for sym, bits in ((True, 4), (False, 4), (False, 1), (True, 8)):
        b = [bits] * len(x)
        got = fake_quantize_rows(x, b, sym, backend="triton").cpu()
        assert got[0].isnan().all() and _same_with_nan(got, fake_quantize_rows(x.cpu(), b, sym, backend="torch"))
    for sym, scale in ((True, 0.5), (False, 0.5), (True, 0.0), (False, inf)):
        s = torch.full((len(x), 1), scale, device=kernel_device)
        z = None if sym else torch.full((len(x), 1), 8.0, device=kernel_device)
        got = fake_quantize_static(x, s, z, 4, sym, backend="triton").cpu()
        want = fake_quantize_static(x.cpu(), s.cpu(), None if z is None else z.cpu(), 4, sym, backend="torch")
        assert got[0, 0].isnan() and _same_with_nan(got, want)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_rows_one_int_is_the_bit_width_of_every_row(kernel_device, backend):
    """``bits_per_row`` may be one int (a Python or numpy int, or a 0-d integer tensor) for every row, as the
    docstrings say; it quantizes exactly as the same width repeated per row (it raised "'int' object is not
    iterable")."""
    import numpy as np

    x = _rows_input().to(kernel_device)
    for sym, b in ((False, 3), (True, 5), (False, 32)):
        want = fake_quantize_rows(x, [b] * len(x), sym, backend=backend)
        for one in (b, np.int64(b), torch.tensor(b)):
            assert bit_equal(fake_quantize_rows(x, one, sym, backend=backend).cpu(), want.cpu()), (sym, one)
        assert bit_equal(fake_quantize_rows_reference(x.cpu(), b, sym), want.cpu())
    with pytest.raises(ValueError, match="bits_per_row has values"):
        fake_quantize_rows(x, 9, False, backend=backend)
    with pytest.raises(TypeError, match="bits_per_row"):
        fake_quantize_rows(x, True, False, backend=backend)  # a bool is not a bit-width


@pytest.mark.parametrize("backend", ["auto", "torch", "triton"])
def test_empty_inputs_keep_their_shape_and_dtype(kernel_device, backend):
    """No rows (an empty batch of ``(0, T, C)`` activations, a conv weight without output channels) or no columns:
    an empty result of ``x``'s shape and dtype. Reshaping to ``(0, -1)`` raised, and the Triton kernels returned
    their float32 buffer for bfloat16 under the interpreter."""
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for shape in ((0, 3, 4), (2, 0), (0, 5), (3, 0, 2)):
            x = torch.randn(shape).to(dtype).to(kernel_device)
            y = fake_quantize_rows(x, [4] * shape[0], False, backend=backend)
            assert y.shape == x.shape and y.dtype == dtype, (shape, dtype, "rows")
            y = fake_quantize_static(x, torch.ones(shape[0], 1, device=kernel_device), None, 4, True,
                                     backend=backend)
            assert y.shape == x.shape and y.dtype == dtype, (shape, dtype, "static")
    w = torch.zeros(0, 3, 2, 2, device=kernel_device)  # a Conv2d weight without output channels
    assert fake_quantize_static(w, torch.ones(0, 1, device=kernel_device), torch.zeros(0, 1, device=kernel_device),
                                4, False, backend=backend).shape == w.shape


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_static_bits_and_group_size_are_not_coerced(kernel_device, backend):
    """A fractional bit-width or a group size that is not a positive int is refused, as by the reference, rather
    than truncated (``bits=4.7`` ran at 4 bits) or read as "no groups" (``group_size=-1`` / ``0``). Integer types
    other than ``int`` (numpy ints) are accepted."""
    import numpy as np

    x = torch.randn(4, 64, device=kernel_device)
    s = torch.full((4, 1), 0.1, device=kernel_device)
    sg = torch.full((4, 2), 0.1, device=kernel_device)
    for bad in (4.7, 4.0, True, "4"):
        with pytest.raises(TypeError, match="bits must be an int"):
            fake_quantize_static(x, s, None, bad, True, backend=backend)
    for bad in (-1, 0, 32.0, True):
        with pytest.raises(ValueError, match="group_size must be a positive int"):
            fake_quantize_static(x, sg, None, 4, True, group_size=bad, backend=backend)
    want = fake_quantize_static_reference(x.cpu(), sg.cpu(), None, 4, True, 32)
    got = fake_quantize_static(x, sg, None, np.int64(4), True, group_size=np.int32(32), backend=backend)
    assert bit_equal(got.cpu(), want)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_huge_bit_widths_pass_through_on_every_backend(kernel_device, backend):
    """Any width >= 16 leaves its row in floating point. The Triton kernel converted the widths to int32, so
    2**32 + 4 wrapped to 4 and that row was quantized at 4 bits (the reference passed it through)."""
    x = _rows_input().to(kernel_device)
    bits = torch.tensor([2**32 + 4, 2**31, 4] + [32] * (len(x) - 3))
    out = fake_quantize_rows(x, bits, False, backend=backend)
    assert bit_equal(out[:2].cpu(), x[:2].cpu())
    assert bit_equal(out.cpu(), fake_quantize_rows_reference(x.cpu(), bits, False))
