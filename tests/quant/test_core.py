"""Quantization primitives against the formulas of :mod:`medquant.quant.core` (an independent numpy
reference), with hypothesis property tests."""
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from medquant.kernels.layout import container_bits, padded_k
from medquant.quant import QuantConfig, QuantLinear, dequantize, fake_quantize, pack, quantize, unpack
from tests.quant.np_reference import np_unpack

SETTINGS = settings(max_examples=40, deadline=None)


@SETTINGS
@given(bits=st.integers(1, 8), rows=st.integers(1, 5), words=st.integers(1, 4), seed=st.integers(0, 2**31 - 1))
def test_pack_unpack_exact_every_width(bits, rows, words, seed):
    vpw = 32 // container_bits(bits)
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 2**bits, (rows, words * vpw), generator=g, dtype=torch.int32)
    packed = pack(codes, bits)
    assert packed.dtype == torch.int32 and packed.shape == (rows, words)
    assert torch.equal(unpack(packed, bits).to(torch.int32), codes)
    # the independent reader agrees on the bit layout (lowest K index in the lowest bits)
    assert np.array_equal(np_unpack(packed.numpy(), bits, words * vpw), codes.numpy())


@pytest.mark.parametrize("bits", [3, 5, 6, 7])
@pytest.mark.parametrize("k", [32, 96, 200])
def test_dense_words_are_compressed_tensors_pack_quantized_words(bits, k):
    """Format version 2: the dense words of 3/5/6/7-bit codes equal compressed-tensors' ``pack_to_int32`` (signed
    values ``q = u - 2^(b-1)``, packed along K) word for word; K not a multiple of 32 is zero-padded here, so its
    ``ceil(K*b/32)`` words are the first of each row."""
    ct = pytest.importorskip("compressed_tensors.compressors.pack_quantized.helpers")
    g = torch.Generator().manual_seed(bits * 1000 + k)
    codes = torch.randint(0, 2**bits, (6, k), generator=g, dtype=torch.int32)
    kp = padded_k(k, bits, None, dense=True)
    assert kp % 32 == 0 and kp - k < 32
    ours = pack(torch.nn.functional.pad(codes, (0, kp - k)), bits, dense=True)
    assert ours.shape == (6, kp * bits // 32)
    theirs = ct.pack_to_int32((codes - 2 ** (bits - 1)).to(torch.int8), bits)
    assert torch.equal(ours[:, : theirs.shape[1]], theirs)
    assert torch.equal(unpack(ours, bits, k, dense=True).to(torch.int32), codes)
    back = ct.unpack_from_int32(ours[:, : theirs.shape[1]], bits, torch.Size((6, k)))
    assert torch.equal(back.to(torch.int32) + 2 ** (bits - 1), codes)
    # the independent bit-by-bit reader agrees
    assert np.array_equal(np_unpack(ours.numpy(), bits, k, dense=True), codes.numpy())


def test_dense_3bit_layout_by_hand():
    """32 three-bit codes in three words: code i at stream bits 3i..3i+2; code 10 straddles words 0 and 1."""
    codes = torch.zeros(1, 32, dtype=torch.int32)
    codes[0, 0], codes[0, 10], codes[0, 31] = 5, 6, 7  # 6 = 0b110: bits 30, 31 of word 0 get 0, 1; bit 0 of word 1: 1
    w = [int(v) & 0xFFFFFFFF for v in pack(codes, 3, dense=True)[0]]
    assert w == [5 | (1 << 31), 1, 7 << 29]
    assert pack(codes, 3).shape == (1, 4) and pack(codes, 4).shape == (1, 4)  # version 1: a 4-bit container


def test_layout_lowest_index_in_lowest_bits():
    codes = torch.tensor([[1, 2, 3, 0, 0, 0, 0, 15]], dtype=torch.int32)
    word = pack(codes, 4)[0, 0].item() & 0xFFFFFFFF
    assert word == 1 | (2 << 4) | (3 << 8) | (15 << 28)


def test_containers_and_padding():
    assert [container_bits(b) for b in range(1, 9)] == [1, 2, 4, 4, 8, 8, 8, 8]
    assert padded_k(200, 4, 128) == 256 and padded_k(200, 4, None) == 200 and padded_k(201, 2, None) == 208
    # a group size that is not a multiple of the values per word: pad to their lcm (20 and 8 -> 40)
    assert padded_k(100, 3, 20) == 120
    w = torch.randn(3, 100)
    q = quantize(w, QuantConfig(3, group_size=20, scale_dtype="float32"))
    assert q.codes.shape == (3, 120) and q.scales.shape == (3, 6)
    assert (dequantize(q) - w).abs().max() <= q.scales.max() / 2 + 1e-6
    with pytest.raises(ValueError, match="codes out of range"):
        pack(torch.full((1, 8), 16), 4)


def _weights(draw_seed, n, k, scale):
    g = torch.Generator().manual_seed(draw_seed)
    return torch.randn(n, k, generator=g) * scale


@SETTINGS
@given(bits=st.integers(2, 8), sym=st.booleans(), scope=st.sampled_from(["tensor", "channel", "group"]),
       gs=st.sampled_from([32, 64, 128]), n=st.integers(1, 6), k=st.integers(1, 300),
       seed=st.integers(0, 2**31 - 1), mag=st.floats(1e-3, 1e2))
def test_reconstruction_error_at_most_half_a_step(bits, sym, scope, gs, n, k, seed, mag):
    w = _weights(seed, n, k, mag)
    cfg = QuantConfig(bits, symmetric=sym, scope=scope, group_size=gs, scale_dtype="float32")
    q = quantize(w, cfg)
    w_hat = dequantize(q, torch.float64)
    s = q.scales.double()
    s_full = s.repeat_interleave(q.group_size, dim=1)[:, :k] if scope == "group" else s.expand(n, k)
    # every weight lies inside the clamp range by construction of the scale (range covers min/max),
    # so |w^ - w| <= s/2 (plus float32 rounding of w/s)
    err = (w_hat - w.double()).abs()
    assert bool((err <= s_full / 2 * (1 + 1e-5) + 1e-12).all()), float((err - s_full / 2).max())
    assert q.codes.max() <= 2**bits - 1


def test_symmetric_two_bit_is_ternary_and_one_bit_is_sign_times_mean():
    w = torch.tensor([[0.9, -0.2, 0.05, -1.0, 0.4, 0.0, 0.3, -0.6]])
    t = dequantize(quantize(w, QuantConfig(2, symmetric=True, scope="channel", scale_dtype="float32")))
    s = 1.0  # absmax / (2^1 - 1)
    assert set((t / s).round().flatten().tolist()) <= {-1.0, 0.0, 1.0}
    assert torch.allclose(t, torch.tensor([[1.0, 0, 0, -1, 0, 0, 0, -1]]))
    o = dequantize(quantize(w, QuantConfig(1, symmetric=True, scope="channel", scale_dtype="float32")))
    mean_abs = w.abs().mean()
    assert torch.allclose(o, torch.where(w >= 0, mean_abs, -mean_abs))


def test_asymmetric_formula_hand_computed():
    w = torch.tensor([[0.5, 1.0, 1.5, 3.0]])  # all positive: min' = 0, max' = 3
    q = quantize(w, QuantConfig(2, symmetric=False, scope="channel", scale_dtype="float32"))
    assert math.isclose(q.scales.item(), 1.0) and q.zeros.item() == 0
    assert q.codes[0, :4].tolist() == [0, 1, 2, 3]  # round(0.5)=0 (half to even), round(1.5)=2
    assert torch.allclose(dequantize(q), torch.tensor([[0.0, 1.0, 2.0, 3.0]]))


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("value", [0.0, 0.37, -2.5])
def test_constant_and_zero_rows_never_nan(bits, sym, value):
    w = torch.full((3, 64), value)
    for scope in ("tensor", "channel", "group"):
        out = dequantize(quantize(w, QuantConfig(bits, symmetric=sym, scope=scope, group_size=32)))
        assert torch.isfinite(out).all()
        if sym and bits == 1:  # sign * mean|w| cannot represent 0: a zero row becomes +eps
            assert torch.allclose(out, w, rtol=2e-3, atol=1e-7)
        else:  # exact up to the fp16 rounding of the scale
            assert torch.allclose(out, w, rtol=2e-3, atol=0), (bits, sym, scope, out[0, 0])


@SETTINGS
@given(bits=st.integers(2, 8), sym=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_fake_quantize_forward_and_straight_through_gradient(bits, sym, seed):
    w = _weights(seed, 4, 96, 1.0).requires_grad_(True)
    cfg = QuantConfig(bits, symmetric=sym, group_size=32)
    out = fake_quantize(w, cfg)
    assert torch.equal(out.detach(), dequantize(quantize(w.detach(), cfg)))
    g = torch.randn_like(w)
    out.backward(g)
    assert torch.equal(w.grad, g)  # straight through
    w.grad = None
    fake_quantize(w, cfg, mask_outside=True).backward(g)
    # masked: identity where round(w/s) (+ z) lies inside the code range, 0 where the clamp cut it off.
    # The range is built from min/max, so only rounding ties of the zero point can clip an extreme element.
    q = quantize(w.detach(), cfg)
    s = q.scales.float().repeat_interleave(32, dim=1)[:, :96]
    r = torch.round(w.detach() / s)
    if sym:
        inside = r.abs() <= 2 ** (bits - 1) - 1
    else:
        r = r + q.zeros.float().repeat_interleave(32, dim=1)[:, :96]
        inside = (r >= 0) & (r <= 2**bits - 1)
    assert inside.float().mean() > 0.9
    assert torch.equal(w.grad, g * inside)


def test_fake_quantize_mask_outside_zeroes_a_clipped_element():
    # asymmetric 2-bit on [-0.5, 1.0]: s = 1.5/3 = 0.5, z = round(1.0) = 1; 1.0/s + z = 3 (inside).
    # With -0.75: s = 1.75/3, z = round(1.2857) = 1, 1.0/s + z = round(1.714) + 1 = 3 (inside).
    # With min -0.25 and a tie: s = 1.5/3 = 0.5 for [-0.25, 1.25]: z = round(0.5) = 0 (half to even),
    # 1.25/0.5 = 2.5 -> round = 2 (even) -> inside; -0.25/0.5 = -0.5 -> round = -0 -> 0 + 0 inside.
    # [-0.75, 0.75]: s = 0.5, z = round(1.5) = 2; 0.75/s + z = round(1.5) + 2 = 4 > 3: clipped.
    w = torch.tensor([[-0.75, 0.75, 0.25, 0.0]], requires_grad=True)
    cfg = QuantConfig(2, scope="channel", scale_dtype="float32")
    out = fake_quantize(w, cfg, mask_outside=True)
    assert torch.allclose(out.detach(), torch.tensor([[-1.0, 0.5, 0.0, 0.0]]))
    out.sum().backward()
    assert w.grad.tolist() == [[1.0, 0.0, 1.0, 1.0]]


def test_fake_quantize_is_differentiable_for_conv_weights():
    w = torch.randn(8, 4, 3, 3, requires_grad=True)
    out = fake_quantize(w, QuantConfig(4, group_size=32))
    assert out.shape == w.shape
    out.sum().backward()
    assert torch.equal(w.grad, torch.ones_like(w))


@pytest.mark.parametrize("kwargs,match", [
    ({"bits": 9}, "bits=9 is not supported"),
    ({"bits": -1}, "not supported"),
    ({"group_size": 0}, "group_size must be a positive integer"),
    ({"group_size": -32}, "group_size must be a positive integer"),
    ({"scope": "row"}, "scope='row' is not supported"),
    ({"scale_dtype": "int8"}, "scale_dtype='int8' is not supported"),
    ({"bits": 4, "channel_bits": (4, 12)}, "channel_bits entry=12"),
    ({"scale_dtype": torch.int8}, "scale_dtype='int8' is not supported"),
    ({"channel_bits": torch.full((2, 3), 4)}, r"one-dimensional .* shape \(2, 3\)"),
    ({"channel_bits": torch.tensor(4)}, r"one-dimensional .* shape \(\)"),
    ({"bits": float("inf")}, "bits must be an integer, got inf"),
    ({"group_size": 64.0}, "group_size must be a positive integer, got 64.0"),
    ({"group_size": True}, "group_size must be a positive integer, got True"),
    ({"scale_dtype": ["float16"]}, r"scale_dtype=\['float16'\] is not supported; accepted: float16"),
    ({"channel_bits": np.array([[4, 2]])}, r"one-dimensional .* shape \(1, 2\)"),
])
def test_bad_configs_raise_clear_errors(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        QuantConfig(**kwargs)


def test_channel_bits_are_checked_not_truncated_and_must_be_ordered():
    """A per-row bit-width of 4.5 is refused (``int()`` would have made it 4 bits); a set or dict has no row order,
    a string or single int is no per-row sequence: each is refused with what is accepted. Ordered sequences of
    integers (NumPy integers and 1-D arrays too) give the same tuple."""
    with pytest.raises(ValueError, match="channel_bits entry must be an integer, got 4.5"):
        QuantConfig(channel_bits=torch.tensor([4.5, 2.0]))
    with pytest.raises(TypeError, match="channel_bits entry must be an integer bit-width, got True"):
        QuantConfig(channel_bits=torch.tensor([True, False]))
    for bad in ({4, 2}, {4: 1, 2: 1}, "42", 4):
        with pytest.raises(TypeError, match=r"one bit-width per output row \(tuple, list, 1-D tensor or array\)"):
            QuantConfig(channel_bits=bad)
    with pytest.raises(TypeError, match=r"one bit-width per output row"):
        QuantConfig.from_dict({"bits": 4, "channel_bits": 4})
    for good in ([8, 2, 0], np.array([8, 2, 0]), torch.tensor([8, 2, 0]), (b for b in (8, 2, 0))):
        assert QuantConfig(channel_bits=good).channel_bits == (8, 2, 0)
    cfg = QuantConfig(group_size=np.int64(64), channel_bits=[np.int64(4), 2])
    assert cfg.group_size == 64 and type(cfg.group_size) is int and cfg.channel_bits == (4, 2)
    assert QuantConfig.from_json(cfg.to_json()) == QuantConfig(group_size=64, channel_bits=(4, 2))
    for bad in (None, [("bits", 4)], "bits"):
        with pytest.raises(TypeError, match="a QuantConfig dict maps field names to values"):
            QuantConfig.from_dict(bad)


def test_nan_and_bad_weights_raise():
    w = torch.randn(4, 64)
    w[1, 3] = float("nan")
    with pytest.raises(ValueError, match="NaN/inf"):
        quantize(w, QuantConfig(4))
    with pytest.raises(TypeError, match="floating-point"):
        quantize(torch.ones(4, 64, dtype=torch.int32), QuantConfig(4))
    with pytest.raises(ValueError, match="2-D"):
        quantize(torch.ones(64), QuantConfig(4))
    with pytest.raises(ValueError, match="too large for torch.float16"):
        quantize(torch.full((1, 32), 1e9), QuantConfig(8, scope="channel"))
    # max - min overflows float32 itself: no advice to use the float32 scales it already has
    with pytest.raises(ValueError, match=r"too large for torch.float32 scales .*overflows float32: rescale"):
        quantize(torch.tensor([[3e38, -3e38]]), QuantConfig(2, scale_dtype="float32"))
    with torch.device("meta"):
        meta = nn.Linear(8, 4)
    with pytest.raises(ValueError, match="meta device"):
        QuantLinear.from_float(meta, QuantConfig(4))


def test_config_json_round_trip():
    cfg = QuantConfig(3, symmetric=None, scope="group", group_size=64, channel_bits=(2, 4, 8))
    again = QuantConfig.from_json(cfg.to_json())
    assert again == cfg and hash(again) == hash(cfg)
    # torch dtypes and tensors are taken as their names and tuples, as the JSON form holds them
    typed = QuantConfig(3, group_size=64, scale_dtype=torch.bfloat16, channel_bits=torch.tensor([2, 4, 8]),
                        compute_dtype=torch.float32)
    assert typed == QuantConfig(3, group_size=64, scale_dtype="bfloat16", channel_bits=(2, 4, 8),
                                compute_dtype="float32")
    assert QuantConfig.from_json(typed.to_json()) == typed
    assert cfg.is_symmetric(2) is False and cfg.is_symmetric(8) is True
    with pytest.raises(ValueError, match="unknown QuantConfig fields"):
        QuantConfig.from_dict({"bits": 4, "colour": "red"})
