"""Inputs holding +inf, -inf or NaN through the native weight-only matmuls, against torch.

Reference: ``F.linear(x, W, b)`` with ``W`` the layer's dequantized weight (``(u - z) * s`` in float32, in the
input's dtype) and ``b`` its bias, which is what IEEE arithmetic gives: in a row of ``x`` with a NaN every
output is NaN; with ``x[i, j] = +inf`` (and no NaN), ``y[i, r]`` is ``+inf`` where ``W[r, j] > 0``, ``-inf`` where
``W[r, j] < 0`` and NaN where ``W[r, j] == 0`` (``inf * 0``) or where infinities of both signs meet. The kernels'
factored sum (``s * (sum u x - z * sum x)``) would make every output of such a row NaN; the tests check that the
masks ``isnan`` / ``isposinf`` / ``isneginf`` equal torch's, for every storage width and group layout, every
``xmode`` of the kernel, one row (decode) and several, float32 and bfloat16 ``x``, and that rows whose inputs are
finite are untouched: bit for bit what the kernel gives them in the same call with the values that are not
finite replaced (in the mode such a call runs in: the integer forms of ``x`` run as 2), and close to torch's
product.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from medquant.kernels import cpu_path, set_cpu_compute_dtype
from medquant.kernels.native import INT8_XMODE, native_gemv4, native_status
from medquant.quant import QuantConfig, QuantLinear
from tests.kernels.kernel_helpers import bit_equal

INF = float("inf")

CONFIGS = {  # id -> (config, layout version)
    "1asym-g32": (QuantConfig(1, symmetric=False, group_size=32), 2),
    "1sym-g128": (QuantConfig(1, symmetric=True, group_size=128), 2),
    "2asym-g128": (QuantConfig(2, symmetric=False, group_size=128), 2),
    "2sym-g32": (QuantConfig(2, symmetric=True, group_size=32), 2),
    "3asym-g128": (QuantConfig(3, symmetric=False, group_size=128), 2),  # dense 3-bit stream
    "3asym-g64-v1": (QuantConfig(3, symmetric=False, group_size=64), 1),  # 3-bit codes in 4-bit containers
    "4asym-g128": (QuantConfig(4, symmetric=False, group_size=128), 2),
    "4sym-g32": (QuantConfig(4, group_size=32), 2),
    "4sym-g96": (QuantConfig(4, group_size=96), 2),
    "4asym-channel": (QuantConfig(4, symmetric=False, scope="channel"), 2),
    "4asym-g64-f16": (QuantConfig(4, symmetric=False, group_size=64, scale_dtype="float16"), 2),
    "5sym-g128": (QuantConfig(5, group_size=128), 2),
    "6asym-g64-v1": (QuantConfig(6, symmetric=False, group_size=64), 1),  # 6-bit codes in 8-bit containers
    "7asym-channel": (QuantConfig(7, symmetric=False, scope="channel"), 2),
    "8sym-channel": (QuantConfig(8, scope="channel"), 2),
    "8asym-g32": (QuantConfig(8, symmetric=False, group_size=32), 2),
}
XMODES = (0, 1, 2, 3, INT8_XMODE)


@pytest.fixture(autouse=True)
def _restore(cpu_settings):
    yield


def _layer(cfg: QuantConfig, layout: int, n: int = 40, k: int = 320, bias: bool = False) -> QuantLinear:
    g = torch.Generator().manual_seed(0)
    lin = nn.Linear(k, n, bias=bias)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(n, k, generator=g) * torch.exp(torch.randn(n, 1, generator=g)))
        if bias:
            lin.bias.copy_(torch.randn(n, generator=g))
    return QuantLinear.from_float(lin, cfg, layout=layout)


def _x(m: int, k: int, dtype: torch.dtype) -> tuple[torch.Tensor, list[int]]:
    """``m`` rows of ``x`` and the rows holding a value that is not finite: +inf in a full block, -inf in the
    row's last (partial) block, a NaN, +inf with -inf, two +inf; one row (decode) holds +inf and -inf."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(m, k, generator=g)
    if m == 1:
        x[0, 5], x[0, k - 1] = INF, -INF
        return x.to(dtype), [0]
    x[1, 5] = INF
    x[3, k - 1] = -INF
    x[4, 40] = float("nan")
    x[5, 7], x[5, 200] = INF, -INF
    x[7, 0], x[7, 129] = INF, INF
    return x.to(dtype), [1, 3, 4, 5, 7]


def _assert_pattern(y: torch.Tensor, ref: torch.Tensor, what: str) -> None:
    for name, fn in (("isnan", torch.isnan), ("isposinf", torch.isposinf), ("isneginf", torch.isneginf)):
        got, want = fn(y), fn(ref)
        assert torch.equal(got, want), f"{what}: {name} differs at {(got != want).nonzero().tolist()[:8]}"


def _close(y: torch.Tensor, ref: torch.Tensor, tol: float, what: str) -> None:
    err = float((y.double() - ref.double()).abs().max() / ref.double().abs().max().clamp_min(1e-30))
    assert err < tol, f"{what}: relative error {err:.3g} >= {tol}"


def _fallback(xmode: int) -> int:
    """The mode a call with a value of ``x`` that is not finite runs in (every row of it): the 16- and 8-bit
    integer forms run as 2."""
    return 2 if xmode in (3, INT8_XMODE) else xmode


@pytest.mark.parametrize("cfg_id", list(CONFIGS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("m", [1, 9])
def test_kernel_gives_torch_non_finite_pattern(cfg_id, dtype, m):
    cfg, layout = CONFIGS[cfg_id]
    layer = _layer(cfg, layout)
    gemv = native_gemv4(layer.packed_weight(cfg.bits))
    if gemv is None:
        pytest.skip(f"no native matmul for this layout here: {native_status()['reason'] or 'not compiled in'}")
    k = layer.k
    x, bad = _x(m, k, dtype)
    good = [i for i in range(m) if i not in bad]
    wd = layer.dequantized_weight(torch.float32)
    ref = F.linear(x, wd.to(dtype))
    ref32 = F.linear(x.float(), wd)
    with torch.no_grad():
        for xmode in XMODES:
            what = f"{cfg_id} {dtype} m={m} xmode={xmode}"
            y = gemv(x, xmode)
            assert y is not None and y.dtype == dtype, what
            _assert_pattern(y, ref, what)
            _assert_pattern(y.float(), ref32, what + " (float32 reference)")
            if good:  # the same call with the values that are not finite replaced (the same tiles of rows)
                yg = gemv(torch.where(torch.isfinite(x), x, torch.ones((), dtype=dtype)), _fallback(xmode))
                assert bit_equal(y[good], yg[good]), f"{what}: finite rows changed"
                _close(y[good], ref32[good], 2e-2, what)


@pytest.mark.parametrize("cfg_id", ["4asym-g128", "3asym-g128", "8sym-channel", "2asym-g128"])
@pytest.mark.parametrize("cd", ["float32", "bfloat16"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("m", [1, 9, 40])
def test_layer_call_gives_torch_non_finite_pattern(cfg_id, cd, dtype, m):
    """A ``QuantLinear`` with a bias on the CPU backend (native decode, the gemm or dense prefill) against
    ``F.linear(x, W, b)``."""
    cfg, layout = CONFIGS[cfg_id]
    set_cpu_compute_dtype(cd)
    layer = _layer(cfg, layout, bias=True)
    x, bad = _x(m, layer.k, dtype)
    good = [i for i in range(m) if i not in bad]
    wd, b = layer.dequantized_weight(torch.float32), layer.bias.detach().float()
    ref32 = F.linear(x.float(), wd, b)
    with torch.no_grad():
        y = layer(x)
    what = f"{cfg_id} cd={cd} {dtype} m={m} path={cpu_path(x, layer.packed_weight(cfg.bits))}"
    _assert_pattern(y.float(), ref32, what)
    _assert_pattern(y, F.linear(x, wd.to(dtype), b.to(dtype)), what)
    if good:
        _close(y[good].float(), ref32[good], 2e-2, what)


def test_nan_anywhere_in_a_row_makes_every_output_nan():
    layer = _layer(*CONFIGS["4asym-g128"])
    gemv = native_gemv4(layer.packed_weight(4))
    if gemv is None:
        pytest.skip("no native matmul here")
    x = torch.randn(3, layer.k)
    x[0, 0], x[1, 319], x[2, 100], x[2, 101] = float("nan"), float("nan"), float("nan"), INF
    for xmode in XMODES:
        assert torch.isnan(gemv(x, xmode)).all(), xmode


def test_zero_weights_under_an_infinity_give_nan_and_the_others_signed_infinities():
    """A hand-made weight: row 0 all positive, row 1 all negative, row 2 zero in column 3 (the infinity's),
    row 3 mixed signs elsewhere: ``+inf``, ``-inf``, NaN, ``+inf`` for ``x[3] = +inf``."""
    lin = nn.Linear(64, 16, bias=False)
    with torch.no_grad():
        w = torch.ones(16, 64)
        w[1] = -1.0
        w[2, 3] = 0.0
        w[3, ::2] = -1.0
        w[3, 3] = 0.5
        lin.weight.copy_(w)
    layer = QuantLinear.from_float(lin, QuantConfig(8, symmetric=True, scope="channel"))
    gemv = native_gemv4(layer.packed_weight(8))
    if gemv is None:
        pytest.skip("no native matmul here")
    x = torch.rand(1, 64) + 0.5
    x[0, 3] = INF
    for xmode in XMODES:
        y = gemv(x, xmode)[0, :4]
        assert torch.isposinf(y[0]) and torch.isneginf(y[1]) and torch.isnan(y[2]) and torch.isposinf(y[3]), \
            (xmode, y.tolist())
