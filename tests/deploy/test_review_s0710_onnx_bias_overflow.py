"""format="onnx": ONNX Runtime's fused int8 convolution / Gemm stores each channel's float bias in int32 at scale
``s_x * s_w``. A BatchNorm with a tiny gamma (1e-9: channels an L1 penalty on gamma drove towards 0) folds a tiny
weight scale into its channel, and ``|b| / (s_x * s_w)`` overflows int32: the channel's bias was lost and the
export failed its own verification ("data-dependent control flow"). Such a layer's bias is now written as a float
``Add`` after the Conv / Gemm (a float convolution for that layer), exactly the function the simulation computes.

References: the medquant model itself (plain torch, BatchNorm unfolded) and onnxruntime's InferenceSession.
"""
from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch
from torch import nn

import medquant.deploy as D
from medquant.deploy.onnx import calibrate_activations, logits_tolerance, optimized_op_counts
from medquant.quant.api import quantize_
from medquant.quant.config import QuantConfig


@pytest.mark.parametrize("gamma", [1e-9, -1e-9])  # a negative gamma folds a negative weight scale
def test_a_bias_the_int32_kernel_cannot_hold_is_added_in_float(tmp_path, gamma):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3)).eval()
    with torch.no_grad():
        for bn in (model[1], model[4]):
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.5, 0.5)
        model[4].weight[:2] = gamma  # only the second conv's bias overflows
    quantize_(model, QuantConfig(8, scope="channel"))
    g = torch.Generator().manual_seed(1)
    calib = [torch.randn(4, 3, 12, 12, generator=g) for _ in range(3)]
    sim = calibrate_activations(model, calib)
    report = D.export(sim, tmp_path / "b.onnx", format="onnx", example_inputs=calib[0])
    note = next(r.note for r in report.layers if r.name == "3")
    assert "int32" in note and "Add" in note
    assert optimized_op_counts(tmp_path / "b.onnx")["QLinearConv"] == 1  # the first conv keeps its integer kernel
    x = torch.cat(calib)
    sess = ort.InferenceSession(str(tmp_path / "b.onnx"), providers=["CPUExecutionProvider"])
    got = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        want_sim = sim(x).numpy()
        want = model(x).numpy()  # plain torch: BatchNorm as it is, float activations
    assert np.abs(got - want_sim).max() <= logits_tolerance(sim)
    assert np.abs(got - want).max() <= 0.05 * np.abs(want).max()  # int8 activations; lost biases: ~30%
