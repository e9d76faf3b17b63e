"""Seed 000's VLM classifier on every zoo VLM, and the image-only variants."""
from __future__ import annotations

import pytest
import torch

from medquant.adaptive import AdaptiveQuantizer, CompactCNN, SmallViT, VLMClassifier
from medquant.testing.zoo import ZOO_BY_NAME, vlm_zoo_params
from tests.adaptive.test_adaptive_fakequant import independent_fq

IMAGE_KW = ("image_grid_thw", "pixel_attention_mask")


@vlm_zoo_params
def test_vlm_classifier_every_zoo_vlm(entry):
    vlm = entry.build()
    inputs = entry.inputs(vlm)
    kw = {k: inputs[k] for k in IMAGE_KW if k in inputs}
    ids = inputs["input_ids"][:, -6:]  # plain text tokens: the "metadata string"
    torch.manual_seed(0)
    clf = VLMClassifier(vlm, n_labels=3, text_layer=1, fuse_dim=16, hidden=16).eval()
    logits = clf(inputs["pixel_values"], input_ids=ids, **kw)
    assert logits.shape == (2, 3) and torch.isfinite(logits).all()

    # text features: hidden state after layer 1 of the language model, masked mean (independent call on each
    # sample alone, unpadded: a padded batch gives every sample the features it has alone)
    lm = clf.vlm.get_submodule(clf._language_name)
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]])
    with torch.no_grad():
        want = torch.stack([lm(input_ids=ids[i:i + 1, :n], output_hidden_states=True).hidden_states[1][0].mean(0)
                            for i, n in ((0, 4), (1, 6))])
        assert torch.allclose(clf.text_features(ids, mask), want, atol=1e-5)
        # the metadata text matters: other tokens, other logits
        other = clf(inputs["pixel_values"], input_ids=(ids + 7) % 200 + 4, **kw)
        assert not torch.allclose(other, logits, atol=1e-6)

    # multi-label BCE training step: only the new projections and head learn (frozen backbone)
    clf.train()
    loss = torch.nn.functional.binary_cross_entropy_with_logits(
        clf(inputs["pixel_values"], input_ids=ids, **kw), torch.tensor([[1.0, 0, 1], [0, 1, 0]]))
    loss.backward()
    assert all(p.grad is None for p in clf.vlm.parameters())
    assert clf.head[0].weight.grad.abs().sum() > 0 and clf.image_proj.weight.grad.abs().sum() > 0

    # adaptive bits at the fused embedding (default site: the head input), one batch with mixed bits
    clf.eval()
    aq = AdaptiveQuantizer(clf, weight_config=None).eval()
    with torch.no_grad():
        out = aq(inputs["pixel_values"], input_ids=ids, levels=torch.tensor([0, 3]), **kw)
        with aq.disabled():  # the reference: the head on the hand-quantized fused embedding
            fused = clf.fused_embedding(inputs["pixel_values"], ids, None, **kw)
            assert torch.allclose(out[0], clf.head(independent_fq(fused[0:1], 2))[0], atol=1e-5)
            assert torch.allclose(out[1], clf.head(fused[1:2])[0], atol=1e-5)
            assert not torch.allclose(out[0], clf.head(fused[0:1])[0], atol=1e-4)


def test_image_features_are_the_pooled_vision_tower_output():
    entry = ZOO_BY_NAME["paligemma"]
    vlm = entry.build()
    inputs = entry.inputs(vlm)
    clf = VLMClassifier(vlm, n_labels=2).eval()
    with torch.no_grad():
        tower = vlm.model.vision_tower(pixel_values=inputs["pixel_values"]).last_hidden_state
        assert torch.allclose(clf.image_features(inputs["pixel_values"]), tower.mean(dim=1), atol=1e-5)


def test_vlm_classifier_errors():
    with pytest.raises(ValueError, match="not a vision-language model"):
        VLMClassifier(ZOO_BY_NAME["vit"].build(), n_labels=2)
    vlm = ZOO_BY_NAME["llava"].build()
    with pytest.raises(ValueError, match="text_layer=5 out of range"):
        VLMClassifier(vlm, n_labels=2, text_layer=5)
    with pytest.raises(ValueError, match="n_labels"):
        VLMClassifier(vlm, n_labels=0)


def test_image_only_variants():
    x = torch.randn(3, 1, 32, 32)
    cnn = CompactCNN(5, in_channels=1, widths=(8, 16)).eval()
    vit = SmallViT(5, image_size=32, patch=8, dim=32, depth=2, heads=4).eval()
    for m in (cnn, vit):
        assert m(x).shape == (3, 5)
        assert m.embed(x).shape[0] == 3
    with pytest.raises(ValueError, match="built for 32x32"):
        vit(torch.randn(1, 1, 16, 16))
    with pytest.raises(ValueError, match="multiple"):
        SmallViT(2, image_size=30, patch=8)


def test_frozen_backbone_stays_in_eval_mode_when_the_classifier_trains():
    entry = ZOO_BY_NAME["llava"]
    vlm = entry.build()
    inputs = entry.inputs(vlm)
    for m in vlm.modules():  # dropout inside the VLM's attention: training mode would draw masks
        for name in ("dropout", "attention_dropout"):
            if isinstance(getattr(m, name, None), float):
                setattr(m, name, 0.5)
    ids = inputs["input_ids"][:, -6:]
    torch.manual_seed(0)
    clf = VLMClassifier(vlm, n_labels=2, fuse_dim=8, hidden=8)
    with torch.no_grad():
        want = clf.eval().fused_embedding(inputs["pixel_values"], ids, None)
        clf.train()
        assert clf.training and clf.head.training and not any(m.training for m in clf.vlm.modules())
        for _ in range(2):  # the frozen VLM's features do not change from call to call, nor from eval mode
            assert torch.equal(clf.fused_embedding(inputs["pixel_values"], ids, None), want)
    # an unfrozen VLM follows the classifier's mode (its dropout runs while fine-tuning)
    tuned = VLMClassifier(entry.build(), n_labels=2, fuse_dim=8, hidden=8, freeze_backbone=False).train()
    assert all(m.training for m in tuned.vlm.modules())
