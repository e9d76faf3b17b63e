"""Learned rounding: BatchNorm folding keeps the float outputs; the learned codes are each the floor or the ceiling of
``w / s`` on the quantizer's own grid (ordinary QuantConv2d layers) and reconstruct the feature maps better than
round-to-nearest; deterministic for a seed; clear errors."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from medquant import QuantConfig, QuantConv2d, quantize_
from medquant.calibrate.adaround import adaround_quantize_, fold_batchnorm_
from medquant.quant.core import compute_qparams
from medquant.testing.zoo import tiny_cnn


def _cnn():
    model = tiny_cnn()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):  # non-trivial statistics, as after training
                m.running_mean.uniform_(-0.5, 0.5, generator=g)
                m.running_var.uniform_(0.5, 2.0, generator=g)
                m.weight.uniform_(0.5, 1.5, generator=g)
                m.bias.uniform_(-0.2, 0.2, generator=g)
    return model


def _data(n_batches=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(8, 3, 12, 12, generator=g) for _ in range(n_batches)]


def test_fold_batchnorm_keeps_outputs():
    model = _cnn()
    x = _data(1, seed=5)[0]
    with torch.no_grad():
        ref = model(x)
    pairs = fold_batchnorm_(model)
    assert pairs == [("features.0", "features.1"), ("features.3", "features.4")]
    assert isinstance(model.features[1], nn.Identity) and model.features[0].bias is not None
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref, rtol=1e-5, atol=1e-5)


def test_learned_rounding_beats_rtn_and_stays_on_the_grid():
    cfg = QuantConfig(4, scope="channel")
    model = _cnn()
    test = _data(2, seed=9)
    with torch.no_grad():
        ref = [model.features(x) for x in test]
    folded = copy.deepcopy(model)
    fold_batchnorm_(folded)
    rtn = quantize_(copy.deepcopy(folded), cfg, skip=["classifier"])
    recs = adaround_quantize_(model, cfg, _data(), skip=["classifier"], iters=150, progress=False)
    assert set(recs) == {"features.0", "features.3"} and recs["features.3"]["method"] == "adaround"
    assert recs["features.3"]["mse"] < recs["features.3"]["mse_rtn"]
    assert type(model.features[0]) is QuantConv2d and isinstance(model.classifier, nn.Linear)
    for name in recs:
        conv = folded.get_submodule(name)
        w = conv.weight.detach().reshape(conv.out_channels, -1)
        s, _, _ = compute_qparams(w, 4, True, "channel", 128, torch.float16)
        q = model.get_submodule(name)
        assert torch.equal(q.scales_4, s)                       # the quantizer's grid, unchanged
        steps = q.dequantized_weight() / s.float()
        r = w / s.float()
        inside = (steps > steps.amin(1, keepdim=True)) & (steps < steps.amax(1, keepdim=True))
        # every code inside the range is the floor or the ceiling of w / s
        assert bool(((steps - torch.floor(r)).abs() < 1e-4)[inside].logical_or(
            ((steps - torch.ceil(r)).abs() < 1e-4)[inside]).all())
    # held-out inputs: the reconstructed feature maps are closer to the float ones than RTN's
    with torch.no_grad():
        err_ada = sum(float((model.features(x) - y).pow(2).mean()) for x, y in zip(test, ref))
        err_rtn = sum(float((rtn.features(x) - y).pow(2).mean()) for x, y in zip(test, ref))
    assert err_ada < 0.85 * err_rtn


def test_block_mode_and_determinism():
    cfg = QuantConfig(4, group_size=32)
    a, b = _cnn(), _cnn()
    ra = adaround_quantize_(a, cfg, _data(2), blocks=["features"], skip=["classifier"], iters=20, progress=False)
    adaround_quantize_(b, cfg, _data(2), blocks=["features"], skip=["classifier"], iters=20, progress=False)
    assert ra["features.0"]["block"] == "features" == ra["features.3"]["block"]
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    with torch.no_grad():
        assert torch.isfinite(a(_data(1)[0])).all()


def test_errors():
    with pytest.raises(ValueError, match="calibration set is empty"):
        adaround_quantize_(_cnn(), QuantConfig(4), [], progress=False)
    with pytest.raises(ValueError, match="layer features.0: learned rounding does not support per-row"):
        adaround_quantize_(_cnn(), {"features.0": QuantConfig(4, channel_bits=(4,) * 32)}, _data(1), iters=2,
                           progress=False)
    with pytest.raises(ValueError, match="needs 2..8 bits"):
        adaround_quantize_(_cnn(), QuantConfig(1), _data(1), iters=2, progress=False)
    bad = _data(1)
    bad[0][0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="features.0: calibration input holds NaN"):
        adaround_quantize_(_cnn(), QuantConfig(4), bad, iters=2, progress=False)
