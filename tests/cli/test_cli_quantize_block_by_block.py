"""``medquant quantize --block-by-block [--stream] [--device D]`` on tiny LLaMA folders (MiniLM's real tokenizer):
the saved folder holds, bit for bit, the quantized layers of ``gptq_quantize_sequential`` /
``awq_quantize_sequential`` called directly on the same float model with the command's own calibration batches,
and reloads with ``from_pretrained``; ``--stream`` (a meta skeleton, the blocks read from the folder's safetensors)
writes the same tensors as the in-memory run; bad combinations exit with code 2 before any work."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

import medquant as mq
from medquant.calibrate import awq_quantize_sequential, gptq_quantize_sequential
from medquant.cli import main
from medquant.cli.quantize import calibration_batches
from medquant.quant.api import quantized_modules
from tests.cli.tiny_folder import report_text_file, tiny_llama_folder

IDS = torch.tensor([[101, 2053, 11325, 1997, 2023, 102]])
SAMPLES, SEQ = 3, 16


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("bbb")
    tiny_llama_folder(root / "src")
    report_text_file(root)
    return root


def _args(folder, out, method, *extra):
    return ["quantize", str(folder / "src"), str(folder / out), "--bits", "3", "--group-size", "32", "--method",
            method, "--calib", str(folder / "t.txt"), "--calib-samples", str(SAMPLES), "--seq-len", str(SEQ),
            "--json", *extra]


def _float_and_calib(src, text):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(src).eval()
    calib = calibration_batches(AutoTokenizer.from_pretrained(src), str(text), SAMPLES, SEQ)
    return model, calib


def _reload(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path).eval()


def _assert_same_quantized_layers(got, ref):
    q_got, q_ref = quantized_modules(got), quantized_modules(ref)
    assert sorted(q_got) == sorted(q_ref) and q_ref
    for name in q_ref:
        a = dict(got.get_submodule(name).state_dict())
        b = dict(ref.get_submodule(name).state_dict())
        assert sorted(a) == sorted(b), name
        for k, v in b.items():  # packed codes, scales, zero points: bit for bit
            assert a[k].dtype == v.dtype and torch.equal(a[k], v), f"{name}.{k}"


def _saved_tensors(path):
    from safetensors.torch import load_file

    return load_file(str(path / "model.safetensors"))


def _spy(monkeypatch, name):
    """Record the calls of ``medquant.calibrate.<name>`` (the command imports it when it runs): whether the model
    held meta tensors then, and the keyword arguments."""
    import medquant.calibrate

    real, calls = getattr(medquant.calibrate, name), []

    def spy(model, *args, **kwargs):
        calls.append((any(p.is_meta for p in model.parameters()), kwargs))
        return real(model, *args, **kwargs)

    monkeypatch.setattr(medquant.calibrate, name, spy)
    return calls


def test_gptq_block_by_block_equals_gptq_quantize_sequential(folder, capsys, monkeypatch):
    calls = _spy(monkeypatch, "gptq_quantize_sequential")
    assert main(_args(folder, "gptq_bbb", "gptq", "--block-by-block", "--device", "cpu")) == 0
    summary = json.loads(capsys.readouterr().out)
    # (whole-model GPTQ gives these very codes on this model: the call itself shows which path ran)
    assert len(calls) == 1 and calls[0][0] is False and calls[0][1]["device"] == "cpu"
    assert calls[0][1]["checkpoint"] is None
    assert (summary["path"], summary["device"], summary["method"]) == ("block-by-block", "cpu", "gptq")
    ref, calib = _float_and_calib(folder / "src", folder / "t.txt")
    assert len(calib) == SAMPLES
    gptq_quantize_sequential(ref, mq.QuantConfig(3, group_size=32), calib, device="cpu", progress=False)
    got = _reload(folder / "gptq_bbb")
    _assert_same_quantized_layers(got, ref)
    assert summary["layers_quantized"] == len(quantized_modules(ref)) == 15  # lm_head too, as without the option
    with torch.no_grad():
        assert torch.equal(got(input_ids=IDS).logits, ref(input_ids=IDS).logits)
    # the whole-model path says so
    assert main(_args(folder, "gptq_whole", "gptq")) == 0
    assert json.loads(capsys.readouterr().out)["path"] == "whole-model"


def test_awq_block_by_block_equals_awq_quantize_sequential_and_prints_its_path(folder, capsys):
    assert main(_args(folder, "awq_bbb", "awq", "--block-by-block", "--skip", "@head")) == 0
    summary = json.loads(capsys.readouterr().out)
    assert (summary["path"], summary["device"]) == ("block-by-block", "cpu")  # the default device
    ref, calib = _float_and_calib(folder / "src", folder / "t.txt")
    awq_quantize_sequential(ref, mq.QuantConfig(3, group_size=32), calib, skip=["@head"], device="cpu",
                            progress=False)
    got = _reload(folder / "awq_bbb")
    _assert_same_quantized_layers(got, ref)
    assert "lm_head" not in quantized_modules(got) and summary["layers_quantized"] == 14
    with torch.no_grad():  # the folded norms too
        assert torch.equal(got(input_ids=IDS).logits, ref(input_ids=IDS).logits)
    # the table form names the path
    argv = [a for a in _args(folder, "awq_bbb_table", "awq", "--block-by-block") if a != "--json"]
    assert main(argv) == 0
    assert "path: block by block, blocks computed on cpu" in capsys.readouterr().out


@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_stream_writes_the_tensors_of_the_in_memory_block_by_block_run(folder, method, capsys, monkeypatch):
    import medquant.cli.quantize

    memory, streamed = f"{method}_mem", f"{method}_stream"
    assert main(_args(folder, memory, method, "--block-by-block")) == 0
    capsys.readouterr()
    calls = _spy(monkeypatch, f"{method}_quantize_sequential")

    def no_whole_model(*a, **k):
        raise AssertionError("--stream loaded the whole float model")

    monkeypatch.setattr(medquant.cli.quantize, "_load", no_whole_model)
    assert main(_args(folder, streamed, method, "--block-by-block", "--stream")) == 0
    summary = json.loads(capsys.readouterr().out)
    # a meta skeleton, the blocks read from the folder
    assert len(calls) == 1 and calls[0][0] is True and calls[0][1]["checkpoint"] is not None
    assert summary["path"] == "block-by-block-streamed"
    a, b = _saved_tensors(folder / streamed), _saved_tensors(folder / memory)
    assert sorted(a) == sorted(b)
    for k in b:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    cfg = [json.loads((folder / d / "config.json").read_text())["quantization_config"] for d in (streamed, memory)]
    assert cfg[0] == cfg[1]
    with torch.no_grad():
        assert torch.equal(_reload(folder / streamed)(input_ids=IDS).logits,
                           _reload(folder / memory)(input_ids=IDS).logits)


def test_stream_with_tied_embeddings_reads_the_head_from_the_embedding(folder, capsys):
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    src = folder / "tied"
    tok = AutoTokenizer.from_pretrained(folder / "src")
    torch.manual_seed(1)
    cfg = LlamaConfig(vocab_size=tok.vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, tie_word_embeddings=True)
    LlamaForCausalLM(cfg).save_pretrained(src)
    tok.save_pretrained(src)
    from safetensors import safe_open

    with safe_open(str(src / "model.safetensors"), "pt") as fh:
        assert "lm_head.weight" not in fh.keys()  # noqa: SIM118 (stored once, under the embedding's name)
    outs = []
    for name, extra in (("tied_mem", []), ("tied_stream", ["--stream"])):
        argv = _args(folder, name, "gptq", "--block-by-block", *extra)
        argv[1] = str(src)
        assert main(argv) == 0
        assert json.loads(capsys.readouterr().out)["layers_quantized"] == 15
        outs.append(_saved_tensors(folder / name))
    assert sorted(outs[0]) == sorted(outs[1])
    for k in outs[0]:
        assert torch.equal(outs[0][k], outs[1][k]), k
    _reload(folder / "tied_stream")


def _no_work(monkeypatch):
    import medquant.cli.prune
    import medquant.cli.quantize

    def no_work(*a, **k):
        raise AssertionError("a model was loaded before the arguments were checked")

    monkeypatch.setattr(medquant.cli.prune, "_load", no_work)
    monkeypatch.setattr(medquant.cli.quantize, "_load", no_work)
    monkeypatch.setattr(medquant.cli.quantize, "load_skeleton", no_work)


@pytest.mark.parametrize("extra, message", [
    (["--block-by-block"], "--block-by-block is read by --method awq or gptq"),
    (["--method", "gptq", "--calib", "{calib}", "--stream"], "--stream reads the float weights one block at a time"),
    (["--method", "gptq", "--calib", "{calib}", "--block-by-block", "--device", "gpu0"],
     "--device: expected a device such as cpu, cuda or cuda:1, got 'gpu0'"),
    (["--method", "gptq", "--calib", "{calib}", "--block-by-block", "--device", "meta"], "--device: meta holds no data"),
    (["--method", "gptq", "--calib", "{calib}", "--block-by-block", "--device", "cuda:99"],
     "--device: cuda:99: no such device on this machine"),
    (["--method", "awq", "--calib", "{calib}", "--device", "cpu"], "--device is the compute device of --block-by-block"),
])
def test_block_by_block_argument_errors_exit_2_before_any_work(folder, extra, message, capsys, monkeypatch):
    _no_work(monkeypatch)
    argv = ["quantize", str(folder / "src"), str(folder / "out")] + [a.replace("{calib}", str(folder / "t.txt"))
                                                                    for a in extra]
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    assert message in capsys.readouterr().err
    assert not (folder / "out").exists()


def test_stream_refuses_folders_whose_tensors_it_cannot_read_by_name(folder, capsys):
    """Names that transformers does not rename into the model's either (a LLaMA's under an older VLM layout's
    prefix: ``from_pretrained`` reports them missing) are refused, as a folder without safetensors is. (Names it
    does rename are read: tests/cli/test_cli_quantize_stream_renamed.py.)"""
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM

    renamed = folder / "renamed"  # the names of an older VLM layout: not those of a LLaMA
    shutil.copytree(folder / "src", renamed)
    tensors = load_file(str(renamed / "model.safetensors"))
    save_file({k.replace("model.", "language_model.model.", 1): v for k, v in tensors.items()},
              str(renamed / "model.safetensors"), metadata={"format": "pt"})
    _, info = AutoModelForCausalLM.from_pretrained(renamed, output_loading_info=True)
    assert "model.layers.0.self_attn.q_proj.weight" in info["missing_keys"]
    no_st = folder / "bin_only"
    shutil.copytree(folder / "src", no_st)
    (no_st / "model.safetensors").unlink()
    torch.save(tensors, no_st / "pytorch_model.bin")
    for src, message in ((renamed, "under its own names or those from_pretrained renames the stored ones to"),
                         (no_st, "nor model.safetensors.index.json")):
        argv = _args(folder, "refused", "gptq", "--block-by-block", "--stream")
        argv[1] = str(src)
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert message in err and "run without --stream" in err
        assert not (folder / "refused").exists()


def test_stream_of_a_sharded_bfloat16_folder_keeps_its_dtype(folder, capsys):
    from transformers import AutoModelForCausalLM

    src = folder / "bf16_sharded"
    AutoModelForCausalLM.from_pretrained(folder / "src").to(torch.bfloat16).save_pretrained(src, max_shard_size="1MB")
    for f in (folder / "src").iterdir():  # the tokenizer files
        if not f.name.startswith(("model", "config", "generation")):
            shutil.copy(f, src)
    assert (src / "model.safetensors.index.json").is_file()
    outs = []
    for name, extra in (("bf16_mem", []), ("bf16_stream", ["--stream"])):
        argv = _args(folder, name, "awq", "--block-by-block", *extra)
        argv[1] = str(src)
        assert main(argv) == 0
        capsys.readouterr()
        outs.append(_saved_tensors(folder / name))
    assert sorted(outs[0]) == sorted(outs[1])
    for k, v in outs[0].items():
        assert outs[1][k].dtype == v.dtype and torch.equal(outs[1][k], v), k
    assert outs[1]["model.embed_tokens.weight"].dtype == torch.bfloat16


def test_stream_skeleton_keeps_the_float32_modules_from_pretrained_keeps(tmp_path):
    """A float16 T5 folder: ``from_pretrained`` keeps ``_keep_in_fp32_modules`` (``wo``) in float32; the --stream
    skeleton must give every tensor the dtype ``from_pretrained`` gives it (else the streamed run computes and
    quantizes those layers in float16 and saves a model the in-memory run does not)."""
    from transformers import T5Config, T5ForConditionalGeneration

    from medquant.cli.quantize import load_skeleton

    cfg = T5Config(vocab_size=64, d_model=16, d_kv=4, d_ff=32, num_layers=1, num_heads=2, decoder_start_token_id=0)
    torch.manual_seed(0)
    T5ForConditionalGeneration(cfg).to(torch.float16).save_pretrained(tmp_path)
    ref = T5ForConditionalGeneration.from_pretrained(tmp_path, dtype="auto")
    skeleton, _ = load_skeleton(str(tmp_path))
    want = {k: t.dtype for k, t in ref.state_dict().items()}
    got = {k: t.dtype for k, t in skeleton.state_dict().items()}
    assert torch.float32 in set(want.values()) and torch.float16 in set(want.values())
    assert got == want


def test_stream_skeleton_takes_the_folders_generation_config(tmp_path):
    """``from_pretrained`` reads the folder's ``generation_config.json`` (saved again with the quantized model); the
    --stream skeleton must carry the same one, not the defaults derived from ``config.json``."""
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    from medquant.cli.quantize import load_skeleton

    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2)
    model = LlamaForCausalLM(cfg)
    model.generation_config = GenerationConfig(max_new_tokens=7, do_sample=True, temperature=0.3, eos_token_id=[2, 5])
    model.save_pretrained(tmp_path)
    ref = LlamaForCausalLM.from_pretrained(tmp_path).generation_config
    skeleton, _ = load_skeleton(str(tmp_path))
    assert ref.temperature == 0.3
    assert skeleton.generation_config.to_diff_dict() == ref.to_diff_dict()
