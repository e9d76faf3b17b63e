"""``model.save_pretrained`` of a medquant model whose layers were all made float again (``medquant.dequantize_``).

A model loaded by ``from_pretrained`` (or saved once with :func:`medquant.hf.save_pretrained`) carries medquant's
``hf_quantizer`` and ``quantization_config``. After ``dequantize_`` it holds no quantized layer, and its bound
``save_pretrained`` used to write ``quantization_config`` recording no module: a folder that ``from_pretrained``
refuses ("records no quantized modules"). Reference: transformers' own ``model.dequantize()`` route (which drops
the quantization config) and the in-memory dequantized model's logits.
"""
from __future__ import annotations

import json
import warnings

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

import medquant as mq
import medquant.hf
from medquant.quant.activations import InputQuantizer
from medquant.testing.zoo import text_kwargs

IDS = torch.randint(3, 256, (2, 9), generator=torch.Generator().manual_seed(3))


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def _quantized(tmp_path):
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**text_kwargs(), tie_word_embeddings=True)).eval()
    mq.quantize_(model, mq.QuantConfig(4, group_size=32))
    medquant.hf.save_pretrained(model, tmp_path / "q")
    return model


def _logits(model):
    with torch.no_grad():
        return model(input_ids=IDS).logits


@pytest.mark.parametrize("source", ["from_pretrained", "saved_in_memory"])
def test_a_dequantized_model_saves_as_the_float_model_it_is(source, tmp_path):
    model = _quantized(tmp_path)
    if source == "from_pretrained":
        model = AutoModelForCausalLM.from_pretrained(tmp_path / "q").eval()
    assert isinstance(model.hf_quantizer, medquant.hf.MedQuantHfQuantizer)
    mq.dequantize_(model)
    expected = _logits(model)
    model.save_pretrained(tmp_path / "f")
    assert "quantization_config" not in json.loads((tmp_path / "f" / "config.json").read_text())
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "f").eval()
    assert getattr(back, "hf_quantizer", None) is None
    assert torch.equal(_logits(back), expected)

    # transformers' own route to a float model gives the same weights
    ref = AutoModelForCausalLM.from_pretrained(tmp_path / "q").eval().dequantize()
    ref.save_pretrained(tmp_path / "ref")
    ref_back = AutoModelForCausalLM.from_pretrained(tmp_path / "ref").eval()
    sa, sb = back.state_dict(), ref_back.state_dict()
    assert set(sa) == set(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)

    # the save changed nothing on the in-memory model: quantized again, it saves and reloads as a medquant model
    mq.quantize_(model, mq.QuantConfig(8, scope="channel"))
    expected = _logits(model)
    model.save_pretrained(tmp_path / "q8")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "q8").eval()
    assert isinstance(again.hf_quantizer, medquant.hf.MedQuantHfQuantizer)
    assert torch.equal(_logits(again), expected)


def test_a_dequantized_model_with_input_quantizers_is_refused_before_writing(tmp_path):
    """The folder could record the input quantizers only with a quantized layer: saved float, the model loaded
    from it would compute with float activations (another model), so the save is refused, nothing written."""
    model = _quantized(tmp_path)
    InputQuantizer(8, False, 0.05, 128).attach(model.model.layers[0].mlp.down_proj)
    mq.dequantize_(model)
    with pytest.raises(ValueError, match=r"(?s)input quantizer.*model\.layers\.0\.mlp\.down_proj"):
        model.save_pretrained(tmp_path / "f")
    assert not (tmp_path / "f").exists()
