"""``medquant export`` on saved checkpoints (medquant.save and Hugging Face folders): the folder it writes reloads in
transformers with the medquant model's logits, the report is the library's, and bad arguments stop before any work
with exit code 2 and a message naming the argument."""
from __future__ import annotations

import json

import pytest
import torch

import medquant as mq
from medquant.cli import main
from medquant.kernels import force_backend
from medquant.testing.zoo import ZOO_BY_NAME

pytest.importorskip("compressed_tensors")

IDS = torch.tensor([[2, 17, 5, 99, 42, 7]])


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A zoo LLaMA at int4 asym g32 (layer 0's q_proj mixing 3/4-bit rows), saved with medquant.save."""
    root = tmp_path_factory.mktemp("export_cli")
    model = ZOO_BY_NAME["llama"].build()
    mixed = mq.QuantConfig(4, symmetric=False, group_size=32, channel_bits=(3,) * 8 + (4,) * 120)
    mq.quantize_(model, {"model.layers.0.self_attn.q_proj": mixed,
                         "_default": mq.QuantConfig(4, symmetric=False, group_size=32)}, skip=["lm_head"])
    mq.save(model, root / "mixed")
    uniform = mq.quantize_(ZOO_BY_NAME["llama"].build(), mq.QuantConfig(4, symmetric=True, group_size=32),
                           skip=["lm_head"])
    mq.save(uniform, root / "src")
    with torch.no_grad(), force_backend("torch"):
        ref = uniform(input_ids=IDS).logits
    return root, ref


def test_export_a_saved_checkpoint_reloads_with_the_same_logits(saved, capsys):
    from transformers import AutoModelForCausalLM

    root, ref = saved
    out = root / "ct"
    assert main(["export", str(root / "src"), str(out), "--format", "compressed-tensors", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["format"] == "compressed-tensors" and report["path"] == str(out)
    assert report["counts"] == {"exact repack": 14, "float": 2}  # embeddings and head stay float
    assert {r["name"] for r in report["layers"] if r["how"] == "float"} == {"model.embed_tokens", "lm_head"}
    loaded = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=IDS).logits, ref, rtol=1e-5, atol=1e-5)


def test_quantized_embeddings_are_written_as_the_embeddings_option_says(saved, tmp_path, capsys):
    from safetensors import safe_open

    from medquant.quant.embeddings import quantize_embeddings_

    model = mq.quantize_(ZOO_BY_NAME["llama"].build(), mq.QuantConfig(4, symmetric=True, group_size=32),
                         skip=["lm_head"])
    quantize_embeddings_(model, mq.QuantConfig(4, symmetric=True, group_size=32))
    mq.save(model, tmp_path / "src")
    for how, flag in (("float", []), ("exact repack", ["--embeddings", "packed"])):
        out = tmp_path / f"ct_{how[:5]}"
        assert main(["export", str(tmp_path / "src"), str(out), "--format", "compressed-tensors", "--json",
                     *flag]) == 0
        rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)["layers"]}
        assert rows["model.embed_tokens"]["how"] == how
        keys = set()
        for f in out.glob("*.safetensors"):
            with safe_open(str(f), "pt") as st:
                keys |= set(st.keys())
        assert ("model.embed_tokens.weight_packed" in keys) is bool(flag)
        assert ("model.embed_tokens.weight" in keys) is not bool(flag)


def test_mixed_bits_need_promote(saved, capsys):
    root, _ = saved
    assert main(["export", str(root / "mixed"), str(root / "refused"), "--format", "compressed-tensors"]) == 2
    err = capsys.readouterr().err
    assert "model.layers.0.self_attn.q_proj: mixed {3: 8 rows, 4: 120 rows}" in err and "--promote" in err
    assert not (root / "refused").exists()
    assert main(["export", str(root / "mixed"), str(root / "promoted"), "--format", "compressed-tensors",
                 "--promote", "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)["layers"]}
    assert rows["model.layers.0.self_attn.q_proj"]["how"] == "lossy requantization"
    assert rows["model.layers.0.self_attn.q_proj"]["max_abs_error"] > 0
    assert rows["model.layers.0.self_attn.k_proj"]["how"] == "exact repack"


def test_hf_folder_with_tokenizer_prints_the_table_and_copies_the_tokenizer(tmp_path, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from medquant.hf import save_pretrained
    from tests.prune.real_models import minilm_dir

    tok = AutoTokenizer.from_pretrained(str(minilm_dir()))
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=tok.vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, tie_word_embeddings=False)
    model = mq.quantize_(LlamaForCausalLM(cfg).eval(), mq.QuantConfig(8, symmetric=True, scope="channel"),
                         skip=["lm_head"])
    save_pretrained(model, tmp_path / "hf")
    tok.save_pretrained(tmp_path / "hf")
    out = tmp_path / "ct"
    assert main(["export", str(tmp_path / "hf"), str(out), "--format", "compressed-tensors",
                 "--max-shard-size", "2MB"]) == 0
    printed = capsys.readouterr().out
    assert "exact repack" in printed and f"-> {out} (compressed-tensors)" in printed
    assert "model.layers.0.mlp.down_proj" in printed and "pack-quantized int8 sym channel" in printed
    assert (out / "model.safetensors.index.json").is_file()
    assert AutoTokenizer.from_pretrained(str(out))("chest x-ray").input_ids == tok("chest x-ray").input_ids
    ids = tok("no acute cardiopulmonary process", return_tensors="pt").input_ids
    loaded = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    with torch.no_grad(), force_backend("torch"):
        torch.testing.assert_close(loaded(input_ids=ids).logits, model(input_ids=ids).logits, rtol=1e-5,
                                   atol=1e-5)


@pytest.mark.parametrize("args,expected", [
    (["{root}/missing", "{root}/o1", "--format", "compressed-tensors"], "argument SRC: "),
    (["{src}", "{root}/o2", "--format", "tflite"], "argument --format: invalid choice: 'tflite'"),
    (["{src}", "{root}/o3", "--format", "compressed-tensors", "--max-shard-size", "5XB"],
     "argument --max-shard-size: cannot read the size '5XB'"),
    (["{src}", "{root}/o4", "--format", "compressed-tensors", "--max-shard-size", "0"],
     "argument --max-shard-size: size must be positive"),
    (["{src}", "{root}/o5", "--format", "onnx", "--max-shard-size", "1GB"],
     "--max-shard-size applies to --format compressed-tensors only"),
    (["{src}", "{root}/o6", "--format", "gguf", "--embeddings", "packed"],
     "--embeddings applies to --format compressed-tensors only"),
    (["{src}", "{root}/o6", "--format", "compressed-tensors", "--embeddings", "int4"],
     "argument --embeddings: invalid choice: 'int4'"),
    (["{src}", "{root}", "--format", "compressed-tensors"], "OUT {root} holds SRC {root}/src"),
    # a non-empty folder that is not an earlier export: refused before the model loads, with or without --overwrite
    # (the export would refuse it after loading; it never deletes a folder it did not write)
    (["{src}", "{root}/busy", "--format", "compressed-tensors", "--overwrite"],
     "OUT: {root}/busy is not empty and not an earlier compressed-tensors export: it holds keep.txt"),
    (["{src}", "{root}/busy", "--format", "compressed-tensors"], "not an earlier compressed-tensors export"),
    (["{src}", "{root}/full.gguf", "--format", "compressed-tensors", "--overwrite"],
     "not an earlier compressed-tensors export"),
    (["{src}", "{src}", "--format", "compressed-tensors", "--overwrite"], "OUT must differ from SRC"),
    (["{src}", "{root}/o6"], "the following arguments are required: --format"),
    (["{src}", "{root}/src/config.json", "--format", "gguf", "--overwrite"],
     "OUT: {root}/src/config.json exists and is not a folder; a path without .gguf names a folder"),
    (["{src}", "{root}/src.gguf", "--format", "gguf", "--overwrite"], "OUT: {root}/src.gguf is a folder"),
    # a non-empty folder where the file goes: said as such, not "pass --overwrite" (which could not help)
    (["{src}", "{root}/full.gguf", "--format", "gguf"], "OUT: {root}/full.gguf is a folder"),
    (["{src}", "{root}/full.onnx", "--format", "onnx", "--input-shape", "1,4"], "OUT: {root}/full.onnx is a folder"),
])
def test_bad_arguments_exit_2_naming_the_argument(saved, capsys, args, expected):
    root, _ = saved
    (root / "src.gguf").mkdir(exist_ok=True)  # a folder whose name ends in .gguf
    for name in ("full.gguf", "full.onnx", "busy"):  # non-empty folders (named like the file)
        (root / name).mkdir(exist_ok=True)
        (root / name / "keep.txt").write_text("x")
    argv = [a.format(root=root, src=root / "src") for a in args]
    with pytest.raises(SystemExit) as e:
        main(["export", *argv])
    assert e.value.code == 2
    assert expected.format(root=root) in capsys.readouterr().err
    assert not any((root / f"o{i}").exists() for i in range(1, 7))
    assert all((root / name / "keep.txt").read_text() == "x" for name in ("full.gguf", "full.onnx", "busy"))


def test_a_folder_without_a_model_is_one_line_exit_2(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["export", str(tmp_path / "empty"), str(tmp_path / "out"), "--format", "compressed-tensors"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "not a model folder" in err


def test_other_formats_are_dispatched_through_the_registry(saved, capsys, monkeypatch):
    import importlib

    from medquant.deploy import ExportReport, LayerExport, register_export_format, registry

    importlib.import_module("medquant.deploy.compressed_tensors")  # registered before the registry is copied
    monkeypatch.setattr(registry, "_FORMATS", dict(registry._FORMATS))
    calls = []

    def backend(model, path, **options):
        calls.append((type(model).__name__, str(path), options))
        return ExportReport("toy-cli", str(path), [LayerExport("lm_head", "float32", "F32", "float")])

    register_export_format("toy-cli", backend)
    root, _ = saved
    assert main(["export", str(root / "src"), str(root / "toy.bin"), "--format", "toy-cli", "--promote",
                 "--json"]) == 0
    assert calls == [("LlamaForCausalLM", str(root / "toy.bin"), {"promote": True})]
    assert json.loads(capsys.readouterr().out)["counts"] == {"float": 1}
    with pytest.raises(SystemExit):
        main(["export", str(root / "src"), str(root / "toy2.bin"), "--format", "toy-cli", "--source", str(root)])
    assert "--source applies to --format compressed-tensors / gguf only" in capsys.readouterr().err
