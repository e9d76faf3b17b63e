"""VLMClassifier: one row of logits per sample whatever its batch-mates, and casts of the whole classifier.

References are written plainly with the transformers modules of the tiny zoo VLMs (the vision model / language
model called directly on each sample alone, without padding), not with the classifier's own code paths.
"""
from __future__ import annotations

import pytest
import torch

from medquant.adaptive import AdaptiveQuantizer, VLMClassifier
from medquant.testing.zoo import ZOO_BY_NAME
from tests.adaptive.test_adaptive_fakequant import independent_fq

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _classifier(name, **kw):
    vlm = ZOO_BY_NAME[name].build()
    torch.manual_seed(0)
    return VLMClassifier(vlm, n_labels=3, fuse_dim=16, hidden=16, **kw).eval()


# ---------------------------------------------------------------------------------------------- Idefics3
def _tokens_alone(vlm, image):
    """The vision model's tokens of one unpadded image (3, h, w), called directly: (h/p * w/p, d)."""
    return vlm.model.vision_model(pixel_values=image[None]).last_hidden_state[0]


def test_idefics3_sub_images_and_padding_pool_per_sample():
    """Image splitting gives each sample several sub-images (B, N, 3, H, W), the batch pads missing sub-images
    with all-zero images and smaller images with zeros marked off in ``pixel_attention_mask``: the pooled
    feature of a sample is the mean over the tokens of its own real sub-images' valid patches."""
    clf = _classifier("idefics3")
    vlm = clf.vlm
    g = torch.Generator().manual_seed(0)
    big0, small0, small1 = (torch.randn(3, s, s, generator=g) for s in (48, 32, 32))
    pv = torch.zeros(2, 2, 3, 48, 48)
    pam = torch.zeros(2, 2, 48, 48, dtype=torch.bool)
    pv[0, 0], pam[0, 0] = big0, True                      # sample 0: a 48x48 and a 32x32 sub-image
    pv[0, 1, :, :32, :32], pam[0, 1, :32, :32] = small0, True
    pv[1, 0, :, :32, :32], pam[1, 0, :32, :32] = small1, True  # sample 1: one 32x32 image, one padding image
    with torch.no_grad():
        feats = clf.image_features(pv, pixel_attention_mask=pam)
        want0 = torch.cat([_tokens_alone(vlm, big0), _tokens_alone(vlm, small0)]).mean(0)
        want1 = _tokens_alone(vlm, small1).mean(0)
        assert feats.shape == (2, clf.image_dim)
        assert torch.allclose(feats[0], want0, atol=1e-5)
        assert torch.allclose(feats[1], want1, atol=1e-5)
        # sample 1 on its own (no padding at all) gives the same row
        alone = clf.image_features(small1[None, None])
        assert torch.allclose(alone[0], feats[1], atol=1e-5)
        # image-only logits: one row per sample, in input order
        logits = clf(pv, pixel_attention_mask=pam)
        assert logits.shape == (2, 3)
        assert torch.allclose(logits[1], clf(small1[None, None])[0], atol=1e-5)
        # per-sample levels reach their own sample: level 0 (2 bits) on sample 0 only, float on sample 1
        fused = clf.fused_embedding(pv, pixel_attention_mask=pam)
        want_q0 = clf.head(independent_fq(fused[0:1], 2))[0]
        aq = AdaptiveQuantizer(clf, weight_config=None).eval()
        out = aq(pv, pixel_attention_mask=pam, levels=torch.tensor([0, 3]))
        assert torch.allclose(out[0], want_q0, atol=1e-5)
        assert not torch.allclose(out[0], logits[0], atol=1e-4)
        assert torch.allclose(out[1], logits[1], atol=1e-5)


# ---------------------------------------------------------------------------------------------- PaliGemma
def test_paligemma_text_features_do_not_depend_on_batch_padding():
    """PaliGemma's language model attends bidirectionally over the prefix (``use_bidirectional_attention``): the
    text features of a sample are the same alone, right-padded or left-padded in a batch, and under eager or
    SDPA attention. Reference: the language model on each sample alone, SDPA, no mask (bidirectional)."""
    clf = _classifier("paligemma", text_layer=-1)
    lm = clf.vlm.get_submodule(clf._language_name)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(4, 200, (2, 6), generator=g)
    with torch.no_grad():
        want = [lm(input_ids=ids[0:1, :4]).last_hidden_state[0].mean(0), lm(input_ids=ids[1:2]).last_hidden_state[0].mean(0)]
        right_mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1] * 6])
        left_ids = ids.clone()
        left_ids[0, 2:], left_ids[0, :2] = ids[0, :4], 0
        left_mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1] * 6])
        for impl in ("sdpa", "eager"):
            lm.config._attn_implementation = impl
            for x, m in ((ids, right_mask), (left_ids, left_mask)):
                got = clf.text_features(x, m)
                assert torch.allclose(got[0], want[0], atol=1e-5), (impl, m[0].tolist())
                assert torch.allclose(got[1], want[1], atol=1e-5), (impl, m[0].tolist())


# ---------------------------------------------------------------------------------------------- dtypes
def test_classifier_cast_to_bfloat16_computes_in_bfloat16():
    """``clf.to(torch.bfloat16)`` casts the projections and head too; the features meet them in their dtype.
    Reference: the same pieces in bfloat16 called plainly (LLaVA: CLS-less patch tokens of the selected vision
    layer; language model hidden state after layer 1), and the float32 classifier within bfloat16 rounding."""
    clf = _classifier("llava", text_layer=1)
    entry = ZOO_BY_NAME["llava"]
    inputs = entry.inputs(clf.vlm)
    pv, ids = inputs["pixel_values"], inputs["input_ids"][:, -6:]
    with torch.no_grad():
        ref32 = clf(pv, input_ids=ids)
        clf.to(torch.bfloat16)
        out = clf(pv, input_ids=ids)
        vlm = clf.vlm
        layer = vlm.config.vision_feature_layer
        img = vlm.model.vision_tower(pixel_values=pv.bfloat16(), output_hidden_states=True).hidden_states[layer]
        txt = vlm.model.language_model(input_ids=ids, output_hidden_states=True).hidden_states[1]
        fused = torch.cat([clf.image_proj(img[:, 1:].mean(1)), clf.text_proj(txt.mean(1))], dim=-1)
        want = clf.head(fused)
    assert out.dtype == torch.bfloat16
    assert torch.allclose(out.float(), want.float(), atol=2e-2, rtol=2e-2)
    assert torch.allclose(out.float(), ref32, atol=5e-2 * float(ref32.abs().max()) + 1e-2)


def test_bfloat16_backbone_float32_head():
    """The usual set-up: a VLM loaded in bfloat16, the new projections and head in float32 (float32 logits)."""
    vlm = ZOO_BY_NAME["llava"].build().to(torch.bfloat16)
    inputs = ZOO_BY_NAME["llava"].inputs(vlm)
    torch.manual_seed(0)
    clf = VLMClassifier(vlm, n_labels=3, fuse_dim=16, hidden=16).eval()
    with torch.no_grad():
        out = clf(inputs["pixel_values"], input_ids=inputs["input_ids"][:, -6:])
    assert out.dtype == torch.float32 and torch.isfinite(out).all()


# ---------------------------------------------------------------------------------------------- Gemma 3
def _pan_and_scan_batch():
    """Pan-and-scan-shaped Gemma 3 inputs as the processor gives them: per image the whole image then its
    crops, stacked over the batch, and ``num_crops`` (crops besides the whole image) per image."""
    g = torch.Generator().manual_seed(2)
    pv = torch.randn(4, 3, 32, 32, generator=g)  # sample 0: whole image + 2 crops; sample 1: whole image only
    return pv, torch.tensor([2, 0])


def test_gemma3_pan_and_scan_crops_pool_per_sample():
    """With pan-and-scan each image gives several rows of ``pixel_values`` (the whole image and its crops): the
    pooled feature of a sample is the mean over the tokens of its own rows. Reference: the vision tower called
    directly on each sample's rows alone, and each sample run alone through the classifier."""
    clf = _classifier("gemma3_vlm")
    vlm = clf.vlm
    pv, num_crops = _pan_and_scan_batch()
    ids = torch.randint(4, 200, (2, 6), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        feats = clf.image_features(pv, num_crops=num_crops)
        assert feats.shape == (2, clf.image_dim)
        for i, rows in enumerate((pv[:3], pv[3:])):
            want = vlm.model.vision_tower(pixel_values=rows).last_hidden_state.mean(dim=(0, 1))
            assert torch.allclose(feats[i], want, atol=1e-5), i
        # each sample alone (its own rows and crop count) gives the same row as in the batch
        assert torch.allclose(clf.image_features(pv[:3], num_crops=[2])[0], feats[0], atol=1e-5)
        assert torch.allclose(clf.image_features(pv[3:], num_crops=torch.tensor([0]))[0], feats[1], atol=1e-5)
        assert torch.allclose(clf.image_features(pv[3:])[0], feats[1], atol=1e-5)
        logits = clf(pv, input_ids=ids, num_crops=num_crops)
        assert logits.shape == (2, 3)
        assert torch.allclose(logits[0], clf(pv[:3], input_ids=ids[:1], num_crops=[2])[0], atol=1e-5)
        assert torch.allclose(logits[1], clf(pv[3:], input_ids=ids[1:])[0], atol=1e-5)
        # image-only: one row per sample too
        assert clf(pv, num_crops=num_crops).shape == (2, 3)


def test_gemma3_pan_and_scan_bad_crop_counts_raise():
    """More image rows than samples without ``num_crops``, or counts that do not fit ``pixel_values``: a clear
    ValueError naming ``num_crops``, before any sample is mixed with another."""
    clf = _classifier("gemma3_vlm")
    pv, _ = _pan_and_scan_batch()
    ids = torch.randint(4, 200, (2, 6))
    with torch.no_grad():
        with pytest.raises(ValueError, match="num_crops"):
            clf(pv, input_ids=ids)
        with pytest.raises(ValueError, match="num_crops"):
            clf.image_features(pv, num_crops=torch.tensor([1, 0]))  # 3 rows, pixel_values has 4
        with pytest.raises(ValueError, match="num_crops"):
            clf.image_features(pv, num_crops=torch.tensor([-1, 4]))
        with pytest.raises(ValueError, match="num_crops"):
            clf.image_features(pv, num_crops=torch.tensor([[2, 0]]))
        with pytest.raises(TypeError, match="num_crops"):
            clf.image_features(pv, num_crops=2)
        with pytest.raises(ValueError, match="num_crops"):  # 3 images but 2 text rows
            clf(pv, input_ids=ids, num_crops=torch.tensor([1, 0, 0]))


@pytest.mark.parametrize("named", [False, True])
def test_num_crops_reaches_get_image_features_only_when_named(named):
    """``num_crops`` groups rows for pooling; it is passed on to ``get_image_features`` only when that method
    names the parameter (Gemma 3's takes ``**kwargs`` and would ignore it)."""
    pv, num_crops = _pan_and_scan_batch()
    vlm = ZOO_BY_NAME["gemma3_vlm"].build()
    seen = {}
    original = vlm.model.get_image_features

    def with_num_crops(pixel_values, num_crops=None, **kwargs):
        seen.update(kwargs, num_crops=num_crops)
        return original(pixel_values, **kwargs)

    def without_num_crops(pixel_values, **kwargs):
        seen.update(kwargs)
        return original(pixel_values, **kwargs)

    vlm.model.get_image_features = with_num_crops if named else without_num_crops
    clf = VLMClassifier(vlm, n_labels=3, fuse_dim=16, hidden=16).eval()
    with torch.no_grad():
        assert clf.image_features(pv, num_crops=num_crops).shape == (2, clf.image_dim)
    assert ("num_crops" in seen) == named
    if named:
        assert seen["num_crops"] is num_crops


def test_qwen2_vl_without_its_image_grid_is_a_clear_error():
    entry = ZOO_BY_NAME["qwen2_vl"]
    vlm = entry.build()
    inputs = entry.inputs(vlm)
    clf = VLMClassifier(vlm, n_labels=2, fuse_dim=8, hidden=8).eval()
    with torch.no_grad(), pytest.raises(ValueError, match=r"needs image_grid_thw \(its processor gives it"):
        clf(inputs["pixel_values"], input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
    with torch.no_grad():  # with the grid: one row per sample
        out = clf(inputs["pixel_values"], input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                  image_grid_thw=inputs["image_grid_thw"])
    assert out.shape == (inputs["input_ids"].shape[0], 2)
