"""Review (s0710): adaround_quantize_ is all or nothing, as GPTQ and AWQ are. An error once the model began to
change (a later block's reconstruction failing, a KeyboardInterrupt) used to leave it half done: BatchNorms folded
into the convolutions, the earlier units quantized, input quantizers attached (act_bits), MoE experts unfolded.
The reference is the model as it was before the call: every parameter and buffer equal to a deep copy taken before,
the same module objects under every name, train / eval modes and hooks as before."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from medquant import QuantConfig
from medquant.calibrate import adaround
from medquant.calibrate.adaround import adaround_quantize_
from medquant.testing.zoo import tiny_cnn
from medquant.testing.zoo_moe import build_moe, moe_inputs


def _cnn():
    model = tiny_cnn()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5, generator=g)
                m.running_var.uniform_(0.5, 2.0, generator=g)
    return model


def _data(n=2):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(4, 3, 12, 12, generator=g) for _ in range(n)]


def _snapshot(model):
    return (copy.deepcopy(model.state_dict()), list(model.named_modules(remove_duplicate=False)),
            [m.training for m in model.modules()],
            [(len(m._forward_pre_hooks), len(m._forward_hooks)) for m in model.modules()])


def _assert_as_before(model, snap):
    state, modules, modes, hooks = snap
    now = model.state_dict()
    assert now.keys() == state.keys()
    assert all(torch.equal(now[k], state[k]) for k in state)
    assert [(n, id(m)) for n, m in model.named_modules(remove_duplicate=False)] == [(n, id(m)) for n, m in modules]
    assert [m.training for m in model.modules()] == modes
    assert [(len(m._forward_pre_hooks), len(m._forward_hooks)) for m in model.modules()] == hooks
    assert not any(hasattr(m, "input_quantizer") for m in model.modules())


def _fail_at(monkeypatch, n, exc):
    """The n-th unit's reconstruction raises ``exc`` (the earlier ones run)."""
    real = adaround._reconstruct
    seen = []

    def fake(model, unit, *args, **kwargs):
        seen.append(unit)
        if len(seen) == n:
            raise exc
        return real(model, unit, *args, **kwargs)

    monkeypatch.setattr(adaround, "_reconstruct", fake)
    return seen


@pytest.mark.parametrize("exc", [ValueError("block failed"), KeyboardInterrupt()])
@pytest.mark.parametrize("act_bits", [None, 8])
def test_a_failure_in_a_later_block_leaves_the_cnn_as_before(monkeypatch, exc, act_bits):
    model = _cnn().train()
    model.features[0].register_forward_hook(lambda m, a, o: None)
    model.features[3].register_forward_pre_hook(lambda m, a: None)  # its table is shared with the quantized layer
    x = _data()[0]
    with torch.no_grad():
        ref = copy.deepcopy(model).eval()(x)
    snap = _snapshot(model)
    seen = _fail_at(monkeypatch, 3, exc)
    with pytest.raises(type(exc)):
        adaround_quantize_(model, QuantConfig(4), _data(), blocks=["features.0", "features.3"], iters=2,
                           act_bits=act_bits, progress=False)
    assert len(seen) == 3
    _assert_as_before(model, snap)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), ref)


def test_a_failure_after_the_experts_were_unfolded_leaves_the_moe_model_as_before(monkeypatch):
    model = build_moe("qwen3_moe")
    snap = _snapshot(model)
    _fail_at(monkeypatch, 2, ValueError("block failed"))
    with pytest.raises(ValueError, match="block failed"):
        adaround_quantize_(model, QuantConfig(4), [moe_inputs()], skip=["@head"], iters=2, progress=False)
    _assert_as_before(model, snap)
