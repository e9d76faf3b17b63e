"""format="compressed-tensors": a quantized ``Conv2d`` (a vision tower's patch embedding) is written as its float
weight and, as compressed-tensors' own config builder derives for the same model, is not in ``ignore`` (the
``"Linear"`` target never matches a convolution). The module docstring and the serving guide said it was listed
in ``ignore``."""
from __future__ import annotations

import warnings

import pytest
import torch

import medquant as mq
from medquant.deploy import export
from medquant.quant.modules import QuantConv2d, QuantLinear
from medquant.testing.zoo import ZOO_BY_NAME

pytest.importorskip("compressed_tensors")


def test_a_quantized_conv2d_is_float_and_matches_compressed_tensors_own_ignore_list(tmp_path):
    import json

    import transformers
    from compressed_tensors.quantization import QuantizationConfig, apply_quantization_config
    from safetensors.torch import load_file
    from transformers import AutoConfig

    model = ZOO_BY_NAME["llava"].build()
    mq.quantize_(model, mq.QuantConfig(4, symmetric=True, group_size=32), skip=["@head"])
    convs = [n for n, m in model.named_modules() if isinstance(m, QuantConv2d)]
    packed = {n for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    assert convs and packed
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = export(model, tmp_path / "ct", format="compressed-tensors")
    rows = {r.name: r for r in report.layers}
    q = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]
    tensors = load_file(str(tmp_path / "ct" / "model.safetensors"))
    for n in convs:  # the float weight medquant computes with, under its checkpoint name
        assert rows[n].how == "float" and n not in q["ignore"]
        key = n.replace("model.vision_tower.", "vision_tower.") + ".weight"
        assert torch.equal(tensors[key], model.get_submodule(n).weight)
    # the reference: the written config applied by compressed-tensors to a float model built from config.json,
    # then compressed-tensors' own config builder on the result
    cfg = AutoConfig.from_pretrained(str(tmp_path / "ct"))
    delattr(cfg, "quantization_config")
    ref = getattr(transformers, type(model).__name__)(cfg)
    apply_quantization_config(ref, QuantizationConfig.model_validate(q), show_progress=False)
    schemed = {n for n, m in ref.named_modules() if getattr(m, "quantization_scheme", None) is not None}
    assert schemed == packed
    assert set(q["ignore"]) == set(QuantizationConfig.from_pretrained(ref).ignore)
