"""``medquant pipeline`` end to end on a tiny causal LM folder (MiniLM's real tokenizer, 4 layers)."""
from __future__ import annotations

import json

import torch

from medquant.cli import main
from medquant.pipeline import load_compressed
from tests.prune.real_models import REPORTS, minilm_dir


def test_cli_pipeline(tmp_path, capsys):
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(str(minilm_dir()))
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=tok.vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, tie_word_embeddings=True)
    src = tmp_path / "src"
    LlamaForCausalLM(cfg).save_pretrained(src)
    tok.save_pretrained(src)
    text = tmp_path / "t.txt"
    text.write_text("\n".join(REPORTS * 8))
    out = tmp_path / "out"
    rc = main(["pipeline", str(src), "--out", str(out), "--heads", "0.3", "--ffn", "0.3", "--layer-select",
               "--train", "distil", "--steps", "2", "--batch", "2", "--quant", "awq", "--bits", "4",
               "--group-size", "32", "--text", str(text), "--calib-samples", "8", "--max-length", "24"])
    assert rc == 0
    rep = json.loads((out / "pipeline_report.json").read_text())
    assert rep["after"]["non_embedding_params"] < rep["before"]["non_embedding_params"]
    assert rep["final_train_loss"] is not None
    # the report says what ran on what: REPORTS * 8 texts, 8 calibrate (2 batches of 4), 2 steps x 2 train
    n_texts = len([t for t in REPORTS * 8 if t.strip()])
    assert rep["data"] == {"source": str(text), "texts": n_texts, "calibration_texts": 8, "calibration_batches": 2,
                           "training_texts": 4, "training_batches": 2, "max_length": 24}
    assert rep["settings"] == {"heads": 0.3, "ffn": 0.3, "gqa": "query", "layer_select": True, "train": "distil",
                               "steps": 2, "batch": 2, "lr": 1e-4, "quant": "awq", "bits": 4, "group_size": 32,
                               "seed": 0}
    model = load_compressed(out)
    ids = torch.tensor([[101, 2053, 11325, 102]])
    assert model(input_ids=ids).logits.shape == (1, 4, tok.vocab_size)


class _Stop(Exception):
    pass


def test_cli_pipeline_calibrates_on_every_calib_sample(tmp_path, monkeypatch):
    from transformers import AutoTokenizer

    import medquant.pipeline
    from tests.cli.tiny_folder import tiny_llama_folder

    src = tiny_llama_folder(tmp_path / "src")
    texts = [f"{r} ({i})" for i, r in enumerate(REPORTS * 2)]
    (tmp_path / "t.txt").write_text("\n".join(texts))
    tok = AutoTokenizer.from_pretrained(src)
    seen = {}

    def spy(model, **kw):
        seen["calib"] = kw["calib"]
        raise _Stop

    monkeypatch.setattr(medquant.pipeline, "compress", spy)
    for n in (3, 6):
        try:
            main(["pipeline", str(src), "--out", str(tmp_path / "out"), "--train", "none", "--text",
                  str(tmp_path / "t.txt"), "--calib-samples", str(n), "--max-length", "16"])
        except _Stop:
            pass
        got = torch.cat([b["input_ids"][i] for b in seen.pop("calib") for i in range(len(b["input_ids"]))])
        want = torch.cat([tok(t, return_tensors="pt", truncation=True, max_length=16)["input_ids"][0]
                          for t in texts[:n]])
        # the same texts, in order (padding aside)
        pad = tok.pad_token_id
        assert torch.equal(got[got != pad], want[want != pad])


def test_cli_pipeline_layer_select_without_pruning_is_an_argument_error(tmp_path, capsys):
    import pytest

    from tests.cli.tiny_folder import tiny_llama_folder

    src = tiny_llama_folder(tmp_path / "src")
    with pytest.raises(SystemExit) as e:
        main(["pipeline", str(src), "--out", str(tmp_path / "out"), "--heads", "0", "--ffn", "0", "--layer-select"])
    assert e.value.code == 2 and "--layer-select" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_cli_pipeline_refuses_the_options_of_a_skipped_stage(tmp_path, capsys, monkeypatch):
    import pytest

    import medquant.cli.prune as cli_prune
    from tests.cli.tiny_folder import tiny_llama_folder

    src = tiny_llama_folder(tmp_path / "src")

    def no_load(*a, **k):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(cli_prune, "_load", no_load)
    for extra, named, why in ((["--quant", "none", "--bits", "8"], "--bits", "--quant none"),
                              (["--quant", "none", "--group-size", "32", "--bits", "2"], "--bits, --group-size",
                               "--quant none"),
                              (["--train", "none", "--lr", "0.01"], "--lr", "--train none"),
                              (["--train", "none", "--steps", "3", "--batch", "2"], "--steps, --batch", "--train none"),
                              (["--heads", "0", "--ffn", "0", "--gqa", "group"], "--gqa", "--heads 0 --ffn 0")):
        with pytest.raises(SystemExit) as e:
            main(["pipeline", str(src), "--out", str(tmp_path / "out"), *extra])
        err = capsys.readouterr().err
        assert e.value.code == 2 and f"{named} would do nothing: {why}" in err, err
    assert not (tmp_path / "out").exists()


def test_cli_pipeline_and_prune_rerun_into_the_same_out_gives_a_verified_checkpoint(tmp_path, capsys):
    from medquant.prune import parameter_report
    from tests.cli.tiny_folder import report_text_file, tiny_llama_folder

    src = tiny_llama_folder(tmp_path / "src")
    text = report_text_file(tmp_path)
    p, q = tmp_path / "p", tmp_path / "q"
    for ffn in ("0.25", "0.5"):
        assert main(["pipeline", str(src), "--out", str(p), "--heads", "0", "--ffn", ffn, "--train", "none",
                     "--quant", "rtn", "--group-size", "32", "--text", str(text), "--calib-samples", "4",
                     "--max-length", "16"]) == 0
        assert main(["prune", str(src), "--out", str(q), "--heads", "0", "--ffn", ffn, "--layer-select",
                     "--calib-text", str(text), "--calib-samples", "4", "--max-length", "16"]) == 0
    capsys.readouterr()
    for folder, report in ((p, "pipeline_report.json"), (q, "prune_report.json")):
        assert main(["verify", str(folder)]) == 0, capsys.readouterr()
        model = load_compressed(folder)  # verifies the manifest: every file as the save wrote it
        rep = json.loads((folder / report).read_text())
        assert rep["after"] == parameter_report(model)  # the second run's report, listed in the manifest
        assert rep["after"]["non_embedding_params"] < rep["before"]["non_embedding_params"]
        manifest = json.loads((folder / "medquant.manifest.json").read_text())
        assert report in json.dumps(manifest) and "tokenizer_config.json" in json.dumps(manifest)
    assert (q / "block_influence.png").is_file()
    assert load_compressed(q).model.layers[0].mlp.up_proj.out_features < 128


def test_cli_pipeline_refuses_a_non_finite_learning_rate(tmp_path, capsys):
    import pytest

    from tests.cli.tiny_folder import tiny_llama_folder

    src = tiny_llama_folder(tmp_path / "src")
    for lr in ("inf", "nan", "0", "-1e-3"):
        with pytest.raises(SystemExit) as e:
            main(["pipeline", str(src), "--out", str(tmp_path / "out"), f"--lr={lr}"])
        assert e.value.code == 2 and "--lr: expected a finite number > 0" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_cli_pipeline_refuses_a_missing_text_file_before_loading_the_model(tmp_path, capsys, monkeypatch):
    import pytest

    import medquant.cli.prune
    from tests.cli.tiny_folder import tiny_llama_folder

    def no_work(*a, **k):
        raise AssertionError("the model was loaded before --text was checked")

    monkeypatch.setattr(medquant.cli.prune, "_load", no_work)
    src = tiny_llama_folder(tmp_path / "src")
    with pytest.raises(SystemExit) as e:
        main(["pipeline", str(src), "--out", str(tmp_path / "out"), "--text", str(tmp_path / "no.txt")])
    assert e.value.code == 2 and f"--text: {tmp_path / 'no.txt'}: no such file" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_cli_pipeline_without_texts_left_to_train_on_says_so_in_its_options(tmp_path, capsys, monkeypatch):
    import medquant.cli.prune
    from tests.cli.tiny_folder import tiny_llama_folder

    def no_work(*a, **k):
        raise AssertionError("the model was loaded before the texts were counted")

    src = tiny_llama_folder(tmp_path / "src")
    text = tmp_path / "t.txt"
    text.write_text("\n".join(REPORTS[:3]))
    monkeypatch.setattr(medquant.cli.prune, "_load", no_work)
    # 3 texts: 16 (the default --calib-samples) calibrate, none is left for a training batch of --batch 2 texts
    assert main(["pipeline", str(src), "--out", str(tmp_path / "out"), "--text", str(text), "--batch", "2"]) == 2
    err = capsys.readouterr().err
    assert "3 texts" in err and "--calib-samples 16" in err and "--batch 2" in err
    assert not (tmp_path / "out").exists()


def test_cli_pipeline_seed_makes_training_with_dropout_repeatable(tmp_path):
    from tests.cli.tiny_folder import report_text_file, tiny_llama_folder

    src = tiny_llama_folder(tmp_path / "src")
    cfg = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**cfg, "attention_dropout": 0.5}))  # training draws random masks
    text = report_text_file(tmp_path)

    def run(name: str, seed: int) -> dict[str, torch.Tensor]:
        torch.manual_seed(ord(name))  # whatever the caller's generator holds must not matter
        out = tmp_path / name
        assert main(["pipeline", str(src), "--out", str(out), "--heads", "0", "--ffn", "0", "--train", "finetune",
                     "--steps", "2", "--batch", "2", "--lr", "0.01", "--quant", "none", "--text", str(text),
                     "--calib-samples", "4", "--max-length", "16", "--seed", str(seed)]) == 0
        assert json.loads((out / "pipeline_report.json").read_text())["settings"]["seed"] == seed
        return load_compressed(out).state_dict()

    a, b, c = run("a", 3), run("b", 3), run("c", 4)
    assert a.keys() == b.keys() == c.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)  # the seed decides the dropout masks, so the weights
