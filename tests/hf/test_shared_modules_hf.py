"""A quantized Linear bound under several names in a transformers model, read by transformers' own
``from_pretrained``. ``medquant.save`` stores its tensors once and records the other names in ``medquant.json``
(``shared_modules``), which ``medquant.load`` reads; ``config.json``'s ``quantization_config`` did not record
them, so ``from_pretrained`` of the folder left the other name a freshly initialised float Linear (logits off by
0.25, with transformers' "MISSING" notice only), and ``medquant.hf.save_pretrained`` raised transformers'
"shared tensors ... not properly defined". Reference: the in-memory model (its logits and tensors)."""
from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

import medquant
import medquant.hf
from medquant import QuantConfig
from medquant.testing.zoo import ZOO_BY_NAME


def _logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


SHARED = {"llama": "mlp.down_proj", "qwen2": "self_attn.q_proj"}  # qwen2's q_proj has a bias


@pytest.fixture(scope="module", params=sorted(SHARED))
def shared_llama(request):
    entry = ZOO_BY_NAME[request.param]
    model = entry.build().eval()
    layers = model.model.layers
    parent, _, attr = SHARED[request.param].rpartition(".")
    setattr(layers[1].get_submodule(parent), attr, layers[0].get_submodule(SHARED[request.param]))
    medquant.quantize_(model, QuantConfig(4, group_size=32))
    return model, entry.inputs(model), SHARED[request.param]


@pytest.mark.parametrize("writer", ["medquant.save", "save_pretrained"])
def test_a_shared_quantized_layer_is_one_layer_again_after_from_pretrained(shared_llama, tmp_path, writer):
    model, inputs, shared = shared_llama
    if writer == "medquant.save":
        medquant.save(model, tmp_path / "q")
    else:
        medquant.hf.save_pretrained(model, tmp_path / "q")
    qc = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    assert qc["shared_modules"] == {f"model.layers.1.{shared}": f"model.layers.0.{shared}"}
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "q").eval()
    layers = loaded.model.layers
    assert layers[1].get_submodule(shared) is layers[0].get_submodule(shared)
    assert isinstance(layers[0].get_submodule(shared), medquant.QuantLinear)
    for k, t in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], t), k
    assert torch.equal(_logits(loaded, inputs), _logits(model, inputs))
    # and saved again from there: the same record
    loaded.save_pretrained(tmp_path / "again")
    again = json.loads((tmp_path / "again" / "config.json").read_text())["quantization_config"]
    assert again["shared_modules"] == qc["shared_modules"]
    assert torch.equal(_logits(AutoModelForCausalLM.from_pretrained(tmp_path / "again").eval(), inputs),
                       _logits(model, inputs))


def test_the_config_checks_its_shared_modules():
    from medquant.hf import MedQuantConfig

    rec = {"type": "QuantLinear", "config": {"bits": 4}}
    assert MedQuantConfig(4, modules={"a": rec}, shared_modules={"b": "a"}).to_dict()["shared_modules"] == {"b": "a"}
    assert "shared_modules" not in MedQuantConfig(4).to_dict()
    with pytest.raises(ValueError, match="shared_modules"):
        MedQuantConfig(4, modules={"a": rec}, shared_modules={"b": "c"})  # not a recorded module
    with pytest.raises(ValueError, match="shared_modules"):
        MedQuantConfig(4, modules={"a": rec, "b": rec}, shared_modules={"b": "a"})  # a recipe of its own
    with pytest.raises(TypeError, match="shared_modules"):
        MedQuantConfig(4, modules={"a": rec}, shared_modules=["b"])
