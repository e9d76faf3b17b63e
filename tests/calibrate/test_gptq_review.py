"""Adversarial review of GPTQ (medquant/calibrate/gptq.py) against an independent plain-torch float64 GPTQ.

The reference below is written from the formulas alone (SPEC.md / the module docstring): its quantizer does not
call medquant's ``compute_qparams``; it is textbook GPTQ, one column at a time, every later column updated at once.
"""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from medquant import QuantConfig, QuantConv2d, QuantLinear, quantize_
from medquant.calibrate.gptq import (
    HessianAccumulator,
    gptq_quantize_,
    gptq_quantize_layer,
    gptq_quantize_sequential,
    gptq_quantize_weight,
)
from medquant.quant.core import dequantize, quantize
from medquant.testing.zoo import ZOO_BY_NAME


# ---------------------------------------------------------------------------------------------- reference
def _ref_params(cols: torch.Tensor, bits: int, sym: bool, sd: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of ``cols`` (n, m) float64: (scale, zero) from the spec's formulas, scale rounded to ``sd``."""
    tiny = torch.finfo(sd).tiny if sd != torch.float16 else 2.0 ** -14
    if sym and bits == 1:
        s = cols.abs().mean(1)
        z = torch.zeros_like(s)
    elif sym:
        s = cols.abs().amax(1) / (2 ** (bits - 1) - 1)
        z = torch.zeros_like(s)
    else:
        lo = cols.amin(1).clamp_max(0)
        hi = cols.amax(1).clamp_min(0)
        s = (hi - lo) / (2**bits - 1)
    s = s.clamp_min(tiny).to(sd).double()
    if not sym:
        z = torch.clamp(torch.round(-lo / s), 0, 2**bits - 1)
    return s, z


def _ref_q(col: torch.Tensor, s: torch.Tensor, z: torch.Tensor, bits: int, sym: bool) -> torch.Tensor:
    if sym and bits == 1:
        return torch.where(col >= 0, s, -s)
    if sym:
        qmax = 2 ** (bits - 1) - 1
        return torch.clamp(torch.round(col / s), -qmax, qmax) * s
    return (torch.clamp(torch.round(col / s) + z, 0, 2**bits - 1) - z) * s


def _ref_gptq(w: torch.Tensor, h: torch.Tensor, bits: int, sym: bool, scope: str, gs: int, sd: torch.dtype,
              damp: float = 0.01, act_order: bool = False) -> torch.Tensor:
    """Dequantized GPTQ weight (original column order), float64."""
    w = w.double().clone()
    h = h.double().clone()
    n, k = w.shape
    d = torch.diagonal(h).clone()
    dead = d == 0
    mean = d[~dead].mean() if bool((~dead).any()) else torch.tensor(1.0, dtype=torch.float64)
    order = torch.argsort(d, descending=True, stable=True) if act_order else torch.arange(k)
    h[dead, dead] = mean
    w[:, dead] = 0
    h = h + damp * mean * torch.eye(k, dtype=torch.float64)
    hp = h[order][:, order]
    u = torch.linalg.cholesky(torch.linalg.inv(hp), upper=True)
    wp = w[:, order].clone()
    out = torch.zeros(n, k, dtype=torch.float64)
    if scope == "channel":
        fixed = _ref_params(w, bits, sym, sd)
    elif scope == "tensor":
        s, z = _ref_params(w.reshape(1, -1), bits, sym, sd)
        fixed = (s.expand(n), z.expand(n))
    cache: dict[int, tuple] = {}
    pos_of = {int(c): j for j, c in enumerate(order)}
    for j in range(k):
        c = int(order[j])
        if scope == "group":
            g = c // gs
            if g not in cache:
                cols = [pos_of[cc] for cc in range(g * gs, min(g * gs + gs, k))]
                cache[g] = _ref_params(wp[:, cols], bits, sym, sd)
            s, z = cache[g]
        else:
            s, z = fixed
        q = _ref_q(wp[:, j], s, z, bits, sym)
        out[:, c] = q
        e = (wp[:, j] - q) / u[j, j]
        wp[:, j:] -= e[:, None] * u[j, j:][None, :]
    return out


def _correlated(n: int, k: int, seed: int, rank: int = 6) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, rank, generator=g) @ torch.randn(rank, k, generator=g) + 0.05 * torch.randn(n, k, generator=g)


def _h(x: torch.Tensor) -> torch.Tensor:
    x = x.double()
    return 2 * x.T @ x / x.shape[0]


CASES = [  # (bits, symmetric, scope, group_size, scale dtype)
    (4, True, "group", 16, "float16"),
    (4, False, "group", 24, "float32"),      # K = 64 not a multiple of 24
    (8, True, "group", 32, "float16"),
    (8, False, "channel", 128, "float32"),
    (1, True, "group", 16, "float32"),
    (1, False, "channel", 128, "float32"),
    (2, False, "tensor", 128, "float32"),
    (3, True, "tensor", 128, "bfloat16"),
]


# ---------------------------------------------------------------------------------------------- one weight
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"b{c[0]}-sym{c[1]}-{c[2]}{c[3]}-{c[4]}")
@pytest.mark.parametrize("act_order", [False, True])
def test_matches_independent_float64_reference(case, act_order):
    bits, sym, scope, gs, sd = case
    cfg = QuantConfig(bits, symmetric=sym, scope=scope, group_size=gs, scale_dtype=sd)
    x = _correlated(300, 64, seed=1)
    x[:, 9] = 0.0  # a dead input
    h = _h(x)
    w = torch.randn(16, 64, generator=torch.Generator().manual_seed(2)) * 0.1
    qt, _ = gptq_quantize_weight(w, h, cfg, act_order=act_order, block_size=20, dtype=torch.float64)
    ref = _ref_gptq(w, h, bits, sym, scope, gs, cfg.torch_scale_dtype, act_order=act_order)
    got = dequantize(qt, torch.float64)
    # scales are formed in float32 (one ulp from the float64 formula); a different code would be off by ~1e-2
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-9)
    if not (sym and bits == 1):  # 1-bit symmetric has no zero level: a dead column is +-s
        assert torch.count_nonzero(got[:, 9]) == 0


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"b{c[0]}-sym{c[1]}-{c[2]}{c[3]}-{c[4]}")
def test_identity_hessian_is_round_to_nearest(case):
    bits, sym, scope, gs, sd = case
    cfg = QuantConfig(bits, symmetric=sym, scope=scope, group_size=gs, scale_dtype=sd)
    w = torch.randn(16, 64, generator=torch.Generator().manual_seed(3))
    h = 3.7 * torch.eye(64, dtype=torch.float64)
    for act_order in (False, True):
        qt, _ = gptq_quantize_weight(w, h, cfg, act_order=act_order)
        rtn = quantize(w, cfg)
        assert torch.equal(qt.codes, rtn.codes) and torch.equal(qt.scales, rtn.scales)
        assert (qt.zeros is None) == (rtn.zeros is None)
        if rtn.zeros is not None:
            assert torch.equal(qt.zeros, rtn.zeros)


@pytest.mark.parametrize("case", CASES[:4], ids=lambda c: f"b{c[0]}-sym{c[1]}-{c[2]}{c[3]}")
def test_reconstruction_error_not_above_rtn(case):
    bits, sym, scope, gs, sd = case
    cfg = QuantConfig(bits, symmetric=sym, scope=scope, group_size=gs, scale_dtype=sd)
    x = _correlated(400, 64, seed=4).double()
    w = torch.randn(16, 64, generator=torch.Generator().manual_seed(5)) * 0.1
    rtn = dequantize(quantize(w, cfg), torch.float64)
    for act_order in (False, True):
        qt, _ = gptq_quantize_weight(w, _h(x), cfg, act_order=act_order)
        got = dequantize(qt, torch.float64)
        assert (x @ (w.double() - got).T).norm() <= (x @ (w.double() - rtn).T).norm()


# ---------------------------------------------------------------------------------------------- layers / models
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_layer_matches_reference_and_its_forward(dtype):
    """A float16 / bfloat16 layer: the Hessian in float64 from the half inputs, the codes those of the float64
    reference on the half weights, and the layer computes x @ W^T with its dequantized weight."""
    lin = nn.Linear(64, 16).to(dtype)
    x = _correlated(200, 64, seed=6).to(dtype)
    acc = HessianAccumulator(lin, "lin")
    acc.add(x.reshape(4, 50, 64))
    h = acc.hessian()[0]
    assert h.dtype == torch.float64
    torch.testing.assert_close(h, _h(x.float()), rtol=1e-5, atol=1e-6)
    cfg = QuantConfig(4, group_size=16)
    q = gptq_quantize_layer(lin, h, cfg, act_order=True, name="lin")
    ref = _ref_gptq(lin.weight.detach(), h, 4, True, "group", 16, torch.float16, act_order=True)
    wq = q.dequantized_weight().double()
    assert (wq - ref).abs().max() < 1e-3 * ref.abs().max()
    with torch.no_grad():
        y = q(x[:5])
    assert y.dtype == dtype
    torch.testing.assert_close(y.float(), (x[:5].float() @ wq.float().T + lin.bias.float()), rtol=2e-2, atol=2e-2)


def test_conv_act_order_groups_match_reference_and_forward():
    torch.manual_seed(7)
    conv = nn.Conv2d(4, 6, 3, padding=1)
    x = torch.randn(3, 4, 8, 8).cumsum(1)
    acc = HessianAccumulator(conv, "conv")
    acc.add(x)
    h = acc.hessian()[0]
    cfg = QuantConfig(4, symmetric=False, group_size=8, scale_dtype="float32")  # K = 36: partial last group
    q = gptq_quantize_layer(conv, h, cfg, act_order=True, name="conv", dtype=torch.float64)
    assert isinstance(q, QuantConv2d)
    ref = _ref_gptq(conv.weight.detach().reshape(6, -1), h, 4, False, "group", 8, torch.float32, act_order=True)
    wq = q.dequantized_weight().reshape(6, -1).double()
    torch.testing.assert_close(wq, ref, rtol=0, atol=1e-6)
    with torch.no_grad():
        torch.testing.assert_close(q(x), nn.functional.conv2d(x, wq.reshape_as(conv.weight).float(), conv.bias,
                                                              padding=1), rtol=1e-4, atol=1e-4)


def test_one_token_calibration():
    lin = nn.Linear(64, 16)
    acc = HessianAccumulator(lin, "lin")
    acc.add(torch.randn(1, 1, 64))
    q = gptq_quantize_layer(lin, acc.hessian(), QuantConfig(4, group_size=16), name="lin")
    ref = _ref_gptq(lin.weight.detach(), acc.hessian()[0], 4, True, "group", 16, torch.float16)
    assert acc.rows == 1
    torch.testing.assert_close(q.dequantized_weight().double(), ref, rtol=0, atol=1e-3)


class _Shared(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(8)
        shared = nn.Linear(32, 32)
        self.a = shared
        self.b = shared
        self.head = nn.Linear(32, 4)

    def forward(self, x):
        return self.head(self.b(torch.relu(self.a(x))))


def test_shared_module_stays_one_quantized_module():
    """A module bound under two names is one layer: quantize_ swaps it under both names; GPTQ left the second
    name on the float module (half the uses of the layer unquantized)."""
    model = _Shared()
    rtn = quantize_(copy.deepcopy(model), QuantConfig(4, group_size=16))
    assert rtn.a is rtn.b and isinstance(rtn.a, QuantLinear)
    x = _correlated(64, 32, seed=9)
    gptq_quantize_(model, QuantConfig(4, group_size=16), [x], skip=["head"], progress=False)
    assert isinstance(model.a, QuantLinear) and model.b is model.a
    # its Hessian covers both uses: the inputs at a and at b
    ref = _Shared()
    with torch.no_grad():
        mid = torch.relu(ref.a(x))
    xs = torch.cat([x, mid])
    expect = _ref_gptq(ref.a.weight.detach(), _h(xs), 4, True, "group", 16, torch.float16)
    assert model.a.calibration["rows"] == 128
    torch.testing.assert_close(model.a.dequantized_weight().double(), expect, rtol=0, atol=2e-3)


def test_error_mid_way_leaves_the_model_unchanged():
    """A layer that fails after earlier stages were quantized (here a singular Hessian with damp=0) raises, and
    the model is exactly as before (quantize_'s guarantee); before, the earlier layers stayed quantized."""
    torch.manual_seed(10)
    model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 16), nn.Linear(16, 4))
    with torch.no_grad():
        model[2].weight.copy_(torch.outer(torch.randn(16), torch.randn(16)))  # layer 3 sees rank-2 inputs
    before = {k: v.clone() for k, v in model.state_dict().items()}
    mods = list(model)
    with pytest.raises(ValueError, match="layer 3"):
        gptq_quantize_(model, QuantConfig(4, group_size=16), [torch.randn(32, 16)], damp=0.0, progress=False)
    assert all(a is b for a, b in zip(model, mods))
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)



def _gptq_llama(model, cfg, inputs, sequential):
    """GPTQ of a zoo model on one batch, the head kept float: block by block or whole."""
    if sequential:
        gptq_quantize_sequential(model, cfg, [inputs], skip=["@head"], device="cpu", progress=False)
    else:
        gptq_quantize_(model, cfg, [inputs], skip=["@head"], progress=False)

@pytest.mark.parametrize("sequential", [False, True], ids=["whole", "sequential"])
def test_shared_module_inside_a_block_is_swapped_under_every_name(sequential):
    e = ZOO_BY_NAME["llama"]
    model = e.build()
    mlp = model.model.layers[0].mlp
    mlp.up_alias = mlp.up_proj  # the same module under a second name
    inputs = e.inputs(model)
    cfg = QuantConfig(4, group_size=32)
    _gptq_llama(model, cfg, inputs, sequential)
    assert isinstance(mlp.up_proj, QuantLinear) and mlp.up_alias is mlp.up_proj


def test_quantized_layers_keep_the_train_mode_of_the_layers_they_replace():
    """GPTQ runs the model in eval mode; the new layers get the mode the float layers had before (as quantize_
    gives them), not the eval mode of the calibration run."""
    model = nn.Sequential(nn.Linear(32, 32), nn.Linear(32, 4))
    model.train()
    model[1].eval()
    gptq_quantize_(model, QuantConfig(4, group_size=32), [torch.randn(8, 32)], progress=False)
    assert isinstance(model[0], QuantLinear) and isinstance(model[1], QuantLinear)
    assert model.training and model[0].training and not model[1].training


def test_model_that_is_itself_the_layer_is_refused_up_front():
    """quantize_ refuses a bare layer (nothing to swap it into) before any work; GPTQ ran the calibration and the
    factorisation first and then failed inside swap_module with a message about submodule names."""
    lin = nn.Linear(32, 8)
    calls = []
    lin.register_forward_pre_hook(lambda m, a: calls.append(1))
    with pytest.raises(ValueError, match="gptq_quantize_layer"):
        gptq_quantize_(lin, QuantConfig(4, group_size=32), [torch.randn(4, 32)], progress=False)
    assert not calls and type(lin) is nn.Linear


class _NanAtPadding(nn.Module):
    """A token model whose hidden states are NaN at the padding positions (attention_mask 0), as a normalisation
    over an empty set makes them; the real positions are finite."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(11)
        self.emb = nn.Embedding(10, 32)
        self.fc1 = nn.Linear(32, 32)
        self.fc2 = nn.Linear(32, 8)

    def forward(self, input_ids, attention_mask, nan_at=None):
        h = self.emb(input_ids)
        keep = attention_mask if nan_at is None else 1 - nan_at
        h = torch.where(keep[..., None] != 0, h, torch.full_like(h, float("nan")))
        return self.fc2(torch.relu(self.fc1(h)))


def test_non_finite_values_at_padding_positions_are_not_calibration_data():
    """Padding rows are left out of X; their values (NaN here) must not refuse the batch. Before, the first
    batch's call-order pass checked every row of the input and raised 'calibration input holds NaN/inf'. The
    Hessian of fc1 is that of the real tokens alone."""
    model = _NanAtPadding()
    ids = torch.randint(0, 10, (2, 6), generator=torch.Generator().manual_seed(12))
    am = torch.ones(2, 6, dtype=torch.long)
    am[1, 4:] = 0
    with torch.no_grad():
        real = model.emb(ids)[am != 0]                                     # (10, 32): the real tokens
    w = model.fc1.weight.detach().clone()
    recs = gptq_quantize_(model, QuantConfig(4, group_size=16), [{"input_ids": ids, "attention_mask": am}],
                          skip=["fc2"], progress=False)
    assert recs["fc1"]["rows"] == 10
    ref = _ref_gptq(w, _h(real), 4, True, "group", 16, torch.float16)
    torch.testing.assert_close(model.fc1.dequantized_weight().double(), ref, rtol=0, atol=2e-3)
    # a NaN at a real position is still refused, naming the layer, in the first batch or a later one
    nan_at = torch.zeros(2, 6, dtype=torch.long)
    nan_at[0, 2] = 1
    ok = {"input_ids": ids, "attention_mask": am, "nan_at": 1 - am}
    bad = {"input_ids": ids, "attention_mask": am, "nan_at": nan_at}
    for batches in ([bad], [ok, bad]):
        with pytest.raises(ValueError, match="layer fc1: calibration input holds"):
            gptq_quantize_(_NanAtPadding(), QuantConfig(4, group_size=16), batches, progress=False)


@pytest.mark.parametrize("sequential", [False, True])
def test_hooks_on_a_layer_run_around_its_gptq_replacement(sequential):
    """As quantize_: a forward hook registered on a layer keeps running after GPTQ swapped the layer (and its
    handle still removes it); GPTQ's swaps dropped it."""
    e = ZOO_BY_NAME["llama"]
    model = e.build()
    seen = []
    handle = model.model.layers[0].mlp.up_proj.register_forward_hook(lambda m, a, out: seen.append(type(m)))
    inputs = e.inputs(model)
    cfg = QuantConfig(4, group_size=32)
    _gptq_llama(model, cfg, inputs, sequential)
    seen.clear()
    with torch.no_grad():
        model(**inputs)
    assert seen == [QuantLinear]
    handle.remove()
    with torch.no_grad():
        model(**inputs)
    assert seen == [QuantLinear]
