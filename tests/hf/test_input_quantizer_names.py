"""The recorded input quantizers (``quantization_config.input_quantizers``) follow transformers' renaming on load,
as the recorded modules do: a checkpoint with a head read into its base model (``AutoModel``) and a base model's
checkpoint read into a model with a head. Before, the first raised "an input quantizer is recorded for
'model.layers.0', which LlamaModel does not have". Reference: the in-memory model's hidden states."""
from __future__ import annotations

import json

import torch
import transformers

import medquant
import medquant.hf
from medquant import QuantConfig
from medquant.quant.activations import InputQuantizer, input_quantizers
from medquant.testing.zoo import ZOO_BY_NAME

ACT = {"bits": 4, "symmetric": False, "scale": 0.5, "zero": 8}


def _hidden(model, inputs):
    with torch.no_grad():
        return model(**inputs).last_hidden_state


def test_input_quantizers_follow_the_base_model_renaming(tmp_path):
    entry = ZOO_BY_NAME["llama"]
    model = entry.build().eval()
    inputs = entry.inputs(model)
    medquant.quantize_(model, QuantConfig(4, group_size=32))
    InputQuantizer(**ACT).attach(model.model.layers[1])
    InputQuantizer(**ACT).attach(model.lm_head)  # outside the base model: dropped with the head's tensors
    medquant.hf.save_pretrained(model, tmp_path / "full")
    assert set(json.loads((tmp_path / "full" / "config.json").read_text())["quantization_config"][
        "input_quantizers"]) == {"model.layers.1", "lm_head"}
    base = transformers.AutoModel.from_pretrained(tmp_path / "full").eval()
    assert {n: q.as_dict() for n, q in input_quantizers(base).items()} == {"layers.1": ACT}
    expected = _hidden(model.model, inputs)
    assert torch.equal(_hidden(base, inputs), expected)
    model.model.layers[1].input_quantizer_handle.remove()  # the control: without it the states differ
    assert not torch.equal(_hidden(model.model, inputs), expected)
    InputQuantizer(**ACT).attach(model.model.layers[1])

    medquant.hf.save_pretrained(model.model, tmp_path / "base")
    full = type(model).from_pretrained(tmp_path / "base").eval()
    assert {n: q.as_dict() for n, q in input_quantizers(full).items()} == {"model.layers.1": ACT}
    assert torch.equal(_hidden(full.model, inputs), expected)
