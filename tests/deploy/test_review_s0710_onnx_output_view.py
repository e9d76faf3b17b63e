"""format="onnx": "the layer that produces the model's output keeps a float output (logits are not quantized)".
A model that returns a view of its last layer's output (a single-logit binary classifier's ``fc(x).squeeze(1)``,
``.view(-1, n)``, ``[:, 0]``) had that output quantized to uint8 like an inner activation: 256 levels over the
calibrated range, and logits beyond the calibration batches clipped to its edge.

References: onnxruntime's InferenceSession on the file of the same model returning the layer's output itself (no
view), and the medquant model (plain torch).
"""
from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch
from torch import nn

import medquant.deploy as D
from medquant.deploy.onnx import calibrate_activations, logits_tolerance
from medquant.quant.api import quantize_
from medquant.quant.config import QuantConfig

VIEWS = {"none": lambda y: y, "squeeze": lambda y: y.squeeze(1), "view": lambda y: y.view(-1),
         "index": lambda y: y[:, 0]}


class Binary(nn.Module):
    def __init__(self, view: str) -> None:
        super().__init__()
        self.a, self.fc, self.view = nn.Linear(20, 16), nn.Linear(16, 1), view

    def forward(self, x):
        return VIEWS[self.view](self.fc(torch.relu(self.a(x))))


def _ort(path, x: torch.Tensor) -> np.ndarray:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]


@pytest.mark.parametrize("view", ["squeeze", "view", "index"])
def test_a_view_of_the_last_layer_output_is_not_quantized(tmp_path, view):
    g = torch.Generator().manual_seed(1)
    calib = [torch.randn(32, 20, generator=g) for _ in range(2)]
    x = torch.randn(64, 20, generator=g)
    sims = {}
    for kind in (view, "none"):  # the same weights; "none" returns the layer's output itself
        torch.manual_seed(0)
        model = Binary(kind).eval()
        quantize_(model, QuantConfig(8, scope="channel"))
        sims[kind] = calibrate_activations(model, calib)
        D.export(sims[kind], tmp_path / f"{kind}.onnx", format="onnx", example_inputs=calib[0])
    sim = sims[view]
    assert sim.medquant_onnx.output_layer == "fc"
    got, plain = _ort(tmp_path / f"{view}.onnx", x), _ort(tmp_path / "none.onnx", x)
    with torch.no_grad():
        want = model(x).numpy().reshape(got.shape)  # plain torch, float activations
        np.testing.assert_array_equal(sim(x).numpy(), sims["none"](x).numpy().reshape(got.shape))
    np.testing.assert_allclose(got, plain.reshape(got.shape), rtol=0, atol=1e-6)  # quantized logits: 4e-3 off
    assert np.abs(got - sim(x).detach().numpy()).max() <= logits_tolerance(sim)
    assert np.abs(got - want).max() <= 0.05 * np.abs(want).max()
