"""format="compressed-tensors" of a model holding layers of other libraries whose tensors are not the model's own
weights: PEFT LoRA adapters left unmerged (a ``PeftModel``: ``base_layer`` / ``lora_A`` / ``lora_B`` tensors under
``base_model.model.``) and bitsandbytes 4-bit layers (``Linear4bit``: a packed ``uint8`` weight and its quantization
state). The export wrote them as float tensors under those names (``architectures: ["PeftModel"]``; NF4 bytes as a
Linear's float weight), folders transformers cannot load as the model. Both are refused now, naming the modules and
what to do (merge the adapters, dequantize the NF4 layers), before anything is written."""
from __future__ import annotations

import warnings

import pytest

import medquant as mq
from medquant.deploy import ExportError, export
from medquant.testing.zoo import ZOO_BY_NAME

pytest.importorskip("compressed_tensors")

FMT = "compressed-tensors"


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def _llava():
    model = ZOO_BY_NAME["llava"].build()
    return mq.quantize_(model, {"@language": mq.QuantConfig(4, symmetric=True, group_size=32), "@vision": None},
                        skip=["@head"])


def test_unmerged_peft_adapters_are_refused_naming_them(tmp_path):
    peft = pytest.importorskip("peft")
    model = _llava()
    target = "model.vision_tower.encoder.layers.0.self_attn.q_proj"
    wrapped = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=[target]))
    with pytest.raises(ExportError, match=r"self_attn\.q_proj.*merge_and_unload"):
        export(wrapped, tmp_path / "ct", format=FMT)
    assert not list(tmp_path.iterdir())
    merged = wrapped.merge_and_unload()  # what the message asks for: the model's own float layer again
    report = export(merged, tmp_path / "ct", format=FMT)
    assert {r.name: r.how for r in report.layers}[target] == "float"


def test_bitsandbytes_4bit_layers_are_refused_naming_them(tmp_path):
    pytest.importorskip("bitsandbytes")
    from medquant.qlora import nf4_dequantize_, nf4_quantize_

    model = _llava()
    target = "model.vision_tower.encoder.layers.0.mlp.fc1"
    assert nf4_quantize_(model, [target]) == [target]
    with pytest.raises(ExportError, match=r"mlp\.fc1.*Linear4bit.*nf4_dequantize_"):
        export(model, tmp_path / "ct", format=FMT)
    assert not list(tmp_path.iterdir())
    nf4_dequantize_(model)
    report = export(model, tmp_path / "ct", format=FMT)
    assert {r.name: r.how for r in report.layers}[target] == "float"
