"""medquant.deploy.onnx_sim edge cases: BatchNorms that cannot be folded (batch statistics, a convolution output
also read elsewhere) stay BatchNorms; calibration options and calibration sets that would be misread are refused.

References: plain torch (the user's model in eval mode), onnxruntime on the exported file (OnnxClassifier, the
session options the export verifies with), counts of the batches actually observed.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import medquant.deploy as D
from medquant.deploy.onnx import CalibrationError, OnnxClassifier, calibrate_activations, logits_tolerance
from medquant.quant.api import quantize_
from medquant.quant.config import QuantConfig
from medquant.testing.zoo import tiny_cnn

pytestmark = pytest.mark.usefixtures("one_torch_thread")
INT8 = QuantConfig(bits=8, scope="channel")


class _ConvBN(nn.Module):
    """conv -> conv -> BatchNorm -> ReLU -> mean -> Linear; ``skip``: the second conv's output is also added after
    the ReLU (the BatchNorm's input is read twice)."""

    def __init__(self, bn: nn.BatchNorm2d, skip: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.c0, self.conv = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn, self.relu, self.fc, self.skip = bn, nn.ReLU(), nn.Linear(8, 3), skip
        if bn.track_running_stats:
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 1.5)
        if bn.affine:
            bn.weight.data.uniform_(0.5, 1.5)
            bn.bias.data.uniform_(-0.2, 0.2)

    def forward(self, x):
        c = self.conv(self.c0(x))
        y = self.relu(self.bn(c))
        if self.skip:
            y = y + c
        return self.fc(y.mean((2, 3)))


def _calib(n=3, batch=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, 3, 8, 8, generator=g) for _ in range(n)]


def _deployed_matches(model, sim, tmp_path, rel=0.1):
    """The sim is near the plain-torch model (quantization error only) and ORT on the exported file is within the
    derived tolerance of the sim."""
    x = torch.randn(6, 3, 8, 8, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ref, want = model(x), sim(x)
    assert float((ref - want).abs().max()) <= rel * float(ref.abs().max())
    D.export(sim, tmp_path / "m.onnx", format="onnx", example_inputs=x[:2])
    got = OnnxClassifier(tmp_path / "m.onnx")(x)
    tol = logits_tolerance(sim)
    tol = 1e-3 + 5e-2 * float(want.abs().max()) if tol is None else tol
    assert np.abs(got - want.numpy()).max() <= tol


def test_batchnorm_without_running_statistics_is_refused_naming_it(tmp_path):
    """BatchNorm2d(track_running_stats=False) normalizes with each batch's statistics, even in eval mode: nothing to
    fold, and torch.onnx cannot write it with a dynamic batch. calibrate_activations raised AttributeError
    ('NoneType' object has no attribute 'float'); now both entry points name the BatchNorm and what is accepted."""
    model = _ConvBN(nn.BatchNorm2d(8, track_running_stats=False)).eval()
    quantize_(model, INT8)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for call in (lambda: calibrate_activations(model, _calib()),
                 lambda: D.export(model, tmp_path / "m.onnx", format="onnx", calib=_calib())):
        with pytest.raises(D.ExportError, match=r"BatchNorm bn: track_running_stats=False .* Accepted: BatchNorms "
                                                r"with running statistics"):
            call()
    assert not (tmp_path / "m.onnx").exists()
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_batchnorm_whose_convolution_output_is_also_read_elsewhere_is_not_folded(tmp_path):
    """``relu(bn(c)) + c``: folding the BatchNorm into the convolution would change ``c`` for the addition too
    (the structure check refused the model; with check=False the sim was wrong by about half the logits)."""
    model = _ConvBN(nn.BatchNorm2d(8), skip=True).eval()
    quantize_(model, INT8)
    sim = calibrate_activations(model, _calib())
    assert sim.medquant_onnx.folded == {}
    _deployed_matches(model, sim, tmp_path)
    plain = _ConvBN(nn.BatchNorm2d(8), skip=False).eval()  # read once: still folded
    quantize_(plain, INT8)
    assert calibrate_activations(plain, _calib()).medquant_onnx.folded == {"conv": "bn"}


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "2"])
def test_max_batches_that_is_not_a_positive_integer_is_refused(bad):
    """max_batches=0 or -1 calibrated on one batch and 1.5 on two, silently."""
    model = tiny_cnn()
    quantize_(model, INT8)
    with pytest.raises(ValueError, match=rf"max_batches must be a positive integer \(or None\), got {bad!r}"):
        calibrate_activations(model, [torch.randn(2, 3, 16, 16) for _ in range(3)], max_batches=bad)


def test_max_batches_limits_the_batches_observed():
    model = tiny_cnn()
    quantize_(model, INT8)
    calib = [torch.randn(2, 3, 16, 16) for _ in range(4)]
    for limit, want in ((1, 1), (2, 2), (3, 3), (9, 4), (None, 4)):
        assert calibrate_activations(model, calib, max_batches=limit).medquant_onnx.batches == want


def test_a_single_tensor_as_the_calibration_set_is_refused_with_what_to_pass(tmp_path):
    """A (N, C, H, W) tensor iterates over its samples: each 'batch' lost its batch axis and the model failed inside
    a layer ('expected 4D input (got 3D input)')."""
    model = tiny_cnn()
    quantize_(model, INT8)
    x = torch.randn(8, 3, 16, 16)
    for call in (lambda: calibrate_activations(model, x),
                 lambda: D.export(model, tmp_path / "m.onnx", format="onnx", calib=x)):
        with pytest.raises(CalibrationError, match=r"a single tensor of shape \(8, 3, 16, 16\).*x\.split\(32\)"):
            call()
    assert not (tmp_path / "m.onnx").exists()


class _ReluSkip(nn.Module):
    """``relu(c) + c``: the convolution's output is read by the ReLU and by the addition."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.c0, self.relu, self.fc = nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Linear(8, 3)

    def forward(self, x):
        c = self.c0(x)
        return self.fc((self.relu(c) + c).mean((2, 3)))


def test_relu_whose_input_is_also_read_elsewhere_is_not_fused(tmp_path):
    """Fusing the ReLU into c0 rectified ``c`` for the addition too: the structure check refused the model (and
    with check=False the sim differed from it by about the size of the logits)."""
    model = _ReluSkip().eval()
    quantize_(model, INT8)
    sim = calibrate_activations(model, _calib())
    assert not sim.get_submodule("c0").fuse_relu
    _deployed_matches(model, sim, tmp_path)


@pytest.mark.parametrize("model_dtype,input_dtype", [(torch.float32, torch.float64), (torch.float32, torch.float16),
                                                     (torch.bfloat16, torch.bfloat16), (torch.float16, torch.float16)])
def test_half_and_double_models_and_inputs_are_simulated_in_float32(tmp_path, model_dtype, input_dtype):
    """The exported model computes in float32 whatever the dtype of the model or of its inputs (OnnxClassifier casts
    floating inputs). Calibration batches from numpy (float64), or a bfloat16 / float16 model with batches of its
    dtype, failed inside the simulation ('Input type (c10::BFloat16) and bias type (float) should be the same').
    Reference: a float32 copy of the model in plain torch, and onnxruntime on the exported file."""
    import copy

    model = tiny_cnn().to(model_dtype)
    quantize_(model, INT8)
    g = torch.Generator().manual_seed(0)
    calib = [torch.randn(8, 3, 16, 16, generator=g) for _ in range(3)]
    sim = calibrate_activations(model, [c.to(input_dtype) for c in calib])
    x = torch.randn(6, 3, 16, 16, generator=g)
    with torch.no_grad():
        ref = copy.deepcopy(model).float()(x)
        want = sim(x.to(input_dtype))
    assert want.dtype == torch.float32
    assert float((ref - want).abs().max()) <= 0.1 * float(ref.abs().max())
    if input_dtype == torch.float64:  # float32 values in float64: cast back exactly
        assert torch.equal(sim(x), want)
    D.export(sim, tmp_path / "m.onnx", format="onnx", example_inputs=x[:2].to(input_dtype))
    got = OnnxClassifier(tmp_path / "m.onnx")(x.to(input_dtype))
    assert np.abs(got - want.numpy()).max() <= logits_tolerance(sim)
    assert next(p for p in model.parameters()).dtype == model_dtype  # the user's model keeps its dtype


def test_a_model_calibrate_activations_returned_is_refused_for_recalibration():
    """Recalibrating a returned simulation (e.g. to try method='percentile') failed with 'no calibration data
    reached the input of features.0 (is the layer used in forward?)', which points at the wrong cause."""
    model = tiny_cnn()
    quantize_(model, INT8)
    calib = [torch.randn(4, 3, 16, 16) for _ in range(2)]
    sim = calibrate_activations(model, calib)
    with pytest.raises(D.ExportError, match=r"already calibrated .*pass the quantized model it was made from"):
        calibrate_activations(sim, calib, method="percentile")
    pct = calibrate_activations(model, calib, method="percentile", percentile=99.0)  # the way that works
    assert pct.medquant_onnx.method == "percentile"


@pytest.mark.parametrize("bad", ["99", None, float("nan"), 50.0, True])
def test_percentile_that_is_not_a_number_in_range_is_refused(bad):
    """percentile='99' raised a raw TypeError ('<' not supported between 'float' and 'str')."""
    model = tiny_cnn()
    quantize_(model, INT8)
    with pytest.raises(ValueError, match=rf"percentile must be a number in \(50, 100\], got {bad!r}"):
        calibrate_activations(model, [torch.randn(2, 3, 16, 16)], method="percentile", percentile=bad)
