"""Packed weight-only matmul: Triton kernels (interpreted on CPU) against an fp64 oracle built from the codes."""
from __future__ import annotations

import dataclasses
import io
import itertools

import pytest
import torch

from medquant.kernels import (
    PackedWeight,
    force_backend,
    packed_linear,
    packed_linear_reference,
    select_regime,
)
from medquant.kernels.layout import padded_k
from medquant.kernels.packed import packed_linear_triton
from medquant.quant import QuantConfig, pack, quantize, unpack
from medquant.quant.modules import QuantLinear
from tests.kernels.kernel_helpers import assert_matches_oracle, dequant_fp64

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SCOPES = [("group", 32), ("group", 64), ("group", 128), ("channel", None), ("tensor", None)]


def make_case(m, n, k, bits, scope, gs, symmetric, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * (0.5 + torch.rand(n, 1, generator=g))
    cfg = QuantConfig(bits, symmetric=symmetric, scope=scope, group_size=gs or 128)
    q = quantize(w, cfg)
    qw = pack(q.codes, bits)
    x = torch.randn(m, k, generator=g).to(dtype)
    w64 = dequant_fp64(q.codes, q.scales, q.zeros, bits, q.symmetric, scope, q.group_size, k)
    weight = PackedWeight(qw.to(device), q.scales.to(device), None if q.zeros is None else q.zeros.to(device),
                          bits, q.symmetric, scope, q.group_size, k)
    return x.to(device), weight, w64


def _cpu(weight: PackedWeight) -> PackedWeight:
    return dataclasses.replace(weight, qweight=weight.qweight.cpu(), scales=weight.scales.cpu(),
                               zeros=None if weight.zeros is None else weight.zeros.cpu())


def _grid():
    """A covering subset of M x N x K x bits x scope x symmetric x dtype (the full product is ~7000 cases).

    Every (bits, scope) pair appears twice; every other axis is a shuffled cycle over its values (seeded), so
    each value appears about equally often and every regime is hit."""
    import random

    rng = random.Random(0)
    pairs = [p for p in itertools.product([2, 3, 4, 8], SCOPES) for _ in range(2)]

    def cycle(values):
        out = (list(values) * (len(pairs) // len(values) + 1))[: len(pairs)]
        rng.shuffle(out)
        return out

    ms, ns, ks = cycle([1, 3, 17, 64, 80]), cycle([1, 33, 96]), cycle([40, 128, 200, 256])
    syms, dts = cycle([True, False]), cycle(DTYPES)
    return [(ms[i], ns[i], ks[i], b, sc, gs, syms[i], dts[i]) for i, (b, (sc, gs)) in enumerate(pairs)]


GRID = _grid()


@pytest.mark.parametrize("m,n,k,bits,scope,gs,symmetric,dtype", GRID,
                         ids=[f"M{c[0]}-N{c[1]}-K{c[2]}-b{c[3]}-{c[4]}{c[5] or ''}-{'sym' if c[6] else 'asym'}-"
                              f"{str(c[7])[6:]}" for c in GRID])
def test_kernel_matches_fp64_oracle(kernel_device, m, n, k, bits, scope, gs, symmetric, dtype):
    x, weight, w64 = make_case(m, n, k, bits, scope, gs, symmetric, dtype, kernel_device)
    y = packed_linear_triton(x, weight)
    assert_matches_oracle(y.cpu(), x.cpu(), w64, f"{select_regime(m)}")
    # the torch reference (the CPU path) satisfies the same bound
    assert_matches_oracle(packed_linear_reference(x.cpu(), _cpu(weight)), x.cpu(), w64, "reference")


def test_grid_covers_every_axis():
    for axis, values in [(0, {1, 3, 17, 64, 80}), (1, {1, 33, 96}), (2, {40, 128, 200, 256}), (3, {2, 3, 4, 8}),
                         (6, {True, False}), (7, set(DTYPES))]:
        assert {c[axis] for c in GRID} == values, axis
    assert {select_regime(c[0]) for c in GRID} == {"gemv", "splitk", "gemm"}


@pytest.mark.parametrize("regime", ["splitk", "gemm"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_every_regime_every_dtype(kernel_device, regime, dtype):
    x, weight, w64 = make_case(5, 33, 200, 4, "group", 64, False, dtype, kernel_device, seed=1)
    y = packed_linear_triton(x, weight, regime=regime)
    assert_matches_oracle(y.cpu(), x.cpu(), w64, regime)


# small blocks force several K tiles per program, splits that start mid-K, and all three scale modes
SMALL = {"gemv": {"BLOCK_N": 16, "BLOCK_KW": 4, "SPLIT_K": 2},
         "splitk": {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_KW": 4, "SPLIT_K": 2, "GROUP_M": 1},
         "gemm": {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_KW": 4, "SPLIT_K": 1, "GROUP_M": 2}}


@pytest.mark.parametrize("bits,scope,gs,k,symmetric", [
    (4, "group", 32, 100, True),     # BLOCK_K = 32 = group: TILE mode, 4 tiles
    (8, "group", 32, 72, False),     # BLOCK_K = 16 divides the group: TILE mode, 2 tiles per group
    (2, "group", 64, 200, False),    # BLOCK_K = 64: TILE mode
    (2, "group", 24, 96, True),      # group not a multiple of the 16 values per word: ELEM mode
    (3, "group", 12, 96, False),     # 4-bit container, group 12: ELEM mode
    (4, "group", 24, 96, False),     # group = 3 words, not a multiple of BLOCK_K = 32: WORD mode
    (4, "channel", None, 75, False),
])
@pytest.mark.parametrize("regime,m", [("gemv", 1), ("splitk", 7), ("gemm", 20)])
def test_multi_tile_and_scale_modes(kernel_device, bits, scope, gs, k, symmetric, regime, m):
    x, weight, w64 = make_case(m, 20, k, bits, scope, gs, symmetric, torch.float32, kernel_device, seed=2)
    y = packed_linear_triton(x, weight, regime=regime, config=SMALL[regime])
    assert_matches_oracle(y.cpu(), x.cpu(), w64, f"{regime} {bits}b {scope}{gs} sym={symmetric}")


def test_one_bit_and_seven_bit(kernel_device):
    for bits, sym in [(1, True), (1, False), (5, True), (7, False)]:
        x, weight, w64 = make_case(3, 20, 100, bits, "group", 32, sym, torch.float32, kernel_device, seed=3)
        assert_matches_oracle(packed_linear_triton(x, weight).cpu(), x.cpu(), w64, f"{bits} bits")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("scope,gs", [("channel", None), ("group", 32)])
def test_negative_control_wrong_scale_is_caught(kernel_device, dtype, scope, gs):
    """One perturbed scale must make the comparison fail: the tolerance is tight enough to see it."""
    x, weight, w64 = make_case(4, 33, 128, 4, scope, gs, True, dtype, kernel_device, seed=4)
    y = packed_linear_triton(x, weight)
    assert_matches_oracle(y.cpu(), x.cpu(), w64, "unperturbed")
    s = weight.scales.clone()
    s[5, 1 if scope == "group" else 0] *= 1.5
    y_bad = packed_linear_triton(x, dataclasses.replace(weight, scales=s))
    with pytest.raises(AssertionError, match="max"):
        assert_matches_oracle(y_bad.cpu(), x.cpu(), w64, "perturbed scale")


def test_custom_op_forced_backends_agree(kernel_device):
    x, weight, w64 = make_case(3, 33, 200, 4, "group", 32, False, torch.float16, kernel_device, seed=5)
    y_t = packed_linear(x, weight, backend="triton")
    y_r = packed_linear(x, weight, backend="torch")
    assert_matches_oracle(y_t.cpu(), x.cpu(), w64, "op/triton")
    assert_matches_oracle(y_r.cpu(), x.cpu(), w64, "op/torch")
    # N-D activations
    x3 = x.reshape(3, 1, 200)
    y3 = packed_linear(x3, weight, backend="triton")
    assert y3.shape == (3, 1, 33)


def test_backward_through_the_op(kernel_device):
    x, weight, w64 = make_case(3, 33, 40, 4, "channel", None, True, torch.float32, kernel_device, seed=6)
    x = x.clone().requires_grad_(True)
    with force_backend("triton"):
        y = packed_linear(x, weight)
    g = torch.randn_like(y)
    y.backward(g)
    expected = g.double().cpu() @ w64
    assert torch.allclose(x.grad.double().cpu(), expected, atol=1e-4)


def _mixed_linear(device, bits=(2, 4, 8, 16, 0, 3), scope="group", gs=32):
    torch.manual_seed(7)
    lin = torch.nn.Linear(70, 37)
    channel_bits = tuple(bits[i % len(bits)] for i in range(37))
    q = QuantLinear.from_float(lin, QuantConfig(4, scope=scope, group_size=gs, channel_bits=channel_bits))
    return q.to(device)


@pytest.mark.parametrize("scope", ["group", "channel"])
def test_mixed_bit_quantlinear_through_kernels(kernel_device, scope):
    q = _mixed_linear(kernel_device, scope=scope)
    x = torch.randn(5, 70, device=kernel_device)
    with force_backend("triton"):
        y_k = q(x)
    with force_backend("torch"):
        y_r = q(x)
    w64 = q.dequantized_weight(torch.float64).cpu()
    ref = x.double().cpu() @ w64.t() + q.bias.double().cpu()
    tol = 70 * torch.finfo(torch.float32).eps * float(x.abs().max()) * float(w64.abs().max())
    assert float((y_k.double().cpu() - ref).abs().max()) <= tol
    assert float((y_r.double().cpu() - ref).abs().max()) <= tol
    # pruned rows (0 bits) give exactly the bias
    pruned = (q.row_bits() == 0).nonzero().flatten()
    assert torch.equal(y_k[:, pruned].cpu(), q.bias[pruned].cpu().expand(5, -1))


def test_saved_layout_is_consumed_without_repacking(kernel_device):
    """The buffers of a saved and reloaded state dict go straight into the kernel."""
    q = _mixed_linear("cpu", bits=(4, 2), scope="group", gs=64)
    buf = io.BytesIO()
    torch.save(q.state_dict(), buf)
    buf.seek(0)
    q2 = QuantLinear(70, 37, True, q.config)
    q2.load_state_dict(torch.load(buf))
    q2 = q2.to(kernel_device)
    x = torch.randn(1, 70, device=kernel_device)
    for b in q2.bit_groups:
        w = q2.packed_weight(b)
        assert w.qweight is q2.get_buffer(f"qweight_{b}")  # the stored tensor itself, no copy
        assert w.qweight.dtype == torch.int32 and w.qweight.is_contiguous()
        w64 = dequant_fp64(unpack(w.qweight.cpu(), w.bits), w.scales.cpu(), None if w.zeros is None else w.zeros.cpu(),
                           w.bits, w.symmetric, w.scope, w.group_elems, w.k)
        y = packed_linear_triton(x, w)
        assert_matches_oracle(y.cpu(), x.cpu(), w64, f"saved {b}-bit rows")


def test_bad_inputs_are_rejected(kernel_device):
    x, weight, _ = make_case(2, 8, 64, 4, "group", 32, False, torch.float32, kernel_device)
    qw, s, z, bits, sym, scope, ge, k = (weight.qweight, weight.scales, weight.zeros, weight.bits, weight.symmetric,
                                         weight.scope, weight.group_elems, weight.k)
    with pytest.raises(ValueError, match="K="):
        PackedWeight(qw, s, z, 2, sym, scope, ge, k)  # wrong bits -> K_pad mismatch
    with pytest.raises(ValueError, match="input features"):
        packed_linear_triton(x[:, :60], weight)
    with pytest.raises(TypeError, match="float16, bfloat16 or float32"):
        packed_linear_triton(x.double(), weight)
    with pytest.raises(ValueError, match="out of range"):
        PackedWeight(qw, s, z, 9, sym, scope, ge, k)
    with pytest.raises(ValueError, match="zero points"):
        PackedWeight(qw, s, None, bits, False, scope, ge, k)
    with pytest.raises(ValueError, match="scales of shape"):
        PackedWeight(qw, s[:, :1], z[:, :1], bits, sym, scope, ge, k)
    with pytest.raises(TypeError, match="int32"):
        PackedWeight(qw.to(torch.int64), s, z, bits, sym, scope, ge, k)
    with pytest.raises(ValueError, match="group_elems"):
        PackedWeight(qw, s, z, bits, sym, scope, 0, k)
    with pytest.raises(ValueError, match="regime"):
        packed_linear_triton(x, weight, regime="gemv")
    # the same checks on the torch path, and the public function wants the bundle
    with pytest.raises(ValueError, match="input features"):
        packed_linear(x[:, :60], weight, backend="torch")
    with pytest.raises(TypeError, match="PackedWeight"):
        packed_linear(x, (qw, s, z, bits, sym, scope, ge, k), backend="torch")


def test_packed_weight_dequantize_matches_the_oracle():
    _x, weight, w64 = make_case(2, 9, 100, 3, "group", 32, False, torch.float32, "cpu", seed=8)
    assert weight.n == 9 and weight.k == 100 and weight.k_pad == 128
    assert torch.equal(weight.dequantize(torch.float64), w64)
    with pytest.raises(dataclasses.FrozenInstanceError):
        weight.bits = 4


def make_dense_case(m, n, k, bits, scope, gs, symmetric, dtype, device, seed=0):
    """A version-2 (dense 3/5/6/7-bit) row group and its fp64 oracle, from the unpacked codes."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * (0.5 + torch.rand(n, 1, generator=g))
    q = quantize(w, QuantConfig(bits, symmetric=symmetric, scope=scope, group_size=gs or 128), dense=True)
    assert q.k_pad % 32 == 0
    qw = pack(q.codes, bits, dense=True)
    assert qw.shape == (n, q.k_pad * bits // 32)
    x = torch.randn(m, k, generator=g).to(dtype)
    w64 = dequant_fp64(q.codes, q.scales, q.zeros, bits, q.symmetric, scope, q.group_size, k)
    weight = PackedWeight(qw.to(device), q.scales.to(device), None if q.zeros is None else q.zeros.to(device),
                          bits, q.symmetric, scope, q.group_size, k, dense=True)
    return x.to(device), weight, w64


@pytest.mark.parametrize("bits,scope,gs,k,symmetric", [
    (3, "group", 32, 100, True),
    (3, "group", 128, 200, False),
    (3, "channel", None, 75, False),
    (5, "group", 64, 128, True),
    (6, "tensor", None, 96, False),
    (7, "group", 16, 40, False),
])
@pytest.mark.parametrize("m", [1, 7, 70])
def test_dense_layout_through_the_kernels(kernel_device, bits, scope, gs, k, symmetric, m):
    """Format version 2: the Triton path (dense words -> containers by a Triton kernel, then the v1 kernels), the
    torch reference and the weight's own dequantization against the fp64 oracle of the unpacked codes."""
    from medquant.kernels.packed import dense_to_container_triton

    x, weight, w64 = make_dense_case(m, 24, k, bits, scope, gs, symmetric, torch.float32, kernel_device, seed=5)
    assert torch.equal(dense_to_container_triton(weight).cpu(), pack(weight.codes().cpu(), bits))
    assert_matches_oracle(packed_linear_triton(x, weight).cpu(), x.cpu(), w64, f"triton {bits}b dense")
    assert_matches_oracle(packed_linear_reference(x.cpu(), _cpu(weight)), x.cpu(), w64, "reference dense")
    torch.testing.assert_close(weight.dequantize(torch.float64).cpu(), w64[:, :k], rtol=1e-6, atol=1e-6)


def test_dense_flag_is_checked_against_the_word_count():
    _x, weight, _ = make_dense_case(1, 8, 64, 3, "group", 32, True, torch.float32, "cpu")
    with pytest.raises(ValueError, match="a dense flag that does not match the words"):
        dataclasses.replace(weight, dense=False)


@pytest.mark.parametrize("bits", [3, 5, 6, 7])
def test_dense_row_group_without_rows_unpacks_to_nothing(bits):
    """A dense row group of 0 rows unpacks to ``(0, K)`` codes and multiplies to ``(M, 0)``, as the container
    layouts and the Triton kernel do (the reference path failed reshaping 0 elements)."""
    from medquant.kernels.layout import pack, unpack

    words = pack(torch.zeros(0, 64, dtype=torch.int64), bits, dense=True)
    assert unpack(words, bits, dense=True).shape == (0, 64)
    w = PackedWeight(words, torch.ones(0, 1, dtype=torch.float16), None, bits, True, "channel", 64, 64, dense=True)
    assert packed_linear(torch.randn(3, 64), w, backend="torch").shape == (3, 0)


def _padding_group_case(m, n, k, bits, gs, symmetric, seed=0):
    """A row group whose padding-only groups (``K_pad`` is a multiple of the codes per word and of ``gs``) hold
    inf / NaN scales and zero points, and whose padding codes are not zero; the fp64 oracle of its real columns."""
    g = torch.Generator().manual_seed(seed)
    kp = padded_k(k, bits, gs)
    real_groups = -(-k // gs)
    assert kp // gs > real_groups, "the case needs groups that hold only padding"
    codes = torch.randint(0, 2 ** bits, (n, kp), generator=g)
    scales = 0.05 + torch.rand(n, kp // gs, generator=g)
    zeros = None if symmetric else torch.randint(0, 2 ** bits, (n, kp // gs), generator=g).float()
    scales[0::2, real_groups:] = float("inf")
    scales[1::2, real_groups:] = float("nan")
    if zeros is not None:
        zeros[0::2, real_groups:] = float("nan")
        zeros[1::2, real_groups:] = float("-inf")
    w = PackedWeight(pack(codes, bits), scales, zeros, bits, symmetric, "group", gs, k)
    w64 = dequant_fp64(codes, scales, zeros, bits, symmetric, "group", gs, k)  # real columns only
    assert torch.isfinite(w64).all()
    return torch.randn(m, k, generator=g), w, w64


# groups that are not a multiple of the codes per word (ELEM mode): the last word of real codes reaches into groups
# that hold only padding, whose scales and zero points no reader may use (docs/reference/layout: padding is ignored)
@pytest.mark.parametrize("bits,gs,k", [(4, 3, 2), (4, 3, 10), (2, 24, 20)])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("regime,m", [("gemv", 1), ("splitk", 3), ("gemm", 20)])
def test_padding_only_groups_are_ignored(kernel_device, bits, gs, k, symmetric, regime, m):
    x, weight, w64 = _padding_group_case(m, 5, k, bits, gs, symmetric)
    y = packed_linear_triton(x.to(kernel_device), _to(weight, kernel_device), regime=regime, config=SMALL[regime])
    assert torch.isfinite(y).all(), f"{regime}: non-finite output from the scales of padding-only groups"
    assert_matches_oracle(y.cpu(), x, w64, f"triton {regime}")
    assert_matches_oracle(packed_linear_reference(x, weight), x, w64, "reference")


def _to(weight: PackedWeight, device) -> PackedWeight:
    return dataclasses.replace(weight, qweight=weight.qweight.to(device), scales=weight.scales.to(device),
                               zeros=None if weight.zeros is None else weight.zeros.to(device))


@pytest.mark.parametrize("backend", ["auto", "torch", "cpu"])
@pytest.mark.parametrize("requires_grad", [False, True])
def test_zero_dim_x_is_rejected(backend, requires_grad):
    """A 0-d x has no feature dimension: the same ValueError on the eager path and the custom op's path."""
    w = PackedWeight(pack(torch.zeros(2, 8, dtype=torch.int64), 4), torch.ones(2, 1), None, 4, True, "channel", 8, 8)
    x = torch.tensor(1.0, requires_grad=requires_grad)
    with pytest.raises(ValueError, match="at least one dimension"):
        packed_linear(x, w, backend=backend)


def test_unpack_refuses_k_outside_the_packed_codes():
    """``unpack(words, bits, k)`` returns ``(n, k)`` or raises: never fewer columns than asked."""
    from medquant.kernels.layout import pack as layout_pack
    from medquant.kernels.layout import unpack as layout_unpack

    codes = torch.randint(0, 16, (2, 8), generator=torch.Generator().manual_seed(0))
    words = layout_pack(codes, 4)  # one word: 8 codes
    assert torch.equal(layout_unpack(words, 4, k=5).long(), codes[:, :5])
    assert layout_unpack(words, 4, k=8).shape == (2, 8)
    assert layout_unpack(words, 4, k=0).shape == (2, 0)
    for k in (9, 100, -1, -8):
        with pytest.raises(ValueError, match=f"k={k} out of range"):
            layout_unpack(words, 4, k=k)
    dense = layout_pack(torch.zeros(3, 32, dtype=torch.int64), 3, dense=True)  # 3 words: 32 codes
    assert layout_unpack(dense, 3, k=32, dense=True).shape == (3, 32)
    with pytest.raises(ValueError, match="hold 32 3-bit codes"):
        layout_unpack(dense, 3, k=33, dense=True)


def test_wrong_dense_flag_is_caught_only_where_word_counts_differ():
    """The message of the word-count check says what it can detect: a wrong ``dense`` flag only where the two
    layouts need different word counts. Where they coincide (3 bits, K = 20: 3 words either way) nothing in the
    words tells the layouts apart: the row group is built and its codes are misread (documented)."""
    _x, weight, _ = make_dense_case(1, 8, 64, 3, "group", 32, True, torch.float32, "cpu")
    with pytest.raises(ValueError, match="caught only where the two layouts' word counts differ"):
        dataclasses.replace(weight, dense=False)
    codes = torch.zeros(4, 24, dtype=torch.int64)
    codes[:, :20] = torch.randint(0, 8, (4, 20), generator=torch.Generator().manual_seed(1))
    words = pack(codes, 3)  # version-1 containers: 24 codes in 3 words
    s = torch.full((4, 1), 0.1)
    assert torch.equal(PackedWeight(words, s, None, 3, True, "channel", 24, 20).codes()[:, :20].long(), codes[:, :20])
    misread = PackedWeight(words, s, None, 3, True, "channel", 32, 20, dense=True)  # accepted: same word count
    assert not torch.equal(misread.codes()[:, :20].long(), codes[:, :20])


@pytest.mark.parametrize("backend", ["auto", "torch", "triton", "cpu"])
def test_empty_leading_and_feature_dims(backend):
    """``(..., k)`` inputs with no rows or no features give ``(..., n)`` in ``x``'s dtype: zeros when K = 0
    (reshaping ``(2, 3, 0)`` to ``(-1, 0)`` raised)."""
    w0 = PackedWeight(pack(torch.zeros(5, 0, dtype=torch.int64), 4), torch.ones(5, 1), None, 4, True, "channel", 1, 0)
    w8 = PackedWeight(pack(torch.ones(5, 8, dtype=torch.int64), 4), torch.ones(5, 1), None, 4, True, "channel", 8, 8)
    for dtype in (torch.float32, torch.bfloat16):
        for w, shape in ((w0, (2, 3, 0)), (w0, (0, 0)), (w0, (4, 0)), (w8, (0, 3, 8)), (w8, (2, 0, 8))):
            y = packed_linear(torch.zeros(shape, dtype=dtype), w, backend=backend)
            assert y.shape == (*shape[:-1], 5) and y.dtype == dtype, (shape, dtype)
            assert not y.any(), (shape, dtype)


@pytest.mark.parametrize("m", [0, 3])
def test_a_wrong_regime_is_refused_also_for_empty_inputs(m):
    x, weight, _ = make_case(m, 16, 64, 4, "group", 32, True, torch.float32, "cpu")
    with pytest.raises(ValueError, match="regime='fast'; accepted"):
        packed_linear_triton(x, weight, regime="fast")
    if m > 1:
        with pytest.raises(ValueError, match="the gemv regime needs M = 1"):
            packed_linear_triton(x, weight, regime="gemv")
    assert packed_linear_triton(x, weight, regime="gemm").shape == (m, 16)


def test_the_kernel_error_says_triton_is_missing_when_it_is(monkeypatch):
    """Without Triton the error names the missing package, not the interpreter switch."""
    from medquant.kernels import dispatch
    from medquant.kernels.fakequant import fake_quantize_rows_triton

    x, weight, _ = make_case(2, 16, 64, 4, "group", 32, True, torch.float32, "cpu")
    monkeypatch.setattr(dispatch, "_triton_importable", lambda: False)
    with pytest.raises(RuntimeError, match="Triton is not installed"):
        packed_linear_triton(x, weight)
    with pytest.raises(RuntimeError, match="Triton is not installed"):
        fake_quantize_rows_triton(x, torch.full((2,), 4), True, 1e-8, False)
    monkeypatch.setattr(dispatch, "_triton_importable", lambda: True)
    monkeypatch.setattr(dispatch, "interpreting", lambda: False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        packed_linear_triton(x, weight)
