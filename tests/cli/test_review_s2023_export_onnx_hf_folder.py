"""``medquant export --format onnx`` of a quantized Hugging Face folder (what ``medquant quantize`` and
``save_pretrained`` write): ``from_pretrained`` gives a model carrying transformers' quantizer, whose ``.float()``
transformers refuses ("not supported for quantized model"), so the export's float32 copy failed on every such folder.
Reference: the same quantized model held in memory, exported through the Python API with the same calibration
samples; the two files' activation scales are equal bit for bit and ONNX Runtime gives equal logits."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import numpy_helper

import medquant as mq
from medquant.cli import main
from medquant.testing.zoo import ZOO_BY_NAME

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _scales(path) -> dict[str, float]:
    return {t.name: float(numpy_helper.to_array(t)) for t in onnx.load(str(path)).graph.initializer
            if t.name.endswith("_quant.scale")}


def _run(path, x: torch.Tensor) -> np.ndarray:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {"pixel_values": x.numpy()})[0]


def test_a_quantized_hf_folder_exports_as_the_model_in_memory_does(tmp_path, capsys):
    from transformers import AutoModelForImageClassification

    torch.manual_seed(0)
    model = ZOO_BY_NAME["vit"].build().eval()
    mq.quantize_(model, mq.QuantConfig(bits=8, scope="channel"))
    model.save_pretrained(tmp_path / "hf")
    loaded = AutoModelForImageClassification.from_pretrained(tmp_path / "hf")
    assert getattr(loaded, "hf_quantizer", None) is not None  # transformers' quantized model, as users load it
    calib = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    np.save(tmp_path / "calib.npy", calib.numpy())
    out = tmp_path / "cli.onnx"
    assert main(["export", str(tmp_path / "hf"), str(out), "--format", "onnx", "--calib",
                 str(tmp_path / "calib.npy"), "--calib-batch-size", "4"]) == 0
    capsys.readouterr()
    ref = tmp_path / "api.onnx"
    mq.export(model, ref, format="onnx", calib=list(calib.split(4)))
    scales = _scales(ref)
    assert scales and _scales(out) == scales
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    np.testing.assert_array_equal(_run(out, x), _run(ref, x))


def test_the_python_export_of_a_loaded_quantized_folder_leaves_it_usable(tmp_path):
    """The export works on a copy: the loaded model keeps its quantizer, dtype and outputs."""
    from transformers import AutoModelForImageClassification

    torch.manual_seed(0)
    model = ZOO_BY_NAME["vit"].build().eval()
    mq.quantize_(model, mq.QuantConfig(bits=8, scope="channel"))
    model.save_pretrained(tmp_path / "hf")
    loaded = AutoModelForImageClassification.from_pretrained(tmp_path / "hf").eval()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        before = loaded(pixel_values=x).logits
    mq.export(loaded, tmp_path / "m.onnx", format="onnx", calib=[x])
    with torch.no_grad():
        assert torch.equal(loaded(pixel_values=x).logits, before)
    assert loaded.hf_quantizer is not None
