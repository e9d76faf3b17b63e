"""``--stream`` reads folders whose stored tensor names transformers renames while loading, as ``from_pretrained``
reads them (transformers' loader is the reference), and refuses the tensors transformers converts (fuses, splits).

* A tiny LLaVA saved in the older layout of the Hub's LLaVA folders (``language_model.model.``,
  ``language_model.lm_head``, ``vision_tower.vision_model.``, ``multi_modal_projector.``; ``from_pretrained`` reads
  it to the same logits as the model it came from): block-by-block GPTQ on the streamed skeleton
  (:func:`medquant.cli.quantize.load_skeleton`) gives bit for bit the layers it gives on the ``from_pretrained``
  model, and the saved folders hold the same tensors and reload (``from_pretrained``) to the same logits. This is
  tested through the Python API: the command's calibration is report text, which never runs a VLM's vision blocks
  (block-by-block quantization refuses blocks the batches do not call), so calibration with images goes through
  ``gptq_quantize_sequential`` directly.
* On the command line: a LLaMA folder stored under its base model's names (``layers.0...``, the ``model.`` prefix
  that ``from_pretrained`` adds) writes, with ``--stream``, the tensors of the run without it.
* Refused before any work: a Mixtral folder as ``save_pretrained`` writes it (experts stored one by one, stacked into
  3-D tensors while loading), and two stored tensors that would be read under one name.
"""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import medquant as mq
from medquant.calibrate import gptq_quantize_sequential
from medquant.cli import main
from medquant.quant.api import quantized_modules
from medquant.testing.zoo import ZOO_BY_NAME
from tests.cli.tiny_folder import report_text_file, tiny_llama_folder
from tests.models.test_checkpoint_names import legacy_llava_name

IDS = torch.tensor([[101, 2053, 11325, 1997, 2023, 102]])
CONFIG = mq.QuantConfig(3, group_size=32)


@pytest.fixture(scope="module")
def legacy_llava(tmp_path_factory):
    """A tiny LLaVA folder whose safetensors use the older layout; checked with ``from_pretrained``."""
    from transformers import LlavaForConditionalGeneration

    folder = tmp_path_factory.mktemp("legacy_llava")
    entry = ZOO_BY_NAME["llava"]
    model = entry.build()
    assert not model.config.tie_word_embeddings  # lm_head is stored, under language_model.lm_head
    model.save_pretrained(folder)
    tensors = {legacy_llava_name(k): v.contiguous() for k, v in model.state_dict().items()}
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    assert "language_model.lm_head.weight" in tensors
    assert "vision_tower.vision_model.encoder.layers.0.self_attn.q_proj.weight" in tensors
    assert not any(k.startswith("model.") for k in tensors)
    loaded = LlavaForConditionalGeneration.from_pretrained(folder).eval()
    inputs = entry.inputs(model)
    with torch.no_grad():
        assert torch.equal(loaded(**inputs).logits, model(**inputs).logits)  # transformers reads this layout
    return folder


def _assert_same_quantized_layers(got, ref):
    q_got, q_ref = quantized_modules(got), quantized_modules(ref)
    assert sorted(q_got) == sorted(q_ref) and q_ref
    for name in q_ref:
        a, b = dict(got.get_submodule(name).state_dict()), dict(ref.get_submodule(name).state_dict())
        assert sorted(a) == sorted(b), name
        for k, v in b.items():
            assert a[k].dtype == v.dtype and torch.equal(a[k], v), f"{name}.{k}"


def test_stream_reads_an_older_vlm_layout_as_from_pretrained_does(legacy_llava, tmp_path):
    from transformers import LlavaForConditionalGeneration

    from medquant.cli.quantize import load_skeleton
    from medquant.hf import save_pretrained

    entry = ZOO_BY_NAME["llava"]
    ref = LlavaForConditionalGeneration.from_pretrained(legacy_llava).eval()
    skeleton, source = load_skeleton(str(legacy_llava))  # refused before the renaming
    assert any(p.is_meta for p in skeleton.parameters())
    assert set(ref.state_dict()) <= source.keys()
    assert source.stored_name("lm_head.weight") == "language_model.lm_head.weight"
    calib = [entry.inputs(ref)]  # with the image: the vision blocks are calibrated too
    gptq_quantize_sequential(ref, CONFIG, calib, device="cpu", progress=False)
    gptq_quantize_sequential(skeleton, CONFIG, calib, device="cpu", progress=False, checkpoint=source)
    assert not any(t.is_meta for t in skeleton.state_dict().values())
    _assert_same_quantized_layers(skeleton, ref)
    names = quantized_modules(ref)
    assert "lm_head" in names and "model.multi_modal_projector.linear_1" in names
    assert any(n.startswith("model.vision_tower.") for n in names)
    for model, out in ((ref, tmp_path / "from_pretrained"), (skeleton, tmp_path / "streamed")):
        save_pretrained(model, out)
    a, b = load_file(str(tmp_path / "streamed" / "model.safetensors")), \
        load_file(str(tmp_path / "from_pretrained" / "model.safetensors"))
    assert sorted(a) == sorted(b)
    for k in b:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    reloaded = LlavaForConditionalGeneration.from_pretrained(tmp_path / "streamed").eval()
    with torch.no_grad():
        assert torch.equal(reloaded(**calib[0]).logits, ref(**calib[0]).logits)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("renamed")
    tiny_llama_folder(root / "src")
    report_text_file(root)
    return root


def _args(folder, src, out, *extra):
    return ["quantize", str(src), str(folder / out), "--bits", "3", "--group-size", "32", "--method", "gptq",
            "--calib", str(folder / "t.txt"), "--calib-samples", "3", "--seq-len", "16", "--block-by-block",
            "--json", *extra]


def _copy_with_tensors(folder, name, tensors):
    dst = folder / name
    shutil.copytree(folder / "src", dst)
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


def test_stream_on_the_command_line_reads_a_folder_under_its_base_model_names(folder, capsys):
    from transformers import AutoModelForCausalLM

    tensors = load_file(str(folder / "src" / "model.safetensors"))
    src = _copy_with_tensors(folder, "base_names", {k.removeprefix("model."): v for k, v in tensors.items()})
    assert "layers.0.self_attn.q_proj.weight" in load_file(str(src / "model.safetensors"))
    with torch.no_grad():  # from_pretrained adds the prefix back
        assert torch.equal(AutoModelForCausalLM.from_pretrained(src)(input_ids=IDS).logits,
                           AutoModelForCausalLM.from_pretrained(folder / "src")(input_ids=IDS).logits)
    outs = []
    for out, extra in (("base_mem", []), ("base_stream", ["--stream"])):
        assert main(_args(folder, src, out, *extra)) == 0
        summary = json.loads(capsys.readouterr().out)
        assert summary["path"] == ("block-by-block-streamed" if extra else "block-by-block")
        outs.append(load_file(str(folder / out / "model.safetensors")))
    assert sorted(outs[0]) == sorted(outs[1]) and "model.layers.0.self_attn.q_proj.qweight_3" in outs[0]
    for k, v in outs[0].items():
        assert outs[1][k].dtype == v.dtype and torch.equal(outs[1][k], v), k


def _no_quantization(monkeypatch):
    import medquant.calibrate

    def refused(*a, **k):
        raise AssertionError("--stream quantized a folder it should have refused")

    monkeypatch.setattr(medquant.calibrate, "gptq_quantize_sequential", refused)


def test_stream_refuses_tensors_transformers_converts_while_loading(folder, capsys, monkeypatch):
    from transformers import AutoTokenizer, MixtralConfig, MixtralForCausalLM

    src = folder / "mixtral"
    tok = AutoTokenizer.from_pretrained(folder / "src")
    cfg = MixtralConfig(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                        num_attention_heads=2, num_key_value_heads=2, num_local_experts=2)
    torch.manual_seed(0)
    MixtralForCausalLM(cfg).save_pretrained(src)
    tok.save_pretrained(src)
    stored = load_file(str(src / "model.safetensors"))
    assert "model.layers.0.block_sparse_moe.experts.0.w1.weight" in stored  # one tensor per expert on disk ...
    loaded = MixtralForCausalLM.from_pretrained(src).state_dict()
    assert loaded["model.layers.0.mlp.experts.gate_up_proj"].dim() == 3  # ... stacked by from_pretrained
    _no_quantization(monkeypatch)
    assert main(_args(folder, src, "moe_out", "--stream")) == 2
    err = capsys.readouterr().err
    assert "--stream: transformers converts these tensors while loading" in err
    assert "model.layers.0.block_sparse_moe.experts.0.w1.weight" in err and "6 tensors" in err
    assert "run without --stream" in err
    assert not (folder / "moe_out").exists()


def test_stream_refuses_two_stored_tensors_read_under_one_name(folder, capsys, monkeypatch):
    tensors = load_file(str(folder / "src" / "model.safetensors"))
    extra = tensors["model.layers.0.mlp.up_proj.weight"].clone()  # read as model.layers.0... too (the prefix added)
    src = _copy_with_tensors(folder, "twice", {**tensors, "layers.0.mlp.up_proj.weight": extra})
    _no_quantization(monkeypatch)
    assert main(_args(folder, src, "twice_out", "--stream")) == 2
    err = capsys.readouterr().err
    assert "'model.layers.0.mlp.up_proj.weight' and 'layers.0.mlp.up_proj.weight' are both read as " \
           "'model.layers.0.mlp.up_proj.weight'" in err or \
           "'layers.0.mlp.up_proj.weight' and 'model.layers.0.mlp.up_proj.weight' are both read as " \
           "'model.layers.0.mlp.up_proj.weight'" in err
    assert "run without --stream" in err
    assert not (folder / "twice_out").exists()
