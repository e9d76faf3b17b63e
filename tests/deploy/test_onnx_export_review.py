"""format="onnx" export review: every model input stays an input of the file (an input the output does not read is
not dropped by the tracer), and input / output names that would collide are refused by name.

References: plain torch (the model itself), onnx (the graph inputs as written, ``onnx.checker`` full check),
onnxruntime on the written file.
"""
from __future__ import annotations

import os

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from medquant.deploy.onnx import OnnxClassifier, calibrate_activations, export_onnx, logits_tolerance
from medquant.deploy.registry import ExportError
from medquant.quant.api import quantize_
from medquant.quant.config import QuantConfig

pytestmark = pytest.mark.usefixtures("one_torch_thread")


class _MaskIgnored(nn.Module):
    """``forward(x, mask, scale)``: the logits read ``x`` and ``scale`` (an int64 input); ``mask`` is accepted and not
    read (a model with an optional input that this checkpoint ignores)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(8, 3)

    def forward(self, x, mask, scale):
        return self.fc(x) * scale.float()


def _inputs(b: int):
    g = torch.Generator().manual_seed(b)
    return torch.randn(b, 8, generator=g), torch.ones(b, 5), torch.full((b, 1), 2, dtype=torch.int64)


@pytest.mark.parametrize("bits", [None, 8])
def test_an_input_the_output_does_not_read_stays_an_input_of_the_file(tmp_path, bits):
    model = _MaskIgnored().eval()
    if bits:  # the reference is the simulation that is exported (static int8 activations)
        quantize_(model, QuantConfig(bits=bits, scope="channel"))
        model = calibrate_activations(model, [_inputs(4)])
    export_onnx(model, tmp_path / "m.onnx", example_inputs=_inputs(2), input_names=["x", "mask", "scale"])
    proto = onnx.load(str(tmp_path / "m.onnx"))
    onnx.checker.check_model(proto, full_check=True)
    graph_inputs = {i.name: i for i in proto.graph.input}
    assert [i.name for i in proto.graph.input] == ["x", "mask", "scale"]
    dims = [d.dim_param or d.dim_value for d in graph_inputs["mask"].type.tensor_type.shape.dim]
    assert dims == ["batch", 5]
    assert graph_inputs["mask"].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    clf = OnnxClassifier(tmp_path / "m.onnx")
    for b in (1, 7):
        x, mask, scale = _inputs(b)
        with torch.no_grad():
            ref = model(x, mask, scale).numpy()
        got = clf(x, mask, scale.numpy())
        assert got.shape == (b, 3)
        tol = logits_tolerance(model) if bits else None
        assert np.abs(got - ref).max() <= (tol if tol is not None else 1e-5 * max(1.0, np.abs(ref).max()))
    with pytest.raises(ValueError, match=r"'mask' has shape \(2, 4\), the model expects \(batch, 5\)"):
        clf(x[:2], torch.ones(2, 4), scale[:2])


def test_duplicate_input_names_or_an_output_named_like_an_input_are_refused(tmp_path):
    model = _MaskIgnored().eval()
    with pytest.raises(ExportError, match=r"input_names must be distinct.*'a'"):
        export_onnx(model, tmp_path / "m.onnx", example_inputs=_inputs(2), input_names=["a", "a", "b"])
    with pytest.raises(ExportError, match=r"output_name 'b' is also an input name"):
        export_onnx(model, tmp_path / "m.onnx", example_inputs=_inputs(2), input_names=["a", "c", "b"],
                    output_name="b")
    assert not (tmp_path / "m.onnx").exists()


def test_files_the_tracer_writes_beside_the_graph_do_not_outlive_a_failed_export(tmp_path, monkeypatch):
    """Over 2 GB of weights, torch.onnx.export writes each tensor as its own file in the folder of the graph
    (``onnx__MatMul_5``, 2.1 GB, left beside the target by a 2.1 GB float Linear whose export then failed). Here the
    tracer is made to write such a file and then fail: the target folder must hold only what it held before."""
    import medquant.deploy.onnx as mod

    real = torch.onnx.export

    def spilling(model, args, f, *a, **kw):
        real(model, args, f, *a, **kw)
        with open(os.path.join(os.path.dirname(f), "onnx__MatMul_5"), "wb") as fh:
            fh.write(b"\0" * 64)
        raise RuntimeError("serialization failed after writing external data")

    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("x")
    monkeypatch.setattr(mod.torch.onnx, "export", spilling)
    with pytest.raises(ExportError, match="could not express"):
        export_onnx(nn.Linear(8, 3).eval(), tmp_path / "out" / "m.onnx", example_inputs=torch.randn(2, 8))
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["keep.txt"]


def test_a_graph_over_the_protobuf_limit_is_refused_by_size(tmp_path, monkeypatch):
    """A graph that protobuf cannot serialize (over 2 GB) is refused naming its size and the limit, not as an
    "invalid graph" ("EncodeError: Failed to serialize proto"); the limit is lowered here to the size of a tiny
    model's weights (the real one needs a >2 GB model)."""
    import medquant.deploy.onnx as mod

    torch.manual_seed(0)
    model = nn.Linear(8, 3).eval()
    weights = sum(p.numel() * 4 for p in model.parameters())  # float32 bytes, all stored in the graph
    monkeypatch.setattr(mod, "PROTOBUF_LIMIT", weights // 2, raising=False)
    with pytest.raises(ExportError, match=r"bytes.*over the .* limit of one \.onnx file"):
        export_onnx(model, tmp_path / "m.onnx", example_inputs=torch.randn(2, 8))
    assert list(tmp_path.iterdir()) == []



def test_a_dict_output_exports_its_logits_not_its_first_value(tmp_path):
    """{"aux": ..., "logits": ...}: the first value was exported (and checked against itself)."""

    class DictOut(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(6, 3)

        def forward(self, x):
            return {"aux": x.sum(-1, keepdim=True), "logits": self.fc(x)}

    torch.manual_seed(0)
    model = DictOut().eval()
    x = torch.randn(4, 6)
    export_onnx(model, tmp_path / "d.onnx", example_inputs=x)
    got = np.asarray(OnnxClassifier(tmp_path / "d.onnx")(x))
    want = model(x)["logits"].detach().numpy()
    assert got.shape == (4, 3) and np.abs(got - want).max() < 1e-5
