"""Fourth review round of the CPU backend (``medquant.kernels.cpu``): defects a demanding user reaches, each shown
against an independent reference (``F.linear`` with the float32 weight ``(u - z) * s`` written here from the
packed codes and scales)."""
from __future__ import annotations

import inspect
import sys
import threading
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from medquant.kernels import cpu as cpu_mod
from medquant.kernels.cpu import set_cpu_compute_dtype, set_cpu_int4_kernel
from medquant.kernels.layout import unpack
from medquant.quant import QuantConfig, QuantLinear


@pytest.fixture(autouse=True)
def _restore_settings(cpu_settings):
    yield


def _w_ref(weight) -> torch.Tensor:
    """The float32 weight ``(u - z) * s`` per group, from the packed codes and scales (symmetric ``z = 2^(b-1)``)."""
    u = unpack(weight.qweight, weight.bits, dense=weight.dense).float()
    n, kp = u.shape
    ge = weight.group_elems if weight.scope == "group" else kp
    idx = torch.arange(kp) // ge
    s = weight.scales.float().expand(n, kp // ge)[:, idx]
    z = (torch.full_like(s, 2.0 ** (weight.bits - 1)) if weight.symmetric
         else weight.zeros.float().expand(n, kp // ge)[:, idx])
    return ((u - z) * s)[:, : weight.k]


def test_kernel_params_of_one_plan_built_from_two_threads_at_once():
    """Two threads making the int4 kernel's scales in two compute dtypes for one row group (two threads calling
    one layer for the first time, one with a float16 model, say): the plan's float32 masters are dropped by one
    thread while the other, which has just rebuilt them, is about to read them. Forced here by pausing the
    first thread at that point (its wait times out where a lock holds the second thread back). It used to raise
    in the first thread (an AssertionError or a TypeError on None)."""
    set_cpu_int4_kernel("aten")
    set_cpu_compute_dtype("float32")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q = QuantLinear.from_float(nn.Linear(64, 32, bias=False), QuantConfig(bits=4, group_size=32))
    w = q.packed_weight(4)
    plan = cpu_mod.cpu_plan(w)
    assert plan.kind == "int4"
    cpu_mod._params(plan, w, torch.float32)  # the masters are dropped once one dtype is built
    # the function that rebuilds the float32 masters and reads them (its body may sit in a helper under a lock)
    fn = getattr(cpu_mod, "_params_locked", cpu_mod._params)
    src, first = inspect.getsourcelines(fn)
    pause_at = first + next(i for i, line in enumerate(src) if "assert plan.scale is not None" in line)
    b_done, a_paused = threading.Event(), threading.Event()
    errors: list[BaseException] = []

    def tracer(frame, event, arg):
        if frame.f_code is fn.__code__:
            def local(frame, event, arg):
                if event == "line" and frame.f_lineno == pause_at and not a_paused.is_set():
                    a_paused.set()
                    b_done.wait(timeout=1.0)
                return local
            return local
        return None

    def thread_a():
        sys.settrace(tracer)
        try:
            cpu_mod._params(plan, w, torch.bfloat16)
        except BaseException as e:  # noqa: BLE001
            errors.append(e)
        finally:
            sys.settrace(None)

    def thread_b():
        a_paused.wait(timeout=5.0)
        try:
            cpu_mod._params(plan, w, torch.float16)
        except BaseException as e:  # noqa: BLE001
            errors.append(e)
        b_done.set()

    ta, tb = threading.Thread(target=thread_a), threading.Thread(target=thread_b)
    ta.start()
    tb.start()
    ta.join(10)
    tb.join(10)
    assert a_paused.is_set()
    assert not errors, errors
    # both dtypes' parameters are right: the layer's output in each compute dtype matches the reference
    ref_w = _w_ref(w)
    for cd, tol in ((torch.bfloat16, 3e-2), (torch.float16, 3e-3)):
        set_cpu_compute_dtype(cd)
        x = torch.randn(3, 64)
        with torch.inference_mode():
            y = q(x)
        r = F.linear(x, ref_w)
        assert float((y - r).abs().max()) <= tol * float(r.abs().max()), cd


@pytest.mark.parametrize("cfg", [QuantConfig(bits=4, group_size=32), QuantConfig(bits=8, scope="channel")],
                         ids=["w4g32", "w8-channel"])
def test_a_new_compute_dtype_on_an_aten_plan_after_the_native_library_is_enabled_again(monkeypatch, cfg):
    """A row group planned for aten's weight-only kernel while ``$MEDQUANT_NATIVE=0`` keeps that plan (its tensors
    are unchanged); when a new compute dtype then asks the plan for its scales in that dtype, the float32 masters
    (dropped once one dtype was built) are made again from the layer's scales. They used to be taken from a fresh
    plan of the row group as it would be chosen now, the native kernel's, which holds none: an AssertionError at
    the layer's next call."""
    monkeypatch.setenv("MEDQUANT_NATIVE", "0")
    set_cpu_compute_dtype("float32")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q = QuantLinear.from_float(nn.Linear(64, 32, bias=False), cfg)
        w = q.packed_weight(cfg.bits)
        x = torch.randn(1, 64)
        ref_w = _w_ref(w)
        with torch.inference_mode():
            y = q(x)
        assert cpu_mod.cpu_plan(w).kind in ("int4", "int8")
        assert float((y - F.linear(x, ref_w)).abs().max()) <= 1e-5 * float(F.linear(x, ref_w).abs().max())
        monkeypatch.delenv("MEDQUANT_NATIVE")
        set_cpu_compute_dtype("bfloat16")
        with torch.inference_mode():
            y = q(x)
    r = F.linear(x, ref_w)
    assert float((y - r).abs().max()) <= 3e-2 * float(r.abs().max())


@pytest.mark.parametrize("bad_dtype", [torch.float16, torch.float64])
def test_the_bound_and_unbound_native_operators_refuse_an_x_they_cannot_read(bad_dtype):
    """``medquant::gemv4_bound`` (and ``medquant::gemv4``) read ``x`` as float32 or bfloat16; their docstrings
    promise a RuntimeError for a wrong ``x`` (never a wrong result). A float16 or float64 ``x`` of the right shape
    used to be read as float32 memory: a wrong result (and reads past a float16 buffer's end)."""
    from medquant.kernels.native import gemv4_bound_op, gemv4_op

    set_cpu_compute_dtype("float32")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q = QuantLinear.from_float(nn.Linear(64, 32, bias=False), QuantConfig(bits=4, group_size=32))
    w = q.packed_weight(4)
    gemv = cpu_mod.cpu_plan(w).gemv
    if gemv is None:
        pytest.skip("the native weight-only kernel is not available here")
    x = torch.randn(2, 64)
    r = F.linear(x, _w_ref(w))
    y = gemv4_bound_op(x, gemv.handle, gemv.n, 0)  # the operator reads float32 as it is
    assert float((y - r).abs().max()) <= 1e-5 * float(r.abs().max())
    with pytest.raises(RuntimeError):
        gemv4_bound_op(x.to(bad_dtype), gemv.handle, gemv.n, 0)
    with pytest.raises(RuntimeError):
        gemv4_op(x.to(bad_dtype), gemv.qweight, gemv.s, gemv.z, gemv.k, gemv.kp, gemv.ge, 0, gemv.bits)


def test_native_scales_given_without_zero_points_are_refused_not_ignored():
    """``dequantize_native`` / ``native_gemv4`` take the row group's float32 ``scale`` and ``zero`` together
    (``w = (u - zero) * scale``). A ``scale`` passed alone used to be dropped silently: the layer's own scales
    were used, so ``dequantize_native(w, float32, scale=2 * s)`` returned ``(u - z) * s``, not the doubled weight."""
    from medquant.kernels.native import dequantize_native, native_gemv4, native_status

    if not native_status()["active"]:
        pytest.skip("the native library is not available here")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q = QuantLinear.from_float(nn.Linear(64, 32, bias=False), QuantConfig(bits=4, group_size=32))
    w = q.packed_weight(4)
    s2 = 2 * w.scales.float()
    with pytest.raises(ValueError):
        dequantize_native(w, torch.float32, s2)
    with pytest.raises(ValueError):
        native_gemv4(w, s2)
    # both given: the given values are what is computed with
    got = dequantize_native(w, torch.float32, s2, torch.full_like(s2, 8.0))
    assert got is not None and torch.allclose(got, 2 * _w_ref(w), rtol=0, atol=1e-6)
