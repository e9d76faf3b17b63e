"""``medquant.dequantize_`` of a transformers model that carries medquant's ``hf_quantizer`` (loaded by
``from_pretrained``, or saved once with :func:`medquant.hf.save_pretrained`): once nothing quantized is left, the
quantizer, ``config.quantization_config`` and ``is_quantized`` go, as transformers' own ``model.dequantize()``
removes them (the reference). They stayed: the config in memory still described a quantized model, and
transformers' ``Trainer`` refuses to fine-tune a model flagged as quantized. A model that keeps input quantizers
(still quantized activations) keeps them."""
from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

import medquant as mq
import medquant.hf
from medquant.quant.activations import InputQuantizer
from tests.hf.test_review_integration_dequantized_save import IDS, _quiet  # noqa: F401 (_quiet: autouse fixture)
from tests.hf.test_review_integration_dequantized_save import _quantized as _saved


def _state(model):
    return (getattr(model, "hf_quantizer", None), getattr(model.config, "quantization_config", None),
            getattr(model, "is_quantized", False))


@pytest.mark.parametrize("source", ["from_pretrained", "saved_in_memory"])
def test_nothing_quantized_left_drops_what_transformers_dequantize_drops(source, tmp_path):
    model = _saved(tmp_path)
    if source == "from_pretrained":
        model = AutoModelForCausalLM.from_pretrained(tmp_path / "q").eval()
    assert _state(model)[0] is not None and _state(model)[1] is not None
    ref = AutoModelForCausalLM.from_pretrained(tmp_path / "q").eval().dequantize()
    assert _state(ref) == (None, None, False)
    mq.dequantize_(model)
    assert _state(model) == _state(ref)
    assert "quantization_config" not in model.config.to_dict()
    with torch.no_grad():
        assert torch.equal(model(input_ids=IDS).logits, ref(input_ids=IDS).logits)
    # quantized again, the bound save_pretrained records it again: a medquant folder that reloads
    mq.quantize_(model, mq.QuantConfig(8, scope="channel"))
    model.save_pretrained(tmp_path / "q8")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "q8").eval()
    assert isinstance(again.hf_quantizer, medquant.hf.MedQuantHfQuantizer)
    with torch.no_grad():
        assert torch.equal(again(input_ids=IDS).logits, model(input_ids=IDS).logits)


def test_input_quantizers_left_keep_the_quantizer(tmp_path):
    model = _saved(tmp_path)
    InputQuantizer(8, False, 0.05, 128).attach(model.model.layers[0].mlp.down_proj)
    mq.dequantize_(model)
    assert _state(model)[0] is not None and _state(model)[1] is not None
