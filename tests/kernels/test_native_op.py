"""``medquant::gemv4_bound_native``: the C++ kernel of a bound matmul computes the Python kernel's product bit for
bit, hands what it does not take to it, and forgets a handle when its matmul is freed."""
from __future__ import annotations

import gc

import pytest
import torch

import medquant as mq
from medquant.kernels import native_op
from medquant.kernels.native import _BOUND, GEMM_XMODE, INT8_XMODE, gemv4_bound_op, native_status

pytestmark = pytest.mark.skipif(not native_status().get("gemv4"), reason="no native weight-only kernel to bind")


def _bound_layer(bits: int, n: int = 48, k: int = 96, group: int = 32):
    torch.manual_seed(bits)
    lin = torch.nn.Linear(k, n, bias=False)
    layer = mq.quantize_(torch.nn.Sequential(lin), mq.QuantConfig(bits, group_size=group))[0]
    assert layer.bind_cpu_kernels()
    handle = max(_BOUND)  # the matmul this binding just made
    assert _BOUND[handle].n == n
    return layer, handle


@pytest.fixture
def cpp():
    """The C++ operator, built: a machine without a C++ compiler skips (the Python kernel runs there); any
    other failure to build fails."""
    status = native_op.native_op_status()
    if "no C++ compiler" in str(status["reason"]):
        pytest.skip(status["reason"])
    assert status["active"], status["reason"]
    return torch.ops.medquant.gemv4_bound_native.default


def test_the_cpp_kernel_is_built_and_bound_layers_use_it(cpp):
    _layer, handle = _bound_layer(4)
    assert native_op.traced_bound_op(handle) is cpp
    assert native_op.native_op_status()["bound"] >= 1


@pytest.mark.parametrize("bits", [4, 8, 3])
def test_same_product_as_the_python_kernel_in_every_mode(bits, cpp):
    """Against the Python kernel of ``medquant::gemv4_bound`` (itself tested against the dequantized reference):
    float32 and bfloat16 ``x``, one row and twenty, the weight-only modes (int16 and int8 ``x`` among them) and the
    blocked form."""
    _layer, handle = _bound_layer(bits)
    op = native_op.traced_bound_op(handle)
    modes = [0, 1, 2, 3, INT8_XMODE] + ([GEMM_XMODE] if native_status().get("gemm") else [])
    for m in (1, 20):
        for dtype in (torch.float32, torch.bfloat16):
            x = torch.randn(m, 96).to(dtype)
            for mode in modes:
                if mode == GEMM_XMODE and m == 1:
                    continue
                assert torch.equal(op(x, handle, 48, mode), gemv4_bound_op(x, handle, 48, mode)), (m, dtype, mode)


def test_what_it_does_not_take_goes_to_the_python_kernel(cpp):
    _layer, handle = _bound_layer(4)
    op = native_op.traced_bound_op(handle)
    with pytest.raises(RuntimeError, match="no bound matmul"):
        op(torch.randn(1, 96), 10**9, 48, 0)  # unknown handle: the Python kernel's error
    with pytest.raises(RuntimeError, match="no bound matmul"):
        op(torch.randn(1, 95), handle, 48, 0)  # wrong k
    with pytest.raises(RuntimeError, match="xmode"):
        op(torch.randn(1, 96), handle, 48, 5)
    if native_status().get("gemm"):
        x = torch.randn(20, 96)
        x[3, 5] = float("inf")  # the blocked form declines; the Python kernel's float32 reference product
        torch.testing.assert_close(op(x, handle, 48, GEMM_XMODE), gemv4_bound_op(x, handle, 48, GEMM_XMODE),
                                   rtol=0, atol=0, equal_nan=True)


def test_the_handle_read_from_a_tensor(cpp):
    """``medquant::gemv4_bound_by_native`` / ``gemv4_bound_by`` (what programs compiled ahead of time call): the
    handle in a one-element int64 tensor gives the integer handle's product; a wrong handle tensor is refused."""
    from medquant.kernels.native import gemv4_bound_by_op

    _layer, handle = _bound_layer(4)
    by = native_op.traced_bound_op(handle, by_tensor=True)
    assert by is torch.ops.medquant.gemv4_bound_by_native.default
    x = torch.randn(3, 96)
    expected = gemv4_bound_op(x, handle, 48, 2)
    for h in (torch.tensor([handle]), torch.tensor([0, handle, 0])[1:2], torch.tensor(handle)):
        assert torch.equal(by(x, h, 48, 2), expected) and torch.equal(gemv4_bound_by_op(x, h, 48, 2), expected)
    for bad in (torch.tensor([handle, handle]), torch.tensor([float(handle)]), torch.tensor([handle], dtype=torch.int32)):
        for op in (by, gemv4_bound_by_op):
            with pytest.raises(RuntimeError, match="one-element int64 CPU tensor"):
                op(x, bad, 48, 2)
    with pytest.raises(RuntimeError, match="no bound matmul"):
        by(x, torch.tensor([10**9]), 48, 2)


def test_a_freed_matmul_leaves_the_cpp_table(cpp):
    """A handle whose matmul was freed is removed from the C++ table with it (weakref.finalize): a graph still
    calling it gets the Python kernel's error, never freed memory."""
    from medquant.kernels.native import native_gemv4

    layer, _ = _bound_layer(4)
    gemv = native_gemv4(layer.packed_weight(4))  # a matmul of its own (a layer's stays cached with its codes)
    handle = gemv.handle
    op = native_op.traced_bound_op(handle)
    assert op is cpp
    gc.collect()  # matmuls of models freed before this test leave the table now, not in the count below
    before = native_op.native_op_status()["bound"]
    x = torch.randn(1, 96)
    assert torch.equal(op(x, handle, 48, 0), gemv4_bound_op(x, handle, 48, 0))
    del gemv
    gc.collect()
    assert handle not in _BOUND and native_op.native_op_status()["bound"] == before - 1
    with pytest.raises(RuntimeError, match="no bound matmul"):
        op(x, handle, 48, 0)


def test_switched_off_layers_bind_to_the_python_kernel(monkeypatch, cpp):
    monkeypatch.setenv(native_op.ENV_NATIVE_OP, "0")
    _layer, handle = _bound_layer(4)
    assert native_op.traced_bound_op(handle) is gemv4_bound_op
    assert not native_op.native_op_status()["active"]
    monkeypatch.delenv(native_op.ENV_NATIVE_OP)
    assert native_op.traced_bound_op(handle) is cpp


def test_a_freed_model_frees_its_kernels_plans_and_handles():
    """Freeing a quantized model frees what the CPU backend built for it: the cached plans (keyed weakly by the
    layers' codes; the native matmul holds the codes through an alias, not the key), the bound matmuls and their
    entries in the C++ table. Before the alias, every layer that ever ran stayed in memory with its codes."""
    from medquant.kernels import cpu
    from medquant.kernels.native import _BOUND

    def run_and_free():
        model = torch.nn.Sequential(torch.nn.Linear(96, 96), torch.nn.Linear(96, 48))
        mq.quantize_(model, mq.QuantConfig(4, group_size=32))
        with torch.no_grad():
            model(torch.randn(1, 96))
            model(torch.randn(40, 96))
        for layer in model:
            assert layer.bind_cpu_kernels()
            native_op.traced_bound_op(max(_BOUND))

    gc.collect()
    counts = len(cpu._plans), len(_BOUND), native_op.native_op_status()["bound"]
    for _ in range(3):
        run_and_free()
        gc.collect()
    assert (len(cpu._plans), len(_BOUND), native_op.native_op_status()["bound"]) == counts
