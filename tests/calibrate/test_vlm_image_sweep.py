"""Calibration, quantization round trips and pruning of the extra-zoo VLMs with the image merged into the sequence.

The zoo's own inputs of these models run the image path and the text apart (text-only forwards); here each batch
is what a processor gives: image placeholder tokens in ``input_ids`` (as many as the model's image path returns
features for one image) and the pixel inputs the model's forward scatters into them, so the language model's
blocks see image features; the second row ends in padding. The inputs are set by hand from the model's config and
the transformers source of its forward (no processor is downloaded).

References: whole-model :func:`gptq_quantize_` (every layer calibrated in whole-model forwards) for the codes of
block-by-block GPTQ; forward pre-hooks on the finished quantized model for the inputs each block is calibrated on;
the in-memory model for the ``medquant.hf`` and ``load_pruned`` round trips; for pruning, the unpruned model with
what the plan removes zeroed (tests/prune/test_zoo.py).
"""
from __future__ import annotations

import copy
import warnings
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

import medquant.hf
from medquant import QuantConfig, quantize_
from medquant.calibrate.gptq import gptq_quantize_, gptq_quantize_sequential
from medquant.calibrate.sequential import quantize_sequential
from medquant.models import block_stacks
from medquant.prune import StructuredPruner, load_pruned, save_pruned
from medquant.prune.importance import calibration_loss
from medquant.quant.modules import QUANT_MODULES
from medquant.testing.zoo import BOS_ID, IMAGE, IMAGE_TOKEN, PAD_ID, PATCH, TEXT_HIGH
from medquant.testing.zoo_vlm import EXTRA_ZOO_BY_NAME
from tests.calibrate.test_sequential_between_blocks import _block_inputs, _outside_the_blocks
from tests.hf._helpers import state_equal
from tests.prune.test_zoo import _zeroed

BATCH = 2
TEXT = 5  # text tokens after the image
PADDED = 2  # padding tokens at the end of the second row
GRID = IMAGE // PATCH  # 4x4 patches per 32 px image


def _ids(n_image: int, gen: torch.Generator, image_token: int = IMAGE_TOKEN, before: tuple[int, ...] = (),
         after: tuple[int, ...] = ()) -> torch.Tensor:
    """``BOS, before..., image_token * n_image, after..., TEXT random text tokens`` for each of the batch rows."""
    head = torch.tensor([BOS_ID, *before]).expand(BATCH, -1)
    tail = torch.tensor(list(after), dtype=torch.long).expand(BATCH, -1)
    return torch.cat([head, torch.full((BATCH, n_image), image_token), tail,
                      torch.randint(4, TEXT_HIGH, (BATCH, TEXT), generator=gen)], 1)


def _with_mask(ids: torch.Tensor, **rest: Any) -> dict[str, Any]:
    """The batch, its second row right-padded as a processor pads a shorter prompt: its last ``PADDED`` text tokens
    are padding (``attention_mask`` 0)."""
    mask = torch.ones_like(ids)
    mask[1, -PADDED:] = 0
    return {"input_ids": ids.masked_fill(mask == 0, PAD_ID), "attention_mask": mask, **rest}


# ---------------------------------------------------------------------------------------------- per model
def _phi4mm(model: nn.Module, gen: torch.Generator) -> dict[str, Any]:
    """One 32 px crop (image_sizes 32x32) + the global image: 2x2 compressed patches per view, each row followed
    by a ``sub_img_feature_extensor`` column -> 6 tokens per view, plus one ``global_img_feature_extensor``: 13."""
    vc = model.config.vision_config
    assert vc.crop_size == IMAGE and vc.image_size // vc.patch_size == GRID
    return _with_mask(_ids(13, gen, vc.image_token_id),
                      image_pixel_values=torch.randn(BATCH, 2, 3, IMAGE, IMAGE, generator=gen),
                      image_sizes=torch.tensor([[IMAGE, IMAGE]] * BATCH),
                      image_attention_mask=torch.ones(BATCH, 2, GRID, GRID, dtype=torch.long))


def _siglip_patches(model: nn.Module, gen: torch.Generator) -> dict[str, Any]:
    """DeepSeek-VL / Janus: the aligner maps each of the 16 patch features (no class token) to one token."""
    return _with_mask(_ids(GRID * GRID, gen, model.config.image_token_id),
                      pixel_values=torch.randn(BATCH, 3, IMAGE, IMAGE, generator=gen))


def _paddleocr_vl(model: nn.Module, gen: torch.Generator) -> dict[str, Any]:
    """Flattened 8x8 patches, grid 1x4x4, merged 2x2 by the projector: 4 tokens between vision start / end, and
    ``mm_token_type_ids`` (1 at the image tokens) for the 3-D rotary positions."""
    c = model.config
    m = c.vision_config.spatial_merge_size
    ids = _ids(GRID * GRID // (m * m), gen, c.image_token_id, (c.vision_start_token_id,), (c.vision_end_token_id,))
    return _with_mask(ids, pixel_values=torch.randn(BATCH * GRID * GRID, 3, PATCH, PATCH, generator=gen),
                      image_grid_thw=torch.tensor([[1, GRID, GRID]] * BATCH),
                      mm_token_type_ids=(ids == c.image_token_id).int())


def _ovis2(model: nn.Module, gen: torch.Generator) -> dict[str, Any]:
    """``hidden_stride`` 2 folds the 4x4 patches into 4 visual tokens; the image sits between two of the visual
    indicator tokens (each replaced by its row of the visual embedding table)."""
    c = model.config
    assert c.vision_config.hidden_stride == 2
    ind = c.visual_indicator_token_ids
    return _with_mask(_ids(GRID * GRID // 4, gen, c.image_token_id, (ind[0],), (ind[1],)),
                      pixel_values=torch.randn(BATCH, 3, IMAGE, IMAGE, generator=gen))


def _gemma4(model: nn.Module, gen: torch.Generator) -> dict[str, Any]:
    """Patchified pixels (16 patches of 8x8x3) with their (x, y) positions, pooled 2x2: 4 soft tokens between
    begin / end of image."""
    c = model.config
    k = c.vision_config.pooling_kernel_size
    yy, xx = torch.meshgrid(torch.arange(GRID), torch.arange(GRID), indexing="ij")
    return _with_mask(_ids(GRID * GRID // (k * k), gen, c.image_token_id, (c.boi_token_id,), (c.eoi_token_id,)),
                      pixel_values=torch.randn(BATCH, GRID * GRID, 3 * PATCH * PATCH, generator=gen),
                      image_position_ids=torch.stack([xx.flatten(), yy.flatten()], -1).expand(BATCH, -1, -1).clone())


def _chameleon_model() -> nn.Module:
    """The zoo's Chameleon with an image vocabulary: its ``vocabulary_map`` names only ``<image>``, so its VQ codes
    have no BPE tokens to become (no image can enter the sequence). Here code ``i`` of the 32-entry codebook is the
    token ``IMGIMG<i in letters A-J>Z`` = id ``200 + i``, and the VQ encoder downsamples 32 px images 3 times (4x4
    codes: 16 image tokens, not 256)."""
    from transformers import ChameleonConfig, ChameleonForConditionalGeneration

    entry_model = EXTRA_ZOO_BY_NAME["chameleon"].build()
    cfg = entry_model.config.to_dict()
    cfg["vq_config"].update(num_embeddings=32, channel_multiplier=[1, 1, 1, 1])
    letters = {str(d): chr(ord("A") + d) for d in range(10)}
    cfg["vocabulary_map"] = {"<image>": IMAGE_TOKEN,
                             **{f"IMGIMG{''.join(letters[c] for c in str(i))}Z": 200 + i for i in range(32)}}
    torch.manual_seed(0)
    return ChameleonForConditionalGeneration(ChameleonConfig.from_dict(cfg)).eval()


def _chameleon(model: nn.Module, gen: torch.Generator) -> dict[str, Any]:
    """16 VQ codes per 32 px image (4x4 latent), each the embedding of its image-vocabulary token."""
    return _with_mask(_ids(GRID * GRID, gen, model.model.vocabulary_mapping.image_token_id),
                      pixel_values=torch.randn(BATCH, 3, IMAGE, IMAGE, generator=gen))


def _llava_onevision(model: nn.Module, gen: torch.Generator) -> dict[str, Any]:
    """AnyRes with one 32x32 grid pinpoint: the base image and one crop (``pixel_values`` (B, 2, 3, 32, 32)), 16
    features each; the crop's 4x4 features get ``image_newline`` after every row: 16 + 16 + 4 = 36 tokens."""
    c = model.config
    assert c.image_grid_pinpoints == [[IMAGE, IMAGE]] and c.vision_feature_select_strategy == "full"
    return _with_mask(_ids(36, gen, c.image_token_id),
                      pixel_values=torch.randn(BATCH, 2, 3, IMAGE, IMAGE, generator=gen),
                      image_sizes=torch.tensor([[IMAGE, IMAGE]] * BATCH))


def _lfm2_vl(model: nn.Module, gen: torch.Generator) -> dict[str, Any]:
    """SigLIP 2 NaFlex: patchified pixels (16 patches of 8x8x3) with their mask and 4x4 shape; the projector's
    pixel unshuffle (factor 2) leaves 4 tokens."""
    c = model.config
    assert c.downsample_factor == 2
    return _with_mask(_ids(GRID * GRID // 4, gen, c.image_token_id),
                      pixel_values=torch.randn(BATCH, GRID * GRID, 3 * PATCH * PATCH, generator=gen),
                      pixel_attention_mask=torch.ones(BATCH, GRID * GRID, dtype=torch.long),
                      spatial_shapes=torch.tensor([[GRID, GRID]] * BATCH))


def _idefics2(model: nn.Module, gen: torch.Generator) -> dict[str, Any]:
    """One image per sample (``pixel_values`` (B, 1, 3, 32, 32)); the perceiver resampler gives its
    ``resampler_n_latents`` = 4 tokens."""
    c = model.config
    return _with_mask(_ids(c.perceiver_config.resampler_n_latents, gen, c.image_token_id),
                      pixel_values=torch.randn(BATCH, 1, 3, IMAGE, IMAGE, generator=gen))


def _florence2(model: nn.Module, gen: torch.Generator) -> dict[str, Any]:
    """DaViT's 4x4 final feature map (strides 4 and 2) and its spatial mean: 17 tokens in the encoder's sequence;
    the decoder reads the 5 text tokens."""
    out = _with_mask(_ids(17, gen, model.config.image_token_id),
                     pixel_values=torch.randn(BATCH, 3, IMAGE, IMAGE, generator=gen))
    out["decoder_input_ids"] = out["input_ids"][:, -TEXT:]
    return out


CASES: dict[str, Callable[[nn.Module, torch.Generator], dict[str, Any]]] = {
    "phi4mm": _phi4mm,
    "deepseek_vl": _siglip_patches,
    "janus": _siglip_patches,
    "paddleocr_vl": _paddleocr_vl,
    "ovis2": _ovis2,
    "gemma4": _gemma4,
    "chameleon": _chameleon,
    "llava_onevision": _llava_onevision,
    "lfm2_vl": _lfm2_vl,
    "idefics2": _idefics2,
    "florence2": _florence2,
}
BUILD = {"chameleon": _chameleon_model}
PIXELS = {"phi4mm": "image_pixel_values"}
# Phi-4-multimodal takes its image features from the vision tower's hidden_states[feature_layer = -2]: the last
# vision layer runs but nothing reads its output, so its Taylor importance is 0 (warned)
UNUSED_LAYER = {"phi4mm": r"model\.embed_tokens_extend\.image_embed\.img_processor\.encoder\.layers\.1\."}


def _model_and_batches(name: str, n: int = 1) -> tuple[nn.Module, list[dict[str, Any]]]:
    model = BUILD[name]() if name in BUILD else EXTRA_ZOO_BY_NAME[name].build().eval()
    gen = torch.Generator().manual_seed(0)
    return model, [CASES[name](model, gen) for _ in range(n)]


def _logits(model: nn.Module, inputs: dict[str, Any]) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits


names = pytest.mark.parametrize("name", list(CASES))
# expected: layers medquant does not quantize (Phi-4-multimodal's audio Conv1d, LFM2's convolution mixer) and
# pruning's notes on the layers it cannot prune (tests/prune/test_zoo.py checks them)
pytestmark = [pytest.mark.filterwarnings("ignore:.*stay in floating point:UserWarning"),
              pytest.mark.filterwarnings("ignore:pruning skips parts:UserWarning")]


@names
def test_the_image_reaches_the_logits(name):
    """The batches are real image + text batches: other pixels give other logits, at the text positions too."""
    model, (inputs,) = _model_and_batches(name)
    key = PIXELS.get(name, "pixel_values")
    other = dict(inputs, **{key: torch.randn_like(inputs[key])})
    a, b = _logits(model, inputs), _logits(model, other)
    assert a.shape[:2] == inputs.get("decoder_input_ids", inputs["input_ids"]).shape
    assert (a[:, -1] - b[:, -1]).abs().max() > 1e-4


@names
def test_the_block_stacks_are_the_blocks_a_forward_with_images_calls_in_their_order(name):
    """Block-by-block calibration chains each block's output to the next block of its stack: every block must be
    called (once) in a forward with images, in the order :func:`block_stacks` lists them."""
    model, (inputs,) = _model_and_batches(name)
    stacks = block_stacks(model)
    calls: list[str] = []
    hooks = [model.get_submodule(n).register_forward_pre_hook(lambda m, a, n=n: calls.append(n))
             for g in stacks for n in g]
    try:
        _logits(model, inputs)
    finally:
        for h in hooks:
            h.remove()
    assert calls == [n for g in stacks for n in g]


@names
def test_gptq_block_by_block_gives_the_codes_of_whole_model_gptq(name):
    model, batches = _model_and_batches(name, 2)
    skip = _outside_the_blocks(model)  # every stack has quantized layers (checked below): none is skipped whole
    stacks = block_stacks(model)
    whole, seq = model, copy.deepcopy(model)
    gptq_quantize_(whole, QuantConfig(4, group_size=32), batches, skip=skip, progress=False)
    gptq_quantize_sequential(seq, QuantConfig(4, group_size=32), batches, skip=skip, device="cpu", progress=False)
    quantized = [n for n, m in seq.named_modules() if isinstance(m, QUANT_MODULES)]
    assert all(any(q.startswith(blk + ".") for q in quantized for blk in g) for g in stacks)
    a, b = whole.state_dict(), seq.state_dict()
    assert a.keys() == b.keys()
    assert [k for k in a if not torch.equal(a[k], b[k])] == []


@names
def test_each_block_is_calibrated_on_the_inputs_the_quantized_model_gives_it(name):
    model, (inputs,) = _model_and_batches(name)
    stacks = block_stacks(model)
    seen: dict[str, torch.Tensor] = {}

    def per_block(block, block_inputs):
        seen[block_inputs.name] = block_inputs.hidden_states[0]

    quantize_sequential(model, QuantConfig(4, group_size=32), [inputs], device="cpu", per_block_fn=per_block)
    assert set(seen) == {n for g in stacks for n in g}
    ref = _block_inputs(model, list(seen), inputs)
    assert [n for n, h in seen.items() if not torch.equal(h, ref[n][0])] == []


@names
def test_round_to_nearest_with_images_saves_and_reloads_with_the_same_logits(name, tmp_path):
    model, (inputs,) = _model_and_batches(name)
    quantize_(model, QuantConfig(4, group_size=32))
    expected = _logits(model, inputs)
    assert torch.isfinite(expected).all()
    medquant.hf.save_pretrained(model, tmp_path / "q")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        back = type(model).from_pretrained(tmp_path / "q").eval()
    state_equal(model, back)
    assert torch.equal(_logits(back, inputs), expected)


@names
def test_taylor_loss_leaves_the_image_placeholders_out_of_the_targets(name):
    """The default Taylor loss is next-token cross-entropy on ``input_ids``; a placeholder position holds image
    features, not a token to predict, so it is no target (``labels = -100``), like padding; so are Ovis2's visual
    indicator tokens, whose embeddings its visual embedding table replaces."""
    model, (inputs,) = _model_and_batches(name)
    ids = inputs["input_ids"]
    indicators = torch.tensor(list(getattr(model.config, "visual_indicator_token_ids", ())), dtype=ids.dtype)
    labels = ids.masked_fill((ids == IMAGE_TOKEN) | torch.isin(ids, indicators) | (inputs["attention_mask"] == 0),
                             -100)
    if "decoder_input_ids" in inputs:  # Florence-2: the targets are the decoder's next tokens
        dec = inputs["decoder_input_ids"]
        labels = torch.cat([dec[:, 1:], torch.full_like(dec[:, :1], -100)], 1)
    assert (labels == -100).any() and (labels != -100).any()
    with torch.no_grad():
        expected = model(**inputs, labels=labels).loss
        assert torch.equal(calibration_loss(model, inputs), expected)


@names
@pytest.mark.parametrize("importance", ["activation", "taylor"])
def test_pruning_scored_on_image_batches_runs_with_images_and_reloads(name, importance, tmp_path):
    model, batches = _model_and_batches(name)
    original = copy.deepcopy(model)
    pruner = StructuredPruner(0.5, 0.3, scope="all", importance=importance, progress=False)
    if importance == "taylor" and name in UNUSED_LAYER:  # the layer runs, but the logits do not depend on it
        with pytest.warns(UserWarning, match=rf"{UNUSED_LAYER[name]}.*does not read its output.*importance is 0"):
            pruner.plan(model, batches)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plan = pruner.prune(model, batches)
    assert plan.heads or plan.neurons
    out = _logits(model, batches[0])
    ref = _logits(_zeroed(original, plan), batches[0])
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5 * max(1.0, float(ref.abs().max())))
    save_pruned(model, tmp_path / "p", plan=plan)
    back = load_pruned(tmp_path / "p")
    assert torch.equal(_logits(back, batches[0]), out)
    if plan.hf_config_exact:  # the config says what was removed: transformers' own from_pretrained rebuilds it
        model.save_pretrained(tmp_path / "hf")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            again = type(model).from_pretrained(tmp_path / "hf").eval()
        assert torch.equal(_logits(again, batches[0]), out)
