"""medquant.eval.perplexity / token_batches against a hand computation on a tiny causal LM."""
from __future__ import annotations

import math

import pytest
import torch

from medquant.eval import perplexity, token_batches
from medquant.testing.zoo import ZOO_BY_NAME


class _Tok:
    """Whitespace tokenizer over a fixed vocabulary, right padding with id 0 (the transformers call shape)."""

    def __call__(self, texts, return_tensors="pt", padding=True, truncation=True, max_length=128):
        ids = [[4 + (sum(map(ord, w)) % 190) for w in t.split()][:max_length] for t in texts]
        width = max(len(r) for r in ids)
        return {"input_ids": torch.tensor([r + [0] * (width - len(r)) for r in ids]),
                "attention_mask": torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in ids])}


TEXTS = ["the heart is normal in size", "no pleural effusion", "mild cardiomegaly with clear lungs today",
         "lungs clear", "no acute disease of the chest is seen here"]


def test_token_batches_order_padding_and_drop_last():
    tok = _Tok()
    b = token_batches(tok, TEXTS, batch_size=2, max_length=5)
    assert [x["input_ids"].shape[0] for x in b] == [2, 2, 1]
    assert b[0]["input_ids"].shape[1] == 5 and b[0]["attention_mask"][1].tolist() == [1, 1, 1, 0, 0]
    assert len(token_batches(tok, TEXTS, batch_size=2, drop_last=True)) == 2
    with pytest.raises(ValueError, match="batch_size"):
        token_batches(tok, TEXTS, batch_size=0)


def test_perplexity_is_the_token_weighted_exp_of_the_mean_nll():
    entry = ZOO_BY_NAME["llama"]
    model = entry.build().eval()
    batches = token_batches(_Tok(), TEXTS, batch_size=2)
    nll, n = 0.0, 0
    with torch.no_grad():
        for b in batches:
            logp = torch.log_softmax(model(**b).logits.double(), -1)
            for r in range(b["input_ids"].shape[0]):
                for t in range(b["input_ids"].shape[1] - 1):
                    if b["attention_mask"][r, t + 1]:
                        nll -= float(logp[r, t, b["input_ids"][r, t + 1]])
                        n += 1
    assert perplexity(model, batches) == pytest.approx(math.exp(nll / n), rel=1e-5)
    # batching does not change it (the sum runs over every token before the division)
    assert perplexity(model, token_batches(_Tok(), TEXTS, batch_size=5)) == pytest.approx(math.exp(nll / n), rel=1e-5)


def test_perplexity_of_a_plain_module_returning_logits_and_empty_input():
    class Uniform(torch.nn.Module):
        def forward(self, input_ids, attention_mask):
            return torch.zeros(*input_ids.shape, 10)

    b = [{"input_ids": torch.tensor([[1, 2, 3]]), "attention_mask": torch.tensor([[1, 1, 1]])}]
    assert perplexity(Uniform(), b) == pytest.approx(10.0)
    with pytest.raises(ValueError, match="no tokens"):
        perplexity(Uniform(), [{"input_ids": torch.tensor([[1]]), "attention_mask": torch.tensor([[1]])}])
