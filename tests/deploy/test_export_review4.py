"""Fourth review of the GGUF / ONNX exports: behaviour checked against independent references.

References: ONNX Runtime running the written file on inputs the export never saw, compared with the PyTorch model
itself.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

pytest.importorskip("onnxruntime")

from medquant.deploy import ExportError, export


class _TokenCentering(nn.Module):
    """Centers each sample's tokens; ``batch_from_len`` reads the batch size with ``len(x)``, a Python int that the
    tracer bakes in (1 for a one-sample example), so the traced graph centers over the tokens of the whole batch."""

    def __init__(self, batch_from_len: bool) -> None:
        super().__init__()
        self.batch_from_len = batch_from_len
        self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x)
        h = h.reshape(len(x) if self.batch_from_len else x.size(0), -1, 8)
        h = h - h.mean(1, keepdim=True)
        h = h.reshape(x.size(0), -1, 8)
        return self.b(h.mean(1) + h.abs().mean(1))


def _ort(path, x: torch.Tensor) -> np.ndarray:
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {"pixel_values": x.numpy()})[0]


def test_batch_axis_check_uses_distinct_samples_for_a_one_sample_example(tmp_path):
    """With a one-sample example, the doubled batch of the verification held the same sample twice, so a graph that
    mixes the samples of a batch (a batch size traced as a constant) computed the right values on it and was
    written. Reference: the PyTorch model on three distinct samples."""
    torch.manual_seed(0)
    x1, x3 = torch.randn(1, 5, 8), torch.randn(3, 5, 8)
    wrong = _TokenCentering(batch_from_len=True).eval()
    with torch.no_grad():
        want = wrong(x3).numpy()
    # the file really is wrong on a batch of distinct samples (written unverified to show it)
    export(wrong, tmp_path / "unverified.onnx", format="onnx", example_inputs=x1, verify=False)
    assert np.abs(_ort(tmp_path / "unverified.onnx", x3) - want).max() > 1e-2
    with pytest.raises(ExportError, match="differ from the model"):
        export(wrong, tmp_path / "m.onnx", format="onnx", example_inputs=x1)
    assert not (tmp_path / "m.onnx").exists()

    right = _TokenCentering(batch_from_len=False).eval()  # the batch size read as a traced shape: written
    report = export(right, tmp_path / "ok.onnx", format="onnx", example_inputs=x1)
    with torch.no_grad():
        assert np.abs(_ort(report.files[0], x3) - right(x3).numpy()).max() < 1e-5
