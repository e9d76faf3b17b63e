"""The whole-model ``awq_quantize_`` is all or nothing: an error or interrupt after the scales were folded (in the
fold itself, while a later layer is quantized, while the quantized layers are swapped in) leaves the model exactly
as it was before the call.

Reference: a deep copy of the model taken before the call (every parameter and buffer, non-persistent buffers
included, compared with ``torch.equal``; its module classes), its output on a batch, and the checks of
:func:`tests.calibrate.test_sequential_undo._assert_restored` (the same module / parameter objects under every name,
train / eval modes, a user hook still in place)."""
from __future__ import annotations

import copy

import pytest
import torch

from medquant.calibrate import awq as awq_mod
from medquant.calibrate.awq import awq_quantize_
from medquant.quant import api as api_mod
from tests.calibrate.test_sequential_undo import CFG, LLAMA, _assert_restored, _calib, _model, _snapshot

NORM = "model.layers.0.input_layernorm.weight"


def _outlier_model():
    """``_model()`` (mixed train / eval modes) with outlier channels: the search picks alpha > 0, so the folds really
    change the norm and linear weights."""
    model = _model()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.input_layernorm.weight[[3, 40, 77]] *= 8.0
            layer.post_attention_layernorm.weight[[5, 60]] *= 8.0
    return model


def _output(model):
    with torch.no_grad(), torch.random.fork_rng():
        was = [(m, m.training) for m in model.modules()]
        model.eval()
        out = model(**LLAMA.inputs(model)).logits
        for m, t in was:
            m.training = t
    return out


def _tensors(model):
    return {**{f"p:{n}": p for n, p in model.named_parameters(remove_duplicate=False)},
            **{f"b:{n}": b for n, b in model.named_buffers(remove_duplicate=False)}}


def _assert_same_as_copy(model, ref, ref_out):
    got, want = _tensors(model), _tensors(ref)
    assert got.keys() == want.keys()
    for k, v in want.items():
        assert got[k].dtype == v.dtype and torch.equal(got[k], v), k
    assert [(n, type(m)) for n, m in model.named_modules(remove_duplicate=False)] == \
        [(n, type(m)) for n, m in ref.named_modules(remove_duplicate=False)]
    assert torch.equal(_output(model), ref_out)


def _changed(model, ref):
    """Whether the fold had already changed the model's float weights (else the test would prove nothing)."""
    return not torch.equal(model.get_parameter(NORM), ref.get_parameter(NORM))


def _fail_in_quantizer(monkeypatch, model, ref, seen):
    """The quantizer of one layer of the second block raises (the folds are done; quantize_ builds its layers)."""
    real = api_mod.quantize_module

    def bad(mod, cfg, *, name=None):
        if name == "model.layers.1.mlp.down_proj":
            seen.append(_changed(model, ref))
            raise ValueError("layer model.layers.1.mlp.down_proj: injected quantizer failure")
        return real(mod, cfg, name=name)

    monkeypatch.setattr(api_mod, "quantize_module", bad)
    return ValueError, "injected quantizer failure"


def _interrupt_at(owner, attr: str, call: int):
    """An injection: a KeyboardInterrupt at the ``call``-th call of ``owner.attr``."""
    def inject(monkeypatch, model, ref, seen):
        real = getattr(owner, attr)
        n = [0]

        def bad(*args, **kwargs):
            n[0] += 1
            if n[0] == call:
                seen.append(_changed(model, ref))
                raise KeyboardInterrupt
            return real(*args, **kwargs)

        monkeypatch.setattr(owner, attr, bad)
        return KeyboardInterrupt, None
    return inject


_interrupt_in_swap = _interrupt_at(api_mod, "swap_module", 5)  # four layers already replaced by QuantLinear
_interrupt_in_fold = _interrupt_at(awq_mod, "_fold", 3)  # two groups already folded


@pytest.mark.parametrize("inject", [_fail_in_quantizer, _interrupt_in_swap, _interrupt_in_fold],
                         ids=["quantizer_error", "interrupt_in_swap", "interrupt_in_fold"])
def test_awq_quantize_failure_after_the_fold_restores_the_model(monkeypatch, inject):
    model = _outlier_model()
    calib = _calib(model, 2)
    ref = copy.deepcopy(model)
    ref_out = _output(ref)
    snap = _snapshot(model)
    seen: list[bool] = []
    exc, match = inject(monkeypatch, model, ref, seen)
    with pytest.raises(exc, match=match):
        awq_quantize_(model, CFG, calib, grid=4, progress=False)
    assert seen == [True]  # the failure came after the fold had changed the weights
    _assert_same_as_copy(model, ref, ref_out)
    _assert_restored(model, snap)


def test_awq_quantize_after_a_failed_call_equals_a_clean_call(monkeypatch):
    """The restored model quantizes exactly as a fresh copy does (same folds, same codes)."""
    model = _outlier_model()
    calib = _calib(model, 2)
    clean = copy.deepcopy(model)
    seen: list[bool] = []
    with monkeypatch.context() as mp:
        exc, _ = _interrupt_in_swap(mp, model, clean, seen)
        with pytest.raises(exc):
            awq_quantize_(model, CFG, calib, grid=4, progress=False)
    assert seen == [True]
    g1 = awq_quantize_(model, CFG, calib, grid=4, progress=False)
    g2 = awq_quantize_(clean, CFG, calib, grid=4, progress=False)
    assert [(g.prev, g.alpha) for g in g1] == [(g.prev, g.alpha) for g in g2]
    sa, sb = model.state_dict(), clean.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
