"""format="onnx": a BatchNorm whose gamma is 0 for some channels (zero-initialised residual gammas, channels driven
to 0 by an L1 penalty on gamma) folds a weight scale of 0 into those rows of an int8 QDQ convolution. ONNX
Runtime's fused integer convolution stores the bias in int32 at scale ``s_x * s_w``: with ``s_w = 0`` the bias of
those channels was lost and the export failed its own verification ("data-dependent control flow").

References: the medquant model itself (plain torch, BatchNorm unfolded) and onnxruntime's InferenceSession; the
file's codes of the other rows read with onnx.numpy_helper against medquant's packed codes.
"""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import numpy_helper
from torch import nn

import medquant.deploy as D
from medquant.deploy.onnx import calibrate_activations, logits_tolerance, optimized_op_counts
from medquant.quant.api import quantize_
from medquant.quant.config import QuantConfig


def _model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3)).eval()
    with torch.no_grad():
        for bn in (model[1], model[4]):
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.5, 0.5)
            bn.weight[:3] = 0.0  # three channels whose output is the constant beta
    return model


@pytest.mark.parametrize("symmetric", [True, False])
def test_zero_gamma_channels_keep_their_bias_in_the_integer_conv(tmp_path, symmetric):
    model = _model()
    quantize_(model, QuantConfig(8, scope="channel", symmetric=symmetric))
    g = torch.Generator().manual_seed(1)
    calib = [torch.randn(4, 3, 12, 12, generator=g) for _ in range(3)]
    sim = calibrate_activations(model, calib)
    D.export(sim, tmp_path / "z.onnx", format="onnx", example_inputs=calib[0])  # failed its verification
    assert optimized_op_counts(tmp_path / "z.onnx")["QLinearConv"] == 2  # still the integer kernels
    x = torch.cat(calib)
    sess = ort.InferenceSession(str(tmp_path / "z.onnx"), providers=["CPUExecutionProvider"])
    got = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        want_sim = sim(x).numpy()
        want = model(x).numpy()  # plain torch: BatchNorm as it is, float activations
    assert np.abs(got - want_sim).max() <= logits_tolerance(sim)
    assert np.abs(got - want).max() <= 0.05 * np.abs(want).max()  # int8 activations; lost biases: ~30%
    graph = onnx.load(str(tmp_path / "z.onnx")).graph
    inits = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    for name in ("0", "3"):  # the other rows keep medquant's codes bit for bit
        pw = model.get_submodule(name).packed_weight(8)
        u = pw.codes()[:, :pw.k].to(torch.int32)
        codes = torch.from_numpy(inits[f"{name}.weight_codes"].reshape(8, -1).astype(np.int32))
        q = u - 128 if symmetric else u
        assert torch.equal(codes[3:], q[3:])
        node = next(n for n in graph.node if n.op_type == "DequantizeLinear" and n.input[0] == f"{name}.weight_codes")
        zp = torch.from_numpy(inits[node.input[2]].astype(np.int32))  # equal zero points share one tensor
        assert (codes[:3] == zp[:3, None]).all()  # the zero-gamma rows: weight 0, exactly
