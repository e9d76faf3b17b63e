"""AdaptiveQuantizer's weight quantization through the sequential (block-by-block) path.

Reference: the default AdaptiveQuantizer, whose weights go through whole-model ``quantize_`` (itself checked
against numpy in tests/quant). Equality is ``torch.equal`` on every state-dict tensor and on the outputs at mixed
per-sample activation bits.
"""
from __future__ import annotations

import copy

import pytest
import torch
from accelerate import init_empty_weights
from safetensors.torch import save_model

from medquant import QuantConfig
from medquant.adaptive import AdaptiveQuantizer, CompactCNN, VLMClassifier
from medquant.adaptive.quantizer import _sequential_blocks
from medquant.quant.api import quantized_modules
from medquant.testing.zoo import ZOO_BY_NAME

IMAGE_KW = ("image_grid_thw", "pixel_attention_mask", "image_sizes")

# tiny tensors: intra-op threads only add overhead on a loaded 2-core machine
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _classifier(entry):
    vlm = entry.build()
    torch.manual_seed(0)
    return VLMClassifier(vlm, n_labels=3, text_layer=1, fuse_dim=16, hidden=16).eval()


def _call(aq, entry, inputs, levels):
    kw = {k: inputs[k] for k in IMAGE_KW if k in inputs}
    with torch.no_grad():
        return aq(inputs["pixel_values"], input_ids=inputs["input_ids"][:, -6:], levels=levels, **kw)


def _assert_same(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert set(sa) == set(sb)
    for k in sa:
        assert sa[k].device.type != "meta", k
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k


@pytest.mark.parametrize("name", ["gemma3_vlm", "llava"])
def test_sequential_weights_equal_whole_model(name):
    entry = ZOO_BY_NAME[name]
    clf = _classifier(entry)
    inputs = entry.inputs(clf.vlm)
    blocks = _sequential_blocks(clf)  # the VLM's vision then language blocks, under the wrapper's names
    assert len(blocks) == 2 and blocks[0][0].startswith("vlm.") and "language_model" in blocks[1][0]
    # role patterns (@vision) do not resolve on the wrapper (it has no roles): regular expressions
    cfg = {"re:.*vision_tower.*": QuantConfig(4, group_size=32), "re:.*": QuantConfig(8, scope="channel")}
    whole = AdaptiveQuantizer(copy.deepcopy(clf), weight_config=cfg, weight_skip=["re:.*lm_head"])
    seq = AdaptiveQuantizer(copy.deepcopy(clf), weight_config=cfg, weight_skip=["re:.*lm_head"],
                            weight_sequential={"device": "cpu"})
    _assert_same(whole.model, seq.model)
    q = quantized_modules(seq.model)
    assert set(q) == set(quantized_modules(whole.model))
    assert any("vision_tower" in n for n in q) and any("language_model" in n for n in q)
    assert seq.model.get_submodule(next(n for n in q if "vision_tower" in n)).config.bits == 4
    assert "head.0" in q  # the classifier's own MLP head (outside the VLM blocks) is quantized too
    levels = torch.tensor([0, 2])
    assert torch.equal(_call(seq, entry, inputs, levels), _call(whole, entry, inputs, levels))


@pytest.mark.parametrize("name", ["llava", "gemma3_vlm"])
def test_sequential_weights_from_meta_checkpoint(name, tmp_path):
    """A classifier skeleton built on the meta device, its float weights streamed from safetensors (Gemma 3: its
    head tied to the input embeddings inside the wrapped VLM is stored once, under the embeddings' name)."""
    entry = ZOO_BY_NAME[name]
    clf = _classifier(entry)
    inputs = entry.inputs(clf.vlm)
    save_model(clf, str(tmp_path / "clf.safetensors"))
    with init_empty_weights():
        meta = _classifier(entry)
    assert any(p.device.type == "meta" for p in meta.parameters())
    whole = AdaptiveQuantizer(clf)  # default: int8 per output channel, every Linear
    seq = AdaptiveQuantizer(meta, weight_sequential={"device": "cpu", "checkpoint": tmp_path / "clf.safetensors"})
    _assert_same(whole.model, seq.model)
    levels = torch.tensor([1, 3])
    assert torch.equal(_call(seq, entry, inputs, levels), _call(whole, entry, inputs, levels))


def test_sequential_weights_cnn_with_explicit_blocks():
    torch.manual_seed(0)
    cnn = CompactCNN(3, in_channels=1, widths=(8, 16)).eval()
    x = torch.randn(2, 1, 16, 16)
    whole = AdaptiveQuantizer(copy.deepcopy(cnn), weight_config=QuantConfig(4, scope="channel"))
    seq = AdaptiveQuantizer(copy.deepcopy(cnn), weight_config=QuantConfig(4, scope="channel"),
                            weight_sequential={"device": "cpu", "blocks": ["blocks.0", "blocks.1"]})
    _assert_same(whole.model, seq.model)
    assert "blocks.0.conv" in quantized_modules(seq.model)
    with torch.no_grad():
        assert torch.equal(seq(x, bits=torch.tensor([2, 8])), whole(x, bits=torch.tensor([2, 8])))


def test_weight_sequential_errors():
    cnn = CompactCNN(3, in_channels=1, widths=(8, 16))
    with pytest.raises(ValueError, match="unknown weight_sequential option.*accepted"):
        AdaptiveQuantizer(cnn, weight_sequential={"devise": "cpu"})
    with pytest.raises(TypeError, match="bool or a dict"):
        AdaptiveQuantizer(cnn, weight_sequential="cpu")
    with pytest.raises(ValueError, match="needs weight_config"):
        AdaptiveQuantizer(cnn, weight_config=None, weight_sequential=True)
    assert not quantized_modules(cnn)  # nothing was changed by the refused calls
    with pytest.raises(ValueError, match="no decoder or vision blocks"):  # a CNN has no known blocks
        AdaptiveQuantizer(cnn, weight_sequential={"device": "cpu"})
