"""KD of a multi-label classifier (C independent sigmoid outputs, ``BCEWithLogitsLoss``: a chest X-ray model with one
logit per finding). A softmax over the C findings treats them as mutually exclusive classes: it is not the model's
distribution. The model's distribution is the product of C Bernoullis, whose KL is the sum of the per-label
Bernoulli KLs; the reference is ``torch.distributions``' own Bernoulli KL."""
from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.distributions import Bernoulli, kl_divergence

from medquant.distill import Distiller, kd_loss


def _reference(s: torch.Tensor, t: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 * mean over examples of sum over labels KL(Bern(sigmoid(t/T)) || Bern(sigmoid(s/T)))."""
    kl = kl_divergence(Bernoulli(logits=t / temperature), Bernoulli(logits=s / temperature))
    return temperature ** 2 * kl.sum(-1).mean()


@pytest.mark.parametrize("temperature", [1.0, 3.0])
def test_kd_loss_multi_label_is_the_sum_of_bernoulli_kls(temperature):
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(5, 14, generator=g) * 2, torch.randn(5, 14, generator=g) * 2
    want = _reference(s, t, temperature)
    torch.testing.assert_close(kd_loss(s, t, temperature, multi_label=True), want)
    # the softmax KL over the 14 labels is another number: the default treats them as exclusive classes
    assert not torch.allclose(kd_loss(s, t, temperature), want)
    # one label: the same as the (B, 1) Bernoulli KL the default already gives
    torch.testing.assert_close(kd_loss(s[:, :1], t[:, :1], temperature, multi_label=True),
                               kd_loss(s[:, :1], t[:, :1], temperature))


def test_kd_loss_multi_label_masks_positions_and_refuses_a_non_bool():
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(2, 4, 3, generator=g), torch.randn(2, 4, 3, generator=g)
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])
    keep = mask.bool()
    torch.testing.assert_close(kd_loss(s, t, 2.0, mask, multi_label=True), _reference(s[keep], t[keep], 2.0))
    with pytest.raises(TypeError, match="multi_label"):
        kd_loss(s, t, 2.0, multi_label="yes")


def _vit(problem_type: str | None):
    from transformers import ViTConfig, ViTForImageClassification

    cfg = ViTConfig(image_size=16, patch_size=8, num_channels=1, hidden_size=16, num_hidden_layers=1,
                    num_attention_heads=2, intermediate_size=32, num_labels=5, problem_type=problem_type)
    return ViTForImageClassification(cfg)


def test_distiller_reads_multi_label_from_the_config_and_can_be_told():
    torch.manual_seed(0)
    teacher, student = _vit("multi_label_classification"), _vit("multi_label_classification")
    g = torch.Generator().manual_seed(2)
    batch = {"pixel_values": torch.randn(3, 1, 16, 16, generator=g),
             "labels": (torch.rand(3, 5, generator=g) > 0.5).float()}
    with torch.no_grad():
        s_logits, t_logits = student(batch["pixel_values"]).logits, teacher(batch["pixel_values"]).logits
    d = Distiller(teacher, student, alpha=1.0, temperature=2.0)
    assert d.multi_label
    with torch.no_grad():
        torch.testing.assert_close(d(batch)["kd"], _reference(s_logits, t_logits, 2.0))
    # told otherwise: the softmax KL over the labels
    d = Distiller(teacher, student, alpha=1.0, temperature=2.0, multi_label=False)
    with torch.no_grad():
        torch.testing.assert_close(d(batch)["kd"], kd_loss(s_logits, t_logits, 2.0))
    # a single-label classifier keeps the softmax
    assert not Distiller(_vit("single_label_classification"), _vit(None), alpha=1.0).multi_label
    with pytest.raises(TypeError, match="multi_label"):
        Distiller(teacher, student, multi_label=1)
    # a plain module has no config: softmax unless told
    assert not Distiller(nn.Linear(3, 2), nn.Linear(3, 2), alpha=1.0).multi_label
