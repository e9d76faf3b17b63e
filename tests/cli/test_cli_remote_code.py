"""Hugging Face folders whose model needs the folder's own code (``config.json`` ``auto_map``: CheXagent, RadFM,
MiniCPM-V...), on the command line: without ``--trust-remote-code`` every command that loads such a folder stops in
one line before any of its code runs (no prompt, nothing written); with it ``quantize`` / ``prune`` save folders
that carry the code and reload through transformers (``trust_remote_code=True``) with the logits of the same
compression done in Python on the model transformers loads, and ``info`` / ``eval`` read them."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import medquant as mq
from medquant.cli import main
from tests.cli.tiny_folder import report_text_file
from tests.prune.real_models import minilm_dir

IDS = torch.tensor([[101, 2053, 11325, 1997, 2023, 102]])
CODE_FILES = ("configuration_tinymed.py", "modeling_tinymed.py")

CONFIGURATION = '''
from transformers import LlamaConfig


class TinyMedConfig(LlamaConfig):
    model_type = "tinymed"
'''

MODELING = '''
from transformers import LlamaForCausalLM

from .configuration_tinymed import TinyMedConfig


class TinyMedForCausalLM(LlamaForCausalLM):
    config_class = TinyMedConfig
'''


def tinymed_folder(path: Path) -> Path:
    """A 2-block causal LM whose model type (``tinymed``) transformers does not provide: its configuration and
    modeling code are files of the folder, named by the ``auto_map`` of its ``config.json``; weights drawn with seed 0
    and saved by ``save_pretrained``, with MiniLM's real tokenizer."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    path.mkdir(parents=True)
    (path / "configuration_tinymed.py").write_text(CONFIGURATION)
    (path / "modeling_tinymed.py").write_text(MODELING)
    tok = AutoTokenizer.from_pretrained(str(minilm_dir()))
    (path / "config.json").write_text(json.dumps({
        "model_type": "tinymed", "architectures": ["TinyMedForCausalLM"],
        "auto_map": {"AutoConfig": "configuration_tinymed.TinyMedConfig",
                     "AutoModelForCausalLM": "modeling_tinymed.TinyMedForCausalLM"},
        "vocab_size": tok.vocab_size, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8, "tie_word_embeddings": False}))
    torch.manual_seed(0)
    cfg = AutoConfig.from_pretrained(path, trust_remote_code=True)
    AutoModelForCausalLM.from_config(cfg, trust_remote_code=True).save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("remote")
    tinymed_folder(root / "src")
    report_text_file(root)
    return root


def _trusted(path):
    """The folder's model as transformers loads it with its code (the independent reference)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True).eval()


def _logits(model):
    with torch.no_grad():
        return model(input_ids=IDS).logits


@pytest.fixture
def no_folder_code(monkeypatch):
    """Loading any folder's code, or asking on the terminal, fails the test."""
    import builtins

    import transformers.dynamic_module_utils as dyn

    def refuse(*a, **k):
        raise AssertionError("the folder's code was loaded")

    def no_prompt(*a, **k):
        raise AssertionError("a prompt was shown")

    monkeypatch.setattr(dyn, "get_class_in_module", refuse)
    monkeypatch.setattr(builtins, "input", no_prompt)


def _refused(argv, capsys, folder_named):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err and "--debug" not in err
    assert str(folder_named) in err and "--trust-remote-code" in err and "would run that code" in err
    assert all(f in err for f in CODE_FILES)


@pytest.mark.parametrize("args", [
    ["quantize", "{src}", "{out}"],
    ["quantize", "{src}", "{out}", "--method", "gptq", "--calib", "{text}", "--block-by-block", "--stream"],
    ["prune", "{src}", "--out", "{out}", "--importance", "magnitude"],
    ["pipeline", "{src}", "--out", "{out}", "--text", "{text}", "--train", "none", "--quant", "rtn"],
    ["eval", "{src}", "--text", "{text}"],
    ["compile-decoder", "{src}", "{out}", "--max-len", "16"],
    ["generate", "{src}", "--max-len", "16", "--prompt", "Findings:"],
    ["export", "{src}", "{out}", "--format", "gguf"],
], ids=lambda a: "-".join(x for x in a if not x.startswith("{"))[:40])
def test_refused_in_one_line_without_the_flag_before_any_code_runs(folder, args, capsys, no_folder_code):
    out = folder / "refused_out"
    argv = [a.format(src=folder / "src", out=out, text=folder / "t.txt") for a in args]
    _refused(argv, capsys, folder / "src")
    assert not out.exists() and not list(folder.glob(".refused_out*"))  # nothing written


def test_quantize_rtn_and_gptq_reload_through_transformers_as_quantize_in_python(folder, capsys):
    from transformers import AutoTokenizer

    from medquant.calibrate import gptq_quantize_
    from medquant.cli.quantize import calibration_batches

    rtn = folder / "rtn"
    assert main(["quantize", str(folder / "src"), str(rtn), "--group-size", "16", "--trust-remote-code",
                 "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["layers_quantized"] == 15
    assert all((rtn / f).is_file() for f in CODE_FILES)
    assert json.loads((rtn / "config.json").read_text())["auto_map"]["AutoModelForCausalLM"] == \
        "modeling_tinymed.TinyMedForCausalLM"
    got = _trusted(rtn)
    assert type(got).__name__ == "TinyMedForCausalLM" and type(got).__module__.startswith("transformers_modules")
    ref = mq.quantize_(_trusted(folder / "src"), mq.QuantConfig(4, group_size=16))
    assert torch.equal(_logits(got), _logits(ref))

    gptq = folder / "gptq"
    assert main(["quantize", str(folder / "src"), str(gptq), "--group-size", "16", "--method", "gptq", "--calib",
                 str(folder / "t.txt"), "--calib-samples", "2", "--seq-len", "16", "--trust-remote-code"]) == 0
    assert "layers quantized: 15 (gptq)" in capsys.readouterr().out
    tok = AutoTokenizer.from_pretrained(folder / "src", trust_remote_code=True)
    calib = calibration_batches(tok, str(folder / "t.txt"), 2, 16)
    ref = _trusted(folder / "src")
    gptq_quantize_(ref, mq.QuantConfig(4, group_size=16), calib, progress=False)
    assert torch.equal(_logits(_trusted(gptq)), _logits(ref))

    # info reads the quantized folder with its code, and refuses it without the flag
    assert main(["info", str(rtn), "--json", "--trust-remote-code"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["class"] == "TinyMedForCausalLM" and report["layers_quantized"] == 15
    assert report["totals"] == mq.model_size(got).as_dict()
    _refused(["info", str(rtn)], capsys, rtn)


def test_prune_saves_a_folder_that_reloads_through_transformers_and_load_pruned(folder, capsys):
    from transformers import AutoModelForCausalLM

    from medquant.io import CheckpointError
    from medquant.prune import StructuredPruner, load_pruned

    out = folder / "pruned"
    assert main(["prune", str(folder / "src"), "--out", str(out), "--heads", "0.5", "--ffn", "0.5", "--importance",
                 "magnitude", "--trust-remote-code"]) == 0
    assert "HF config exact: True" in capsys.readouterr().out
    assert all((out / f).is_file() for f in CODE_FILES)
    ref = _trusted(folder / "src").float()
    StructuredPruner(0.5, 0.5, importance="magnitude").prune(ref)
    assert ref.config.intermediate_size == 32
    assert torch.equal(_logits(AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()),
                       _logits(ref))
    assert torch.equal(_logits(load_pruned(out, trust_remote_code=True)), _logits(ref))
    with pytest.raises(CheckpointError, match="trust_remote_code=True"):
        load_pruned(out)
    # eval and info read it with the flag, and refuse it without
    assert main(["info", str(out), "--json", "--trust-remote-code"]) == 0
    assert json.loads(capsys.readouterr().out)["class"] == "TinyMedForCausalLM"
    _refused(["info", str(out)], capsys, out)
    assert main(["eval", str(out), "--text", str(folder / "t.txt"), "--max-length", "8", "--json",
                 "--trust-remote-code"]) == 0
    assert json.loads(capsys.readouterr().out)["texts"] > 0


def test_save_carries_the_code_and_load_rebuilds_it_only_when_trusted(folder, tmp_path):
    from medquant.io import CheckpointError

    model = mq.quantize_(_trusted(folder / "src"), mq.QuantConfig(4, group_size=16))
    mq.save(model, tmp_path / "q")
    assert all((tmp_path / "q" / f).is_file() for f in CODE_FILES)
    with pytest.raises(CheckpointError, match="modeling_tinymed.py"):
        mq.load(tmp_path / "q")
    got = mq.load(tmp_path / "q", trust_remote_code=True)
    assert type(got).__name__ == "TinyMedForCausalLM"
    assert torch.equal(_logits(got), _logits(model))


def test_which_folders_run_their_own_code(folder, tmp_path):
    from medquant.io import remote_code_files
    from tests.cli.tiny_folder import tiny_llama_folder

    assert remote_code_files(folder / "src") == list(CODE_FILES)
    plain = tiny_llama_folder(tmp_path / "llama")
    assert remote_code_files(plain) == []
    # a model type transformers knows: its own classes load it (the auto_map is not needed)
    cfg = json.loads((plain / "config.json").read_text())
    cfg["auto_map"] = {"AutoModelForCausalLM": "modeling_x.XForCausalLM"}
    (plain / "config.json").write_text(json.dumps(cfg))
    assert remote_code_files(plain) == []
    # a tokenizer class transformers does not provide, and code kept in another repository
    tok = json.loads((plain / "tokenizer_config.json").read_text())
    tok.update(tokenizer_class="MedTokenizer", auto_map={"AutoTokenizer": ["tokenization_med.MedTokenizer", None]})
    (plain / "tokenizer_config.json").write_text(json.dumps(tok))
    assert remote_code_files(plain) == ["tokenization_med.py"]
    cfg.update(model_type="medvlm", auto_map={"AutoModel": "owner/vision--modeling_vit.ViT"})
    (plain / "config.json").write_text(json.dumps(cfg))
    assert remote_code_files(plain) == ["modeling_vit.py (from owner/vision)", "tokenization_med.py"]


def test_stream_with_the_flag_builds_the_folders_class_and_writes_the_in_memory_tensors(folder, capsys):
    """``quantize --block-by-block --stream --trust-remote-code``: the meta skeleton is the folder's own class (built
    by the Auto class its ``auto_map`` names), its weights read from the folder; the output holds the tensors of the
    same command without ``--stream`` and carries the code files."""
    from safetensors.torch import load_file

    outs = {}
    for name, extra in (("bbb_mem", []), ("bbb_stream", ["--stream"])):
        out = folder / name
        assert main(["quantize", str(folder / "src"), str(out), "--group-size", "16", "--method", "gptq", "--calib",
                     str(folder / "t.txt"), "--calib-samples", "2", "--seq-len", "16", "--block-by-block",
                     "--trust-remote-code", "--json", *extra]) == 0
        assert json.loads(capsys.readouterr().out)["layers_quantized"] == 15
        assert all((out / f).is_file() for f in CODE_FILES)
        outs[name] = load_file(str(out / "model.safetensors"))
    a, b = outs["bbb_stream"], outs["bbb_mem"]
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in b)
    assert type(_trusted(folder / "bbb_stream")).__name__ == "TinyMedForCausalLM"


@pytest.mark.parametrize("command", ["quantize", "prune"])
def test_calib_images_is_refused_in_one_line_without_the_flag_as_the_other_options(folder, command, capsys,
                                                                                   no_folder_code, tmp_path):
    """--calib-images reads the folder's processor before the model: the folder's code is refused first all the
    same, in the one line naming --trust-remote-code (not as a processor the folder lacks)."""
    import numpy as np

    np.savez(tmp_path / "images.npz", images=np.zeros((2, 28, 28), dtype=np.uint8))
    out = tmp_path / "out"
    if command == "quantize":
        argv = ["quantize", str(folder / "src"), str(out), "--method", "gptq", "--calib", str(folder / "t.txt"),
                "--calib-images", str(tmp_path / "images.npz")]
    else:
        argv = ["prune", str(folder / "src"), "--out", str(out), "--importance", "activation", "--calib-text",
                str(folder / "t.txt"), "--calib-images", str(tmp_path / "images.npz")]
    _refused(argv, capsys, folder / "src")
    assert not out.exists()
