"""format="onnx": names the file cannot carry are refused naming what is accepted, instead of a file that silently
differs from the request (an empty output_name became an output named "6") or torch's internal TypeError with a
dump of the traced graph (a non-string name).

References: the output name read back with onnx.load; the refusal's message.
"""
from __future__ import annotations

import onnx
import pytest
import torch
from torch import nn

import medquant.deploy as D
from medquant.quant.api import quantize_
from medquant.quant.config import QuantConfig


def _model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(40, 16), nn.ReLU(), nn.Linear(16, 3)).eval()
    quantize_(model, QuantConfig(4, group_size=32))  # weight-only: no calibration needed
    return model


def test_the_output_has_the_name_asked_for(tmp_path):
    D.export(_model(), tmp_path / "a.onnx", format="onnx", example_inputs=torch.randn(2, 40), output_name="probs")
    assert [o.name for o in onnx.load(str(tmp_path / "a.onnx")).graph.output] == ["probs"]


@pytest.mark.parametrize("kwargs", [{"output_name": ""}, {"output_name": None}, {"input_names": [None]},
                                    {"input_names": [3]}, {"input_names": [""]}, {"input_names": 3}])
def test_empty_or_non_string_names_are_refused_naming_what_is_accepted(tmp_path, kwargs):
    with pytest.raises(D.ExportError, match=r"input_names must be .*(non-empty strings|list of names)") as err:
        D.export(_model(), tmp_path / "a.onnx", format="onnx", example_inputs=torch.randn(2, 40), **kwargs)
    assert "_jit_pass" not in str(err.value)  # not torch's internal error
    assert not (tmp_path / "a.onnx").exists()

