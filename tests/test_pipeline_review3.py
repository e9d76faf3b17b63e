"""Review round 3 of :func:`medquant.pipeline.compress`: what the training stage needs is refused before the prune
stage changes the model (the promise of ``compress``'s docstring), checked against a copy of the model taken before
the call; the distillation loss of the pipeline against a hand computation in plain torch."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from medquant.pipeline import PruneStage, TrainStage, compress
from medquant.testing.zoo import ZOO_BY_NAME


def _outputs(model, inputs) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(**inputs).logits


def _assert_unchanged(model, reference, inputs) -> None:
    got = dict(model.named_parameters())
    want = dict(reference.named_parameters())
    assert got.keys() == want.keys()
    for k, v in want.items():
        assert got[k].shape == v.shape and torch.equal(got[k], v), k
    assert torch.equal(_outputs(model, inputs), _outputs(reference, inputs))


def _four_d_mask_batch(inputs) -> dict[str, torch.Tensor]:
    """A batch with a 4-D (per query, per key) causal attention mask, as packed-sequence training uses: the model and
    its ``.loss`` take it, the distillation term of token logits (a mask per position) does not."""
    ids = inputs["input_ids"]
    b, s = ids.shape
    mask = torch.tril(torch.ones(s, s, dtype=torch.bool)).expand(b, 1, s, s).clone()
    return {"input_ids": ids, "attention_mask": mask, "labels": ids}


def test_a_distillation_term_that_cannot_be_computed_is_refused_before_the_prune_stage():
    e = ZOO_BY_NAME["llama"]
    model = e.build()
    inputs = e.inputs(model)
    batch = _four_d_mask_batch(inputs)
    with torch.no_grad():
        assert torch.isfinite(model(**batch).loss)  # the task loss alone is fine: only the KD term fails
    reference = copy.deepcopy(model)
    with pytest.raises(ValueError, match="training stage cannot compute its loss.*mask shape"):
        compress(model, calib=[inputs], train_data=[batch], prune=PruneStage(0.25, 0.3, importance="magnitude"),
                 train=TrainStage("distil", steps=1, alpha=0.5), progress=False)
    _assert_unchanged(model, reference, inputs)


@pytest.mark.parametrize("train", [TrainStage("finetune", steps=1),
                                   TrainStage("distil", steps=1, feature_pairs=[(1, 1)])])
def test_a_model_with_no_trainable_parameter_is_refused_before_the_prune_stage(train):
    # finetune failed only after pruning ("the student has no trainable parameters"); distil with feature pairs
    # trained the projections alone and saved a pruned student that no step had changed
    e = ZOO_BY_NAME["llama"]
    model = e.build().requires_grad_(False)
    inputs = e.inputs(model)
    reference = copy.deepcopy(model)
    with pytest.raises(ValueError, match="no parameter that requires grad"):
        compress(model, calib=[inputs], train_data=[inputs], prune=PruneStage(0.25, 0.3, importance="magnitude"),
                 train=train, progress=False)
    _assert_unchanged(model, reference, inputs)


def test_a_partly_frozen_model_still_trains_its_trainable_part():
    # the refusal above is for a model with nothing to train, not for a frozen embedding
    e = ZOO_BY_NAME["llama"]
    model = e.build()
    model.model.embed_tokens.requires_grad_(False)
    inputs = e.inputs(model)
    emb = model.model.embed_tokens.weight.clone()
    head = model.lm_head.weight.clone()
    res = compress(model, train_data=[inputs], train=TrainStage("finetune", steps=1, lr=1e-2), progress=False)
    assert len(res.train_losses) == 1
    assert torch.equal(model.model.embed_tokens.weight, emb)
    assert not torch.equal(model.lm_head.weight, head)


def test_the_first_distillation_loss_is_the_hand_computed_one_with_padding():
    # the first step's loss is computed before any update: alpha * T^2 * KD + (1 - alpha) * CE with the teacher the
    # model before pruning, the student the pruned model, padding (attention_mask 0) left out of both terms
    from medquant.prune import StructuredPruner

    e = ZOO_BY_NAME["llama"]
    model = e.build()
    inputs = e.inputs(model)
    mask = inputs["attention_mask"].clone()
    mask[1, -4:] = 0
    ids = inputs["input_ids"]
    labels = ids.masked_fill(mask == 0, -100)
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    teacher = copy.deepcopy(model)
    student = copy.deepcopy(model)
    StructuredPruner(0.25, 0.3, importance="magnitude", progress=False).prune(student)
    alpha, T = 0.3, 3.0
    with torch.no_grad():
        zt, zs = teacher(**batch).logits.float(), student(**batch).logits.float()
        kl = (F.softmax(zt / T, -1) * (F.log_softmax(zt / T, -1) - F.log_softmax(zs / T, -1))).sum(-1)
        m = mask.float()
        kd = T * T * (kl * m).sum() / m.sum()
        ce = F.cross_entropy(zs[:, :-1].reshape(-1, zs.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100)
        want = alpha * kd + (1 - alpha) * ce
    res = compress(model, train_data=[batch], prune=PruneStage(0.25, 0.3, importance="magnitude"),
                   train=TrainStage("distil", steps=1, alpha=alpha, temperature=T), progress=False)
    assert res.train_losses[0] == pytest.approx(float(want), rel=1e-5)
