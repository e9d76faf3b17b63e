"""Review (s2023): KD of a classifier with one logit per example (a sigmoid / BCEWithLogitsLoss binary model).

A softmax over one class is 1 whatever the logit, so the softmax KL of (B, 1) logits is 0 for every teacher and
student: the KD term taught nothing. One logit ``z`` is the two-class distribution ``(1 - sigmoid(z), sigmoid(z))``
(the two-class softmax of ``(0, z)``); the reference here is that Bernoulli KL, written with plain torch."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from medquant.distill import Distiller, kd_loss


def _bernoulli_kd(s: torch.Tensor, t: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 * mean KL(Bern(sigmoid(t/T)) || Bern(sigmoid(s/T))), by hand."""
    pt, ps = torch.sigmoid(t / temperature), torch.sigmoid(s / temperature)
    kl = pt * (pt.log() - ps.log()) + (1 - pt) * ((1 - pt).log() - (1 - ps).log())
    return temperature ** 2 * kl.mean()


def _kl_div_reference(s: torch.Tensor, t: torch.Tensor, temperature: float) -> torch.Tensor:
    """The same through F.kl_div on the two log-probabilities (logsigmoid(-z), logsigmoid(z))."""
    def two(z):
        return torch.stack([F.logsigmoid(-z / temperature), F.logsigmoid(z / temperature)], -1).reshape(-1, 2)
    return temperature ** 2 * F.kl_div(two(s), two(t), log_target=True, reduction="batchmean")


@pytest.mark.parametrize("temperature", [1.0, 2.0, 4.0])
def test_kd_loss_of_one_logit_per_example_is_the_bernoulli_kl(temperature):
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(6, 1, generator=g) * 3, torch.randn(6, 1, generator=g) * 3
    want = _bernoulli_kd(s, t, temperature)
    assert want > 1e-3  # the teacher and student differ: a KD term of 0 would be wrong
    torch.testing.assert_close(_kl_div_reference(s, t, temperature), want)
    torch.testing.assert_close(kd_loss(s, t, temperature), want)


def test_kd_loss_of_one_logit_per_token_is_masked_per_position():
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(2, 5, 1, generator=g), torch.randn(2, 5, 1, generator=g)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    keep = mask.bool()
    torch.testing.assert_close(kd_loss(s, t, 2.0, mask), _bernoulli_kd(s[keep], t[keep], 2.0))


def test_one_logit_per_example_equals_the_two_class_logits_zero_and_z():
    g = torch.Generator().manual_seed(2)
    s, t = torch.randn(4, 1, generator=g), torch.randn(4, 1, generator=g)
    two = kd_loss(torch.cat([torch.zeros_like(s), s], -1), torch.cat([torch.zeros_like(t), t], -1), 3.0)
    torch.testing.assert_close(kd_loss(s, t, 3.0), two)


class Binary(nn.Module):  # one logit per image, (B, 1), or squeezed to (B,) as BCEWithLogitsLoss takes it
    def __init__(self, seed, squeeze=False):
        super().__init__()
        torch.manual_seed(seed)
        self.lin = nn.Linear(8, 1)
        self.squeeze = squeeze

    def forward(self, x):
        z = self.lin(x)
        return z.squeeze(-1) if self.squeeze else z


def test_the_distiller_of_a_binary_classifier_distils_and_trains_the_student():
    teacher, student = Binary(0), Binary(1)
    x = torch.randn(5, 8, generator=torch.Generator().manual_seed(3))
    d = Distiller(teacher, student, alpha=1.0, temperature=2.0)
    out = d(x)
    with torch.no_grad():
        want = _bernoulli_kd(student(x).reshape(-1, 1), teacher(x).reshape(-1, 1), 2.0)
    torch.testing.assert_close(out["kd"], want)
    out["loss"].backward()
    assert student.lin.weight.grad is not None and student.lin.weight.grad.abs().sum() > 0
    losses = d.fit([x] * 20, lr=0.05, progress=False)
    assert losses[-1] < losses[0]


def test_the_distiller_refuses_1d_logits_instead_of_a_softmax_over_the_batch():
    # (B,) logits: one binary logit per example, or one example's class logits; softmaxed over the batch before
    teacher, student = Binary(0, squeeze=True), Binary(1, squeeze=True)
    x = torch.randn(5, 8, generator=torch.Generator().manual_seed(3))
    with pytest.raises(ValueError, match=r"1-D.*\(B, 1\)"):
        Distiller(teacher, student, alpha=1.0)(x)
