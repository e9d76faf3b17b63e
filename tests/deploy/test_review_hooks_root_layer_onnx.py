"""ONNX export of a model that is itself one quantized layer (a linear probe: ``quantize_module(nn.Linear(...))``).

The simulation replaces every quantized layer by an export layer bound at the layer's name; the root has no name
to bind at, so the root layer stayed the layer it was and the export failed with misleading messages
("the trace does not represent the model (data-dependent control flow ...)", "no calibration data reached the
input of  (is the layer used in forward?)"). Such a model is refused up front with what to pass instead, and the
accepted form (the layer inside a container) exports and runs in ONNX Runtime as the layer computes (plain torch
forward as the reference).
"""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from torch import nn

import medquant as mq
from medquant.deploy import ExportError, calibrate_activations, export
from medquant.quant.api import quantize_module

ort = pytest.importorskip("onnxruntime")

X = torch.randn(4, 64, generator=torch.Generator().manual_seed(0))


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def _probe(bits: int) -> nn.Module:
    torch.manual_seed(0)
    cfg = mq.QuantConfig(4, group_size=16) if bits == 4 else mq.QuantConfig(8, scope="channel")
    return quantize_module(nn.Linear(64, 8), cfg).eval()


@pytest.mark.parametrize("bits", [4, 8])
def test_a_root_layer_is_refused_with_what_to_pass_instead(bits, tmp_path):
    layer = _probe(bits)
    with pytest.raises(ExportError, match=r"(?s)the model is itself a QuantLinear.*nn\.Sequential\("):
        export(layer, tmp_path / "m.onnx", format="onnx", example_inputs=X, calib=[X] if bits == 8 else None)
    assert not (tmp_path / "m.onnx").exists()
    with pytest.raises(ExportError, match=r"the model is itself a QuantLinear"):
        calibrate_activations(layer, [X])
    # a float root layer is traced as it is (what its float export layer computes): still exported
    export(nn.Linear(64, 8).eval(), tmp_path / "float.onnx", format="onnx", example_inputs=X)

    wrapped = nn.Sequential(layer).eval()  # the accepted form
    export(wrapped, tmp_path / "m.onnx", format="onnx", example_inputs=X, calib=[X] if bits == 8 else None)
    session = ort.InferenceSession(str(tmp_path / "m.onnx"))
    got = session.run(None, {session.get_inputs()[0].name: X.numpy()})[0]
    with torch.no_grad():
        want = layer(X).numpy()
    tol = 1e-4 if bits == 4 else 0.1  # 8-bit: static int8 activations (input quantized) against the float input
    np.testing.assert_allclose(got, want, rtol=0, atol=tol)
