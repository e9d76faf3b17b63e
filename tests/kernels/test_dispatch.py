"""The backend registry: built-in choice, forcing, and a registered fast path taking over without other changes."""
from __future__ import annotations

import pytest
import torch

from medquant.kernels import PackedWeight, force_backend, packed_linear, select_kernel
from medquant.kernels.dispatch import backend_names, register_backend, register_kernel, unregister_backend
from medquant.quant import QuantConfig, QuantLinear, pack, quantize


def _weight(bits=4, k=64, n=8, group_size=16):
    """Groups of 16 columns: no CPU kernel takes them (the torch reference runs)."""
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(0))
    q = quantize(w, QuantConfig(bits, scope="group", group_size=group_size))
    return PackedWeight(pack(q.codes, bits), q.scales, q.zeros, bits, q.symmetric, "group", q.group_size, k)


def test_auto_runs_the_reference_on_cpu():
    x = torch.randn(3, 64)
    w = _weight()
    assert select_kernel("packed_linear", x, w).backend == "torch"
    assert select_kernel("fake_quantize_rows", x, torch.tensor([4, 4, 4]), False, 1e-38, False).backend == "torch"
    assert set(backend_names()) >= {"auto", "torch", "triton"}


def test_unknown_backend_is_refused():
    with pytest.raises(ValueError, match="accepted: auto"), force_backend("cuda_magic"):
        pass


@pytest.fixture
def fast_path():
    calls = []

    def int4_linear(x, weight):
        calls.append(weight.bits)
        return x @ weight.dequantize(x.dtype).t() + 1.0  # recognisable offset

    register_backend("test_int4", lambda dev: None if dev.type == "cpu" else "CPU only")
    # above the built-in CPU backend (priority 10), which takes these 4-bit layers too
    register_kernel("packed_linear", "test_int4", int4_linear, accepts=lambda x, w: w.bits == 4, priority=100)
    yield calls
    unregister_backend("test_int4")


def test_registered_fast_path_is_chosen_where_it_accepts(fast_path):
    x = torch.randn(2, 64)
    y4 = packed_linear(x, _weight(4))
    ref = packed_linear(x, _weight(4), backend="torch")
    assert fast_path == [4]
    assert torch.allclose(y4, ref + 1.0)
    packed_linear(x, _weight(8))  # 8-bit: the predicate declines, the reference runs
    assert fast_path == [4]
    # QuantLinear reaches it without any change to the module
    lin = QuantLinear.from_float(torch.nn.Linear(64, 8), QuantConfig(4, group_size=32))
    lin(x)
    assert fast_path == [4, 4]
    # forcing it runs it whatever the predicate says
    with force_backend("test_int4"):
        packed_linear(x, _weight(8))
    assert fast_path == [4, 4, 8]


def test_forced_backend_without_the_op_or_device_fails(fast_path):
    x = torch.randn(2, 30)
    with force_backend("test_int4"), pytest.raises(RuntimeError, match="no fake_quantize_rows kernel"):
        torch.ops.medquant.fake_quantize_rows(x, torch.tensor([4, 4]), False, 1e-38, False)
    register_backend("test_never", lambda dev: "never available here")
    register_kernel("fake_quantize_rows", "test_never", lambda *a: None)
    try:
        with force_backend("test_never"), pytest.raises(RuntimeError, match="never available here"):
            torch.ops.medquant.fake_quantize_rows(x, torch.tensor([4, 4]), False, 1e-38, False)
        # auto skips an unavailable backend
        out, _ = torch.ops.medquant.fake_quantize_rows(x, torch.tensor([4, 4]), False, 1e-38, False)
        assert out.shape == x.shape
    finally:
        unregister_backend("test_never")
    assert "test_never" not in backend_names()


def test_the_reference_backend_cannot_be_removed():
    with pytest.raises(ValueError, match="cannot be removed"):
        unregister_backend("torch")


def _bf16_decode_only(x, w):
    """A registered kernel's predicate on the input itself (the kernels guide's example): bfloat16 and M == 1."""
    return x.dtype == torch.bfloat16 and x.shape[0] == 1


@pytest.mark.parametrize("first", ["accepted", "refused"])
def test_prepared_layer_follows_an_input_dependent_predicate(first):
    """A QuantLinear prepares its kernel at its first eager call; a registered kernel whose ``accepts`` reads the
    input's dtype and rows must still run exactly for the inputs it accepts, whichever input came first."""
    torch.manual_seed(0)
    lin = QuantLinear.from_float(torch.nn.Linear(64, 32), QuantConfig(4, scope="group", group_size=32))
    xs = [torch.randn(1, 64, dtype=torch.bfloat16), torch.randn(1, 64), torch.randn(5, 64, dtype=torch.bfloat16),
          torch.randn(3, 64), torch.randn(1, 1, 64, dtype=torch.bfloat16), torch.randn(2, 64, dtype=torch.bfloat16)]
    if first == "refused":
        xs = xs[1:] + xs[:1]
    with torch.no_grad():
        before = [lin(x) for x in xs]  # the built-in choice
    calls = []

    def bf16_decode(x, w):
        calls.append((x.dtype, x.shape[0]))
        return torch.full((x.shape[0], w.n), 7.0, dtype=x.dtype)  # recognisable

    register_backend("test_bf16_decode", lambda dev: None if dev.type == "cpu" else "CPU only")
    register_kernel("packed_linear", "test_bf16_decode", bf16_decode, accepts=_bf16_decode_only, priority=10_000)
    try:
        with torch.no_grad():
            ys = [lin(x) for x in xs]
    finally:
        unregister_backend("test_bf16_decode")
    taken = [x.dtype == torch.bfloat16 and x.numel() == 64 for x in xs]
    assert calls == [(torch.bfloat16, 1)] * sum(taken)
    w64 = lin.dequantized_weight(torch.float64)
    bias = lin.bias.detach()
    for x, y, y0, took in zip(xs, ys, before, taken):
        assert y.shape == (*x.shape[:-1], 32) and y.dtype == x.dtype
        if took:
            assert torch.equal(y, torch.full_like(y, 7.0) + bias.to(y.dtype))
            continue
        assert torch.equal(y, y0), f"{x.dtype} M={x.shape[0]}: not the built-in kernel's result"
        ref = x.double() @ w64.t() + bias.double()
        tol = 64 * torch.finfo(x.dtype).eps * (float(x.abs().max()) * float(w64.abs().max()) + 1.0)
        assert float((y.double() - ref).abs().max()) <= tol


def test_builtin_and_input_independent_choices_stay_prepared_once():
    """The built-in predicates read the input's device only: prepared callables bind their kernel (no per-call
    dispatch); so does a kernel declared ``input_dependent=False`` or one tried after the chosen kernel."""
    from medquant.kernels import prepare_packed_linear

    x, w = torch.randn(1, 64), _weight(4, n=16, group_size=32)  # n % 16 == 0: the CPU backend takes it anywhere
    assert not getattr(prepare_packed_linear(x, w), "per_call_choice", False)
    register_backend("test_late", lambda dev: None)
    try:
        # below the CPU backend (which takes this weight): tried only after it
        register_kernel("packed_linear", "test_late", lambda x, w: None, accepts=_bf16_decode_only, priority=-1)
        assert select_kernel("packed_linear", x, w).backend == "cpu"
        assert not getattr(prepare_packed_linear(x, w), "per_call_choice", False)
        register_kernel("packed_linear", "test_late", lambda x, w: None, accepts=lambda x, w: w.bits == 8,
                        priority=10_000, input_dependent=False)
        assert not getattr(prepare_packed_linear(x, w), "per_call_choice", False)
        register_kernel("packed_linear", "test_late", lambda x, w: None, accepts=_bf16_decode_only, priority=10_000)
        fn = prepare_packed_linear(x, w)
        assert fn.per_call_choice
        torch.testing.assert_close(fn(x), packed_linear(x, w, backend="torch"), rtol=1e-5, atol=1e-5)
    finally:
        unregister_backend("test_late")
