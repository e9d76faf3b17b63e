"""transformers integration: medquant models reload with plain ``from_pretrained`` and quantize on load.

Reference for every round trip: the in-memory quantized model itself (its outputs and every tensor of its state
dict, compared with ``torch.equal``); the quantization of that model is checked against a numpy reference in
tests/quant. Quantize-on-load is checked against ``quantize_`` of the float model.
"""
from __future__ import annotations

import functools
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import medquant.hf
from medquant import QuantConfig, quantize_
from medquant.hf import MedQuantConfig, MedQuantHfQuantizer
from medquant.quant.api import ConfigMap, quantized_modules, resolve_configs
from medquant.quant.experts import QuantExperts, moe_routers
from medquant.quant.modules import QUANT_MODULES
from medquant.testing.zoo import ZOO_BY_NAME, ZooEntry, zoo_params
from medquant.testing.zoo_moe import MOE_ZOO_BY_NAME, build_moe
from medquant.testing.zoo_vlm import extra_zoo_params
from tests.hf._helpers import state_equal

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()

AUTO_CLASS = {
    "llama": "AutoModelForCausalLM", "qwen2": "AutoModelForCausalLM", "gemma3_text": "AutoModelForCausalLM",
    "gemma3_vlm": "AutoModelForImageTextToText", "llava": "AutoModelForImageTextToText",
    "qwen2_vl": "AutoModelForImageTextToText", "qwen2_5_vl": "AutoModelForImageTextToText",
    "paligemma": "AutoModelForImageTextToText", "idefics3": "AutoModelForImageTextToText",
    "siglip_vision": "AutoModel", "vit": "AutoModelForImageClassification", "bert": "AutoModel",
    "qwen2_moe": "AutoModelForCausalLM", "gemma4_moe": "AutoModelForCausalLM",
}
ROW_PATTERN = (2, 3, 4, 8, 16, 0, 4, 6)  # every kind of row: asymmetric, symmetric, float, pruned


def _mixed_plan(model):
    """4-bit group-64 everywhere, per-channel mixed bits on the first layer, the last layer skipped."""
    names = list(resolve_configs(model, QuantConfig(4)))
    first, last = names[0], names[-1]
    rows = model.get_submodule(first).weight.shape[0]
    cb = tuple(ROW_PATTERN[i % len(ROW_PATTERN)] for i in range(rows))
    mapping = {first: QuantConfig(4, scope="channel", channel_bits=cb), "re:.*": QuantConfig(4, group_size=64)}
    return mapping, [last], first, last, cb


def _without_dtype(d):
    if isinstance(d, dict):
        return {k: _without_dtype(v) for k, v in d.items() if k != "dtype"}
    return d


def _auto(entry):
    return getattr(transformers, AUTO_CLASS[entry.name])


@zoo_params
def test_save_pretrained_reloads_with_auto_class(entry, tmp_path):
    model = entry.build()
    inputs = entry.inputs(model)
    mapping, skip, first, last, cb = _mixed_plan(model)
    quantize_(model, mapping, skip=skip)
    expected = entry.output(model, inputs)

    medquant.hf.save_pretrained(model, tmp_path / "a")
    qc = json.loads((tmp_path / "a" / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "medquant"
    assert set(qc["modules"]) == set(quantized_modules(model))
    assert tuple(qc["modules"][first]["config"]["channel_bits"]) == cb
    assert last in qc["skipped_modules"] and last not in qc["modules"]
    assert qc["modules"][next(n for n in qc["modules"] if n != first)]["config"]["group_size"] == 64

    reloaded = _auto(entry).from_pretrained(tmp_path / "a")
    assert type(reloaded) is type(model)
    assert isinstance(reloaded.get_submodule(first), QUANT_MODULES)
    assert torch.equal(reloaded.get_submodule(first).row_bits(), torch.tensor(cb, dtype=torch.int16))
    assert isinstance(reloaded.get_submodule(last), (torch.nn.Linear, torch.nn.Conv2d))
    state_equal(model, reloaded)
    assert torch.equal(entry.output(reloaded, inputs), expected)

    # the reloaded model saves with plain save_pretrained and round-trips again, byte for byte in its tensors
    reloaded.save_pretrained(tmp_path / "b")
    cfg_a = json.loads((tmp_path / "a" / "config.json").read_text())
    cfg_b = json.loads((tmp_path / "b" / "config.json").read_text())
    assert cfg_b["quantization_config"] == cfg_a["quantization_config"]
    # transformers itself fills in sub-config dtypes on reload (float models too); everything else is equal
    assert _without_dtype(cfg_b) == _without_dtype(cfg_a)
    ta, tb = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    assert set(ta) == set(tb) and all(torch.equal(ta[k], tb[k]) for k in ta)
    if entry.name == "llava":  # identical files load identically; check one anyway
        again = _auto(entry).from_pretrained(tmp_path / "b")
        assert torch.equal(entry.output(again, inputs), expected)


# MoE models whose routers quantize_ keeps in float: Qwen2-MoE's shared_expert_gate (an nn.Linear beside the
# experts), Gemma 4's router.proj (an nn.Linear inside the router)
LOAD_ZOO = {**ZOO_BY_NAME, "qwen2_moe": MOE_ZOO_BY_NAME["qwen2_moe"],
            "gemma4_moe": ZooEntry("gemma4_moe", "gemma4", False, functools.partial(build_moe, "gemma4"),
                                   MOE_ZOO_BY_NAME["qwen2_moe"].inputs_fn, output_shape=(2, 8, 256))}


@pytest.mark.parametrize("name", ["llama", "gemma3_text", "llava", "qwen2_moe", "gemma4_moe"])
def test_quantize_on_load_equals_quantize_(name, tmp_path):
    entry = LOAD_ZOO[name]
    float_model = entry.build()
    routers = set(moe_routers(float_model))
    assert bool(routers) == (name in MOE_ZOO_BY_NAME or name == "gemma4_moe")
    inputs = entry.inputs(float_model)
    float_model.save_pretrained(tmp_path / "float")
    mapping, _, first, _, _ = _mixed_plan(float_model)  # per-channel mixed bits on the first layer
    if entry.is_vlm:
        spec = MedQuantConfig({first: mapping[first], "@language": QuantConfig(3, group_size=32),
                               "@vision": QuantConfig(8, scope="channel")}, skip=["@projector"])
    else:
        spec = MedQuantConfig(mapping)
    loaded = _auto(entry).from_pretrained(tmp_path / "float", quantization_config=spec)
    quantize_(float_model, spec.quantize_spec(), skip=spec.skip)
    assert set(quantized_modules(loaded)) == set(quantized_modules(float_model))
    if routers:  # MoE: the experts are quantized, the routers (matched by "re:.*") stay float in both
        assert any(isinstance(m, QuantExperts) for m in loaded.modules())
        assert routers.isdisjoint(quantized_modules(loaded))
        assert all(type(loaded.get_submodule(n)) is type(float_model.get_submodule(n)) for n in routers)
    if name == "qwen2_moe":  # a plain nn.Linear router named exactly is quantized, on load as by quantize_
        named = "model.layers.0.mlp.shared_expert_gate"
        opt_in = MedQuantConfig({named: QuantConfig(8, scope="channel"), **spec.quantize_spec()})
        with_router = _auto(entry).from_pretrained(tmp_path / "float", quantization_config=opt_in)
        reference = quantize_(entry.build(), opt_in.quantize_spec())
        assert set(quantized_modules(with_router)) == set(quantized_modules(reference))
        assert set(quantized_modules(with_router)) & routers == {named}
        state_equal(reference, with_router)
    state_equal(float_model, loaded)
    expected = entry.output(float_model, inputs)
    assert torch.equal(entry.output(loaded, inputs), expected)
    # control: the quantized output differs from the float one, so equality above is not vacuous
    assert not torch.equal(expected, entry.output(entry.build(), inputs))

    loaded.save_pretrained(tmp_path / "q")
    again = _auto(entry).from_pretrained(tmp_path / "q")
    state_equal(float_model, again)
    assert torch.equal(entry.output(again, inputs), expected)


def test_config_json_round_trip_and_validation():
    cfg = MedQuantConfig({"@language": 4, "re:.*mlp.*": QuantConfig(2, scope="channel"), "@head": None},
                         skip=["@vision"])
    again = MedQuantConfig.from_dict(json.loads(cfg.to_json_string()))
    assert again == cfg
    assert again.quantize_spec() == {"@language": QuantConfig(4), "re:.*mlp.*": QuantConfig(2, scope="channel"),
                                     "@head": None}
    # the whole spec as one config object: the patterns plus skip; one config becomes the "_default" entry
    assert again.to_config_map() == ConfigMap(again.quantize_spec(), skip=["@vision"])
    assert MedQuantConfig(QuantConfig(3), skip=["lm_head"]).to_config_map() == ConfigMap(
        {"_default": QuantConfig(3)}, skip=["lm_head"])
    with pytest.raises(ValueError, match="unknown MedQuantConfig fields"):
        MedQuantConfig.from_dict({"quant_method": "medquant", "bitz": 4})
    with pytest.raises(ValueError, match="bits=5"[:4]):
        MedQuantConfig(config={"bits": 9})
    with pytest.raises(ValueError, match="not both"):
        MedQuantConfig(QuantConfig(4), config_map={"x": 4})
    with pytest.raises(ValueError, match="format version"):
        MedQuantConfig(format_version=999)
    with pytest.raises(TypeError, match="single string"):
        MedQuantConfig(4, skip="lm_head")
    # malformed fields are refused with what is accepted (a string was split into letters, a list gave a bare
    # AttributeError, a bool or negative format version passed)
    with pytest.raises(TypeError, match="skipped_modules must be a list"):
        MedQuantConfig(4, skipped_modules="lm_head")
    with pytest.raises(TypeError, match="skip must hold non-empty strings"):
        MedQuantConfig(4, skip=["lm_head", None])
    with pytest.raises(TypeError, match="modules must be a mapping"):
        MedQuantConfig.from_dict({"quant_method": "medquant", "modules": ["model.layers.0.mlp.up_proj"]})
    for bad in (True, 0, -1):
        with pytest.raises(ValueError, match="format version"):
            MedQuantConfig(format_version=bad)


def test_recorded_format_version_is_the_one_save_writes():
    """MedQuantConfig.record and medquant.save decide the format version with the same helper
    (medquant.io.format_version_of): 1 for 3-bit rows still in version-1 containers, 2 once they are dense."""
    from torch import nn

    from medquant import QuantLinear
    from medquant.io import dense_layouts, format_version_of

    torch.manual_seed(0)
    net = nn.Sequential(QuantLinear.from_float(nn.Linear(32, 8), QuantConfig(3), layout=1), nn.Linear(8, 2))
    assert MedQuantConfig.from_model(net).format_version == format_version_of(net) == 1
    dense_layouts(net)
    cfg = MedQuantConfig.from_model(net)
    assert cfg.format_version == format_version_of(net) == 2
    assert cfg.modules["0"]["layout"] == 2 and cfg.skipped_modules == ["1"]


def test_errors_are_clear(tmp_path):
    entry = ZOO_BY_NAME["llama"]
    model = entry.build()
    with pytest.raises(ValueError, match="no medquant-quantized layer"):
        medquant.hf.save_pretrained(model, tmp_path / "x")
    with pytest.raises(TypeError, match="PreTrainedModel"):
        medquant.hf.save_pretrained(torch.nn.Linear(4, 4), tmp_path / "x")
    model.save_pretrained(tmp_path / "float")
    with pytest.raises(ValueError, match="matches no module"):
        transformers.AutoModelForCausalLM.from_pretrained(
            tmp_path / "float", quantization_config=MedQuantConfig({"model.layers.9.mlp": 4}))
    with pytest.raises(ValueError, match="nothing to quantize"):
        transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "float", quantization_config=MedQuantConfig())

    # a checkpoint whose recipe was edited: the stored bit map no longer matches it
    name = "model.layers.0.mlp.up_proj"
    rows = model.get_submodule(name).out_features
    cb = tuple(4 if i % 2 else 8 for i in range(rows))
    quantize_(model, {name: QuantConfig(4, scope="channel", channel_bits=cb)})
    medquant.hf.save_pretrained(model, tmp_path / "q")
    cfg_path = tmp_path / "q" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["quantization_config"]["modules"][name]["config"]["channel_bits"] = list(reversed(cb))
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="config.json is truncated or altered"):  # the manifest sees the edit
        transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "q")
    (tmp_path / "q" / "medquant.manifest.json").unlink()  # without it (an older save) the tensors still disagree
    with pytest.raises(ValueError, match="bit map disagrees"):
        transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "q")
    cfg["quantization_config"]["modules"]["model.layers.7.mlp.up_proj"] = cfg["quantization_config"]["modules"][name]
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="does not have"):
        transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "q")


@pytest.mark.parametrize("spec", [{}, {"re:.*": None}, {"@language": QuantConfig(4)}])
def test_quantize_on_load_that_selects_no_layer_is_refused(spec, tmp_path):
    """A plan that quantizes nothing loaded a float model recorded as medquant, whose save_pretrained folder then
    failed to load ("records no quantized modules"); it is refused at from_pretrained."""
    ZOO_BY_NAME["llama"].build().save_pretrained(tmp_path / "float")
    skip = ["@language", "@head"] if spec else None
    with pytest.raises(ValueError, match="quantizes no layer of LlamaForCausalLM"):
        transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "float",
                                                          quantization_config=MedQuantConfig(spec, skip=skip))


def _hidden(model, inputs):
    with torch.no_grad():
        return model(**inputs).last_hidden_state


@pytest.mark.parametrize("how", ["quantize_", "quantize_sequential", "load"])
def test_plain_model_save_pretrained_after_quantizing_in_place_reloads(how, tmp_path):
    """``model.save_pretrained(dir)`` (transformers' own call) of a model medquant quantized in place, block by block
    or loaded writes the recipe: it wrote the packed tensors without ``quantization_config`` and ``from_pretrained``
    gave a float model with random weights. Reference: the in-memory quantized model's logits and tensors."""
    from medquant.calibrate import quantize_sequential

    entry = ZOO_BY_NAME["llama"]
    model = entry.build()
    inputs = entry.inputs(model)
    if how == "quantize_":
        quantize_(model, QuantConfig(4, group_size=32))
    elif how == "quantize_sequential":
        quantize_sequential(model, QuantConfig(4, group_size=32))
    else:
        quantize_(model, QuantConfig(4, group_size=32))
        medquant.save(model, tmp_path / "mq")
        model = medquant.load(tmp_path / "mq", entry.build())
    assert "save_pretrained" in vars(model)
    model.save_pretrained(tmp_path / "hf")
    qc = json.loads((tmp_path / "hf" / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "medquant" and set(qc["modules"]) == set(quantized_modules(model))
    reloaded = _auto(entry).from_pretrained(tmp_path / "hf")
    state_equal(model, reloaded)
    assert torch.equal(entry.output(reloaded, inputs), entry.output(model, inputs))
    plain = torch.nn.Sequential(torch.nn.Linear(32, 32))
    quantize_(plain, QuantConfig(4, group_size=32))  # not a transformers model: nothing bound
    assert "save_pretrained" not in vars(plain)


@pytest.mark.parametrize("name", ["llama", "llava"])
def test_base_model_and_model_with_head_read_each_others_checkpoints(name, tmp_path):
    """transformers reads a checkpoint with a head into its base model (``AutoModel``: the ``model.`` prefix is
    dropped, the head's tensors are ignored) and a base model's checkpoint into a model with a head (the prefix is
    added); the recorded module names follow (both raised "records a quantized module ... does not have").
    Reference: the in-memory quantized model's hidden states and tensors."""
    entry = ZOO_BY_NAME[name]
    model = entry.build()
    inputs = entry.inputs(model)
    quantize_(model, QuantConfig(4, group_size=32))  # the head too: its record is not the base model's
    medquant.hf.save_pretrained(model, tmp_path / "full")
    base = transformers.AutoModel.from_pretrained(tmp_path / "full")
    assert type(base) is type(model.model)
    assert set(quantized_modules(base)) == {n.removeprefix("model.") for n in quantized_modules(model)} - {"lm_head"}
    state_equal(model.model, base)
    assert torch.equal(_hidden(base, inputs), _hidden(model.model, inputs))

    medquant.hf.save_pretrained(model.model, tmp_path / "base")
    full = _auto(entry).from_pretrained(tmp_path / "base")
    assert isinstance(full.lm_head, torch.nn.Linear)  # not in the checkpoint: a new float head
    state_equal(model.model, full.model)
    assert torch.equal(_hidden(full.model, inputs), _hidden(model.model, inputs))


def test_modules_recorded_under_the_legacy_vlm_layout_load(tmp_path):
    """A LLaVA quantized under transformers 4 records its modules in the legacy layout (``language_model.model.*``,
    ``vision_tower.*``, ``language_model.lm_head``), the names of its tensors in the file; transformers 5 renames
    the tensors on load and the recorded names follow (before: "records a quantized module ... does not have")."""
    entry = ZOO_BY_NAME["llava"]
    model = entry.build()
    inputs = entry.inputs(model)
    quantize_(model, {"@language": QuantConfig(4, group_size=32), "_default": QuantConfig(8, scope="channel")})
    expected = entry.output(model, inputs)
    medquant.hf.save_pretrained(model, tmp_path / "q")
    legacy = {"model.language_model.": "language_model.model.", "model.vision_tower.": "vision_tower.",
              "model.multi_modal_projector.": "multi_modal_projector.", "lm_head": "language_model.lm_head"}
    cfg_path = tmp_path / "q" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    modules = cfg["quantization_config"]["modules"]
    renamed = {}
    for n, e in modules.items():
        old = next(k for k in legacy if n.startswith(k))
        renamed[legacy[old] + n[len(old):]] = e
    assert set(renamed) == {k.rpartition(".")[0] for k in load_file(tmp_path / "q" / "model.safetensors")
                            if k.endswith((".scales_4", ".scales_8"))}  # the file's own names
    cfg["quantization_config"]["modules"] = renamed
    cfg_path.write_text(json.dumps(cfg))
    (tmp_path / "q" / "medquant.manifest.json").unlink()  # a folder of that time has none
    with pytest.warns(UserWarning, match="no medquant.manifest.json"):
        back = transformers.AutoModelForImageTextToText.from_pretrained(tmp_path / "q")
    state_equal(model, back)
    assert torch.equal(entry.output(back, inputs), expected)


def test_registration_is_idempotent_and_lazy():
    from transformers.quantizers import auto

    medquant.hf.register()
    medquant.hf.register()
    assert auto.AUTO_QUANTIZER_MAPPING["medquant"] is MedQuantHfQuantizer
    assert auto.AUTO_QUANTIZATION_CONFIG_MAPPING["medquant"] is MedQuantConfig
    code = (
        "import sys, medquant.hf\n"
        "assert 'transformers' not in sys.modules, 'medquant.hf imported transformers eagerly'\n"
        "assert not medquant.hf.is_registered()\n"
        "import transformers.quantizers.auto as a\n"
        "assert medquant.hf.is_registered()\n"
        "assert a.AUTO_QUANTIZER_MAPPING['medquant'].__name__ == 'MedQuantHfQuantizer'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


# ---------------------------------------------------------------------------------------------- extra zoo (zoo_vlm)
def _extra_recipe(entry):
    if entry.is_vlm:
        return {"@language": QuantConfig(4, group_size=32), "_default": QuantConfig(8, scope="channel")}, [
            "@vision", "@head"]
    return QuantConfig(4, scope="channel"), ["@head", "@projector"]


# generation is checked on one model per kind of layout (test time): Q-Former, LLaVA-Med's own class, M-RoPE
# with deepstack, VQ tokenizer beside the layers, per-layer embeddings
GENERATE = {"blip2", "llava_med", "qwen3_vl", "chameleon", "gemma4"}


def _generate(entry, model, inputs):
    """Greedy decoding of 2 tokens: with the image for BLIP-2 (its generate needs it), else from the last 6 text
    tokens."""
    if entry.name == "blip2":
        return model.generate(**inputs, max_new_tokens=2, do_sample=False)
    ids = inputs["input_ids"][:, -6:]
    return model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=2, do_sample=False,
                          pad_token_id=0)


@extra_zoo_params
def test_extra_zoo_save_pretrained_from_pretrained_and_generate(entry, tmp_path):
    """The transformers round trip of every extra entry, quantized by roles: the class's own from_pretrained gives
    back every tensor and the output bit for bit, and greedy generation is unchanged (``GENERATE``)."""
    model = entry.build()
    inputs = entry.inputs(model)
    spec, skip = _extra_recipe(entry)
    quantize_(model, spec, skip=skip)
    expected = entry.output(model, inputs)
    medquant.hf.save_pretrained(model, tmp_path / "q")
    qc = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    assert set(qc["modules"]) == set(quantized_modules(model))
    reloaded = type(model).from_pretrained(tmp_path / "q")
    assert type(reloaded) is type(model)
    state_equal(model, reloaded)
    assert torch.equal(entry.output(reloaded, inputs), expected)
    if entry.name in GENERATE:
        with torch.no_grad():
            assert torch.equal(_generate(entry, reloaded, inputs), _generate(entry, model, inputs))


def test_bf16_vlm_keeps_its_dtypes_through_save_pretrained(tmp_path):
    """Issue 22 item 5 for the transformers round trip: bfloat16 vision / projector / embedding weights, the
    quantized layers' compute dtype and the logits come back unchanged."""
    entry = ZOO_BY_NAME["llava"]
    entry.build().save_pretrained(tmp_path / "float")
    model = transformers.AutoModelForImageTextToText.from_pretrained(tmp_path / "float", dtype=torch.bfloat16)
    inputs = entry.inputs(model)
    inputs["pixel_values"] = inputs["pixel_values"].to(torch.bfloat16)
    quantize_(model, {"@language": QuantConfig(4)}, skip=["@head"])
    expected = entry.output(model, inputs)
    medquant.hf.save_pretrained(model, tmp_path / "q")
    back = transformers.AutoModelForImageTextToText.from_pretrained(tmp_path / "q")
    assert {p.dtype for p in back.parameters()} == {torch.bfloat16}
    assert back.model.vision_tower.embeddings.patch_embedding.weight.dtype == torch.bfloat16
    assert all(m.weight_dtype == torch.bfloat16 for m in quantized_modules(back).values())
    state_equal(model, back)
    assert torch.equal(entry.output(back, inputs), expected)


@pytest.mark.parametrize("name", ["vit", "llava"])
def test_from_pretrained_with_another_dtype_casts_the_quantized_layers_like_to(name, tmp_path):
    """``from_pretrained(dtype=torch.bfloat16)`` of a float32 save builds the float layers in bfloat16; the quantized
    ones follow (biases and the dequantized weight's dtype, the stored codes and scales as saved), as ``.to()``
    does in memory. Before, they stayed float32 and the vision embeddings failed on mixed dtypes."""
    entry = ZOO_BY_NAME[name]
    model = entry.build()
    quantize_(model, QuantConfig(8, scope="channel"))
    inputs = entry.inputs(model)
    medquant.hf.save_pretrained(model, tmp_path / "q")
    back = _auto(entry).from_pretrained(tmp_path / "q", dtype=torch.bfloat16)
    model.to(torch.bfloat16)
    layers = quantized_modules(back)
    assert any(isinstance(m, medquant.QuantConv2d) for m in layers.values())
    assert {m.weight.dtype for m in layers.values()} == {torch.bfloat16}
    state_equal(model, back)
    with torch.no_grad():
        got, want = entry.output(back, inputs), entry.output(model, inputs)
    assert got.dtype == torch.bfloat16
    if name == "vit":
        assert torch.equal(got, want)
    else:  # transformers rebuilds the rotary inv_freq (not in the state dict) in float32; .to() cast it
        assert float((got.float() - want.float()).norm() / want.float().norm()) < 1e-2
