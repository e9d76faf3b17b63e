"""format="compressed-tensors" writes the checkpoint tensor names ``save_pretrained`` writes.

transformers 5 converts checkpoint weights on load (per-expert MoE weights fused into 3-D ``mlp.experts.gate_up_proj``
/ ``down_proj`` tensors, VLM prefixes such as ``language_model.model.`` renamed to ``model.language_model.``) and
reverts the conversion in ``save_pretrained``; runtimes (vLLM) read the checkpoint names. The reference here is
``save_pretrained`` itself, on a float copy of the model whose quantized layers hold their dequantised weights: the
exported float tensors must carry its names and values, and each packed layer, decompressed by compressed-tensors,
must equal the tensor ``save_pretrained`` writes for that layer's weight."""
from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch

import medquant as mq
from medquant.deploy import export
from medquant.quant.api import quantized_modules
from medquant.testing.zoo import ZOO_BY_NAME

pytest.importorskip("compressed_tensors")

from tests.deploy.test_compressed_tensors import _tensors
from tests.deploy.test_compressed_tensors_review import _tiny_qwen3_moe

FMT = "compressed-tensors"
PACKED = ("weight_packed", "weight_scale", "weight_shape", "weight_zero_point")
CFG = mq.QuantConfig(4, symmetric=True, group_size=32)


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def _build(name: str):
    if name == "qwen3_moe":  # experts (fused 3-D tensors in memory) and router stay float
        model = _tiny_qwen3_moe()
        mq.quantize_(model, CFG, skip=["lm_head", "re:.*experts.*"])
        assert not any("experts" in n for n in quantized_modules(model))
        return model
    entry = ZOO_BY_NAME[name]
    model = entry.build()
    if entry.is_vlm:
        mq.quantize_(model, {"@language": CFG, "@vision": None}, skip=["@head"])
    else:
        mq.quantize_(model, CFG, skip=["lm_head"])
    return model


def _save_pretrained_reference(model, float_model, folder) -> dict[str, torch.Tensor]:
    """What ``save_pretrained`` writes for ``float_model`` with each quantized layer's weight set to medquant's
    dequantised weight."""
    ref = copy.deepcopy(float_model)
    mods = dict(ref.named_modules())
    with torch.no_grad():
        for name, layer in quantized_modules(model).items():
            mods[name].weight.copy_(layer.dequantized_weight(torch.float32))
    ref.save_pretrained(str(folder))
    return _tensors(folder)


@pytest.mark.parametrize("name", ["qwen3_moe", "llama", "llava", "qwen2_vl"])
def test_exported_names_and_values_are_those_save_pretrained_writes(tmp_path, name):
    from compressed_tensors.compressors.pack_quantized import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationConfig

    torch.manual_seed(0)
    model = _build(name)
    # a float model of the same class and weights: rebuild it and load the float state (quantized layers apart)
    float_model = _tiny_qwen3_moe() if name == "qwen3_moe" else ZOO_BY_NAME[name].build()
    float_model.load_state_dict({k: v for k, v in model.state_dict().items() if k in float_model.state_dict()},
                                strict=False)
    ref = _save_pretrained_reference(model, float_model, tmp_path / "ref")
    export(model, tmp_path / "ct", format=FMT)
    got = _tensors(tmp_path / "ct")

    packed_keys = {k for k in got if k.rpartition(".")[2] in PACKED}
    packed_modules = {k.rpartition(".")[0] for k in packed_keys}
    assert len(packed_modules) == len(quantized_modules(model))
    float_keys = set(got) - packed_keys
    # the float tensors: save_pretrained's names, bit-equal values
    assert float_keys == set(ref) - {f"{m}.weight" for m in packed_modules}
    for k in float_keys:
        assert got[k].dtype == ref[k].dtype and torch.equal(got[k], ref[k]), k
    # each packed layer under the name save_pretrained gives its weight, and that weight's value
    qcfg = QuantizationConfig.model_validate(json.loads((tmp_path / "ct" / "config.json").read_text())
                                             ["quantization_config"])
    (scheme,) = qcfg.config_groups.values()
    for m in packed_modules:
        local = {p: got[f"{m}.{p}"] for p in PACKED if f"{m}.{p}" in got}
        w = PackedQuantizationCompressor.decompress(local, scheme)["weight"]
        assert torch.equal(w.float(), ref[f"{m}.weight"]), m
    if name == "qwen3_moe":  # per-expert tensors, as on the Hub, not the fused in-memory ones
        assert "model.layers.0.mlp.experts.0.gate_proj.weight" in float_keys
        assert not any(k.endswith("experts.gate_up_proj") for k in got)
    if name == "llava":  # the checkpoint prefix, for packed layers too
        assert "language_model.model.layers.0.self_attn.q_proj.weight_packed" in packed_keys


def test_converted_float_experts_are_named_in_the_report(tmp_path):
    """The fused in-memory experts are split per expert on export (save_pretrained's layout); the report names
    them, as transformers' compressed-tensors loader cannot read float experts in that layout."""
    model = _build("qwen3_moe")
    report = export(model, tmp_path / "ct", format=FMT)
    (note,) = [n for n in report.notes if "checkpoint layout" in n]
    assert note.startswith("4 float tensor(s) (model.layers.0.mlp.experts.gate_up_proj, "
                           "model.layers.0.mlp.experts.down_proj ...)")
    llama = _build("llama")
    assert not any("checkpoint layout" in n for n in export(llama, tmp_path / "l", format=FMT).notes)


@pytest.mark.parametrize("name", ["llama", "llava", "qwen2_vl"])
def test_the_export_still_loads_with_transformers(tmp_path, name):
    import transformers
    from transformers import CompressedTensorsConfig

    model = _build(name)
    export(model, tmp_path / "ct", format=FMT)
    cls = getattr(transformers, type(model).__name__)
    loaded = cls.from_pretrained(str(tmp_path / "ct"),
                                 quantization_config=CompressedTensorsConfig(dequantize=True)).eval()
    sd = loaded.state_dict()
    for lname, layer in quantized_modules(model).items():
        assert torch.equal(sd[f"{lname}.weight"], layer.dequantized_weight(torch.float32)), lname
    quant_names = set(quantized_modules(model))
    for k, v in model.state_dict().items():  # every float tensor back under its in-memory name
        if k.rpartition(".")[0] not in quant_names and k in sd and "rotary" not in k:
            assert torch.equal(sd[k], v), k


def test_a_packed_layer_whose_weight_transformers_converts_on_save_is_refused(tmp_path):
    """A checkpoint format that stores a layer's weight converted (here transposed, as a loaded model's
    ``_weight_conversions`` would say) cannot hold that layer's packed codes: refused naming the layer, nothing
    written. The float tensors a converter handles (here the head, kept float) are converted as save_pretrained
    converts them."""
    from transformers.core_model_loading import Transpose, WeightConverter

    from medquant.deploy import ExportError

    model = _build("llama")
    model._weight_conversions = [WeightConverter("self_attn.q_proj.weight", "self_attn.q_proj.weight",
                                                 operations=[Transpose()])]
    with pytest.raises(ExportError, match=r"model\.layers\.0\.self_attn\.q_proj: transformers converts"):
        export(model, tmp_path / "ct", format=FMT)
    assert not (tmp_path / "ct").exists()
    model._weight_conversions = [WeightConverter("lm_head.weight", "lm_head.weight", operations=[Transpose()])]
    report = export(model, tmp_path / "ct", format=FMT)
    got = _tensors(tmp_path / "ct")
    assert torch.equal(got["lm_head.weight"], model.lm_head.weight.detach().t())  # what save_pretrained writes
    model.save_pretrained(str(tmp_path / "ref"))
    assert torch.equal(_tensors(tmp_path / "ref")["lm_head.weight"], got["lm_head.weight"])
    assert any("1 float tensor(s) (lm_head.weight)" in n for n in report.notes)


@pytest.mark.parametrize("name", ["siglip_vision", "paligemma", "llava", "idefics3"])
def test_a_folder_transformers_default_loader_cannot_build_is_noted_with_the_load_that_works(tmp_path, name):
    """transformers' default (compressed) load runs the model's weight initialisation after replacing the packed
    Linears' weights, and SigLIP's ``_init_weights`` reads ``module.weight``: the load fails. The report says so
    exactly when it does (reference: transformers' own loader), and the load it names gives medquant's weights."""
    import transformers
    from transformers import CompressedTensorsConfig

    model = ZOO_BY_NAME[name].build()
    mq.quantize_(model, CFG, skip=["@head"])  # the vision tower too
    report = export(model, tmp_path / "ct", format=FMT)
    noted = [n for n in report.notes if "default (compressed) load of this folder fails" in n]
    cls = getattr(transformers, type(model).__name__)
    try:
        cls.from_pretrained(str(tmp_path / "ct"))
        fails = False
    except AttributeError:
        fails = True
    assert bool(noted) == fails
    assert fails == (name in ("siglip_vision", "paligemma"))  # the SigLIP towers
    if fails:
        assert "CompressedTensorsConfig(dequantize=True)" in noted[0] and "SiglipVisionModel" in noted[0]
        sd = cls.from_pretrained(str(tmp_path / "ct"),
                                 quantization_config=CompressedTensorsConfig(dequantize=True)).state_dict()
        for lname, layer in quantized_modules(model).items():  # a Conv2d's weight is 4-D in the state dict
            assert torch.equal(sd[f"{lname}.weight"].flatten(), layer.dequantized_weight(torch.float32).flatten()), lname
