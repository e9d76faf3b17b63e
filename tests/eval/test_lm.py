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


class _LeftTok(_Tok):
    """The same tokenizer padding on the left, as Llama and Gemma tokenizers do by default."""

    padding_side = "left"

    def __call__(self, texts, return_tensors="pt", padding=True, truncation=True, max_length=128):
        b = super().__call__(texts, return_tensors, padding, truncation, max_length)
        n = b["attention_mask"].sum(1)
        width = b["input_ids"].shape[1]
        ids = torch.stack([torch.roll(r, int(width - k)) for r, k in zip(b["input_ids"], n)])
        mask = torch.stack([torch.roll(r, int(width - k)) for r, k in zip(b["attention_mask"], n)])
        return {"input_ids": ids, "attention_mask": mask}


def _one_by_one_nll(model, texts):
    """Each text alone (no padding at all), through transformers' own model call: summed NLL and token count."""
    nll, n = 0.0, 0
    with torch.no_grad():
        for t in texts:
            ids = _Tok()([t])["input_ids"]
            logp = torch.log_softmax(model(input_ids=ids).logits.double(), -1)[0]
            for pos in range(ids.shape[1] - 1):
                nll -= float(logp[pos, ids[0, pos + 1]])
                n += 1
    return nll, n


def test_perplexity_of_left_padded_batches_equals_one_by_one_and_the_hand_count():
    model = ZOO_BY_NAME["llama"].build().eval()
    nll, n = _one_by_one_nll(model, TEXTS)
    assert n == sum(len(t.split()) - 1 for t in TEXTS)
    expected = math.exp(nll / n)
    left = [{k: v for k, v in b.items()} for b in token_batches(_LeftTok(), TEXTS, batch_size=5)]
    # the helper pads on the right whatever the tokenizer's side; batches padded on the left by hand are also exact
    assert perplexity(model, token_batches(_LeftTok(), TEXTS, batch_size=5)) == pytest.approx(expected, rel=1e-5)
    hand_left = [_LeftTok()(TEXTS[:3]), _LeftTok()(TEXTS[3:])]
    assert hand_left[0]["attention_mask"][1, 0] == 0  # really padded on the left
    assert perplexity(model, hand_left) == pytest.approx(expected, rel=1e-5)
    assert perplexity(model, [_LeftTok()([t]) for t in TEXTS]) == pytest.approx(expected, rel=1e-5)
    assert left[0]["attention_mask"][:, 0].all()


def test_token_batches_pads_on_the_right_for_a_left_padding_transformers_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = sorted({w for t in TEXTS for w in t.split()})
    tk = Tokenizer(models.WordLevel({"<pad>": 0, "<unk>": 1, **{w: 2 + i for i, w in enumerate(words)}}, "<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", unk_token="<unk>", padding_side="left")
    texts = [TEXTS[0], TEXTS[1], TEXTS[3]]
    b = token_batches(tok, texts, batch_size=3)[0]
    assert b["attention_mask"].tolist() == [[1] * 6, [1] * 3 + [0] * 3, [1] * 2 + [0] * 4]
    assert b["input_ids"][1, :3].tolist() == tok(["no pleural effusion"])["input_ids"][0]
    assert tok.padding_side == "left"  # the tokenizer is left as it was
    model = ZOO_BY_NAME["llama"].build().eval()
    one = [token_batches(tok, [t])[0] for t in texts]
    assert perplexity(model, [b]) == pytest.approx(perplexity(model, one), rel=1e-5)


def _plain_torch_perplexity(model, input_ids):
    """exp of torch's mean cross-entropy of every next token, the model called on ``input_ids`` alone."""
    with torch.no_grad():
        logits = model(input_ids=input_ids).logits[:, :-1].double()
    nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), input_ids[:, 1:].reshape(-1))
    return math.exp(float(nll))


def test_perplexity_of_batches_without_attention_mask_counts_every_token():
    model = ZOO_BY_NAME["llama"].build().eval()  # LlamaForCausalLM from a tiny LlamaConfig
    g = torch.Generator().manual_seed(0)
    ids = [torch.randint(4, 200, (2, 7), generator=g), torch.randint(4, 200, (3, 5), generator=g)]
    # the reference: every batch's tokens, token-weighted (6 predicted tokens per row of the first, 4 of the second)
    nll = sum(math.log(_plain_torch_perplexity(model, x)) * x.shape[0] * (x.shape[1] - 1) for x in ids)
    expected = math.exp(nll / (2 * 6 + 3 * 4))
    assert perplexity(model, [{"input_ids": ids[0]}]) == pytest.approx(_plain_torch_perplexity(model, ids[0]),
                                                                       rel=1e-5)
    no_mask = perplexity(model, [{"input_ids": x} for x in ids])
    assert no_mask == pytest.approx(expected, rel=1e-5)
    ones = perplexity(model, [{"input_ids": x, "attention_mask": torch.ones_like(x)} for x in ids])
    assert no_mask == pytest.approx(ones, rel=1e-6)


def test_perplexity_refuses_malformed_batches_with_a_clear_error():
    model = ZOO_BY_NAME["llama"].build().eval()
    ids = torch.tensor([[5, 6, 7, 8]])
    with pytest.raises(ValueError, match="batch 0 has no 'input_ids'"):
        perplexity(model, [{"attention_mask": torch.ones_like(ids)}])
    with pytest.raises(ValueError, match=r"batch 1: attention_mask.*\(1, 3\).*input_ids.*\(1, 4\)"):
        perplexity(model, [{"input_ids": ids},
                           {"input_ids": ids, "attention_mask": torch.ones(1, 3, dtype=torch.long)}])
    with pytest.raises(ValueError, match=r"labels.*\(1, 5\).*input_ids.*\(1, 4\)"):
        perplexity(model, [{"input_ids": ids, "labels": torch.ones(1, 5, dtype=torch.long)}])
    with pytest.raises(ValueError, match=r"input_ids.*\(rows, positions\)"):
        perplexity(model, [{"input_ids": ids[0]}])
    with pytest.raises(TypeError, match="batch 0 is a Tensor, not a dict"):
        perplexity(model, [ids])
    with pytest.raises(TypeError, match=r"\[batch\]"):  # one batch, not a list of batches: iterating gives its keys
        perplexity(model, {"input_ids": ids})
    # labels of the right shape are passed on to the model and do not change the score
    assert perplexity(model, [{"input_ids": ids, "labels": ids}]) == pytest.approx(
        _plain_torch_perplexity(model, ids), rel=1e-5)
