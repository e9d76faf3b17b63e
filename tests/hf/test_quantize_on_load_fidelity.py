"""Quantize-on-load gives the model ``quantize_`` gives, and a ``MedQuantConfig`` means the same after JSON.

References: transformers' own ``from_pretrained`` of the float folder followed by a plain :func:`medquant.quantize_`
with the same plan (every tensor and the output compared with ``torch.equal``), and :meth:`ConfigMap.resolve` /
``quantize_`` of the map the config was built from.
"""
from __future__ import annotations

import json
import os

import pytest
import torch

from medquant import QuantConfig, quantize_
from medquant.hf import MedQuantConfig
from medquant.quant.api import ConfigMap, quantized_modules
from medquant.testing.zoo import ZOO_BY_NAME

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()


def _state_diff(a, b) -> list[str]:
    sa, sb = a.state_dict(), b.state_dict()
    assert set(sa) == set(sb)
    return sorted(k for k in sa if sa[k].dtype != sb[k].dtype or not torch.equal(sa[k], sb[k]))


@pytest.mark.parametrize("name, auto", [("siglip_vision", "AutoModel"),
                                        ("paligemma", "AutoModelForImageTextToText")])
def test_quantize_on_load_keeps_the_checkpoint_s_biases(name, auto, tmp_path):
    """SigLIP's ``_init_weights`` (vision tower of PaliGemma and Gemma 3) re-initialises the biases of its MLP and
    attention layers unless transformers marks them as loaded; quantizing a layer while loading replaced its loaded
    bias by a new parameter without that mark, so the checkpoint's biases were overwritten by random ones."""
    entry = ZOO_BY_NAME[name]
    model = entry.build()
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():  # every bias non-zero and unlike its initialisation (zeros / normal with std 1e-6)
        for n, p in model.named_parameters():
            if n.endswith(".bias"):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    model.save_pretrained(tmp_path / "float")
    cls = getattr(transformers, auto)
    spec = MedQuantConfig(QuantConfig(4, group_size=32))
    expected = cls.from_pretrained(tmp_path / "float")
    quantize_(expected, spec.quantize_spec(), skip=spec.skip)
    loaded = cls.from_pretrained(tmp_path / "float", quantization_config=spec)
    assert any(m.bias is not None for m in quantized_modules(loaded).values())
    assert set(quantized_modules(loaded)) == set(quantized_modules(expected))
    assert _state_diff(expected, loaded) == []
    inputs = entry.inputs(expected)
    with torch.no_grad():
        assert torch.equal(entry.output(loaded, inputs), entry.output(expected, inputs))
    loaded.save_pretrained(tmp_path / "q")
    again = cls.from_pretrained(tmp_path / "q")
    assert _state_diff(expected, again) == []


# overlapping patterns: the first one that matches wins, so their order is part of the plan
ORDERED = {"re:.*mlp.*": QuantConfig(2, scope="channel"), r"re:.*layers\.0\..*": None, "@head": QuantConfig(8),
           "_default": QuantConfig(4, group_size=32)}


def test_pattern_order_survives_json_and_config_json(tmp_path):
    entry = ZOO_BY_NAME["llama"]
    model = entry.build()
    spec = MedQuantConfig(ORDERED, skip=["model.layers.1.self_attn.o_proj"])
    want = ConfigMap(ORDERED, skip=["model.layers.1.self_attn.o_proj"]).resolve(model)
    assert spec.plan(model) == want
    again = MedQuantConfig.from_dict(json.loads(spec.to_json_string()))
    assert again == spec
    assert again.plan(model) == want
    reordered = MedQuantConfig(dict(reversed(list(ORDERED.items()))), skip=spec.skip)
    assert reordered.plan(model) != want  # the order matters for this map ...
    assert reordered != spec  # ... so a config with another order is another config

    # the config.json of a model quantized while loading records the plan it was loaded with
    model.save_pretrained(tmp_path / "float")
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "float", quantization_config=spec)
    assert {n: m.config for n, m in quantized_modules(loaded).items()} == want
    loaded.save_pretrained(tmp_path / "q")
    written = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    assert MedQuantConfig.from_dict({k: v for k, v in written.items() if k not in ("modules", "skipped_modules")}
                                    ).plan(entry.build()) == want


def test_pattern_maps_with_a_repeated_pattern_are_refused():
    with pytest.raises(ValueError, match="given twice"):
        MedQuantConfig(config_map=[["re:.*", 4], ["re:.*", 8]])
    with pytest.raises(TypeError, match="config_map"):
        MedQuantConfig(config_map=[["re:.*"]])


def test_a_config_map_keeps_its_skip_patterns(tmp_path):
    """``MedQuantConfig(ConfigMap(..., skip=[...]))`` dropped the map's ``skip``, while ``quantize_`` of the same
    ConfigMap honours it: the head was quantized on load and kept in float by ``quantize_``."""
    entry = ZOO_BY_NAME["llama"]
    cmap = ConfigMap({"_default": QuantConfig(4, group_size=32)}, skip=["lm_head"])
    spec = MedQuantConfig(cmap, skip=["model.layers.0.mlp.up_proj"])
    assert spec.skip == ["lm_head", "model.layers.0.mlp.up_proj"]
    assert spec.to_config_map() == ConfigMap(cmap, skip=["model.layers.0.mlp.up_proj"])
    entry.build().save_pretrained(tmp_path / "float")
    expected = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "float")
    quantize_(expected, cmap, skip=["model.layers.0.mlp.up_proj"])
    assert "lm_head" not in quantized_modules(expected)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "float", quantization_config=MedQuantConfig.from_dict(json.loads(spec.to_json_string())))
    assert set(quantized_modules(loaded)) == set(quantized_modules(expected))
    assert _state_diff(expected, loaded) == []
