"""benchmarks.onnx_classifiers helpers: class-balanced batches, the uint8 -> float input, the baseline control."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from benchmarks import onnx_classifiers as oc


def test_balanced_batches_draw_every_class_equally_and_walk_each_class_before_repeating():
    y = torch.tensor([0] * 5 + [1] * 23)
    gen = torch.Generator().manual_seed(0)
    batches = list(oc._balanced_batches(y, 2, 8, 6, gen))
    assert len(batches) == 6
    for b in batches:
        assert torch.bincount(y[b], minlength=2).tolist() == [4, 4]
    ones = torch.cat([b[y[b] == 1] for b in batches])
    assert len(set(ones[:20].tolist())) == 20  # 23 pneumonia-like images: no repeat within the first pass of 5 batches
    zeros = [b[y[b] == 0] for b in batches]
    assert len(set(zeros[0].tolist())) == 4 and set(zeros[1].tolist()) <= set(range(5))  # 5 images, 4 per batch
    with pytest.raises(ValueError, match="missing \\[1\\]"):
        next(oc._balanced_batches(torch.zeros(10, dtype=torch.long), 2, 8, 1, gen))


def test_kermany_input_normalises_uint8_and_area_resizes_like_average_pooling():
    x = torch.randint(0, 256, (3, 1, 224, 224), dtype=torch.uint8)
    ref = (x.double() / 255 - 0.5) / 0.25
    torch.testing.assert_close(oc.kermany_input(x).double(), ref, atol=1e-6, rtol=0)
    out = oc.kermany_input(x, pixels=112)
    assert out.dtype == torch.float32 and out.shape == (3, 1, 112, 112)
    torch.testing.assert_close(out.double(), F.avg_pool2d(ref, 2), atol=1e-5, rtol=0)
    assert x.dtype == torch.uint8  # the stored images are not modified
    img = oc.kermany_input(x, pixels=112, norm="image").double()
    u = F.avg_pool2d(x.double() / 255, 2)
    ref = (u - u.mean((1, 2, 3), keepdim=True)) / u.std((1, 2, 3), keepdim=True)
    torch.testing.assert_close(img, ref, atol=1e-4, rtol=0)
    flat = torch.full((1, 1, 224, 224), 7, dtype=torch.uint8)  # a constant image: no division by zero
    assert torch.isfinite(oc.kermany_input(flat, norm="image")).all()
    with pytest.raises(ValueError, match="expected one of"):
        oc.kermany_input(x, norm="minmax")


def _run(name, acc, worst, balanced, classes):
    return {"arch": "a", "dataset": {"name": name, "classes": classes},
            "accuracy": {"pytorch_fp32": {"acc": acc, "worst_group_acc": worst, "balanced_acc": balanced}}}


def test_baseline_control_rejects_near_constant_float_models():
    assert oc.baseline_control(_run("kermany_cxr_224", 0.90, 0.80, 0.85, 2))["met"]
    assert not oc.baseline_control(_run("kermany_cxr_224", 0.63, 0.02, 0.51, 2))["met"]  # the old quick ResNet-18
    assert not oc.baseline_control(_run("kermany_cxr_224", 0.90, 0.65, 0.80, 2))["met"]
    assert oc.baseline_control(_run("ham10000_64", 0.75, 0.70, 0.43, 7))["met"]
    assert not oc.baseline_control(_run("ham10000_64", 0.72, 0.70, 1 / 7, 7))["met"]  # majority class only


def test_epochs_option_sends_resnet18_to_steps():
    assert oc._epochs("cnn=3", {"cnn": 2, "vit": 2}) == {"cnn": 3, "vit": 2}
    with pytest.raises(ValueError, match="--resnet-steps"):
        oc._epochs("resnet18=1", {"cnn": 2, "vit": 2})
    with pytest.raises(ValueError, match="arch=N"):
        oc._epochs("cnn=0", {"cnn": 2, "vit": 2})


def test_binary_auc_counts_ordered_pairs_and_half_ties():
    y = np.array([0, 0, 1, 1, 0, 1])
    s = np.array([0.1, 0.5, 0.5, 0.9, 0.2, 0.05])
    # positives 0.5, 0.9, 0.05 against negatives 0.1, 0.5, 0.2: wins 2 + 3 + 0, one tie -> (5 + 0.5) / 9
    assert oc.binary_auc(s, y) == pytest.approx(5.5 / 9)
    assert oc.binary_auc(-s, y) == pytest.approx(1 - 5.5 / 9)
