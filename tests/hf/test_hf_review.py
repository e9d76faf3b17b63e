"""Review of the transformers integration: save options, recorded recipes used as a plan, configs given twice.

References: the in-memory quantized model (every tensor and its dtype, the logits, compared with ``torch.equal``),
:func:`medquant.load` of the same model, transformers' own ``from_pretrained`` / ``save_pretrained`` behaviour and
the pre-quantized loader's own checks of a recipe (what it refuses, quantize-on-load must refuse too).
"""
from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from safetensors import safe_open

import medquant as mq
import medquant.hf
from medquant import QuantConfig, quantize_
from medquant.hf import MedQuantConfig
from medquant.quant.api import quantized_modules
from medquant.quant.embeddings import quantize_embeddings_
from medquant.testing.zoo import ZOO_BY_NAME, text_kwargs
from tests.hf._helpers import state_equal

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()
AutoModelForCausalLM = transformers.AutoModelForCausalLM

IDS = torch.arange(2, 20).reshape(2, 9)
UP = "model.layers.0.mlp.up_proj"


def _logits(model, ids=IDS):
    with torch.no_grad():
        return model(ids).logits


def _quantized_llama():
    model = ZOO_BY_NAME["llama"].build()
    rows = model.get_submodule(UP).out_features
    cb = tuple((2, 3, 4, 8, 16, 0, 4, 32)[i % 8] for i in range(rows))  # every kind of row, float rows included
    quantize_(model, {UP: QuantConfig(4, scope="channel", channel_bits=cb, scale_dtype="float32"),
                      "re:.*": QuantConfig(4, group_size=32, scale_dtype="bfloat16")}, skip=["lm_head"])
    return model


# ------------------------------------------------------------------------------------------------ variant=
def test_save_pretrained_with_a_variant_is_refused_before_anything_is_written(tmp_path):
    """``save_pretrained(dir, variant="v1")`` wrote ``model.v1.safetensors``, which ``from_pretrained(dir,
    variant="v1")`` then refused ("model.safetensors is not listed in medquant.manifest.json"): a checkpoint that
    saved without complaint and never loaded again. It is refused at save time, and the folder already there
    stays as it was."""
    model = _quantized_llama()
    medquant.hf.save_pretrained(model, tmp_path / "q")
    before = {p.name: p.read_bytes() for p in (tmp_path / "q").iterdir()}
    for save in (lambda d, **kw: medquant.hf.save_pretrained(model, d, **kw), model.save_pretrained):
        with pytest.raises(ValueError, match="variant"):
            save(tmp_path / "q", variant="v1")
        with pytest.raises(ValueError, match="variant"):
            save(tmp_path / "new", variant="v1", max_shard_size="100KB")
    assert {p.name: p.read_bytes() for p in (tmp_path / "q").iterdir()} == before
    assert not (tmp_path / "new").exists()
    state_equal(model, AutoModelForCausalLM.from_pretrained(tmp_path / "q"))


def test_a_pre_quantized_variant_folder_is_refused_on_load_by_name(tmp_path):
    """A folder whose weights transformers wrote under a variant name (its own ``save_pretrained`` of the quantized
    model, not medquant's) was checked against ``model.safetensors``, a file it does not have; the error now says
    which file transformers reads and why it is refused."""
    model = _quantized_llama()
    medquant.hf.attach_quantizer(model)
    type(model).save_pretrained(model, tmp_path / "v", variant="v1")  # transformers' own writer
    assert (tmp_path / "v" / "model.v1.safetensors").is_file()
    with pytest.raises(ValueError, match=r"model\.v1\.safetensors.*variant"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "v", variant="v1")


# ------------------------------------------------------------------------------------------------ shards, pickle
def test_sharded_save_reloads_identically_with_a_tied_quantized_head(tmp_path):
    """``max_shard_size`` splits the packed tensors over several files (the tied head's stored once); the reload
    equals the model before saving and :func:`medquant.load` of the same model, tensor for tensor."""
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**text_kwargs(), "tie_word_embeddings": True}))
    model.eval()
    quantize_(model, QuantConfig(4, group_size=32), skip=["lm_head"])
    quantize_embeddings_(model, QuantConfig(4, group_size=32), tie=True)
    ref = _logits(model)
    medquant.hf.save_pretrained(model, tmp_path / "s", max_shard_size="60KB")
    index = json.loads((tmp_path / "s" / "model.safetensors.index.json").read_text())["weight_map"]
    assert len(set(index.values())) > 2 and not any(k.startswith("lm_head.") for k in index)
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "s").eval()
    assert back.lm_head.qweight_4 is back.model.embed_tokens.qweight_4
    state_equal(model, back)
    assert torch.equal(_logits(back), ref)
    mq.save(model, tmp_path / "mq")
    state_equal(mq.load(tmp_path / "mq"), back)


def test_safe_serialization_false_still_writes_safetensors_that_reload(tmp_path):
    """transformers 5 always writes safetensors (``safe_serialization`` is gone); a pickle checkpoint would skip
    every medquant check. The argument changes nothing: the folder holds ``model.safetensors`` only."""
    model = _quantized_llama()
    medquant.hf.save_pretrained(model, tmp_path / "p", safe_serialization=False)
    names = sorted(p.name for p in (tmp_path / "p").iterdir())
    assert "model.safetensors" in names and not any(n.endswith((".bin", ".pt", ".pth")) for n in names)
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "p")
    state_equal(model, back)
    assert torch.equal(_logits(back), _logits(model))


# ------------------------------------------------------------------------------------------------ config given twice
def test_a_quantization_config_passed_for_a_pre_quantized_folder_warns_and_the_folder_s_wins(tmp_path):
    """``from_pretrained(quantized_dir, quantization_config=MedQuantConfig(QuantConfig(8)))``: the folder's recorded
    recipe is used (re-quantizing packed codes is impossible), with transformers' warning that says so; the model
    equals the saved one and not the 8-bit plan."""
    model = _quantized_llama()
    medquant.hf.save_pretrained(model, tmp_path / "q")
    with pytest.warns(UserWarning, match="quantization_config` from the model will be used"):
        back = AutoModelForCausalLM.from_pretrained(tmp_path / "q",
                                                    quantization_config=MedQuantConfig(QuantConfig(8)))
    assert all(m.config.bits != 8 for m in quantized_modules(back).values())
    state_equal(model, back)
    assert torch.equal(_logits(back), _logits(model))


# ------------------------------------------------------------------------------------------------ dtype on load
def test_from_pretrained_with_bfloat16_keeps_the_saved_scale_and_float_row_dtypes(tmp_path):
    """``dtype=torch.bfloat16`` of a float32 save: every packed tensor (float32 / bfloat16 scales, float16 and
    float32 rows of the mixed layer) keeps its saved dtype and values; the rest is cast as transformers casts a
    float model (reference: ``from_pretrained`` of the same folder followed by ``.to(torch.bfloat16)``)."""
    model = _quantized_llama()
    medquant.hf.save_pretrained(model, tmp_path / "q")
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "q", dtype=torch.bfloat16)
    ref = AutoModelForCausalLM.from_pretrained(tmp_path / "q").to(torch.bfloat16)
    state_equal(ref, back)
    with safe_open(str(tmp_path / "q" / "model.safetensors"), "pt") as f:
        saved = {k: f.get_tensor(k) for k in f.keys() if k.startswith(UP + ".")}  # noqa: SIM118
    got = back.state_dict()
    assert {t.dtype for t in saved.values()} >= {torch.float32, torch.float16}  # the float rows
    for k, t in saved.items():
        assert got[k].dtype == t.dtype and torch.equal(got[k], t), k


# ------------------------------------------------------------------------------------------------ recorded recipes
def test_quantize_on_load_with_recorded_modules_checks_each_recipe_as_the_pre_quantized_loader_does(tmp_path):
    """A config holding only ``modules`` quantizes those layers while loading a float folder. A recipe with a
    misspelled key, or one of another type or shape than the model's layer, was used silently (its config applied
    to whatever layer has the name); the pre-quantized loader refuses the same recipes, and so does this path now.
    Control: the recipes a save recorded give the model ``quantize_`` gives."""
    model = _quantized_llama()
    medquant.hf.save_pretrained(model, tmp_path / "q")
    recorded = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    ZOO_BY_NAME["llama"].build().save_pretrained(tmp_path / "float")

    plan = MedQuantConfig(modules=recorded["modules"])
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "float", quantization_config=plan)
    state_equal(model, loaded)

    good = recorded["modules"][UP]
    misspelled = {k if k != "in_features" else "in_featurs": v for k, v in good.items()}
    conv = {**{k: v for k, v in good.items() if k not in ("in_features", "out_features")}, "type": "QuantConv2d",
            "in_channels": good["in_features"], "out_channels": good["out_features"], "kernel_size": [1, 1],
            "stride": [1, 1], "padding": [0, 0], "dilation": [1, 1], "groups": 1}
    wide = {**good, "in_features": 2 * good["in_features"]}
    for bad, match in ((misspelled, "in_featurs"), (conv, "does not fit"), (wide, "does not fit")):
        # the reference: the pre-quantized loader given the same recipe
        shutil.rmtree(tmp_path / "edited", ignore_errors=True)
        shutil.copytree(tmp_path / "q", tmp_path / "edited")
        (tmp_path / "edited" / "medquant.manifest.json").unlink()
        cfg = json.loads((tmp_path / "edited" / "config.json").read_text())
        cfg["quantization_config"]["modules"][UP] = bad
        (tmp_path / "edited" / "config.json").write_text(json.dumps(cfg))
        with pytest.warns(UserWarning, match="no medquant.manifest.json"), pytest.raises(ValueError, match=match):
            AutoModelForCausalLM.from_pretrained(tmp_path / "edited")
        with pytest.raises(ValueError, match=match):
            AutoModelForCausalLM.from_pretrained(tmp_path / "float",
                                                 quantization_config=MedQuantConfig(modules={UP: bad}))


def test_quantize_on_load_refuses_a_plan_that_quantizes_layers_its_skipped_modules_list(tmp_path):
    """``MedQuantConfig(QuantConfig(4), skipped_modules=["lm_head"])`` (the recorded field instead of ``skip``)
    quantized ``lm_head`` and overwrote the field with the result, with no word. The reference, ``quantize_`` with
    ``skip=["lm_head"]``, keeps it in float; the load now says which field to use. A recorded config whose
    ``skipped_modules`` the plan leaves in float still loads (control: equal to ``quantize_``)."""
    ZOO_BY_NAME["llama"].build().save_pretrained(tmp_path / "float")
    with pytest.raises(ValueError, match=r"skipped_modules.*lm_head.*skip="):
        AutoModelForCausalLM.from_pretrained(
            tmp_path / "float", quantization_config=MedQuantConfig(QuantConfig(4), skipped_modules=["lm_head"]))
    ref = quantize_(ZOO_BY_NAME["llama"].build(), QuantConfig(4), skip=["lm_head"])
    recorded = MedQuantConfig(QuantConfig(4), skip=["lm_head"]).record(ref)
    assert recorded.skipped_modules == ["lm_head"]
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "float", quantization_config=recorded)
    assert isinstance(loaded.lm_head, torch.nn.Linear)
    state_equal(ref, loaded)
