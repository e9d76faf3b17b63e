"""``text_metrics`` promises every score in [0, 1]; identical texts gave a BERTScore F1 of ``1.0000001`` (float32
rounding of a cosine similarity of 1), above the range, while ``bleu4`` already clamps sacrebleu's own rounding."""
from __future__ import annotations

import pytest

pytest.importorskip("bert_score")

from medquant.eval.text import bertscore_f1, minilm_path


def test_bertscore_of_identical_texts_is_at_most_one():
    try:
        minilm_path()
    except (ModuleNotFoundError, FileNotFoundError):
        pytest.skip("no local MiniLM encoder")
    texts = ["héllo wörld", "the heart is normal in size", "no pleural effusion or pneumothorax"]
    got = bertscore_f1(texts, texts, per_pair=True)
    assert all(0.0 <= v <= 1.0 for v in got), got
    assert got == pytest.approx([1.0] * 3, abs=1e-5)
    assert 0.0 <= bertscore_f1(texts, texts) <= 1.0


def test_bertscore_default_layer_of_an_encoder_that_names_its_depth_otherwise(tmp_path):
    """The default layer (the encoder's last) was read as ``config.json["num_hidden_layers"]``: a DistilBERT folder
    (bert_score's own default family for many languages), whose config says ``n_layers``, raised ``KeyError``. The
    reference is the same call with its depth given explicitly."""
    from transformers import AutoTokenizer, DistilBertConfig, DistilBertModel

    try:
        tok = AutoTokenizer.from_pretrained(str(minilm_path()))
    except (ModuleNotFoundError, FileNotFoundError):
        pytest.skip("no local MiniLM encoder (its tokenizer is reused)")
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    DistilBertModel(DistilBertConfig(vocab_size=tok.vocab_size, dim=32, hidden_dim=64, n_layers=2,
                                     n_heads=2)).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    hyps, refs = ["the heart is normal", "small effusion"], ["heart size normal", "no effusion"]
    want = bertscore_f1(hyps, refs, model_path=tmp_path, num_layers=2, per_pair=True)
    assert bertscore_f1(hyps, refs, model_path=tmp_path, per_pair=True) == pytest.approx(want, abs=1e-6)
