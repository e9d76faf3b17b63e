"""Review tests of the CPU backend (``medquant.kernels.cpu``): paths a demanding user reaches, against an
independent reference (float64 ``x @ W^T`` with ``W`` the layer's dequantized weight).

Tolerances fit the compute dtype: bfloat16 ~2e-2 relative to the output's largest magnitude.
"""
from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from medquant.kernels import cpu as cpu_mod
from medquant.kernels.cpu import (
    cpu_packed_linear,
    cpu_path,
    cpu_plan,
    set_cpu_compute_dtype,
    set_cpu_int4_kernel,
)
from medquant.quant import QuantConfig, QuantLinear


@pytest.fixture(autouse=True)
def _restore_settings(cpu_settings):
    yield


def _layer(n: int, k: int, cfg: QuantConfig, seed: int = 0) -> QuantLinear:
    g = torch.Generator().manual_seed(seed)
    lin = nn.Linear(k, n, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(n, k, generator=g))
    return QuantLinear.from_float(lin, cfg)


@pytest.mark.parametrize("bits,cfg", [(4, QuantConfig(bits=4, group_size=32)),
                                      (8, QuantConfig(bits=8, scope="channel"))])
def test_declined_gemm_below_the_native_switch_falls_back_to_the_dense_path(monkeypatch, bits, cfg):
    """A float32 ``x`` of ``M`` rows between the float32 gemm switch (8 or 12) and the native switch (16), bfloat16
    compute, on a library with the blocked matmul (AVX512-VNNI, simulated here): the gemm declines an ``x`` with a
    value that is not finite (``NativeGemv4.gemm`` returns None) and the dense path must run it, propagating the
    NaN to its own row only. It used to fall through to the aten int4 / int8 call of a plan that has no repacked
    weight (``AssertionError``)."""
    set_cpu_int4_kernel("auto")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # bfloat16 compute on a CPU without bfloat16 arithmetic: one warning
        set_cpu_compute_dtype("bfloat16")
        layer = _layer(32, 128, cfg)
        pw = layer.packed_weight(bits)
        plan = cpu_plan(pw)
        if plan.gemv is None:
            pytest.skip("the native kernel does not take this row group here")
        monkeypatch.setattr(plan.gemv, "_gemm", True)  # has_gemm: a library with the blocked matmul
        monkeypatch.setattr(plan.gemv, "gemm", lambda x: None)  # its decline of a not-finite x
        m = 13
        assert cpu_mod._native_below(True, cpu_mod._f32_form(plan)) <= m < cpu_mod._native_below(True)
        x = torch.randn(m, 128)
        assert cpu_path(x, pw) == "gemm"
        x[3, 5] = float("nan")
        y = cpu_packed_linear(x, pw)
    ref = x.double() @ layer.dequantized_weight(torch.float64).t()
    assert y.dtype == torch.float32 and y.shape == (m, 32)
    assert torch.isnan(y[3]).all()
    keep = torch.arange(m) != 3
    assert torch.isfinite(y[keep]).all()
    err = (y[keep].double() - ref[keep]).abs().max() / ref[keep].abs().max()
    assert err < 2e-2


@pytest.mark.parametrize("value,expected", [("Float32", torch.float32), ("BFLOAT16", torch.bfloat16),
                                            (" torch.float16 ", torch.float16), ("AUTO", None)])
def test_env_compute_dtype_is_case_insensitive_like_the_other_variables(monkeypatch, value, expected):
    """``$MEDQUANT_CPU_COMPUTE_DTYPE`` takes any case, as ``$MEDQUANT_CPU_INT4_KERNEL``,
    ``$MEDQUANT_CPU_NATIVE4_ACTIVATIONS`` and ``$MEDQUANT_CPU_PREFILL_KERNEL`` do; it used to ignore ``Float32`` or
    ``AUTO`` with a warning that called them not float32 / auto."""
    monkeypatch.setenv(cpu_mod.ENV_COMPUTE_DTYPE, value)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert cpu_mod._from_env() == expected


def test_env_compute_dtype_bad_value_warns_and_is_ignored(monkeypatch):
    """A value that names no compute dtype is ignored with one RuntimeWarning naming the variable and the value."""
    monkeypatch.setenv(cpu_mod.ENV_COMPUTE_DTYPE, "float64")
    with pytest.warns(RuntimeWarning, match="MEDQUANT_CPU_COMPUTE_DTYPE='float64'"):
        assert cpu_mod._from_env() is None


@pytest.mark.parametrize("kernel", ["auto", "aten"])
@pytest.mark.parametrize("cfg", [QuantConfig(bits=4, group_size=32, scale_dtype="bfloat16"),
                                 QuantConfig(bits=8, scope="channel")], ids=["w4g32-bf16-scales", "w8-channel"])
def test_forget_cpu_plans_after_an_inference_mode_edit_reaches_the_layers_prepared_matmul(kernel, cfg):
    """Inference tensors track no version, so an in-place edit of a layer made under ``torch.inference_mode`` is
    not seen by the CPU kernels' caches; ``forget_cpu_plans`` is the documented remedy. The layer's prepared matmul
    (built at its first call, holding the plan: aten's repacked codes, or float32 copies of bfloat16 scales) must
    be dropped too, so the next call runs the new weights at every ``M``. It used to keep running the old ones."""
    from medquant.kernels import forget_cpu_plans

    set_cpu_int4_kernel(kernel)
    b = cfg.bits
    with warnings.catch_warnings(), torch.inference_mode():
        warnings.simplefilter("ignore")
        layer, other = _layer(32, 64, cfg, seed=0), _layer(32, 64, cfg, seed=1)
        for m in (1, 40):
            layer(torch.randn(m, 64))  # prepared and planned on the old weights
        getattr(layer, f"qweight_{b}").copy_(getattr(other, f"qweight_{b}"))
        getattr(layer, f"scales_{b}").copy_(getattr(other, f"scales_{b}"))
        forget_cpu_plans(getattr(layer, f"qweight_{b}"))
        w = other.dequantized_weight(torch.float64)
        for m in (1, 40):
            x = torch.randn(m, 64)
            y = layer(x)
            ref = x.double() @ w.t()
            assert (y.double() - ref).abs().max() / ref.abs().max() < 1e-4, m


@pytest.mark.parametrize("value", ["disable", "none"])
def test_env_native_unrecognised_value_is_warned_not_silently_ignored(monkeypatch, value):
    """``$MEDQUANT_NATIVE`` disables the native kernels with ``0`` / ``false`` / ``off`` / ``no``; a value that is
    neither that nor an enabling one (``1`` / ``true`` / ``on`` / ``yes``) leaves them enabled, and says so once
    (it used to be ignored silently: ``MEDQUANT_NATIVE=disable`` ran the native kernels)."""
    from medquant.kernels import native

    monkeypatch.setenv(native.ENV_NATIVE, value)
    monkeypatch.setattr(native, "_reported", set())
    with pytest.warns(RuntimeWarning, match=f"MEDQUANT_NATIVE={value!r}"):
        assert native._disabled() is False
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert native._disabled() is False  # once


@pytest.mark.parametrize("value,off", [("0", True), ("OFF", True), (" no ", True), ("1", False), ("Yes", False),
                                       ("", False)])
def test_env_native_recognised_values_are_quiet(monkeypatch, value, off):
    from medquant.kernels import native

    monkeypatch.setenv(native.ENV_NATIVE, value)
    monkeypatch.setattr(native, "_reported", set())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert native._disabled() is off
