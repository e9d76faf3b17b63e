"""Review of VLMClassifier against plain references: Qwen2-VL images of different sizes in one batch, a batch of
one, float64 / integer pixel values.

References call the tiny zoo VLMs' own transformers modules directly (the vision model with its projector
replaced by an identity, the vision tower alone), then average by hand.
"""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from medquant.adaptive import VLMClassifier
from medquant.testing.zoo import ZOO_BY_NAME

pytestmark = pytest.mark.usefixtures("one_torch_thread")


class _Identity(nn.Module):
    def forward(self, x, *args, **kwargs):
        return x


def _classifier(vlm):
    torch.manual_seed(0)
    return VLMClassifier(vlm, n_labels=3, fuse_dim=8, hidden=8).eval()


@pytest.mark.parametrize("name", ["qwen2_vl", "qwen2_5_vl"])
def test_qwen_images_of_different_sizes_pool_per_image(name):
    vlm = ZOO_BY_NAME[name].build()
    clf = _classifier(vlm)
    dim = ZOO_BY_NAME[name].inputs(vlm)["pixel_values"].shape[1]
    grid = torch.tensor([[1, 4, 4], [1, 4, 8]])  # 16 and 32 patches
    pv = torch.randn(16 + 32, dim, generator=torch.Generator().manual_seed(3))
    ref = copy.deepcopy(vlm)
    ref.model.visual.merger = _Identity()  # the vision blocks' output: the merger's input
    with torch.no_grad():
        out = ref.model.visual(pv, grid_thw=grid)
        tokens = out if isinstance(out, torch.Tensor) else out[0]
        want = torch.stack([tokens[:16].mean(0), tokens[16:].mean(0)])
        got = clf.image_features(pv, image_grid_thw=grid)
        assert torch.allclose(got, want, atol=1e-5)
        # logits = head(concat(W_i f_img, 0)) by hand, image-only
        fi = want @ clf.image_proj.weight.T + clf.image_proj.bias
        assert torch.allclose(clf(pv, image_grid_thw=grid), clf.head(torch.cat([fi, torch.zeros_like(fi)], -1)),
                              atol=1e-5)


def test_batch_of_one_and_float64_pixels_match_the_vision_tower():
    entry = ZOO_BY_NAME["paligemma"]
    vlm = entry.build()
    pv = entry.inputs(vlm)["pixel_values"]
    clf = _classifier(vlm)
    with torch.no_grad():
        want = vlm.model.vision_tower(pixel_values=pv).last_hidden_state.mean(dim=1)
        assert torch.allclose(clf.image_features(pv[1:]), want[1:], atol=1e-5)
        assert torch.allclose(clf.image_features(pv.double()), want, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int64])
def test_integer_pixel_values_are_a_clear_error(dtype):
    """Raw 0..255 pixels are not the processor's normalized floats: the backbone would silently use them."""
    entry = ZOO_BY_NAME["llava"]
    vlm = entry.build()
    pv = entry.inputs(vlm)["pixel_values"]
    clf = _classifier(vlm)
    raw = (pv.clamp(0, 1) * 255).to(dtype)
    with torch.no_grad(), pytest.raises(TypeError, match="pixel_values must be floating point"):
        clf(raw)
