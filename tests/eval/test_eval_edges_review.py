"""Review of medquant.eval edge cases: predictions' shapes, huge float labels, perplexity's device and weighting."""
from __future__ import annotations

import math
from typing import ClassVar

import numpy as np
import pytest
import torch

from medquant.eval import fairness_report, perplexity, predictions
from medquant.testing.zoo import ZOO_BY_NAME

# ------------------------------------------------------------------------------------------------ predictions


def test_multilabel_predictions_need_a_2d_matrix():
    z = np.array([0.3, -1.2, 2.0])
    with pytest.raises(ValueError, match=r"multilabel.*\(N, L\).*got \(3,\).*task='binary'"):  # was: (N,) 0/1
        predictions(z, task="multilabel")
    with pytest.raises(ValueError, match=r"\(N, L\).*got \(2, 3, 4\)"):  # was: a (2, 3, 4) "label matrix"
        predictions(np.zeros((2, 3, 4)), task="multilabel")
    with pytest.raises(ValueError, match=r"\(N, L\).*L >= 1.*got \(4, 0\)"):
        predictions(np.zeros((4, 0)), task="multilabel")
    with pytest.raises(ValueError, match=r"\(N, L\)"):
        predictions(np.float64(0.5), task="multilabel")
    # the suggested alternative is right: binary (N,) scores are thresholded per sample, as sklearn's binary labels
    assert predictions(z, task="binary").tolist() == [1, 0, 1]


def test_valid_shapes_against_plain_torch():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(7, 4, generator=g)
    np.testing.assert_array_equal(predictions(z, "multilabel"), (torch.sigmoid(z) > 0.5).long().numpy())
    np.testing.assert_array_equal(predictions(torch.sigmoid(z), "multilabel", scores="probabilities"),
                                  (torch.sigmoid(z) > 0.5).long().numpy())
    np.testing.assert_array_equal(predictions(z[:, :1], "multilabel"), (z[:, :1] > 0).long().numpy())  # one label
    np.testing.assert_array_equal(predictions(z), z.argmax(-1).numpy())
    np.testing.assert_array_equal(predictions(z[:, :2], "binary"), z[:, :2].argmax(-1).numpy())
    np.testing.assert_array_equal(predictions(z[:, 0], "binary"), (z[:, 0] > 0).long().numpy())
    assert predictions(np.zeros((0, 3)), "multilabel").shape == (0, 3)  # no samples: an empty matrix
    for task in ("binary", "multiclass"):  # argmax tasks refuse 3-D scores (torch would argmax the last axis)
        with pytest.raises(ValueError, match=r"\(N, C\)"):
            predictions(np.zeros((2, 3, 2)), task)
        with pytest.raises(ValueError, match=r"\(N, C\)"):
            predictions(np.float64(0.5), task)


# ------------------------------------------------------------------------------------------------ label checks


@pytest.mark.parametrize("bad", [1e20, -1e20, float(2**63)])
def test_a_huge_float_label_is_named_as_such_not_as_a_negative_label(bad):
    with pytest.raises(ValueError) as e:  # was: "holds the negative label -9223372036854775808"
        fairness_report([0.0, bad, 1.0], [0, 1, 1], [0, 0, 1])
    msg = str(e.value)
    assert "negative label" not in msg and "-9223372036854775808" not in msg, msg
    assert "y_true" in msg and "class" in msg and "range" in msg, msg
    assert f"{bad:g}" in msg, msg


def test_a_uint64_label_past_int64_is_refused_with_its_value():
    big = np.array([0, 2**64 - 1, 1], dtype=np.uint64)  # wrapped to -1 before
    with pytest.raises(ValueError, match=r"y_pred.*18446744073709551615.*range") as e:
        fairness_report([0, 1, 1], big, [0, 0, 1])
    assert "negative" not in str(e.value)
    # really negative labels keep their message
    with pytest.raises(ValueError, match="negative label -1"):
        fairness_report([0, -1, 1], [0, 1, 1], [0, 0, 1])
    # integer-valued floats in range are still class ids
    assert fairness_report([0.0, 1.0, 1.0], [0, 1, 1], [0, 0, 1]).classes == [1]


# ------------------------------------------------------------------------------------------------ perplexity


class _Elsewhere(torch.Tensor):
    """A CPU tensor standing in for one on another device than the model: only ``.to(device)`` brings it home
    (returns a plain tensor), and every other op keeps the subclass, as a real off-device tensor stays off-device."""

    moved_to: ClassVar[list] = []

    def to(self, *args, **kwargs):  # type: ignore[override]
        _Elsewhere.moved_to.append(args[0] if args else kwargs.get("device"))
        return torch.Tensor.to(self.as_subclass(torch.Tensor), *args, **kwargs)


class _DeviceStrict(torch.nn.Module):
    """A tiny causal LM (embedding -> logits) that refuses inputs that are not on its device."""

    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(12, 12)

    def get_input_embeddings(self):
        return self.emb

    def forward(self, input_ids, attention_mask=None):
        for x in (input_ids, attention_mask):
            if x is not None and (type(x) is not torch.Tensor or x.device != self.emb.weight.device):
                raise RuntimeError("Expected all tensors to be on the same device")
        return self.emb(input_ids)


def test_perplexity_moves_each_batch_to_the_models_device():
    """Indirect on CPU (no second device here): the batch tensors are a subclass that only ``.to(device)`` turns
    into a plain tensor; the model refuses anything else. The CUDA test below checks the real move."""
    torch.manual_seed(0)
    model = _DeviceStrict()
    ids = torch.tensor([[1, 5, 7, 2], [3, 4, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    plain = perplexity(model, [{"input_ids": ids, "attention_mask": mask}])
    # reference: plain torch, token-weighted CE of the 4 predicted tokens
    logp = torch.log_softmax(model.emb.weight.detach().double()[ids[:, :-1]], -1)
    tgt = [(0, 0), (0, 1), (0, 2), (1, 0)]
    ref = math.exp(-sum(float(logp[r, t, ids[r, t + 1]]) for r, t in tgt) / len(tgt))
    assert plain == pytest.approx(ref, rel=1e-6)
    _Elsewhere.moved_to.clear()
    far = [{"input_ids": ids.as_subclass(_Elsewhere), "attention_mask": mask.as_subclass(_Elsewhere)}]
    assert perplexity(model, far) == pytest.approx(plain, rel=1e-12)  # was: RuntimeError (not moved)
    assert len(_Elsewhere.moved_to) == 2 and all(torch.device(d) == model.emb.weight.device
                                                  for d in _Elsewhere.moved_to)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_perplexity_of_a_cuda_model_on_cpu_batches():  # pragma: no cover - GPU only
    model = ZOO_BY_NAME["llama"].build().eval()
    ids = torch.randint(4, 200, (2, 9), generator=torch.Generator().manual_seed(3))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    cpu = perplexity(model, [batch])
    assert perplexity(model.cuda(), [batch]) == pytest.approx(cpu, rel=1e-4)


def test_perplexity_is_token_weighted_as_transformers_labels_loss_over_padded_batches():
    """Reference: transformers' own ``labels=`` loss (padding as -100), per text alone and per padded batch,
    combined by the number of predicted tokens; the batch-averaged mean differs and is not what is returned."""
    model = ZOO_BY_NAME["llama"].build().eval()
    with torch.no_grad():  # sharper logits: the per-text losses differ (a random init is near uniform)
        model.get_output_embeddings().weight.mul_(4.0)
    g = torch.Generator().manual_seed(5)
    lengths = [9, 2, 6, 7, 5]
    texts = [torch.randint(4, 200, (n,), generator=g) for n in lengths]

    def padded(rows, left=False):
        width = max(len(r) for r in rows)
        ids = torch.zeros(len(rows), width, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, r in enumerate(rows):
            sl = slice(width - len(r), width) if left else slice(0, len(r))
            ids[i, sl], mask[i, sl] = r, 1
        return {"input_ids": ids, "attention_mask": mask}

    with torch.no_grad():
        alone = [float(model(input_ids=t[None], labels=t[None]).loss) for t in texts]
        weights = [n - 1 for n in lengths]
        ref = math.exp(sum(loss * w for loss, w in zip(alone, weights)) / sum(weights))
        batches = [padded(texts[:2]), padded(texts[2:])]  # 9 and 16 predicted tokens
        per_batch = []
        for b in batches:
            labels = b["input_ids"].masked_fill(b["attention_mask"] == 0, -100)
            per_batch.append((float(model(**b, labels=labels).loss), int((labels[:, 1:] != -100).sum())))
    batched_ref = math.exp(sum(loss * n for loss, n in per_batch) / sum(n for _, n in per_batch))
    assert batched_ref == pytest.approx(ref, rel=1e-5)
    assert perplexity(model, batches) == pytest.approx(ref, rel=1e-5)
    assert perplexity(model, [padded(texts[:2], left=True), padded(texts[2:], left=True)]) == pytest.approx(
        ref, rel=1e-5)
    batch_averaged = math.exp(sum(loss for loss, _ in per_batch) / len(per_batch))
    assert abs(batch_averaged - ref) > 1e-3 * ref  # the weighting matters on these batches
