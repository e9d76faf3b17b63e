"""The CPU backend of ``packed_linear`` (aten int4 / int8 weight-only kernels, dense path) against the reference.

Reference: ``x @ W^T`` with ``W`` the layer's dequantized weight (``(u - z) * s`` in float32), in float64 here.
Tolerances fit the compute dtype: float32 compute ~1e-5 relative to the output scale, bfloat16 ~1e-2.

These tests pin rows to aten's int4 / int8 kernels (``set_cpu_int4_kernel("aten")``), except where a test is
parametrized over both choices; medquant's native 4- and 8-bit kernels (the default where the CPU has AVX512)
have their own tests in ``test_native_gemv.py``.
"""
from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import medquant as mq
from medquant.kernels import (
    PackedWeight,
    cpu_features,
    cpu_path,
    force_backend,
    get_cpu_compute_dtype,
    packed_linear,
    select_kernel,
    set_cpu_compute_dtype,
    set_cpu_dense_min_m,
    set_cpu_int4_kernel,
)
from medquant.kernels.cpu import (
    DEFAULT_DENSE_MIN_M,
    DEFAULT_DENSE_MIN_M_INT4,
    cpu_plan,
    default_cpu_compute_dtype,
    dense_min_m,
)
from medquant.kernels.layout import storage_bits
from medquant.kernels.native import native_status
from medquant.quant import QuantConfig, QuantLinear

TOL = {torch.float32: 2e-5, torch.bfloat16: 2e-2}


@pytest.fixture(autouse=True)
def _restore_settings(cpu_settings):
    set_cpu_int4_kernel("aten")


def _native_takes(layer: QuantLinear, bits: int) -> bool:
    """Whether medquant's native kernel runs this row group under ``set_cpu_int4_kernel("auto")`` here: a library
    built with AVX512F + BW, and for layouts other than 4- and 8-bit containers (the dense 3/5/6/7-bit layout,
    1- and 2-bit containers) AVX512-VBMI too."""
    from medquant.kernels.native import gemv4_decline

    return bool(native_status()["gemv4"]) and gemv4_decline(layer.packed_weight(bits)) is None


def _rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y.double() - ref).abs().max() / ref.abs().max().clamp_min(1e-12))


def _ref(layer: QuantLinear, x: torch.Tensor) -> torch.Tensor:
    y = x.double() @ layer.dequantized_weight(torch.float64).t()
    return y + layer.bias.double() if layer.bias is not None else y


def _layer(n: int, k: int, cfg: QuantConfig, seed: int = 0, bias: bool = True) -> QuantLinear:
    g = torch.Generator().manual_seed(seed)
    lin = nn.Linear(k, n, bias=bias)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(n, k, generator=g))
        if bias:
            lin.bias.copy_(torch.randn(n, generator=g))
    return QuantLinear.from_float(lin, cfg)


def _paths(layer: QuantLinear, x2: torch.Tensor) -> set[str]:
    return {cpu_path(x2, layer.packed_weight(b)) for b in layer.bit_groups if 1 <= b <= 8}


# ------------------------------------------------------------------------------------------- features
def test_cpu_features_and_default_dtype():
    f = cpu_features()
    for key in ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "native_bf16", "capability"):
        assert key in f
    assert f["native_bf16"] == (f["avx512_bf16"] or f["amx_bf16"])
    assert default_cpu_compute_dtype() == (torch.bfloat16 if f["native_bf16"] else torch.float32)
    set_cpu_compute_dtype(None)
    assert get_cpu_compute_dtype() == default_cpu_compute_dtype()
    set_cpu_compute_dtype("float32")
    assert get_cpu_compute_dtype() == torch.float32
    with pytest.raises(ValueError, match="compute dtype"):
        set_cpu_compute_dtype(torch.float64)


# ------------------------------------------------------------------------------------------- every path
CASES = [  # bits, symmetric, scope, group size, expected kernel at small M
    (4, True, "group", 128, "int4"),
    (4, False, "group", 64, "int4"),
    (3, False, "group", 128, "int4"),
    (3, True, "group", 32, "int4"),
    (2, False, "group", 128, "int4"),
    (2, True, "group", 256, "int4"),
    (1, False, "group", 64, "int4"),
    (1, True, "group", 128, "int4"),
    (4, True, "channel", 128, "int4"),
    (2, False, "tensor", 128, "int4"),
    (4, True, "group", 96, "int4"),  # a multiple of 32: three kernel groups of 32 per scale
    (8, True, "channel", 128, "int8"),
    (6, False, "channel", 128, "int8"),
    (5, True, "tensor", 128, "int8"),
    (8, True, "group", 128, "dense"),  # no weight-only kernel takes several scales per row: dense at every M
    (8, False, "group", 32, "dense"),
    (6, True, "group", 64, "dense"),
]


@pytest.mark.filterwarnings("ignore:medquant CPU kernels:RuntimeWarning")
@pytest.mark.parametrize("int4_kernel", ["aten", "auto"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("bits,sym,scope,gs,kernel", CASES,
                         ids=[f"{c[0]}b-{'sym' if c[1] else 'asym'}-{c[2]}{c[3]}" for c in CASES])
def test_paths_match_the_reference(bits, sym, scope, gs, kernel, dtype, int4_kernel):
    set_cpu_compute_dtype(dtype)
    set_cpu_int4_kernel(int4_kernel)
    layer = _layer(48, 576, QuantConfig(bits, symmetric=sym, scope=scope, group_size=gs))  # 576: K padded
    if int4_kernel == "auto" and _native_takes(layer, bits):
        # runs every M below the dense threshold, in float32 compute too
        w = layer.packed_weight(bits)
        kernel = f"native{storage_bits(bits, w.dense)}"
    g = torch.Generator().manual_seed(1)
    # W4 asymmetric rows with zero points far from 8 run the int4 kernel in float32 only: float32's rule on M
    f32_rule = dtype == torch.float32 or (kernel == "int4" and bits == 4 and not sym)
    for m in (1, 7, 300):
        x = torch.randn(m, 576, generator=g)
        path = _paths(layer, x)
        if kernel in ("reference", "dense") or m == 1 or (m == 7 and (not f32_rule or kernel.startswith("native"))):
            assert path == {kernel}, (m, path)
        elif kernel.startswith("native") and dtype == torch.bfloat16 and native_status()["gemm"]:
            assert path == {"gemm"}, (m, path)  # the native blocked matmul (set_cpu_prefill_kernel)
        else:
            assert path == {"dense"}, (m, path)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            y = layer(x)
        assert y.dtype == torch.float32
        assert _rel_err(y, _ref(layer, x)) < TOL[dtype], (m, path)


def test_the_cpu_backend_is_chosen_in_auto_and_can_be_forced_off():
    layer = _layer(64, 256, QuantConfig(4, group_size=128))
    x = torch.randn(2, 256)
    w = layer.packed_weight(4)
    assert select_kernel("packed_linear", x, w).backend == "cpu"
    with force_backend("torch"):
        ref = layer(x)
    torch.testing.assert_close(layer(x), ref, rtol=1e-5, atol=1e-5)


def test_compute_dtype_bf16_by_default_where_native_and_outputs_keep_the_callers_dtype():
    set_cpu_compute_dtype(None)
    layer = _layer(64, 256, QuantConfig(4, group_size=128))
    x = torch.randn(3, 256)
    for dt in (torch.float32, torch.bfloat16, torch.float16):
        assert layer(x.to(dt)).dtype == dt
    if cpu_features()["native_bf16"]:
        assert get_cpu_compute_dtype() == torch.bfloat16
        assert _paths(layer, x) == {"int4"}
        assert _rel_err(layer(x), _ref(layer, x)) < TOL[torch.bfloat16]


def test_forced_float32_compute_like_a_cpu_without_bf16():
    """A CPU without native bf16 gets float32 compute: int4 kernel at M = 1 only, the dense path above."""
    set_cpu_compute_dtype(torch.float32)
    layer = _layer(64, 256, QuantConfig(3, group_size=64))
    for m, path in ((1, "int4"), (2, "dense"), (300, "dense")):
        x = torch.randn(m, 256)
        assert _paths(layer, x) == {path}
        assert _rel_err(layer(x), _ref(layer, x)) < 1e-5


def test_per_layer_compute_dtype_from_the_config_wins_and_survives_to_and_copy():
    import copy

    set_cpu_compute_dtype(torch.bfloat16)
    layer = _layer(64, 256, QuantConfig(4, group_size=128, compute_dtype="float32"))
    x = torch.randn(5, 256)
    assert _paths(layer, x) == {"dense"}  # float32 compute at M = 5
    assert _rel_err(layer(x), _ref(layer, x)) < 1e-5
    for other in (layer.to(torch.float32), copy.deepcopy(layer)):
        assert _paths(other, x) == {"dense"}
    assert QuantConfig(4).to_dict() == QuantConfig.from_dict(QuantConfig(4).to_dict()).to_dict()
    assert "compute_dtype" not in QuantConfig(4).to_dict()  # recipes without it keep their form
    assert QuantConfig.from_dict(layer.config.to_dict()).compute_dtype == "float32"
    with pytest.raises(ValueError, match="compute_dtype"):
        QuantConfig(4, compute_dtype="float64")


def test_dense_threshold_is_configurable():
    set_cpu_compute_dtype(torch.bfloat16)
    layer = _layer(64, 256, QuantConfig(4, group_size=128))
    x = torch.randn(8, 256)
    assert _paths(layer, x) == {"int4"}
    set_cpu_dense_min_m(4)
    assert _paths(layer, x) == {"dense"}
    assert _rel_err(layer(x), _ref(layer, x)) < TOL[torch.bfloat16]


def test_dense_threshold_defaults_differ_per_kernel_and_one_setting_moves_both():
    set_cpu_compute_dtype(torch.bfloat16)
    w4 = _layer(64, 256, QuantConfig(4, group_size=128))
    w8 = _layer(64, 256, QuantConfig(8, scope="channel"))
    assert (dense_min_m("int4"), dense_min_m("int8")) == (DEFAULT_DENSE_MIN_M_INT4, DEFAULT_DENSE_MIN_M) == (32, 72)
    for m, p4, p8 in ((31, "int4", "int8"), (32, "dense", "int8"), (71, "dense", "int8"), (72, "dense", "dense")):
        x = torch.randn(m, 256)
        assert (_paths(w4, x), _paths(w8, x)) == ({p4}, {p8}), m
    set_cpu_dense_min_m(100)
    x = torch.randn(80, 256)
    assert (_paths(w4, x), _paths(w8, x)) == ({"int4"}, {"int8"})
    assert dense_min_m("int4") == dense_min_m("int8") == 100
    set_cpu_dense_min_m(None)
    assert dense_min_m("int4") == 32
    assert dense_min_m("gemm") == 16  # native row groups switch to the blocked matmul from here (bf16 compute)
    assert (dense_min_m("gemm_split"), dense_min_m("gemm_int16")) == (8, 12)  # float32 x, split / int16
    with pytest.raises(ValueError, match="'int4', 'int8', 'gemm', 'gemm_split', 'gemm_int16'"):
        dense_min_m("dense")


# ------------------------------------------------------------------------------------------- fallbacks
def test_rows_not_a_multiple_of_16_run_the_reference_with_one_warning():
    set_cpu_compute_dtype(torch.bfloat16)
    layer = _layer(24, 256, QuantConfig(4, group_size=128))
    x = torch.randn(3, 256)
    with pytest.warns(RuntimeWarning, match=r"N=24 K=256 bits=4 .*reference.*multiple of 16"):
        y = layer(x)
    assert select_kernel("packed_linear", x, layer.packed_weight(4)).backend == "torch"
    torch.testing.assert_close(y.double(), _ref(layer, x), rtol=1e-5, atol=1e-5)  # float32 reference
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        layer(x)  # once only
        _layer(24, 256, QuantConfig(4, group_size=128), seed=3)(x)  # same shape: not again


def test_group_size_the_int4_kernel_cannot_take_runs_the_reference():
    layer = _layer(32, 256, QuantConfig(4, group_size=16))
    x = torch.randn(2, 256)
    with pytest.warns(RuntimeWarning, match="group size 16"):
        y = layer(x)
    torch.testing.assert_close(y.double(), _ref(layer, x), rtol=1e-5, atol=1e-5)


def test_asymmetric_8bit_maps_only_where_exact():
    set_cpu_compute_dtype(torch.float32)
    g = torch.Generator().manual_seed(0)
    lin = nn.Linear(128, 32)
    with torch.no_grad():  # all-positive rows: z = 0, codes up to 255 do not fit int8 after u - z
        lin.weight.copy_(torch.rand(32, 128, generator=g) + 0.1)
    layer = QuantLinear.from_float(lin, QuantConfig(8, symmetric=False, scope="channel"))
    x = torch.randn(1, 128)
    with pytest.warns(RuntimeWarning, match="int8 range"):
        assert _paths(layer, x) == {"dense"}  # dequantized at every call instead
    assert _rel_err(layer(x), _ref(layer, x)) < 1e-5


def test_non_contiguous_and_3d_inputs():
    set_cpu_compute_dtype(torch.bfloat16)
    layer = _layer(64, 200, QuantConfig(4, group_size=64))
    x = torch.randn(200, 6).t()  # (6, 200), not contiguous
    assert not x.is_contiguous()
    with pytest.warns(RuntimeWarning, match="non-contiguous"):  # copied (the cast keeps the strides): warned
        y = layer(x)
    assert _rel_err(y, _ref(layer, x)) < TOL[torch.bfloat16]
    xb = torch.randn(200, 6, dtype=torch.bfloat16).t()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        y = layer(xb)  # once only
    assert _rel_err(y, _ref(layer, xb.float())) < TOL[torch.bfloat16]
    x3 = torch.randn(2, 3, 200)
    y3 = layer(x3)
    assert y3.shape == (2, 3, 64)
    assert _rel_err(y3.reshape(6, 64), _ref(layer, x3.reshape(6, 200))) < TOL[torch.bfloat16]


# ------------------------------------------------------------------------------------------- mixed bits
@pytest.mark.filterwarnings("ignore:medquant CPU kernels:RuntimeWarning")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_mixed_bit_layer_each_row_group_on_its_own_kernel(dtype):
    set_cpu_compute_dtype(dtype)
    # 32 rows of 4 bits, 16 of 2, 16 of 8, 8 of 3 (not a multiple of 16: reference), 4 pruned, 4 float16
    bits = (4,) * 32 + (2,) * 16 + (8,) * 16 + (3,) * 8 + (0,) * 4 + (16,) * 4
    perm = torch.randperm(len(bits), generator=torch.Generator().manual_seed(0)).tolist()
    cfg = QuantConfig(4, scope="channel", channel_bits=tuple(bits[i] for i in perm))
    layer = _layer(len(bits), 320, cfg)
    x = torch.randn(1, 320)
    kinds = {b: cpu_path(x, layer.packed_weight(b)) for b in (2, 3, 4, 8)}
    assert kinds == {2: "int4", 3: "reference", 4: "int4", 8: "int8"}
    for m in (1, 5, 300):
        x = torch.randn(m, 320)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            assert _rel_err(layer(x), _ref(layer, x)) < TOL[dtype]


# ------------------------------------------------------------------------------------------- caching
def test_repacked_once_and_rebuilt_after_load_state_dict_and_to():
    set_cpu_compute_dtype(torch.bfloat16)
    layer = _layer(64, 256, QuantConfig(4, group_size=128))
    x = torch.randn(1, 256)
    layer(x)
    plan = cpu_plan(layer.packed_weight(4))
    layer(x)
    assert cpu_plan(layer.packed_weight(4)) is plan  # built once, not per call
    assert "cpu" not in " ".join(layer.state_dict())  # nothing of it in the state dict
    assert set(layer.state_dict()) == {"qweight_4", "scales_4", "bias"}
    other = _layer(64, 256, QuantConfig(4, group_size=128), seed=5)
    layer.load_state_dict(other.state_dict())
    assert cpu_plan(layer.packed_weight(4)) is not plan
    assert _rel_err(layer(x), _ref(other, x)) < TOL[torch.bfloat16]
    plan2 = cpu_plan(layer.packed_weight(4))
    layer.to(torch.bfloat16)  # a cast keeps the stored tensors (only outputs change dtype): and so the plan
    assert layer.scales_4.dtype == torch.float16 and cpu_plan(layer.packed_weight(4)) is plan2
    xb = x.to(torch.bfloat16)
    assert _rel_err(layer(xb), _ref(layer, xb.float())) < TOL[torch.bfloat16]
    with torch.no_grad():
        layer.scales_4.mul_(2)  # changed in place: rebuilt
    assert cpu_plan(layer.packed_weight(4)) is not plan2
    assert _rel_err(layer(xb), _ref(layer, xb.float())) < TOL[torch.bfloat16]


@pytest.mark.parametrize("bits,scope,mixed", [(4, "group", False), (8, "channel", False), (4, "group", True)])
def test_load_state_dict_under_inference_mode_is_not_run_stale(bits, scope, mixed):
    # inference tensors track no version: codes copied in by load_state_dict must still replace the repacked ones
    cb = (4,) * 32 + (8,) * 32 if mixed else None
    cfg = QuantConfig(bits, scope=scope, group_size=64, channel_bits=cb)
    x = torch.randn(1, 128)
    with torch.inference_mode():
        layer, other = _layer(64, 128, cfg), _layer(64, 128, cfg, seed=5)
        layer(x)
        layer.load_state_dict(other.state_dict())
        y = layer(x)
    assert _rel_err(y, _ref(other, x)) < TOL[torch.float32]


def test_save_load_runs_the_fast_path(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    from medquant.testing.zoo import text_kwargs

    set_cpu_compute_dtype(torch.bfloat16)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**text_kwargs())).eval()
    mq.quantize_(model, QuantConfig(4, group_size=64))
    ids = torch.randint(0, 200, (1, 9))
    with torch.no_grad():
        before = model(ids).logits
    mq.save(model, tmp_path / "m")
    loaded = mq.load(tmp_path / "m").eval()
    qlayers = [m for m in loaded.modules() if isinstance(m, QuantLinear)]
    assert qlayers
    assert all(select_kernel("packed_linear", torch.randn(1, q.in_features), q.packed_weight(4)).backend == "cpu"
               for q in qlayers)
    with torch.no_grad():
        after = loaded(ids).logits
        with force_backend("torch"):
            ref = loaded(ids).logits
    torch.testing.assert_close(after, before)  # same codes, same path
    assert _rel_err(after, ref.double()) < 5e-2


def test_quantize_runs_the_fast_path_on_every_layer_of_a_zoo_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    from medquant.testing.zoo import text_kwargs

    set_cpu_compute_dtype(None)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**text_kwargs(num_key_value_heads=2))).eval()
    mq.quantize_(model, QuantConfig(bits=4, group_size=128))
    ids = torch.randint(0, 200, (2, 7))
    used = []
    for q in (m for m in model.modules() if isinstance(m, QuantLinear)):
        used.append(cpu_path(torch.randn(1, q.in_features), q.packed_weight(4)))
    assert set(used) == {"int4"}
    with torch.no_grad():
        y = model(ids).logits
        with force_backend("torch"):
            ref = model(ids).logits
    tol = TOL[get_cpu_compute_dtype()] * 3  # a few layers of bf16 rounding
    assert _rel_err(y, ref.double()) < tol


# ------------------------------------------------------------------------------------------- torch.compile
def test_torch_compile_traces_the_fast_path():
    set_cpu_compute_dtype(torch.bfloat16)
    model = nn.Sequential(nn.Linear(256, 128), nn.ReLU(), nn.Linear(128, 64)).eval()
    for i in (0, 2):
        model[i] = QuantLinear.from_float(model[i], QuantConfig(4, group_size=64))
    x = torch.randn(1, 256)
    assert _paths(model[0], x) == {"int4"}
    with torch.no_grad():
        eager = model(x)
        torch._dynamo.reset()
        compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
        out = compiled(x)
    torch.testing.assert_close(out, eager)


def test_packed_linear_function_on_a_bundle():
    set_cpu_compute_dtype(torch.float32)
    layer = _layer(32, 128, QuantConfig(2, group_size=32))
    w = layer.packed_weight(2)
    assert isinstance(w, PackedWeight)
    x = torch.randn(1, 128)
    torch.testing.assert_close(packed_linear(x, w), packed_linear(x, w, backend="torch"), rtol=1e-5, atol=1e-5)


def test_changing_the_compute_dtype_after_first_use():
    layer = _layer(32, 256, QuantConfig(4, group_size=128))
    x = torch.randn(1, 256)
    set_cpu_compute_dtype(torch.bfloat16)
    assert _rel_err(layer(x), _ref(layer, x)) < TOL[torch.bfloat16]
    set_cpu_compute_dtype(torch.float32)  # the float32 scales are rebuilt from the layer's own
    assert _rel_err(layer(x), _ref(layer, x)) < 1e-5
    set_cpu_compute_dtype(torch.bfloat16)
    assert _rel_err(layer(x), _ref(layer, x)) < TOL[torch.bfloat16]


def test_eager_inference_shortcut_and_the_custom_op_agree():
    """No-grad eager CPU calls skip the custom op; calls needing a gradient go through it: same kernel, same y."""
    set_cpu_compute_dtype(torch.bfloat16)
    layer = _layer(64, 256, QuantConfig(4, group_size=128))
    x = torch.randn(3, 256)
    with torch.no_grad():
        y_fast = layer(x)
    xg = x.clone().requires_grad_(True)
    y_op = layer(xg)
    torch.testing.assert_close(y_op.detach(), y_fast)
    y_op.sum().backward()
    torch.testing.assert_close(xg.grad.double(), layer.dequantized_weight(torch.float64).sum(0).expand(3, 256),
                               rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------- 2-bit rows
def _llm_like_weight(n: int, k: int, seed: int) -> torch.Tensor:
    """A weight shaped like a trained LLM's: heavy-tailed (Student-t, 3 degrees of freedom), row scales spread
    over two decades, and a few outlier columns (the activations' outlier channels meet their weights)."""
    g = torch.Generator().manual_seed(seed)
    t = torch.distributions.StudentT(3.0).sample((n, k))  # the distribution has no generator argument
    rows = torch.exp(torch.randn(n, 1, generator=g) * 1.2) * 0.02
    w = t * rows
    cols = torch.randperm(k, generator=g)[:4]
    w[:, cols] *= 8.0
    return w


@pytest.mark.parametrize("sym", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize("gs", [32, 128])
def test_2bit_fast_path_is_as_close_to_the_reference_as_plain_bfloat16(sym, gs):
    """W2 through the bf16 fast path (int4 kernel at small M, dense at M = 300) against the float64 reference:
    within the bf16 tolerance and no further from it than a plain bfloat16 matmul of the same dequantized weights
    (x and W rounded to bf16, the rounding any bf16 execution has). A wrong code offset, zero point or padding
    of the 2-bit mapping would be off by whole quantization steps (errors of order 1)."""
    set_cpu_compute_dtype(torch.bfloat16)
    torch.manual_seed(0)
    lin = nn.Linear(576, 192, bias=False)  # SmolLM2's hidden size: K = 576 is padded to the kernel group
    with torch.no_grad():
        lin.weight.copy_(_llm_like_weight(192, 576, seed=3))
    layer = QuantLinear.from_float(lin, QuantConfig(2, symmetric=sym, group_size=gs))
    w = layer.dequantized_weight(torch.float64)
    g = torch.Generator().manual_seed(4)
    for m, path in ((1, "int4"), (17, "int4"), (300, "dense")):
        x = torch.randn(m, 576, generator=g) * torch.exp(torch.randn(576, generator=g))  # outlier channels
        assert _paths(layer, x) == {path}
        with torch.no_grad():
            y = layer(x)
        ref = x.double() @ w.t()
        plain_bf16 = (x.bfloat16().double() @ w.bfloat16().double().t())
        err, floor = _rel_err(y, ref), _rel_err(plain_bf16, ref)
        assert err < TOL[torch.bfloat16], (m, err)
        assert err < 3 * floor + 1e-3, (m, err, floor)


@pytest.mark.parametrize("gs", [32, 128])
def test_4bit_asymmetric_fast_path_is_as_close_to_the_reference_as_plain_bfloat16(gs):
    """W4 asymmetric rows fill the int4 kernel's codes 0..15 (no offset): a skewed group's zero is several scales,
    which rounded to bfloat16 cancels against ``(q - 8) * scale`` (errors of 1e-2 and more). The layer must stay
    as close to the float64 reference as a plain bfloat16 matmul of the same dequantized weights."""
    set_cpu_compute_dtype(torch.bfloat16)
    torch.manual_seed(0)  # the Student-t sample of _llm_like_weight
    lin = nn.Linear(576, 192, bias=False)
    with torch.no_grad():
        lin.weight.copy_(_llm_like_weight(192, 576, seed=3))
    layer = QuantLinear.from_float(lin, QuantConfig(4, symmetric=False, group_size=gs))
    assert ((layer.zeros_4.float() - 8).abs() > 1).any()  # skewed groups: the case at stake
    w = layer.dequantized_weight(torch.float64)
    g = torch.Generator().manual_seed(4)
    for m in (1, 5, 17):
        x = torch.randn(m, 576, generator=g) * torch.exp(torch.randn(576, generator=g))  # outlier channels
        with torch.no_grad():
            y = layer(x)
        ref = x.double() @ w.t()
        plain = x.bfloat16().double() @ w.bfloat16().double().t()
        err, floor = _rel_err(y, ref), _rel_err(plain, ref)
        assert err < TOL[torch.bfloat16], (m, err)
        assert err < 2 * floor + 1e-3, (m, err, floor)


# ------------------------------------------------------------------------------------------- dense layout (v2)
@pytest.mark.parametrize("bits,scope,gs", [(3, "group", 128), (3, "channel", 128), (5, "channel", 128),
                                           (6, "tensor", 128)])
def test_dense_layout_runs_the_same_fast_paths_as_containers(bits, scope, gs):
    """A 3/5/6-bit layer stored densely (format version 2, what ``from_float`` builds) and the same layer
    re-packed into version-1 containers give identical outputs on every CPU path, and the dense one is smaller."""
    set_cpu_compute_dtype(torch.bfloat16)
    dense = _layer(48, 576, QuantConfig(bits, scope=scope, group_size=gs))
    assert dense.layout_version == 2 and dense.packed_weight(bits).is_dense
    v1 = _layer(48, 576, QuantConfig(bits, scope=scope, group_size=gs)).to_layout(1)
    assert not v1.packed_weight(bits).is_dense
    assert torch.equal(dense.packed_weight(bits).codes(), v1.packed_weight(bits).codes())
    assert dense.stored_bytes() < v1.stored_bytes()
    g = torch.Generator().manual_seed(2)
    for m in (1, 7, 300):
        x = torch.randn(m, 576, generator=g)
        assert _paths(dense, x) == _paths(v1, x) != {"reference"}
        with torch.no_grad():
            assert torch.equal(dense(x), v1(x))
        assert _rel_err(dense(x), _ref(dense, x)) < TOL[torch.bfloat16]


# ------------------------------------------------------------------------------------------- prepared matmul
def _prepared_fn(layer: QuantLinear):
    from medquant.quant.modules import _PREPARED

    entry = layer.__dict__.get(_PREPARED)
    return None if entry is None else entry[5]


def test_prepared_matmul_equals_the_dispatched_one_and_is_built_once():
    """Eager no-grad calls run the layer's prepared matmul: bit-equal to ``packed_linear`` through the registry,
    built at the first call and reused, for the int4 kernel (M = 1), and the dense path (M = 300)."""
    set_cpu_compute_dtype(torch.bfloat16)
    layer = _layer(64, 576, QuantConfig(4, group_size=128))  # K = 576: kernel groups of 64, x not padded
    assert cpu_plan(layer.packed_weight(4)).group == 64 and cpu_plan(layer.packed_weight(4)).k4 == 576
    for m in (1, 5, 300):
        x = torch.randn(m, 576)
        with torch.no_grad():
            y = layer(x)
            fn = _prepared_fn(layer)
            assert fn is not None
            y2 = layer(x)
            assert _prepared_fn(layer) is fn  # reused
            direct = packed_linear(x, layer.packed_weight(4), backend="cpu") + layer.bias
        torch.testing.assert_close(y, direct, rtol=0, atol=0)
        torch.testing.assert_close(y2, y, rtol=0, atol=0)
        assert _rel_err(y, _ref(layer, x)) < TOL[torch.bfloat16]


def test_prepared_matmul_follows_new_codes_settings_and_forced_backends():
    set_cpu_compute_dtype(torch.bfloat16)
    layer = _layer(32, 256, QuantConfig(4, group_size=128))
    x = torch.randn(1, 256)
    with torch.no_grad():
        layer(x)
        other = _layer(32, 256, QuantConfig(4, group_size=128), seed=7)
        layer.load_state_dict(other.state_dict())  # copied in place: same tensors, new versions
        assert _rel_err(layer(x), _ref(other, x)) < TOL[torch.bfloat16]
        layer.qweight_4.zero_()  # an in-place edit is seen too
        zeroed = _ref(layer, x)
        assert _rel_err(layer(x), zeroed) < TOL[torch.bfloat16]
        set_cpu_compute_dtype(torch.float32)  # a setting change rebuilds it: float32 compute is exact to 1e-5
        assert _rel_err(layer(x), zeroed) < 1e-5
        with force_backend("torch"):
            torch.testing.assert_close(layer(x), x @ layer.dequantized_weight().t() + layer.bias)


def test_prepared_matmul_is_not_shared_by_copies():
    import copy
    import pickle

    set_cpu_compute_dtype(torch.bfloat16)
    layer = _layer(32, 256, QuantConfig(4, group_size=128))
    x = torch.randn(1, 256)
    with torch.no_grad():
        layer(x)
        twin = copy.deepcopy(layer)
        assert _prepared_fn(twin) is None
        pickle.dumps(layer)  # a closure in the state would not pickle
        other = _layer(32, 256, QuantConfig(4, group_size=128), seed=3)
        twin.load_state_dict(other.state_dict())
        assert _rel_err(twin(x), _ref(other, x)) < TOL[torch.bfloat16]
        assert _rel_err(layer(x), _ref(layer, x)) < TOL[torch.bfloat16]  # the original kept its weights
        assert float((twin(x) - layer(x)).abs().max()) > 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_lane_equals_the_prepared_matmul(dtype):
    """Eager calls with few rows, once the layer is prepared, take the decode lane (the native kernel straight from
    ``x``'s own shape, no reshape): bit-equal to the prepared matmul on the same rows as 2-D, bias added, shape
    and dtype kept. The lane declines what ``run`` must take (rows at the gemm / dense switch, a non-contiguous
    or float16 ``x``), is not used for a call that needs a gradient, and is dropped by an in-place edit."""
    set_cpu_int4_kernel("auto")
    set_cpu_compute_dtype(torch.bfloat16)
    layer = _layer(48, 320, QuantConfig(4, group_size=64))
    x = torch.randn(2, 3, 320, dtype=dtype)
    with torch.no_grad():
        y_first = layer(x)  # prepares the layer (general path)
        lane = layer._decode_lane(x)
        assert (lane is not None) == _native_takes(layer, 4)
        y = layer(x)
        ref2d = _prepared_fn(layer)(x.reshape(6, 320)).reshape(2, 3, 48) + layer.bias.to(dtype)
        assert y.shape == (2, 3, 48) and y.dtype == dtype
        torch.testing.assert_close(y, ref2d, rtol=0, atol=0)
        torch.testing.assert_close(y, y_first, rtol=0, atol=0)
        assert _rel_err(y.reshape(6, 48), _ref(layer, x.reshape(6, 320))) < TOL[torch.bfloat16]
        if lane is not None:
            assert lane(torch.randn(300, 320, dtype=dtype)) is None  # the gemm / dense switch: run takes it
            assert lane(x.transpose(0, 1)) is None  # not contiguous
            assert lane(x.to(torch.float16)) is None
            assert lane(torch.randn(1, 319, dtype=dtype)) is None  # run raises for it
        layer.qweight_4.zero_()  # an in-place edit: the lane is dropped until the layer is prepared again
        assert layer._decode_lane(x) is None
        zeroed = _ref(layer, x.reshape(6, 320))  # codes 0: w = -z s
        assert _rel_err(layer(x).reshape(6, 48), zeroed) < TOL[torch.bfloat16]
        assert (layer._decode_lane(x) is not None) == (lane is not None)  # prepared again: a new lane
    xg = x.clone().requires_grad_()
    assert layer._decode_lane(xg) is None  # a gradient: the custom op and its backward


def test_prepared_matmul_rejects_a_wrong_input():
    layer = _layer(32, 256, QuantConfig(4, group_size=128))
    with torch.no_grad():
        layer(torch.randn(1, 256))
        with pytest.raises(ValueError, match="256"):
            layer(torch.randn(1, 255))
