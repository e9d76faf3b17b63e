"""Learned rounding of a layer whose number of calls per batch depends on the data: called once by one calibration
batch and twice by another. Whether a unit's capture may stop at its first call is decided on every calibration
batch (it was decided on the first one only: a layer called once there lost the second call of later batches).

Independent references: the same layer in a model that calls it once, given the inputs of all its calls as separate
batches (same seed: the same rounding, bit for bit), and the reconstruction error computed here in plain torch
(``_hard_error``) over the inputs of every call."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from medquant.calibrate import adaround
from medquant.calibrate.adaround import adaround_quantize_
from tests.calibrate.test_adaround_shared_calls import CFG, _codes, _hard_error, _inputs, _linear, _Once


class _Conditional(nn.Module):
    """``lin(x)``, and ``lin`` once more on its own output when the batch's first value is positive."""

    def __init__(self, lin):
        super().__init__()
        self.lin = lin

    def forward(self, x):
        y = self.lin(x)
        if bool(x[0, 0] > 0):
            y = self.lin(torch.relu(y))
        return y


def _batches():
    once, _ = _inputs(seed=1)
    twice, _ = _inputs(seed=2, n=24)
    once[0, 0], twice[0, 0] = -1.0, 1.0
    return once, twice


@pytest.mark.parametrize("target", ["float", "input"])
@pytest.mark.parametrize("order", ["once_first", "twice_first"])
def test_calls_per_batch_that_vary_are_all_calibration_data(order, target, monkeypatch):
    lin = _linear(out=16)  # square: its output is its second call's input
    once, twice = _batches()
    float_w = lin.weight.detach().clone()
    with torch.no_grad():
        second = torch.relu(lin(twice))  # the second call's input (the layer still float when captured)
    calib, call_inputs = ([once, twice], [once, twice, second]) if order == "once_first" else \
        ([twice, once], [twice, second, once])
    captured = []
    real = adaround._capture_block

    def spy(model, unit, batches, *a, **kw):
        calls = real(model, unit, batches, *a, **kw)
        captured.append([c[0][0] for c in calls])
        return calls

    monkeypatch.setattr(adaround, "_capture_block", spy)
    model = _Conditional(copy.deepcopy(lin))
    recs = adaround_quantize_(model, CFG, calib, iters=40, seed=3, target=target, progress=False)
    # what was collected: the input of every call, in call order (plain torch reference above)
    assert captured and all(len(c) == 3 for c in captured), [len(c) for c in captured]
    for got in captured:
        for a, b in zip(got, call_inputs):
            torch.testing.assert_close(a, b)
    monkeypatch.undo()
    ref = _Once(copy.deepcopy(lin))
    ref_recs = adaround_quantize_(ref, CFG, call_inputs, iters=40, seed=3, target=target, progress=False)
    got, want = _codes(model.lin), _codes(ref.lin)
    assert got.keys() == want.keys()
    for k in want:  # the same learned rounding, bit for bit
        assert torch.equal(got[k], want[k]), k
    for key in ("mse_rtn", "mse_learned", "mse", "fallback"):
        assert recs["lin"][key] == ref_recs["lin"][key], key
    expect = _hard_error(model.lin.dequantized_weight().detach(), lin.bias.detach(), float_w, call_inputs)
    assert recs["lin"]["mse"] == pytest.approx(expect, rel=1e-5)
    assert recs["lin"]["samples"] == 2


class _Switch(nn.Module):
    """``lin`` is called once or twice per batch depending on the batch *and* on whether ``pre`` is quantized yet:
    the float model calls it 1, 2 times on the two batches, the model being quantized (``pre`` done) 2, 1 times."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(4)
        self.pre = nn.Linear(16, 16)
        self.lin = nn.Linear(16, 16)

    def forward(self, x):
        quantized = type(self.pre) is not nn.Linear
        y = self.lin(self.pre(x))
        if bool(x[0, 0] > 0) != quantized:
            y = self.lin(y)
        return y


def test_calls_that_cannot_be_paired_with_the_float_model_are_refused():
    """Same total number of calls (3) in both models, but not batch by batch: pairing the quantized model's calls with
    the float model's outputs in order would give a call the target of another batch's call. Refused, naming the
    block and the batch (before, it was calibrated silently on mismatched pairs)."""
    once, twice = _batches()
    model = _Switch()
    with pytest.raises(ValueError, match=r"block lin: calibration batch 0 calls it 2 time\(s\) in the model being "
                                         r"quantized but 1 time\(s\) in the float model"):
        adaround_quantize_(model, CFG, [once, twice], iters=5, progress=False)
    # target="input" pairs each call with the float block on its own input: nothing to pair, it runs
    recs = adaround_quantize_(_Switch(), CFG, [once, twice], iters=5, target="input", progress=False)
    assert set(recs) == {"pre", "lin"}
