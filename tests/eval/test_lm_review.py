"""Review of medquant.eval.lm.perplexity against independent references (plain torch, transformers' labels loss)."""
from __future__ import annotations

import math

import pytest
import torch

from medquant.eval import perplexity
from medquant.testing.zoo import ZOO_BY_NAME


def _hand_ppl(logits: torch.Tensor, ids: torch.Tensor) -> float:
    """exp of the mean over every predicted token of -log softmax(logits[t])[ids[t + 1]], in float64 / math.exp."""
    logp = torch.log_softmax(logits[:, :-1].double(), -1)
    nll = -logp.gather(-1, ids[:, 1:, None]).mean()
    return math.exp(float(nll))


def test_matches_transformers_labels_loss_on_one_unpadded_sequence():
    model = ZOO_BY_NAME["llama"].build().eval()
    ids = torch.randint(4, 200, (1, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        loss = float(model(input_ids=ids, labels=ids).loss)  # transformers: mean CE of tokens 1..n-1
    assert perplexity(model, [{"input_ids": ids}]) == pytest.approx(math.exp(loss), rel=1e-5)


def test_a_large_mean_nll_is_not_rounded_to_inf():
    """Mean NLL 100 nats (a broken, confidently wrong model): perplexity e^100 ~ 2.7e43 is finite in float64."""
    class ConfidentlyWrong(torch.nn.Module):
        def forward(self, input_ids, attention_mask=None):
            logits = torch.zeros(*input_ids.shape, 2)
            logits[..., 0] = 100.0  # token 0 gets almost all mass; targets are token 1
            return logits

    ids = torch.ones(2, 5, dtype=torch.long)
    expected = _hand_ppl(ConfidentlyWrong()(ids), ids)
    assert math.isfinite(expected) and expected == pytest.approx(math.exp(100.0), rel=1e-6)
    assert perplexity(ConfidentlyWrong(), [{"input_ids": ids}]) == pytest.approx(expected, rel=1e-6)


def test_models_returning_a_tuple_or_a_dict_of_logits():
    """A wrapped / traced model may return ``(logits, ...)``, ``(loss, logits, ...)`` or ``{"logits": ...}``."""
    lm = ZOO_BY_NAME["llama"].build().eval()
    ids = torch.randint(4, 200, (2, 6), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = _hand_ppl(lm(input_ids=ids).logits, ids)

    class AsTuple(torch.nn.Module):
        def forward(self, input_ids, attention_mask=None, labels=None):
            out = lm(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
            return (out.loss, out.logits) if labels is not None else (out.logits,)

    class AsDict(torch.nn.Module):
        def forward(self, input_ids, attention_mask=None):
            return {"logits": lm(input_ids=input_ids, attention_mask=attention_mask).logits}

    assert perplexity(AsTuple(), [{"input_ids": ids}]) == pytest.approx(expected, rel=1e-5)
    assert perplexity(AsTuple(), [{"input_ids": ids, "labels": ids}]) == pytest.approx(expected, rel=1e-5)
    assert perplexity(AsDict(), [{"input_ids": ids}]) == pytest.approx(expected, rel=1e-5)


def test_a_model_left_in_training_mode_is_scored_without_dropout_and_left_as_it_was():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Embedding(50, 16), torch.nn.Dropout(0.5), torch.nn.Linear(16, 50))
    ids = torch.randint(0, 50, (3, 8), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = _hand_ppl(model.eval()(ids), ids)

    class Wrap(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = model

        def forward(self, input_ids):
            return self.net(input_ids)

    w = Wrap().train()
    assert perplexity(w, [{"input_ids": ids}]) == pytest.approx(expected, rel=1e-6)
    assert w.training and model.training  # training mode restored


def test_token_batches_refuses_one_string_for_texts():
    """A bare str is a Sequence[str] of its characters: each character would be scored as a text."""
    from medquant.eval import token_batches

    calls = []

    def tok(texts, **kw):
        calls.append(list(texts))
        n = len(texts)
        return {"input_ids": torch.ones(n, 1, dtype=torch.long), "attention_mask": torch.ones(n, 1, dtype=torch.long)}

    with pytest.raises(TypeError, match=r"\[text\]"):
        token_batches(tok, "no pleural effusion")
    assert calls == []
    assert len(token_batches(tok, ["no pleural effusion"])) == 1


def test_int32_token_ids_are_scored_like_int64():
    """The model takes int32 ids (from numpy / ONNX tokenizers); the cross-entropy target must still work."""
    model = ZOO_BY_NAME["llama"].build().eval()
    ids = torch.tensor([[5, 6, 7, 8, 9], [0, 5, 6, 7, 8]])
    mask = torch.tensor([[1, 1, 1, 1, 1], [0, 1, 1, 1, 1]])
    with torch.no_grad():
        nll = -sum(float(torch.log_softmax(model(input_ids=r).logits.double(), -1)[0, :-1]
                         .gather(-1, r[0, 1:, None]).sum()) for r in (ids[:1], ids[1:, 1:]))
    expected = math.exp(nll / 7)
    assert perplexity(model, [{"input_ids": ids, "attention_mask": mask}]) == pytest.approx(expected, rel=1e-5)
    assert perplexity(model, [{"input_ids": ids.int(), "attention_mask": mask.int()}]) == pytest.approx(
        expected, rel=1e-5)
