""":func:`medquant.distributed.ddp_like` carries every DDP setting, or refuses by name.

One in-process gloo group of one rank (module fixture). The new wrapper is built the way ``fq_qat`` does: a DDP
around the plain module, then a parametrization attached to a weight (the parameter becomes
``parametrizations.weight.original``), then ``ddp_like``. References: the same forward / backward in plain torch
(no DDP, one rank: DDP's average is the gradient itself), with the communication hook's effect applied by hand
(times 2; fp16 rounding for the built-in FP16_COMPRESS hook).
"""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.nn.utils import parametrize

from medquant.distributed import ddp_like

_MP = pytest.importorskip("torch.nn.parallel.distributed")._MixedPrecision


@pytest.fixture(scope="module", autouse=True)
def _group(tmp_path_factory):
    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    init = tmp_path_factory.mktemp("ddp_like") / "init"
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


class _Times(nn.Module):
    """``w * c``: a parametrization that changes the value (so a test that lost it would see it)."""

    def __init__(self, c: float):
        super().__init__()
        self.c = c

    def forward(self, w):
        return w * self.c


def _mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(5, 3, generator=g), torch.randn(5, 2, generator=g)


def _grads(model: nn.Module) -> dict[str, torch.Tensor]:
    x, y = _data()
    model.zero_grad(set_to_none=True)
    ((model(x) - y) ** 2).sum().backward()
    inner = model.module if isinstance(model, DDP) else model
    return {n: p.grad.clone() for n, p in inner.named_parameters()}


def _parametrize(m: nn.Sequential) -> None:
    parametrize.register_parametrization(m[2], "weight", _Times(1.5))


def _reference() -> dict[str, torch.Tensor]:
    """Plain-torch gradients of the parametrized model (same init), keyed by the parametrized names."""
    m = _mlp()
    _parametrize(m)
    return _grads(m)


def _times2(state, bucket):
    state["calls"] += 1
    fut = torch.futures.Future()
    fut.set_result(bucket.buffer() * 2)
    return fut


def test_comm_hook_with_its_state_runs_on_the_new_wrapper():
    m = _mlp()
    old = DDP(m)
    state = {"calls": 0}
    old.register_comm_hook(state, _times2)
    _parametrize(m)
    new = ddp_like(old, m)
    got = _grads(new)
    ref = _reference()
    assert state["calls"] > 0
    assert got.keys() == ref.keys()
    for n in ref:
        torch.testing.assert_close(got[n], 2 * ref[n], msg=n)


def test_builtin_comm_hook_is_carried():
    m = _mlp()
    old = DDP(m)
    old._register_builtin_comm_hook(dist.BuiltinCommHookType.FP16_COMPRESS)
    _parametrize(m)
    new = ddp_like(old, m)
    assert new._get_ddp_logging_data().get("comm_hook") == str(dist.BuiltinCommHookType.FP16_COMPRESS)
    got = _grads(new)
    ref = _reference()
    assert any(not torch.equal(r, r.half().float()) for r in ref.values())  # the rounding is visible
    for n in ref:
        torch.testing.assert_close(got[n], ref[n].half().float(), rtol=0, atol=0, msg=n)


def test_ignored_parameters_stay_ignored_after_parametrization():
    m = _mlp()
    DDP._set_params_and_buffers_to_ignore_for_model(m, ["2.weight", "0.bias"])
    old = DDP(m)
    old.register_comm_hook({"calls": 0}, _times2)  # doubles what DDP reduces, leaves ignored ones alone
    _parametrize(m)
    new = ddp_like(old, m)
    assert new.parameters_to_ignore == {"2.parametrizations.weight.original", "0.bias"}
    got = _grads(new)
    ref = _reference()
    for n in ref:
        factor = 1 if n in new.parameters_to_ignore else 2
        torch.testing.assert_close(got[n], factor * ref[n], msg=n)
    # the ignored original is not broadcast / reduced: not among the reducer's parameters
    assert all(p is not m[2].parametrizations.weight.original for p in new._module_parameters)


def test_ignored_name_that_does_not_resolve_is_refused():
    m = _mlp()
    DDP._set_params_and_buffers_to_ignore_for_model(m, ["2.weight"])
    old = DDP(m)
    other = nn.Sequential(nn.Linear(3, 2))  # no "2.weight" anywhere
    with pytest.raises(ValueError, match="2.weight"):
        ddp_like(old, other)


def test_ignored_set_moves_to_a_new_module_object():
    m = _mlp()
    DDP._set_params_and_buffers_to_ignore_for_model(m, ["0.bias"])
    old = DDP(m)
    m2 = _mlp()
    new = ddp_like(old, m2)
    assert new.parameters_to_ignore == {"0.bias"}
    assert m2._ddp_params_and_buffers_to_ignore == ["0.bias"]


def test_mixed_precision_config_is_carried():
    mp = _MP(param_dtype=torch.bfloat16, reduce_dtype=torch.float32, buffer_dtype=torch.bfloat16)
    m = _mlp()
    old = DDP(m, mixed_precision=mp)
    new = ddp_like(old, m)
    assert new.mixed_precision == mp
    # DDP's own upcast hook is registered once, by the new wrapper, bound to it (not the old one)
    assert len(new._comm_hooks) == 1
    assert new._comm_hooks[0][1].ddp_weakref() is new
    # the old wrapper's forward pre-hooks are gone from the module (else they would run in the new forward)
    for sub in m.modules():
        assert all(getattr(h, "__self__", None) is not old for h in sub._forward_pre_hooks.values())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="DDP mixed precision needs an accelerator (CPU events)")
def test_mixed_precision_behaviour_on_cuda():
    mp = _MP(param_dtype=torch.bfloat16, reduce_dtype=torch.float32, buffer_dtype=torch.bfloat16)
    m = _mlp().cuda()
    old = DDP(m, mixed_precision=mp)
    _parametrize(m)
    new = ddp_like(old, m)
    x, y = (t.cuda() for t in _data())
    out = new(x)
    assert out.dtype == torch.bfloat16
    ((out.float() - y) ** 2).sum().backward()
    ref_m = _mlp().cuda().to(torch.bfloat16)
    _parametrize(ref_m)
    ((ref_m(x.bfloat16()).float() - y) ** 2).sum().backward()
    for (n, p), (_, r) in zip(m.named_parameters(), ref_m.named_parameters()):
        assert p.dtype == torch.float32 and p.grad.dtype == torch.float32, n
        torch.testing.assert_close(p.grad, r.grad.float(), rtol=1e-2, atol=1e-2, msg=n)


def test_other_settings_are_carried():
    m = _mlp()
    old = DDP(m, find_unused_parameters=True, gradient_as_bucket_view=True, dim=1,
              skip_all_reduce_unused_params=True, batched_grad_copy=True, forward_sync_buffers=False)
    new = ddp_like(old, m)
    for a in ("find_unused_parameters", "gradient_as_bucket_view", "dim", "skip_all_reduce_unused_params",
              "batched_grad_copy", "forward_sync_buffers", "static_graph", "process_group", "bucket_bytes_cap",
              "bucket_bytes_cap_list", "bucket_bytes_cap_default"):
        assert getattr(new, a) == getattr(old, a), a
    assert new.bucket_bytes_cap_default  # DDP's default (small first bucket) kept, not an explicit 25 MiB
    old2 = DDP(m, bucket_cap_mb_list=[1, 2], static_graph=True)
    new2 = ddp_like(old2, m)
    for a in ("bucket_bytes_cap", "bucket_bytes_cap_list", "bucket_bytes_cap_default", "static_graph"):
        assert getattr(new2, a) == getattr(old2, a), a


def test_buffer_comm_hook_is_carried():
    m = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    old = DDP(m)
    calls = {"n": 0}

    def hook(state, buffers):
        state["n"] += 1

    old._register_buffer_comm_hook(calls, hook)
    new = ddp_like(old, m)
    new(torch.randn(5, 3))
    assert calls["n"] == 1


def test_delayed_all_reduce_is_refused_by_name():
    m = _mlp()
    old = DDP(m, delay_all_reduce_named_params=[("0.weight", m[0].weight)], param_to_hook_all_reduce=m[2].weight)
    with pytest.raises(ValueError, match="delay_all_reduce_named_params"):
        ddp_like(old, m)
