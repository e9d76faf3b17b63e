"""format="onnx": the file declares axis 0 of every input as its dynamic batch axis. An example without one (a 0-d
tensor, or one unbatched sample whose axis 0 the model reads as features) is refused with an ExportError naming the
batch axis, instead of a bare ValueError / RuntimeError from inside the export's doubled-batch check.

References: the refusal's message; the target folder listed after the failure.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

import medquant.deploy as D
from medquant.deploy.onnx import OnnxClassifier
from medquant.quant.api import quantize_
from medquant.quant.config import QuantConfig


def _model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(40, 16), nn.ReLU(), nn.Linear(16, 3)).eval()
    quantize_(model, QuantConfig(4, group_size=32))  # weight-only: no calibration needed
    return model


def test_an_example_without_a_batch_axis_is_refused_naming_the_batch_axis(tmp_path):
    with pytest.raises(D.ExportError, match=r"0-d .*batch axis"):
        D.export(_model(), tmp_path / "a.onnx", format="onnx", example_inputs=torch.tensor(1.0))
    # one unbatched sample: axis 0 is the model's feature axis, the file would declare it the batch axis
    with pytest.raises(D.ExportError, match=r"cannot run on a batch of 80 .*leading batch axis"):
        D.export(_model(), tmp_path / "a.onnx", format="onnx", example_inputs=torch.randn(40))
    assert list(tmp_path.iterdir()) == []  # no file, no temporary folder


def test_a_per_sample_scalar_input_of_shape_batch_is_accepted(tmp_path):
    """A 1-D input whose axis 0 is the batch (one number per sample, e.g. the patient's age) exports and runs."""

    class TwoInputs(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(41, 3)

        def forward(self, x, age):
            return self.fc(torch.cat([x, age[:, None]], 1))

    torch.manual_seed(0)
    model = TwoInputs().eval()
    quantize_(model, QuantConfig(4, group_size=32))
    x, age = torch.randn(2, 40), torch.rand(2)
    D.export(model, tmp_path / "b.onnx", format="onnx", example_inputs=(x, age))
    with torch.no_grad():
        want = model(torch.cat([x, x]), torch.cat([age, age])).numpy()
    got = OnnxClassifier(tmp_path / "b.onnx")(torch.cat([x, x]), torch.cat([age, age]))
    assert abs(got - want).max() <= 1e-4
