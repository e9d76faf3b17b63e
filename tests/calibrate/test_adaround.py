"""Learned rounding: BatchNorm folding keeps the float outputs; the learned codes are each the floor or the ceiling of
``w / s`` on the quantizer's own grid (ordinary QuantConv2d layers) and reconstruct the feature maps better than
round-to-nearest; deterministic for a seed; clear errors."""
from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from medquant import QuantConfig, QuantConv2d, QuantLinear, quantize_
from medquant.calibrate import adaround
from medquant.calibrate.adaround import (
    InputQuantizer,
    adaround_quantize_,
    attach_input_quantizers,
    fold_batchnorm_,
)
from medquant.quant.core import compute_qparams
from medquant.testing.zoo import ZOO_BY_NAME, tiny_cnn
from tests.calibrate.padding_helpers import gemma3_image_pair, padded_pair, repadded


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


def _trained_pneumonia_cnn():
    """TinyCNN trained briefly on real PneumoniaMNIST chest X-rays (28 px): calibration and held-out images."""
    import os
    from pathlib import Path

    from medquant.data import load_npz_split
    from medquant.testing.zoo import tiny_cnn

    path = Path(os.environ.get("MEDQUANT_DATA_DIR", "")) / "pneumoniamnist" / "pneumoniamnist.npz"
    if not path.is_file():
        pytest.skip("PneumoniaMNIST is not in $MEDQUANT_DATA_DIR / ../shared/data")
    x, y = load_npz_split(path, "train", with_labels=True)
    x = torch.from_numpy(x[:1280]).float().div(255).unsqueeze(1)
    y = torch.from_numpy(y[:1280].reshape(-1).astype("int64"))
    model = tiny_cnn(num_classes=2, in_channels=1, seed=0).train()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(40):
        idx = torch.randint(0, 1024, (32,), generator=g)
        loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    return model, [x[i:i + 32] for i in range(0, 128, 32)], x[1024:1280]


def test_learned_rounding_on_a_trained_cnn_beats_rtn_block_by_block_and_end_to_end():
    """A small CNN trained on real X-rays (BatchNorm with real statistics): every block's learned rounding
    reconstructs the float model's block output better than RTN on the calibration images, and on held-out images
    the quantized model's last feature map and logits are closer to the float model's than RTN's are (with
    target="input" the blocks only avoid adding error of their own, and on the benchmark's trained CNN the errors
    then piled up to more than RTN's)."""
    model, calib, held = _trained_pneumonia_cnn()
    cfg = QuantConfig(3, scope="channel")
    fold_batchnorm_(model)
    rtn = quantize_(copy.deepcopy(model), cfg, skip=["classifier"])
    ada = copy.deepcopy(model)
    recs = adaround_quantize_(ada, cfg, calib, skip=["classifier"], iters=120, fold_bn=False, progress=False)
    assert set(recs) == {"features.0", "features.3"}
    for r in recs.values():
        assert r["target"] == "float" and r["fallback"] is None
        assert r["mse"] == r["mse_learned"] < 0.95 * r["mse_rtn"], recs
    # the recorded error is the float model's block output vs the quantized model's, on the calibration images
    with torch.no_grad():
        e_rec = sum(float((ada.features[:4](x) - model.features[:4](x)).pow(2).mean()) for x in calib) / len(calib)
        f_ada, f_rtn, f_ref = (m.features(held) for m in (ada, rtn, model))
        l_ada, l_rtn, l_ref = (m(held) for m in (ada, rtn, model))
    assert e_rec == pytest.approx(recs["features.3"]["mse"], rel=1e-4)
    err = {k: float((a - f_ref).pow(2).mean()) for k, a in (("ada", f_ada), ("rtn", f_rtn))}
    lerr = {k: float((a - l_ref).pow(2).mean()) for k, a in (("ada", l_ada), ("rtn", l_rtn))}
    assert err["ada"] < 0.9 * err["rtn"], err
    assert lerr["ada"] < lerr["rtn"], lerr


def test_recorded_errors_are_means_over_every_element_of_batches_of_different_sizes(monkeypatch):
    """``mse_rtn``, ``mse_learned`` and ``mse`` are the sum of squared output errors over every calibration batch
    divided by the number of output elements, and the fallback to round-to-nearest compares those. Calibration
    batches of 64 and 8 rows, by hand in float64 (``out - target = x (W^ - W)^T``, the bias cancels): before the fix
    the errors were averages of per-batch means (the 8 rows weighted as much as the 64, ~3x the true errors), and
    here that average preferred the learned rounding, which was kept although it is worse than RTN on the element
    mean."""
    torch.manual_seed(1)
    base = nn.Sequential(nn.Linear(16, 8))
    g = torch.Generator().manual_seed(1)
    batches = [torch.randn(64, 16, generator=g), 10 * torch.randn(8, 16, generator=g)]
    cfg = QuantConfig(3, scope="channel")
    snapshots = []  # the hard rounding in place each time round-to-nearest is set: before training, at a fallback
    rtn_ = adaround._rtn_

    def spy(layers):
        snapshots.append(layers["0"].weight(hard=True).detach().clone())
        rtn_(layers)

    monkeypatch.setattr(adaround, "_rtn_", spy)
    model = copy.deepcopy(base)
    rec = adaround_quantize_(model, cfg, batches, iters=300, seed=1, progress=False)["0"]
    w_kept = model[0].dequantized_weight()
    w_learned = snapshots[1] if len(snapshots) == 2 else w_kept
    w_rtn = quantize_(copy.deepcopy(base), cfg)[0].dequantized_weight()
    w = base[0].weight.detach().double()
    errs = {k: [x.double() @ (v.double() - w).T for x in batches]
            for k, v in (("rtn", w_rtn), ("learned", w_learned), ("kept", w_kept))}
    element_mean = {k: float(sum(e.pow(2).sum() for e in v) / sum(e.numel() for e in v)) for k, v in errs.items()}
    batch_mean = {k: sum(float(e.pow(2).mean()) for e in v) / len(v) for k, v in errs.items()}
    assert rec["mse_rtn"] == pytest.approx(element_mean["rtn"], rel=1e-5)
    assert rec["mse_learned"] == pytest.approx(element_mean["learned"], rel=1e-5)
    assert rec["mse"] == pytest.approx(element_mean["kept"], rel=1e-5)
    assert rec["fallback"] == ("rtn" if element_mean["learned"] > element_mean["rtn"] else None)
    assert (rec["fallback"] == "rtn") == (len(snapshots) == 2)
    # the two means disagree on this data, so the decision itself is tested, not only the record
    assert (batch_mean["learned"] < batch_mean["rtn"]) != (element_mean["learned"] < element_mean["rtn"]), \
        (batch_mean, element_mean)


def test_3_bit_layers_are_stored_densely_like_quantize_():
    model = _cnn()
    adaround_quantize_(model, QuantConfig(3, scope="channel"), _data(1), skip=["classifier"], iters=2, progress=False)
    rtn = quantize_(_cnn(), QuantConfig(3, scope="channel"), skip=["classifier"])
    for name in ("features.0", "features.3"):
        q, r = model.get_submodule(name), rtn.get_submodule(name)
        assert q.stores_dense and r.stores_dense and q.qweight_3.shape == r.qweight_3.shape


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


def _n_bn(model):
    return sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())


def _snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}, [type(m) for m in model.modules()]


def _unchanged(model, snap):
    state, types = snap
    now = model.state_dict()
    return (now.keys() == state.keys() and all(torch.equal(now[k], state[k]) for k in state)
            and [type(m) for m in model.modules()] == types)


def test_failed_or_empty_calls_leave_the_model_unchanged():
    """The BatchNorms used to be folded before the calibration set, the configs and the blocks were checked."""
    cfg = QuantConfig(4, group_size=32)
    model = _cnn()
    snap = _snapshot(model)
    with pytest.raises(ValueError, match="calibration set is empty"):
        adaround_quantize_(model, cfg, [], iters=2, progress=False)
    assert _unchanged(model, snap) and _n_bn(model) == 2
    # a bad config on the last layer: refused before the first one is folded or quantized
    with pytest.raises(ValueError, match="layer classifier: learned rounding needs 2..8 bits, got 1"):
        adaround_quantize_(model, {"features": cfg, "classifier": QuantConfig(1)}, _data(1), iters=2,
                           progress=False)
    assert _unchanged(model, snap)
    with pytest.raises(ValueError, match="blocks 'features' and 'features.0' nest"):
        adaround_quantize_(model, cfg, _data(1), blocks=["features", "features.0"], iters=2, progress=False)
    assert _unchanged(model, snap)
    with pytest.raises(ValueError, match=r"calibration batch 0 \(a tensor of shape \(2, 4, 12, 12\)\) failed in "
                                         "the model's forward"):
        adaround_quantize_(model, cfg, [torch.randn(2, 4, 12, 12)], iters=2, progress=False)
    assert _unchanged(model, snap)
    # nothing planned: nothing to quantize, so nothing is folded either
    assert adaround_quantize_(model, {"features.0": None}, _data(1), iters=2, progress=False) == {}
    assert _unchanged(model, snap)


def test_fold_batchnorm_checks_every_pair_before_folding():
    model = _cnn()
    model.features[4].running_var = None                              # the second BatchNorm cannot be folded
    snap = _snapshot(model)
    with pytest.raises(ValueError, match="features.4: cannot fold a BatchNorm2d without running statistics"):
        fold_batchnorm_(model)
    assert _unchanged(model, snap) and _n_bn(model) == 2


@pytest.mark.parametrize("blocks", [["0", "0.0"], ["0.0", "0"], ["1", "0", "0.2"], ["", "1"]])
def test_nested_blocks_are_refused(blocks):
    seq = nn.Sequential(nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8)), nn.Linear(8, 4))
    inner = next(b for b in blocks if any(o != b and (o == "" or b.startswith(o + ".")) for o in blocks))
    outer = next(o for o in blocks if o != inner and (o == "" or inner.startswith(o + ".")))
    with pytest.raises(ValueError, match=rf"blocks '{outer}' and '{inner}' nest .*blocks must not nest"):
        adaround_quantize_(seq, QuantConfig(4, group_size=8), [torch.randn(4, 8)], blocks=blocks, iters=2,
                           progress=False)
    assert all(type(m) in (nn.Sequential, nn.Linear, nn.ReLU) for m in seq.modules())


def test_a_batch_that_does_not_fit_names_the_batch_and_the_block():
    """A wrong input shape used to surface as torch's raw RuntimeError, naming no batch (GPTQ names both)."""
    torch.manual_seed(0)
    seq = nn.Sequential(nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8)), nn.Linear(8, 4))
    cfg = QuantConfig(4, group_size=8)
    with pytest.raises(ValueError, match=r"calibration batch 0 \(a tensor of shape \(4, 7\)\) failed in the "
                                         r"model's forward while calibrating 0\.0, 0\.2, 1: RuntimeError: ") as info:
        adaround_quantize_(copy.deepcopy(seq), cfg, [torch.randn(4, 7)], iters=2, progress=False)
    assert isinstance(info.value.__cause__, RuntimeError)
    # a later batch that does not fit is caught by the call-counting forward of every batch, before any change
    model = copy.deepcopy(seq)
    with pytest.raises(ValueError, match=r"calibration batch 1 \(a tensor of shape \(4, 7\)\) failed in the "
                                         r"model's forward while calibrating 0\.0, 0\.2, 1: RuntimeError: ") as info:
        adaround_quantize_(model, cfg, [torch.randn(4, 8), torch.randn(4, 7)], iters=2, progress=False)
    assert isinstance(info.value.__cause__, RuntimeError)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), seq.state_dict().values()))
    assert [type(m) for m in model.modules()] == [type(m) for m in seq.modules()]
    with pytest.raises(ValueError, match=r"calibration batch 1 \(a dict with the keys \['x'\]\) failed .*"
                                         r"calibrating features: RuntimeError: ") as info:
        adaround_quantize_(_cnn(), QuantConfig(4, group_size=32), [{"x": _data(1)[0]}, {"x": torch.randn(2, 5, 12, 12)}],
                           blocks=["features"], skip=["classifier"], iters=2, progress=False)
    assert isinstance(info.value.__cause__, RuntimeError)


# ---------------------------------------------------------------------------------------------- W4A8
def _hand_fake_quant(x, lo, hi, bits=8):
    """Static asymmetric per-tensor fake quantization written out in plain torch (range always holds 0)."""
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    s = (hi - lo) / (2**bits - 1)
    z = float(torch.round(torch.tensor(-lo / s, dtype=torch.float64)))
    return (torch.clamp(torch.round(x / s) + z, 0, 2**bits - 1) - z) * s, s, z


def test_w4a8_input_quantizers_equal_hand_reference_and_beat_rtn():
    cfg = QuantConfig(4, scope="channel")
    model = _cnn()
    fold_batchnorm_(model)
    folded = copy.deepcopy(model)
    calib, test = _data(), _data(2, seed=9)
    recs = adaround_quantize_(model, cfg, calib, skip=["classifier"], iters=60, fold_bn=False, act_bits=8,
                              progress=False)
    assert set(recs) == {"features.0", "features.3"}
    for rec in recs.values():
        assert rec["act"]["bits"] == 8 and not rec["act"]["symmetric"]
        assert rec["mse"] < rec["mse_rtn"]           # calibration reconstruction, both with 8-bit inputs
    # features.0 reads the images themselves: scale and zero point from their min / max, by hand
    lo, hi = min(float(x.min()) for x in calib), max(float(x.max()) for x in calib)
    x = test[0]
    ref, s, z = _hand_fake_quant(x, lo, hi)
    assert recs["features.0"]["act"]["scale"] == pytest.approx(s, rel=1e-12) and recs["features.0"]["act"]["zero"] == z
    q0 = model.features[0]
    w = q0.dequantized_weight().reshape(folded.features[0].weight.shape)
    with torch.no_grad():
        torch.testing.assert_close(q0(x), torch.nn.functional.conv2d(ref, w, q0.bias, padding=1), rtol=1e-5,
                                   atol=1e-5)
    # features.3: its raw inputs (captured before the quantizer) fix the range; what it computes with is on the grid
    raw, seen = [], []
    h1 = model.features[3].register_forward_pre_hook(lambda m, a: raw.append(a[0].detach()), prepend=True)
    h2 = model.features[3].register_forward_pre_hook(lambda m, a: seen.append(a[0].detach()))
    with torch.no_grad():
        for xb in calib:
            model(xb)
    h1.remove()
    h2.remove()
    ref3, s3, _ = _hand_fake_quant(torch.cat(raw), min(float(r.min()) for r in raw),
                                   max(float(r.max()) for r in raw))
    assert recs["features.3"]["act"]["scale"] == pytest.approx(s3, rel=1e-6)
    torch.testing.assert_close(torch.cat(seen), ref3, rtol=0, atol=1e-5)
    # held-out: with the same 8-bit input quantizers on an RTN model, learned rounding reconstructs better
    rtn = quantize_(copy.deepcopy(folded), cfg, skip=["classifier"])
    attach_input_quantizers(rtn, recs)
    with torch.no_grad():
        ref_out = [folded.features(t) for t in test]
        err_ada = sum(float((model.features(t) - y).pow(2).mean()) for t, y in zip(test, ref_out))
        err_rtn = sum(float((rtn.features(t) - y).pow(2).mean()) for t, y in zip(test, ref_out))
    assert err_ada < err_rtn


def test_vit_blocks_with_w4a8():
    e = ZOO_BY_NAME["vit"]
    model = e.build().eval()
    g = torch.Generator().manual_seed(3)
    calib = [{"pixel_values": torch.randn(4, 3, 32, 32, generator=g)} for _ in range(3)]
    test = {"pixel_values": torch.randn(4, 3, 32, 32, generator=g)}
    float_model = copy.deepcopy(model)
    blocks = [f"vit.layers.{i}" for i in range(len(model.vit.layers))]
    cfg = QuantConfig(4, group_size=32)
    recs = adaround_quantize_(model, cfg, calib, skip=["classifier"], blocks=blocks, iters=30, act_bits=8,
                              progress=False)
    assert {r["block"] for r in recs.values()} == {*blocks, "vit.embeddings.patch_embeddings.projection"}
    for r in recs.values():
        assert r["mse"] < r["mse_rtn"] and r["act"]["bits"] == 8
    assert all(isinstance(model.get_submodule(n), (QuantLinear, QuantConv2d)) for n in recs)
    assert isinstance(model.vit.layers[0].input_quantizer, InputQuantizer)
    rtn = quantize_(copy.deepcopy(float_model), cfg, skip=["classifier"])
    attach_input_quantizers(rtn, recs)
    with torch.no_grad():
        ref = float_model.vit(**test).last_hidden_state
        err_ada = float((model.vit(**test).last_hidden_state - ref).pow(2).mean())
        err_rtn = float((rtn.vit(**test).last_hidden_state - ref).pow(2).mean())
    assert err_ada < err_rtn


def test_input_quantizer_errors():
    with pytest.raises(ValueError, match="act_bits must be None or an integer in 2..16"):
        adaround_quantize_(_cnn(), QuantConfig(4), _data(1), iters=2, act_bits=1, progress=False)
    with pytest.raises(ValueError, match="activation scale must be a finite number > 0"):
        InputQuantizer(8, False, float("nan"))
    with pytest.raises(ValueError, match="block x: calibration input holds NaN"):
        InputQuantizer.calibrate([torch.tensor([0.0, float("nan")])], 8, name="block x")


def test_one_batch_dict_no_data_and_bad_arguments_are_handled():
    """A single dict batch is one batch (not a list of its keys); no calibration data, a non-integer seed, a
    warmup or rate that is not a finite number, and ``blocks`` given as one string give errors that name the
    argument before the model changes."""
    cfg = QuantConfig(4, scope="channel")
    calib = [{"x": x} for x in _data(2)]

    class Kw(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = tiny_cnn()

        def forward(self, x):
            return self.net(x)

    one, listed = Kw(), Kw()
    listed.load_state_dict(one.state_dict())
    recs = adaround_quantize_(one, cfg, calib[0], iters=3, progress=False)
    assert recs == adaround_quantize_(listed, cfg, calib[:1], iters=3, progress=False)
    model = _cnn()
    snap = _snapshot(model)
    with pytest.raises(ValueError, match="learned rounding needs calibration data"):
        adaround_quantize_(model, cfg, None, iters=2, progress=False)
    for kw, match in [({"seed": "0"}, "seed must be an integer"), ({"seed": 0.5}, "seed must be an integer"),
                      ({"warmup": "0.2"}, "warmup must be"), ({"lr": float("nan")}, "lr must be"),
                      ({"lr": -1.0}, "lr must be"), ({"reg": float("nan")}, "reg must be"),
                      ({"blocks": "features"}, "blocks must be a list")]:
        with pytest.raises(ValueError, match=match):
            adaround_quantize_(model, cfg, _data(1), iters=2, progress=False, **kw)
        assert _unchanged(model, snap), kw


# ---------------------------------------------------------------------------------------------- padding
LAYER0 = "model.layers.0"


def _outputs(model, name, batches, inputs=False):
    """Independent reference: the output (``inputs``: the first input) rows of the module ``name``, each batch run
    on its own (``model(**batch)``, a forward hook), as ``(rows, features)`` concatenated in batch order."""
    rows = []

    def hook(mod, args, out):
        t = args[0] if inputs else out[0] if isinstance(out, tuple) else out
        rows.append(t.detach().reshape(-1, t.shape[-1]))

    h = model.get_submodule(name).register_forward_hook(hook)
    try:
        with torch.no_grad():
            for b in batches:
                model(**b, use_cache=False)
    finally:
        h.remove()
    return torch.cat(rows)


@pytest.mark.parametrize("act_bits", [None, 8], ids=["w4", "w4a8"])
@pytest.mark.parametrize("blocks", [None, [LAYER0]], ids=["layers", "block"])
def test_padded_tokens_are_left_out_of_the_reconstruction(blocks, act_bits):
    """Padding positions (attention_mask 0) are not calibration data: in a right-padded batch of two sequences (12
    and 5 tokens), other token ids at the 7 pad positions give the same records and codes to the bit (loss,
    recorded errors, the fallback decision and the activation range ignore them), and the units that read the
    float model's own activations record the round-to-nearest error of the two sequences run one by one (a
    round-to-nearest model with the recorded input quantizers, whose range is that of the 17 real rows). Before
    the fix the reconstruction error counted the pad rows (24 rows instead of 17)."""
    model = ZOO_BY_NAME["llama"].build()
    vocab = model.config.vocab_size
    padded, separate = padded_pair(vocab)
    cfg = {LAYER0: QuantConfig(4, group_size=32)}
    runs = []
    for calib in ([padded], [repadded(padded, vocab)]):
        m = copy.deepcopy(model)
        runs.append((adaround_quantize_(m, cfg, calib, blocks=blocks, iters=5, act_bits=act_bits, progress=False), m))
    (recs, m_pad), (recs_re, m_re) = runs
    assert len(recs) == 7 and recs == recs_re
    sp, sr = m_pad.state_dict(), m_re.state_dict()
    assert sp.keys() == sr.keys() and all(torch.equal(sp[k], sr[k]) for k in sp)
    # the units whose input is the float model's (layer 0's q / k / v projections, or layer 0 as one block)
    firsts = {LAYER0: f"{LAYER0}.self_attn.q_proj"} if blocks else \
        {f"{LAYER0}.self_attn.{p}_proj": f"{LAYER0}.self_attn.{p}_proj" for p in "qkv"}
    rtn = quantize_(copy.deepcopy(model), cfg)
    for unit, layer in firsts.items():
        rec = recs[layer]
        assert rec["block"] == unit
        if act_bits:
            x = _outputs(model, unit, separate, inputs=True)
            _, s, z = _hand_fake_quant(x, float(x.min()), float(x.max()))
            assert rec["act"]["scale"] == pytest.approx(s, rel=1e-6) and rec["act"]["zero"] == z
    attach_input_quantizers(rtn, recs)
    for unit, layer in firsts.items():
        d = (_outputs(rtn, unit, separate) - _outputs(model, unit, separate)).double()
        assert recs[layer]["mse_rtn"] == pytest.approx(float(d.pow(2).mean()), rel=1e-4), unit


def test_calibration_set_of_only_padding_is_refused_before_the_model_changes():
    """Every attention_mask all zeros (every position padding): the token-input layers have no calibration data.
    The recorded errors were 0 / 0 = NaN and the call failed only after the optimisation, saying the learned
    rounding "diverged". Now a clear error comes first and the model is left as it was; an all-padding batch beside
    a real one adds nothing (round-to-nearest error of the real batch alone)."""
    model = ZOO_BY_NAME["llama"].build()
    vocab = model.config.vocab_size
    padded, _ = padded_pair(vocab)
    empty = {**padded, "attention_mask": torch.zeros_like(padded["attention_mask"])}
    cfg = {f"{LAYER0}.mlp.down_proj": QuantConfig(4, group_size=32)}
    m = copy.deepcopy(model)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    for calib in ([empty], [empty, repadded(empty, vocab)]):
        with pytest.raises(ValueError, match=r"no real token.*attention_mask of every calibration batch is all "
                                             r"zeros.*at least one real token"):
            adaround_quantize_(m, cfg, calib, iters=5, progress=False)
    after = m.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    alone = adaround_quantize_(copy.deepcopy(model), cfg, [padded], iters=5, progress=False)
    mixed = adaround_quantize_(copy.deepcopy(model), cfg, [padded, empty], iters=5, progress=False)
    assert alone.keys() == mixed.keys() == cfg.keys()
    for n in alone:
        assert mixed[n]["mse_rtn"] == pytest.approx(alone[n]["mse_rtn"], rel=1e-12)
        assert math.isfinite(mixed[n]["mse_learned"])


def test_padding_mask_is_not_applied_to_the_vision_tower():
    """Gemma 3 VLM, two images and a right-padded text of 16 tokens: a vision layer's output is ``(2, 16 patches,
    K)``, the mask's shape, but image patches are never padding - its recorded round-to-nearest error is the mean
    over all 32 patch rows, as when the two samples run one by one (27 rows if the text's mask were applied)."""
    e = ZOO_BY_NAME["gemma3_vlm"]
    model = e.build()
    padded, separate = gemma3_image_pair(e, model)  # 16 text positions: the vision tower's patches per image
    name = "model.vision_tower.encoder.layers.0.self_attn.q_proj"
    cfg = {name: QuantConfig(4, group_size=32)}
    rec = adaround_quantize_(copy.deepcopy(model), cfg, [padded], iters=5, progress=False)[name]
    rtn = quantize_(copy.deepcopy(model), cfg)
    got, want = _outputs(rtn, name, separate), _outputs(model, name, separate)
    assert got.shape[0] == 32
    assert rec["mse_rtn"] == pytest.approx(float((got - want).double().pow(2).mean()), rel=1e-4)


def test_decoder_layers_as_blocks():
    """HF decoder layers as blocks: the KV cache the model passes them is not recorded (re-running a block with it
    appended its keys again and again: a shape error in attention on the second run); each block's
    round-to-nearest error is that of a round-to-nearest model (plain forward hooks)."""
    e = ZOO_BY_NAME["llama"]
    model = e.build()
    batch = e.inputs(model)
    blocks = [f"model.layers.{i}" for i in range(model.config.num_hidden_layers)]
    cfg = QuantConfig(4, group_size=32)
    m = copy.deepcopy(model)
    recs = adaround_quantize_(m, cfg, [batch], skip=["@head"], blocks=blocks, iters=5, progress=False)
    assert {r["block"] for r in recs.values()} == set(blocks) and len(recs) == 7 * len(blocks)
    rtn = quantize_(copy.deepcopy(model), {blocks[0]: cfg})
    d = (_outputs(rtn, blocks[0], [batch]) - _outputs(model, blocks[0], [batch])).double()
    assert recs[f"{blocks[0]}.mlp.up_proj"]["mse_rtn"] == pytest.approx(float(d.pow(2).mean()), rel=1e-4)
    assert all(isinstance(m.get_submodule(n), QuantLinear) for n in recs)
