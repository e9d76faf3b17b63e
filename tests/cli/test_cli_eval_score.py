"""``medquant eval`` with a left-padding tokenizer, argument errors of ``eval`` / ``score`` that name the
argument, and ``python -m medquant``."""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from medquant.cli import main

TEXTS = ["the heart is normal in size", "no pleural effusion", "mild cardiomegaly with clear lungs today",
         "lungs clear"]


@pytest.fixture(scope="module")
def left_padding_llama(tmp_path_factory):
    """The zoo's tiny Llama with a word-level tokenizer that pads on the left (the Llama tokenizers' default)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from medquant.testing.zoo import ZOO_BY_NAME

    path = tmp_path_factory.mktemp("llama_left")
    words = sorted({w for t in TEXTS for w in t.split()})
    vocab = {"<pad>": 0, "</s>": 1, "<s>": 2, "<unk>": 3, **{w: 4 + i for i, w in enumerate(words)}}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="</s>", bos_token="<s>",
                                  unk_token="<unk>", padding_side="left")
    model = ZOO_BY_NAME["llama"].build().eval()
    model.save_pretrained(path)
    tok.save_pretrained(path)
    (path / "texts.txt").write_text("\n".join(TEXTS) + "\n", encoding="utf-8")
    return path, model, tok


def test_eval_perplexity_does_not_depend_on_the_batch_size_with_left_padding(left_padding_llama, capsys):
    path, model, tok = left_padding_llama
    got = {}
    for b in ("1", "4"):
        assert main(["eval", str(path), "--text", str(path / "texts.txt"), "--batch-size", b, "--json"]) == 0
        got[b] = json.loads(capsys.readouterr().out)["perplexity"]
    # reference: transformers' model on each text alone (no padding), summed token NLL
    nll, n = 0.0, 0
    with torch.no_grad():
        for t in TEXTS:
            ids = torch.tensor([tok(t)["input_ids"]])
            logp = torch.log_softmax(model(input_ids=ids).logits.double(), -1)[0]
            nll -= float(logp[torch.arange(ids.shape[1] - 1), ids[0, 1:]].sum())
            n += ids.shape[1] - 1
    assert got["1"] == pytest.approx(np.exp(nll / n), rel=1e-5)
    assert got["4"] == pytest.approx(np.exp(nll / n), rel=1e-5)


def test_eval_max_length_below_2_is_an_argument_error(left_padding_llama, capsys):
    path = left_padding_llama[0]
    with pytest.raises(SystemExit) as info:
        main(["eval", str(path), "--text", str(path / "texts.txt"), "--max-length", "1"])
    assert info.value.code == 2
    assert "--max-length: expected an integer >= 2" in capsys.readouterr().err


@pytest.mark.parametrize("weights, shown", [("a,b", "'a,b'"), ("1,2", "2 values"), ("1,1,1,1,-1", "-1"),
                                            ("0,0,0,0,0", "all zero"), ("1,1,nan,1,1", "nan")])
def test_score_weights_error_names_the_option(tmp_path, capsys, monkeypatch, weights, shown):
    import medquant.data

    def no_work(*a, **k):
        raise AssertionError("images were loaded before the arguments were checked")

    monkeypatch.setattr(medquant.data, "load_images", no_work)
    with pytest.raises(SystemExit) as info:
        main(["score", str(tmp_path), "--out", str(tmp_path / "s.csv"), "--weights", weights])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "--weights: expected 5 comma-separated" in err and shown in err, err


def test_score_weights_are_passed_on(tmp_path, capsys):
    np.savez(tmp_path / "x.npz", test_images=np.random.default_rng(0).integers(0, 256, (4, 16, 16), np.uint8))
    assert main(["score", str(tmp_path / "x.npz"), "--out", str(tmp_path / "s.csv"), "--weights", "1,0,0,0,0",
                 "--no-progress"]) == 0
    capsys.readouterr()
    with open(tmp_path / "s.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    entropy = np.array([float(r["entropy"]) for r in rows])
    score = np.array([float(r["score"]) for r in rows])
    np.testing.assert_allclose(score, (entropy - entropy.min()) / (entropy.max() - entropy.min()), atol=1e-5)


def test_score_unknown_split_is_named_with_the_existing_ones(tmp_path, capsys):
    from PIL import Image

    with open(tmp_path / "index.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "split", "label"])
        for i, split in enumerate(("train", "test", "train")):
            Image.fromarray(np.full((8, 8), 40 * i, np.uint8)).save(tmp_path / f"{i}.png")
            w.writerow([f"{i}.png", split, 0])
    for target in (tmp_path, tmp_path / "index.csv"):
        assert main(["score", str(target), "--split", "bogus", "--out", str(tmp_path / "s.csv"),
                     "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert "'bogus'" in err and "test, train" in err, err
    np.savez(tmp_path / "x.npz", test_images=np.zeros((2, 8, 8), np.uint8))
    assert main(["score", str(tmp_path / "x.npz"), "--split", "bogus", "--out", str(tmp_path / "s.csv")]) == 2
    err = capsys.readouterr().err
    assert "'bogus'" in err and "test_images" in err and '"' not in err, err


def test_python_dash_m_medquant_runs_the_console_command():
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-m", "medquant", "--help"], check=False, capture_output=True, text=True,
                         env=env, cwd=root, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("usage: medquant") and "quantize" in out.stdout
    bad = subprocess.run([sys.executable, "-m", "medquant", "score"], check=False, capture_output=True, text=True,
                         env=env, cwd=root, timeout=300)
    assert bad.returncode == 2 and "the following arguments are required" in bad.stderr
