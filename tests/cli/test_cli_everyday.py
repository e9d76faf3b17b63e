"""``medquant quantize`` / ``info`` / ``eval`` on a tiny LLaMA folder (MiniLM's real tokenizer), checked against the
library: the saved folder reloads with ``from_pretrained`` and computes as ``quantize_`` / ``gptq_quantize_`` of
the same model, info's numbers are ``model_size``'s, eval's perplexity is ``perplexity``'s."""
from __future__ import annotations

import json

import pytest
import torch

import medquant as mq
from medquant.calibrate import gptq_quantize_
from medquant.cli import main
from medquant.cli.quantize import calibration_batches
from medquant.eval.lm import perplexity, token_batches
from medquant.quant.api import quantized_modules
from medquant.quant.size import model_size
from tests.cli.tiny_folder import tiny_llama_folder
from tests.prune.real_models import REPORTS

IDS = torch.tensor([[101, 2053, 11325, 1997, 2023, 102]])


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    tiny_llama_folder(root / "src")
    (root / "calib.txt").write_text("\n\n".join(REPORTS * 4), encoding="utf-8")
    return root


def _float(folder):
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(folder / "src").float().eval()


def _reload(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path).eval()


def test_quantize_rtn_reloads_as_quantize_and_info_matches_model_size(folder, capsys):
    out = folder / "rtn"
    assert main(["quantize", str(folder / "src"), str(out), "--bits", "4", "--group-size", "32", "--skip", "@head",
                 "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    ref = mq.quantize_(_float(folder), mq.QuantConfig(4, group_size=32), skip=["@head"])
    got = _reload(out)
    assert (out / "tokenizer.json").is_file() or (out / "vocab.txt").is_file()
    with torch.no_grad():
        assert torch.equal(got(input_ids=IDS).logits, ref(input_ids=IDS).logits)
    assert "lm_head" not in quantized_modules(got)
    size = model_size(ref)
    assert summary["layers_quantized"] == len(quantized_modules(ref)) == 14
    assert summary["bytes_after"] == size.total_bytes and summary["average_bits"] == round(size.effective_bits, 4)
    assert summary["bytes_before"] == model_size(_float(folder)).total_bytes > summary["bytes_after"]

    assert main(["info", str(out), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["totals"] == model_size(got).as_dict()
    assert report["layers_quantized"] == 14 and report["layers_total"] == 15
    row = next(r for r in report["layers"] if r["name"] == "model.layers.0.self_attn.q_proj")
    assert (row["bits"], row["scope"], row["group_size"], row["role"]) == ("4", "group", 32, "language")
    assert main(["info", str(out)]) == 0  # the table form
    text = capsys.readouterr().out
    assert "| model.layers.1.mlp.down_proj | QuantLinear | 64x128 | 4 | group | 32 |" in text
    assert "14 of 15 weight layers quantized" in text

    # the mq.save form of the same model
    mq.save(ref, folder / "saved")
    assert main(["info", str(folder / "saved"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["totals"] == model_size(ref).as_dict()


def test_quantize_gptq_with_calibration_text_matches_gptq_quantize_(folder, capsys):
    from transformers import AutoTokenizer

    out = folder / "gptq"
    argv = ["quantize", str(folder / "src"), str(out), "--bits", "3", "--group-size", "32", "--method", "gptq",
            "--calib", str(folder / "calib.txt"), "--calib-samples", "4", "--seq-len", "16", "--symmetric"]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "layers quantized: 15 (gptq)" in text and "saved to" in text
    tok = AutoTokenizer.from_pretrained(folder / "src")
    calib = calibration_batches(tok, str(folder / "calib.txt"), 4, 16)
    assert len(calib) == 4 and all(b["input_ids"].shape == (1, 16) for b in calib)
    ref = _float(folder)
    gptq_quantize_(ref, mq.QuantConfig(3, symmetric=True, group_size=32), calib, progress=False)
    got = _reload(out)
    with torch.no_grad():
        assert torch.equal(got(input_ids=IDS).logits, ref(input_ids=IDS).logits)
    # a Hessian memory cap: blocks captured in several passes, the same model
    capped = folder / "gptq_capped"
    assert main(argv[:2] + [str(capped)] + argv[3:] + ["--max-hessian-bytes", "40000"]) == 0
    with torch.no_grad():
        assert torch.equal(_reload(capped)(input_ids=IDS).logits, ref(input_ids=IDS).logits)
    with pytest.raises(SystemExit):
        main(["quantize", str(folder / "src"), str(folder / "rtn_capped"), "--max-hessian-bytes", "40000"])
    assert "--max-hessian-bytes is read by --method gptq" in capsys.readouterr().err


def test_eval_is_perplexity_of_the_folder(folder, capsys):
    from transformers import AutoTokenizer

    text = folder / "eval.txt"
    text.write_text("\n".join(REPORTS), encoding="utf-8")
    assert main(["quantize", str(folder / "src"), str(folder / "q8"), "--bits", "8", "--group-size", "32",
                 "--json"]) == 0
    capsys.readouterr()
    tok = AutoTokenizer.from_pretrained(folder / "src")
    batches = token_batches(tok, list(REPORTS), batch_size=8, max_length=512)
    for name in ("src", "q8"):
        assert main(["eval", str(folder / name), "--text", str(text), "--json"]) == 0
        result = json.loads(capsys.readouterr().out)
        model = _float(folder) if name == "src" else _reload(folder / name)
        assert result["perplexity"] == pytest.approx(perplexity(model, batches), rel=1e-6)
        assert result["texts"] == len(REPORTS)


@pytest.mark.parametrize("argv, message", [
    (["quantize", "/no/such/model", "out"], "/no/such/model: no such folder"),
    (["quantize", "{src}", "out", "--bits", "9"], "--bits: expected a bit-width 1..8, got 9"),
    (["quantize", "{src}", "out", "--bits", "0"], "--bits: expected a positive integer, got 0"),
    (["quantize", "{src}", "out", "--method", "hqq"], "--method: invalid choice: 'hqq'"),
    (["quantize", "{src}", "out", "--method", "gptq"], "--method gptq needs --calib FILE"),
    (["quantize", "{src}", "out", "--calib", "{calib}"], "--calib is read by --method awq or gptq; --method rtn"),
    (["quantize", "{src}", "out", "--method", "awq", "--calib", "/no/such.txt"], "--calib: /no/such.txt: no such file"),
    (["quantize", "{src}", "out", "--skip", "@vison"], "--skip: unknown role '@vison'"),
    (["quantize", "{src}", "out", "--group-size", "-4"], "--group-size: expected a positive integer, got -4"),
    (["quantize", "{src}", "out", "--method", "gptq", "--calib", "{calib}", "--seq-len", "1"],
     "--seq-len: expected an integer >= 2 (tokens per calibration sequence), got 1"),
    (["info", "/no/such/ck"], "/no/such/ck: no such folder"),
    (["eval", "/no/such/model", "--text", "x.txt"], "/no/such/model: no such folder"),
    (["eval", "{src}", "--text", "/no/such.txt"], "--text: /no/such.txt: no such file"),
    (["eval", "{src}"], "the following arguments are required: --text"),
])
def test_arguments_are_validated_before_any_work(folder, argv, message, capsys, monkeypatch):
    import medquant.cli.info
    import medquant.cli.prune

    def no_work(*a, **k):
        raise AssertionError("a model was loaded before the arguments were checked")

    monkeypatch.setattr(medquant.cli.prune, "_load", no_work)
    monkeypatch.setattr(medquant.cli.info, "load_hf_folder", no_work)
    with pytest.raises(SystemExit) as info:
        main([a.replace("{src}", str(folder / "src")).replace("{calib}", str(folder / "calib.txt")) for a in argv])
    assert info.value.code == 2
    assert message in capsys.readouterr().err
    assert not (folder / "out").exists()


def test_info_refuses_a_float_folder_in_one_line(folder, capsys):
    assert main(["info", str(folder / "src")]) == 2
    assert "not a medquant checkpoint" in capsys.readouterr().err


def test_quantize_awq_reloads_with_every_layer_quantized_but_the_head(folder, capsys):
    out = folder / "awq"
    assert main(["quantize", str(folder / "src"), str(out), "--group-size", "32", "--method", "awq", "--calib",
                 str(folder / "calib.txt"), "--calib-samples", "2", "--seq-len", "16", "--skip", "@head",
                 "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    got = _reload(out)
    assert summary["layers_quantized"] == len(quantized_modules(got)) == 14
    with torch.no_grad():
        assert torch.isfinite(got(input_ids=IDS).logits).all()


def test_quantize_keeps_the_stored_bfloat16_dtypes_as_the_python_api(folder, capsys):
    from transformers import AutoModelForCausalLM

    src = folder / "src_bf16"
    AutoModelForCausalLM.from_pretrained(folder / "src").to(torch.bfloat16).save_pretrained(src)
    out = folder / "rtn_bf16"
    assert main(["quantize", str(src), str(out), "--group-size", "32", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    ref = AutoModelForCausalLM.from_pretrained(src).eval()
    assert ref.dtype == torch.bfloat16
    before = model_size(ref).total_bytes
    mq.quantize_(ref, mq.QuantConfig(4, group_size=32), progress=False)
    assert summary["bytes_before"] == before and summary["bytes_after"] == model_size(ref).total_bytes
    got = _reload(out)
    assert got.model.embed_tokens.weight.dtype == got.model.norm.weight.dtype == torch.bfloat16
    with torch.no_grad():
        assert torch.equal(got(input_ids=IDS).logits, ref(input_ids=IDS).logits)


def test_prune_magnitude_drop_blocks_reads_the_calibration_text_as_block_influence_does(folder, capsys):
    from transformers import AutoTokenizer

    from medquant.prune import StructuredPruner, block_influence, least_influential, load_pruned

    text = folder / "prune_calib.txt"
    text.write_text("\n".join(REPORTS), encoding="utf-8")
    out = folder / "pruned_mag"
    assert main(["prune", str(folder / "src"), "--out", str(out), "--importance", "magnitude", "--drop-blocks", "1",
                 "--heads", "0", "--ffn", "0", "--calib-text", str(text)]) == 0
    capsys.readouterr()
    tok = AutoTokenizer.from_pretrained(folder / "src")
    tok.pad_token = tok.pad_token or tok.eos_token
    texts = list(REPORTS)
    calib = [dict(tok(texts[i:i + 4], return_tensors="pt", padding=True, truncation=True, max_length=128))
             for i in range(0, len(texts), 4)]
    ref = _float(folder)
    drop = least_influential(block_influence(ref, calib, progress=False), 1)
    StructuredPruner(0.0, 0.0, importance="magnitude", drop_blocks=drop, progress=False).prune(ref)
    got = load_pruned(out)
    assert got.config.num_hidden_layers == ref.config.num_hidden_layers == 1
    with torch.no_grad():
        assert torch.equal(got(input_ids=IDS).logits, ref(input_ids=IDS).logits)


def test_calibration_batches_refuses_a_sequence_length_below_2(folder):
    with pytest.raises(ValueError, match="seq_len must be an integer >= 2"):
        calibration_batches(object(), str(folder / "calib.txt"), 4, 1)
