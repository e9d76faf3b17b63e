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
