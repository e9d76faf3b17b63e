"""The tiny model zoo: every entry builds offline, runs, is deterministic and has quantization-friendly shapes."""

import pytest
import torch
from torch import nn

from medquant.testing.zoo import VLM_ZOO, ZOO, ZOO_BY_NAME, tiny_cnn, vlm_zoo_params, zoo_params

EXPECTED_NAMES = {
    "llama", "qwen2", "gemma3_text", "gemma3_vlm", "llava", "qwen2_vl", "qwen2_5_vl",
    "paligemma", "idefics3", "siglip_vision", "vit", "bert",
}

# image tokens per sample, worked out by hand from the zoo configs (see tests/zoo.py docstring)
IMAGE_TOKENS = {"gemma3_vlm": 4, "llava": 16, "qwen2_vl": 4, "qwen2_5_vl": 4, "paligemma": 16, "idefics3": 4}

_cache: dict[str, tuple[nn.Module, dict, torch.Tensor]] = {}


def _run(entry):
    """Build + forward once per entry and share the result between tests of this module."""
    if entry.name not in _cache:
        model = entry.build()
        inputs = entry.inputs(model)
        with torch.no_grad():
            out = entry.output(model, inputs)
        _cache[entry.name] = (model, inputs, out)
    return _cache[entry.name]


def test_zoo_lists_every_architecture():
    assert {e.name for e in ZOO} == EXPECTED_NAMES
    assert set(ZOO_BY_NAME) == EXPECTED_NAMES
    assert {e.name for e in VLM_ZOO} == set(IMAGE_TOKENS)


@zoo_params
def test_builds_and_runs(entry):
    model, inputs, out = _run(entry)
    assert not model.training
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert isinstance(out, torch.Tensor)
    assert tuple(out.shape) == entry.output_shape
    assert torch.isfinite(out).all()
    assert out.std() > 0  # not a constant output
    for v in inputs.values():
        if isinstance(v, torch.Tensor) and v.dim() >= 1:
            assert v.shape[0] == 2 or entry.name in ("qwen2_vl", "qwen2_5_vl")  # batch 2 (qwen: flat patches)


@zoo_params
def test_deterministic(entry):
    _, _, out = _run(entry)
    model2 = entry.build()
    inputs2 = entry.inputs(model2)
    with torch.no_grad():
        out2 = entry.output(model2, inputs2)
    assert torch.equal(out, out2)


@zoo_params
def test_hidden_size_and_reduction_dims(entry):
    """Every Linear/Conv reduces over a dimension that is a multiple of 32 (group quantization applies)."""
    model, _, _ = _run(entry)
    dims = {}
    for name, mod in model.named_modules():
        if isinstance(mod, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            dims[name] = mod.weight[0].numel()  # in_features, or in_channels * kernel for convolutions
    assert dims
    bad = {n: k for n, k in dims.items() if k % 32}
    assert not bad, f"reduction dims not a multiple of 32: {bad}"
    assert min(dims.values()) >= 128


@vlm_zoo_params
def test_vlm_image_reaches_output(entry):
    """Changing the image changes the logits (the vision path is wired and not zero-initialised)."""
    model, inputs, out = _run(entry)
    changed = dict(inputs, pixel_values=inputs["pixel_values"] + 1.0)
    with torch.no_grad():
        out2 = entry.output(model, changed)
    assert (out - out2).abs().max() > 1e-3


@vlm_zoo_params
def test_vlm_image_token_count(entry):
    """The inputs carry exactly the number of image tokens the model needs: one fewer is rejected."""
    model, inputs, _ = _run(entry)
    image_id = model.config.image_token_id
    ids = inputs["input_ids"]
    assert ((ids == image_id).sum(dim=1) == IMAGE_TOKENS[entry.name]).all()
    # replace one image token per sample by a text token: the model must refuse the mismatch
    broken = ids.clone()
    first = (ids == image_id).int().argmax(dim=1)
    broken[torch.arange(ids.shape[0]), first] = 5
    bad = dict(inputs, input_ids=broken)
    if "mm_token_type_ids" in bad:
        bad["mm_token_type_ids"] = (broken == image_id).int()
    if "token_type_ids" in bad:
        bad["token_type_ids"] = (broken == image_id).long()
    with pytest.raises(Exception), torch.no_grad():  # noqa: B017 - each architecture raises its own type
        entry.output(model, bad)


def test_tiny_cnn():
    model = tiny_cnn()
    assert not model.training
    x = torch.randn(2, 3, 32, 32)
    out = model(x)
    assert out.shape == (2, 4)
    assert torch.equal(out, tiny_cnn()(x))
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [32, 64]
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert model.classifier.in_features % 32 == 0
