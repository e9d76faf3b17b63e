"""medquant.testing.zoo_vlm: every extra entry builds offline, runs, is deterministic and its image reaches the output."""
import torch

from medquant.testing.zoo_vlm import EXTRA_ZOO, IMAGE_PATH, VISION_ENCODERS, VLM_LAYOUTS, extra_zoo_params

EXPECTED_CLASSES = {
    "blip2": "Blip2ForConditionalGeneration", "instructblip": "InstructBlipForConditionalGeneration",
    "kosmos2": "Kosmos2ForConditionalGeneration", "deepseek_vl": "DeepseekVLForConditionalGeneration",
    "janus": "JanusForConditionalGeneration", "paddleocr_vl": "PaddleOCRVLForConditionalGeneration",
    "ovis2": "Ovis2ForConditionalGeneration", "gemma4": "Gemma4ForConditionalGeneration",
    "phi4mm": "Phi4MultimodalForCausalLM", "chameleon": "ChameleonForConditionalGeneration",
    "mllama": "MllamaForConditionalGeneration", "qwen3_vl": "Qwen3VLForConditionalGeneration",
    "llava_onevision": "LlavaOnevisionForConditionalGeneration", "llava_med": "LlavaMistralForCausalLM",
    "glm4v": "Glm4vForConditionalGeneration", "lfm2_vl": "Lfm2VlForConditionalGeneration",
    "idefics2": "Idefics2ForConditionalGeneration", "florence2": "Florence2ForConditionalGeneration",
    "qwen3_5": "Qwen3_5ForConditionalGeneration",
    "dinov2": "Dinov2Model", "clip": "CLIPModel", "clip_vision": "CLIPVisionModel", "siglip2": "Siglip2Model",
    "swin": "SwinModel", "convnext": "ConvNextModel", "beit": "BeitModel",
}


def test_lists():
    assert {e.name for e in EXTRA_ZOO} == set(EXPECTED_CLASSES)
    assert {e.name for e in VLM_LAYOUTS} == set(IMAGE_PATH)
    assert all(e.is_vlm for e in VLM_LAYOUTS) and not any(e.is_vlm for e in VISION_ENCODERS)


@extra_zoo_params
def test_builds_runs_deterministic_and_sees_the_image(entry):
    """Tiny, float32, eval mode, finite non-constant output; a rebuild has the same weights."""
    model = entry.build()
    assert type(model).__name__ == EXPECTED_CLASSES[entry.name]
    assert not model.training and all(p.dtype == torch.float32 for p in model.parameters())
    assert sum(p.numel() for p in model.parameters()) < 2_000_000  # tiny
    inputs = entry.inputs(model)
    with torch.no_grad():
        out = entry.output(model, inputs)
    assert torch.isfinite(out).all() and out.std() > 0
    again = entry.build()  # seeded: the same weights (the outputs then agree; tests/models/test_zoo.py)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))
    key = "images" if "images" in inputs else "pixel_values"
    with torch.no_grad():
        changed = entry.output(model, dict(inputs, **{key: inputs[key] + 1.0}))
    assert (changed - out).abs().max() > 1e-3  # the image path is wired (not zero-initialised)
