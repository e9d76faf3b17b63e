"""``medquant quantize --stream`` reads a folder as ``from_pretrained`` reads it (the run without ``--stream``, which
loads the folder with ``from_pretrained``, is the reference: both must write the same tensors).

* A folder holding both ``model.safetensors`` and a sharded ``model.safetensors.index.json`` (other weights, another
  dtype): ``from_pretrained`` reads ``model.safetensors``, its weights and - with no ``dtype`` in ``config.json`` -
  its dtype.
* A folder whose ``config.json`` says ``tie_word_embeddings`` while it stores ``lm_head.weight`` with values of its
  own: ``from_pretrained`` does not tie them (it warns) and loads each from the folder.
"""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from medquant.cli import main
from tests.cli.tiny_folder import report_text_file, tiny_llama_folder


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("review_stream")
    tiny_llama_folder(root / "src")
    report_text_file(root)
    return root


def _args(folder, src, out, *extra):
    return ["quantize", str(src), str(folder / out), "--bits", "3", "--group-size", "32", "--method", "gptq",
            "--calib", str(folder / "t.txt"), "--calib-samples", "2", "--seq-len", "16", "--block-by-block",
            "--json", *extra]


def _assert_stream_writes_the_from_pretrained_run(folder, src, name, capsys):
    outs = []
    for out, extra in ((f"{name}_mem", []), (f"{name}_stream", ["--stream"])):
        assert main(_args(folder, src, out, *extra)) == 0
        capsys.readouterr()
        outs.append(load_file(str(folder / out / "model.safetensors")))
    assert sorted(outs[0]) == sorted(outs[1])
    for k, v in outs[0].items():
        assert outs[1][k].dtype == v.dtype and torch.equal(outs[1][k], v), k
    return outs[1]


def test_stream_reads_model_safetensors_where_an_index_lies_beside_it(folder, capsys):
    from transformers import AutoModelForCausalLM

    src = folder / "both"
    shutil.copytree(folder / "src", src)
    cfg = json.loads((src / "config.json").read_text())
    cfg.pop("dtype", None)
    cfg.pop("torch_dtype", None)
    (src / "config.json").write_text(json.dumps(cfg))
    other = AutoModelForCausalLM.from_pretrained(folder / "src")
    with torch.no_grad():
        for p in other.parameters():
            p.mul_(-3)
    other.to(torch.bfloat16).save_pretrained(folder / "other", max_shard_size="100KB")
    for f in (folder / "other").glob("model*"):
        shutil.copy(f, src)
    assert (src / "model.safetensors.index.json").is_file()
    ref = AutoModelForCausalLM.from_pretrained(src)  # reads model.safetensors: float32, the first weights
    stored = load_file(str(src / "model.safetensors"))
    assert ref.dtype == torch.float32
    assert torch.equal(ref.state_dict()["lm_head.weight"], stored["lm_head.weight"])
    out = _assert_stream_writes_the_from_pretrained_run(folder, src, "both", capsys)
    assert out["model.embed_tokens.weight"].dtype == torch.float32


def test_stream_does_not_tie_a_head_the_folder_stores_with_values_of_its_own(folder, capsys):
    from transformers import AutoModelForCausalLM

    src = folder / "tie_claimed"
    shutil.copytree(folder / "src", src)
    cfg = json.loads((src / "config.json").read_text())
    cfg["tie_word_embeddings"] = True
    (src / "config.json").write_text(json.dumps(cfg))
    stored = load_file(str(src / "model.safetensors"))
    assert not torch.equal(stored["lm_head.weight"], stored["model.embed_tokens.weight"])
    ref = AutoModelForCausalLM.from_pretrained(src)  # both stored, different: not tied, each loaded
    assert ref.lm_head.weight is not ref.model.embed_tokens.weight
    assert torch.equal(ref.lm_head.weight, stored["lm_head.weight"])
    with pytest.warns(UserWarning, match="tie_word_embeddings"):
        out = _assert_stream_writes_the_from_pretrained_run(folder, src, "tie_claimed", capsys)
    assert "lm_head.qweight_3" in out


def test_stream_still_ties_a_head_the_folder_stores_with_the_embeddings_values(folder, capsys):
    """A folder storing both names with one value (a tied model written by a tool that keeps both) stays tied, as
    ``from_pretrained`` ties it."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    src = folder / "tie_both"
    shutil.copytree(folder / "src", src)
    cfg = json.loads((src / "config.json").read_text())
    cfg["tie_word_embeddings"] = True
    (src / "config.json").write_text(json.dumps(cfg))
    stored = load_file(str(src / "model.safetensors"))
    stored["lm_head.weight"] = stored["model.embed_tokens.weight"].clone()
    save_file(stored, str(src / "model.safetensors"), metadata={"format": "pt"})
    ref = AutoModelForCausalLM.from_pretrained(src)
    assert ref.lm_head.weight is ref.model.embed_tokens.weight
    _assert_stream_writes_the_from_pretrained_run(folder, src, "tie_both", capsys)


def test_stream_refuses_a_folder_another_library_quantized(folder, capsys, monkeypatch):
    """A bitsandbytes 8-bit folder stores each Linear's int8 codes under ``weight`` (the model's float shape) and its
    scales under ``SCB``; ``from_pretrained`` reads it through its quantizer (``Linear8bitLt``). Read as float
    weights by name, the codes would pass every check and be quantized as if they were the weights: refused before
    any work, naming the method, nothing written."""
    pytest.importorskip("bitsandbytes")
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    import medquant.calibrate

    src = folder / "bnb8"
    model = AutoModelForCausalLM.from_pretrained(folder / "src", quantization_config=BitsAndBytesConfig(
        load_in_8bit=True))
    model.save_pretrained(src)
    AutoTokenizer.from_pretrained(folder / "src").save_pretrained(src)
    with safe_open(str(src / "model.safetensors"), "pt") as fh:
        w = fh.get_slice("model.layers.0.mlp.up_proj.weight")
        assert w.get_dtype() == "I8" and w.get_shape() == [128, 64]  # codes, in the float weight's shape
        assert "model.layers.0.mlp.up_proj.SCB" in fh.keys()  # noqa: SIM118
    assert type(model.model.layers[0].mlp.up_proj).__name__ == "Linear8bitLt"

    def refused(*a, **k):
        raise AssertionError("--stream quantized a folder it should have refused")

    monkeypatch.setattr(medquant.calibrate, "gptq_quantize_sequential", refused)
    assert main(_args(folder, src, "bnb8_out", "--stream")) == 2
    err = capsys.readouterr().err
    assert "already quantized (bitsandbytes" in err and "float" in err
    assert not (folder / "bnb8_out").exists()


def test_stream_refuses_a_tensor_of_another_shape_before_any_work(folder, capsys, monkeypatch):
    """A stored tensor whose shape is not the model's (weights of another config): ``from_pretrained`` refuses the
    folder while loading it; ``--stream`` must refuse it before quantizing anything (it read it only when its block
    came, after the blocks before it had been calibrated), naming the tensor and both shapes."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    import medquant.calibrate

    src = folder / "shape"
    shutil.copytree(folder / "src", src)
    stored = load_file(str(src / "model.safetensors"))
    stored["model.layers.1.mlp.up_proj.weight"] = stored["model.layers.1.mlp.up_proj.weight"][:100].contiguous()
    save_file(stored, str(src / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(RuntimeError, match="ignore_mismatched_sizes"):
        AutoModelForCausalLM.from_pretrained(src)

    def refused(*a, **k):
        raise AssertionError("--stream quantized a folder it should have refused")

    monkeypatch.setattr(medquant.calibrate, "gptq_quantize_sequential", refused)
    assert main(_args(folder, src, "shape_out", "--stream")) == 2
    err = capsys.readouterr().err
    assert "--stream" in err and "model.layers.1.mlp.up_proj.weight" in err and "(100, 64)" in err \
        and "(128, 64)" in err
    assert not (folder / "shape_out").exists()


@pytest.mark.parametrize("command", ["quantize", "prune", "pipeline"])
def test_every_command_refuses_a_folder_another_library_quantized(folder, capsys, command):
    """Without ``--stream`` too: ``quantize`` loaded the bitsandbytes folder through transformers' quantizer and
    failed with "'Parameter' object has no attribute 'CB'"; ``prune`` and ``pipeline`` would prune or train the
    int8 layers. One line naming the method, before the model is loaded, nothing written."""
    pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    src = folder / "bnb8_all"
    if not src.is_dir():
        model = AutoModelForCausalLM.from_pretrained(folder / "src", quantization_config=BitsAndBytesConfig(
            load_in_8bit=True))
        model.save_pretrained(src)
        AutoTokenizer.from_pretrained(folder / "src").save_pretrained(src)
    out = folder / f"bnb8_{command}_out"
    argv = {"quantize": [command, str(src), str(out), "--bits", "4"],
            "prune": [command, str(src), "--out", str(out), "--heads", "0.5"],
            "pipeline": [command, str(src), "--out", str(out), "--train", "none", "--quant", "rtn"]}[command]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "already quantized (bitsandbytes" in err and "float" in err and f"medquant {command}" in err
    assert not out.exists()


@pytest.mark.parametrize("command", ["quantize", "prune"])
def test_a_folder_missing_a_tensor_is_refused_without_stream_too(folder, capsys, command):
    """An untied folder without ``lm_head.weight``: ``from_pretrained`` only warns (MISSING) and draws the head at
    random, which the command then compressed into the output; ``--stream`` already refused it. The reference for
    what is missing: transformers' own ``output_loading_info``."""
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM

    src = folder / f"no_head_{command}"
    shutil.copytree(folder / "src", src)
    stored = load_file(str(src / "model.safetensors"))
    del stored["lm_head.weight"]
    save_file(stored, str(src / "model.safetensors"), metadata={"format": "pt"})
    _, info = AutoModelForCausalLM.from_pretrained(src, output_loading_info=True)
    assert info["missing_keys"] == {"lm_head.weight"}
    out = folder / f"no_head_{command}_out"
    argv = ([command, str(src), str(out), "--bits", "4"] if command == "quantize"
            else [command, str(src), "--out", str(out), "--heads", "0.5"])
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "lacks 1 tensor(s)" in err and "lm_head.weight" in err and "at random" in err
    assert not out.exists()
