"""Quantize-on-load of an architecture that binds one Linear under several names (DETR-style shared heads).

``from_pretrained(float_dir, quantization_config=MedQuantConfig(...))`` promises the model
``quantize_(float_model, same_config)`` gives. ``quantize_`` replaces a shared layer by one quantized layer under
every name; quantize-on-load swapped only the name its weight was read under, so the other names kept the float
layer (with ``tie_word_embeddings=False``, where transformers does not tie the declared keys itself): the model
computed something else, silently. Reference: transformers' own ``from_pretrained`` of the float folder followed by
``quantize_``.
"""
from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel

import medquant as mq
from medquant.hf import MedQuantConfig
from medquant.quant import QuantLinear
from tests.hf._helpers import state_equal


class _SharedConfig(PretrainedConfig):
    model_type = "medquant_review_shared_head"

    def __init__(self, tie_word_embeddings: bool = False, **kwargs):
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)


class _SharedHead(PreTrainedModel):
    """``second`` is ``first`` (one Linear bound twice), declared tied so transformers saves it once."""

    config_class = _SharedConfig
    _tied_weights_keys = {"second.weight": "first.weight", "second.bias": "first.bias"}  # noqa: RUF012

    def __init__(self, config):
        super().__init__(config)
        self.first = nn.Linear(64, 64)
        self.mid = nn.Linear(64, 64)
        self.second = self.first
        self.post_init()

    def forward(self, x):
        return self.second(torch.relu(self.mid(self.first(x))))

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=0.1)
            nn.init.normal_(module.bias, std=0.1)


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


@pytest.mark.parametrize("tie", [False, True])
def test_a_layer_bound_under_two_names_is_one_quantized_layer_after_quantize_on_load(tie, tmp_path):
    torch.manual_seed(0)
    _SharedHead(_SharedConfig(tie_word_embeddings=tie)).eval().save_pretrained(tmp_path / "float")
    qc = mq.QuantConfig(4, group_size=32)
    reference = _SharedHead.from_pretrained(tmp_path / "float").eval()
    assert reference.first is reference.second
    mq.quantize_(reference, qc)
    assert isinstance(reference.second, QuantLinear) and reference.first is reference.second

    loaded = _SharedHead.from_pretrained(tmp_path / "float", quantization_config=MedQuantConfig(qc)).eval()
    assert isinstance(loaded.second, QuantLinear)
    assert loaded.first is loaded.second  # one layer, as quantize_ leaves it
    state_equal(reference, loaded)
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = reference(x)
        assert torch.equal(loaded(x), expected)

    loaded.save_pretrained(tmp_path / "q")
    again = _SharedHead.from_pretrained(tmp_path / "q").eval()
    assert again.first is again.second
    with torch.no_grad():
        assert torch.equal(again(x), expected)
