"""Indices into a vision tower's blocks / hidden states follow the blocks when :func:`drop_blocks` is called
directly (not only through ``apply_plan``), Qwen3-VL's deepstack indexes included; float32 ratios count as typed.

Reference for every drop: the original model with the dropped block skipped (a forward hook returns the block's
input as its output), which is what removing the block must equal.
"""
from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest
import torch

from medquant.prune import StructuredPruner, apply_plan, drop_blocks
from medquant.testing.zoo import ZOO_BY_NAME, _qwen_vl_inputs
from medquant.testing.zoo_vlm import EXTRA_ZOO_BY_NAME
from tests.calibrate.test_sequential_between_blocks import _mllama
from tests.prune.test_pruner_review4 import _run_skipped, _windowed_qwen2_5_vl
from tests.tiny_idefics import idefics_inputs, tiny_idefics


# ---------------------------------------------------------------------------------------------- 1. LLaVA direct
def _llava(feature_layer, depth=3):
    from transformers import LlavaForConditionalGeneration

    entry = ZOO_BY_NAME["llava"]
    cfg = copy.deepcopy(entry.build().config)
    cfg.vision_feature_layer, cfg.vision_config.num_hidden_layers = feature_layer, depth
    torch.manual_seed(0)
    return entry, LlavaForConditionalGeneration(cfg).float().eval()


# (feature layer, dropped blocks, hand-computed new value): position p (hidden_states[p] = output of block p-1)
# becomes p - #{dropped < p}; a negative index counts from the new end (L' + 1 entries)
@pytest.mark.parametrize(("feature_layer", "drop", "want"), [
    (2, [0], 1),          # twice-applied renumbering would give 0
    (-2, [2], -1),        # LLaVA-1.5: the last block is unused; hidden_states[-2] of 4 is position 2 -> -1 of 3
    (-2, [1], -2),        # position 2 (output of block 1) -> 1, i.e. -2 of 3 entries: the embedding output's next
    ([1, -1], [0, 2], [0, -1]),
])
def test_drop_blocks_directly_renumbers_vision_feature_layer(feature_layer, drop, want):
    entry, model = _llava(feature_layer)
    inputs = entry.inputs(model)
    names = [f"model.vision_tower.encoder.layers.{i}" for i in drop]
    ref = _run_skipped(model, names, lambda m: entry.output(m, inputs))
    via_plan = copy.deepcopy(model)
    drop_blocks(model, names)
    assert model.config.vision_feature_layer == want
    with torch.no_grad():
        torch.testing.assert_close(entry.output(model, inputs), ref, rtol=1e-5, atol=1e-5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        StructuredPruner(drop_blocks=names, scope="vision", progress=False).prune(via_plan)
    assert via_plan.config.vision_feature_layer == want  # apply_plan renumbers once, not twice
    with torch.no_grad():
        torch.testing.assert_close(entry.output(via_plan, inputs), ref, rtol=1e-5, atol=1e-5)


def test_drop_blocks_directly_keeps_qwen2_5_vl_full_attention_blocks():
    entry, model = _windowed_qwen2_5_vl()
    inputs = entry.inputs(model)
    ref = _run_skipped(model, ["model.visual.blocks.0"], lambda m: entry.output(m, inputs))
    drop_blocks(model, ["model.visual.blocks.0"])
    assert model.model.visual.fullatt_block_indexes == [0] and model.config.vision_config.fullatt_block_indexes == [0]
    with torch.no_grad():
        torch.testing.assert_close(entry.output(model, inputs), ref, rtol=1e-5, atol=1e-5)


def _state(model):
    """A copy of ``model``'s state dict (to show a refused drop changed nothing)."""
    return {k: v.clone() for k, v in model.state_dict().items()}


def _same_state(a, b) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _logits_equal_and_reload(model, cls, inputs, ref, path):
    """The pruned model's logits equal ``ref`` (the original with the blocks skipped), and ``cls.from_pretrained`` of
    its ``save_pretrained`` folder gives them again, bit for bit."""
    with torch.no_grad():
        out = model(**inputs).logits
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    model.save_pretrained(path)
    with torch.no_grad():
        again = cls.from_pretrained(path).eval()(**inputs).logits
    assert torch.equal(again, out)


# ---------------------------------------------------------------------------------------------- 2. Qwen3-VL deepstack
def _qwen3_vl(indexes, depth=3):
    from transformers import Qwen3VLForConditionalGeneration

    entry = EXTRA_ZOO_BY_NAME["qwen3_vl"]
    cfg = copy.deepcopy(entry.build().config)
    cfg.vision_config.depth, cfg.vision_config.deepstack_visual_indexes = depth, list(indexes)
    torch.manual_seed(0)
    return entry, Qwen3VLForConditionalGeneration(cfg).float().eval()


def _qwen3_out(model, inputs):
    """Deepstack features (merger k reads the output of block deepstack_visual_indexes[k]) and the logits of an
    image + text forward (deepstack feature k is added after text layer k)."""
    feats = model.model.get_image_features(pixel_values=inputs["pixel_values"],
                                           image_grid_thw=inputs["image_grid_thw"]).deepstack_features
    return [torch.cat(f) for f in feats] + [model(**inputs).logits]


# (deepstack indexes, dropped, new indexes): a kept block d -> d - #{dropped < d}; a dropped block's output is its
# input (skipping), the output of the kept block before it
@pytest.mark.parametrize(("indexes", "drop", "want"), [
    ([2], [0], [1]), ([1], [1], [0]), ([2], [0, 1], [0]), ([0, 2], [1], [0, 1]), ([1, 2], [0], [0, 1]),
    ([0], [1], [0]),
])
@pytest.mark.parametrize("direct", [True, False])
def test_qwen3_vl_deepstack_indexes_follow_the_blocks(indexes, drop, want, direct):
    _, model = _qwen3_vl(indexes)
    inputs = _qwen_vl_inputs(model, torch.Generator().manual_seed(0))  # with the image tokens of a full forward
    names = [f"model.visual.blocks.{i}" for i in drop]
    ref = _run_skipped(model, names, lambda m: _qwen3_out(m, inputs))
    if direct:
        drop_blocks(model, names)
    else:
        StructuredPruner(drop_blocks=names, scope="vision", progress=False).prune(model)
    assert model.model.visual.deepstack_visual_indexes == want
    assert model.config.vision_config.deepstack_visual_indexes == want
    with torch.no_grad():
        out = _qwen3_out(model, inputs)
    assert len(out) == len(ref)
    for a, b in zip(out, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


# no index can express these: block 0's input (the patch embedding) feeds no merger, and two mergers reading one
# block run once in transformers (``layer_num in indexes`` / ``indexes.index``), so text layer 1 would lose its feature
@pytest.mark.parametrize(("indexes", "drop"), [([0], [0]), ([0, 1], [1]), ([1], [0, 1]), ([0, 2], [1, 2])])
@pytest.mark.parametrize("direct", [True, False])
def test_qwen3_vl_refuses_a_drop_no_deepstack_index_can_express(indexes, drop, direct):
    _, model = _qwen3_vl(indexes)
    names = [f"model.visual.blocks.{i}" for i in drop]
    before = _state(model)
    pruner = StructuredPruner(0.0, 0.5, scope="all", progress=False)  # the text FFNs
    if not direct:  # refused by plan(), and by apply_plan before it prunes anything
        with pytest.raises(ValueError, match="deepstack"):
            StructuredPruner(0.0, 0.5, drop_blocks=names, scope="all", progress=False).plan(model)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the vision blocks have no prunable FFN
            plan = pruner.plan(model)
        plan.drop_blocks = names
    with pytest.raises(ValueError, match="deepstack"):
        if direct:
            drop_blocks(model, names)
        else:
            apply_plan(model, plan)
    assert len(model.model.visual.blocks) == 3 and model.model.visual.deepstack_visual_indexes == indexes
    assert _same_state(model.state_dict(), before)


def test_zoo_qwen3_vl_refuses_dropping_its_deepstack_block_and_drops_the_other():
    entry = EXTRA_ZOO_BY_NAME["qwen3_vl"]  # deepstack_visual_indexes [0], 2 blocks
    model = entry.build().float().eval()
    with pytest.raises(ValueError, match="deepstack"):
        drop_blocks(model, ["model.visual.blocks.0"])
    inputs = _qwen_vl_inputs(model, torch.Generator().manual_seed(0))
    ref = _run_skipped(model, ["model.visual.blocks.1"], lambda m: _qwen3_out(m, inputs))
    drop_blocks(model, ["model.visual.blocks.1"])
    with torch.no_grad():
        for a, b in zip(_qwen3_out(model, inputs), ref, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------- other zoo VLMs
def test_mllama_intermediate_layers_follow_the_local_blocks():
    """Mllama concatenates the outputs of the local transformer's blocks ``intermediate_layers_indices`` (entries of
    ``hidden_states``, one per block) to its vision output."""
    from transformers import MllamaForConditionalGeneration

    entry = EXTRA_ZOO_BY_NAME["mllama"]
    cfg = copy.deepcopy(entry.build().config)
    vc = cfg.vision_config
    vc.num_hidden_layers, vc.intermediate_layers_indices = 3, [1, 2]
    vc.vision_output_dim = vc.hidden_size * 3  # the last hidden state and two intermediate ones
    torch.manual_seed(0)
    model = MllamaForConditionalGeneration(cfg).float().eval()
    inputs = entry.inputs(model)
    names = ["model.vision_model.transformer.layers.0", "model.vision_model.transformer.layers.2"]
    ref = _run_skipped(model, names, lambda m: entry.output(m, inputs))
    drop_blocks(model, names)
    assert model.model.vision_model.intermediate_layers_indices == [0, 0]
    assert model.config.vision_config.intermediate_layers_indices == [0, 0]
    with torch.no_grad():
        torch.testing.assert_close(entry.output(model, inputs), ref, rtol=1e-5, atol=1e-5)
    model = entry.build()  # intermediate_layers_indices [0]: block 0's input is no entry of hidden_states
    with pytest.raises(ValueError, match="intermediate_layers_indices"):
        drop_blocks(model, ["model.vision_model.transformer.layers.0"])
    assert len(model.model.vision_model.transformer.layers) == 2


@pytest.mark.parametrize(("drop", "want"), [(0, [0]), (1, [])])
def test_mllama_text_cross_attention_layers_follow_the_blocks_and_reload(drop, want, tmp_path):
    """Mllama builds text layer i as a cross-attention layer when i is in ``cross_attention_layers`` (zoo: [1] of 2)
    and runs it only with image states; after a drop the list must name the same layers (the pruned model failed
    in its forward when text layer 0 was dropped)."""
    from transformers import MllamaForConditionalGeneration

    model, inputs = _mllama()
    name = f"model.language_model.layers.{drop}"
    ref = _run_skipped(model, [name], lambda m: m(**inputs).logits)
    drop_blocks(model, [name])
    text = model.model.language_model
    assert text.cross_attention_layers == want and model.config.text_config.cross_attention_layers == want
    _logits_equal_and_reload(model, MllamaForConditionalGeneration, inputs, ref, tmp_path / "m")


@pytest.mark.parametrize("block", [0, 1])
def test_gemma4_text_layers_with_per_layer_inputs_are_refused(block):
    """Gemma 4 reads slice i of its per-layer input embeddings (reshaped by num_hidden_layers) in text layer i: the
    model with a dropped layer failed in its forward; the drop is refused and nothing changes."""
    model = EXTRA_ZOO_BY_NAME["gemma4"].build()
    assert model.config.text_config.hidden_size_per_layer_input > 0
    before = _state(model)
    with pytest.raises(ValueError, match="per-layer input embeddings"):
        drop_blocks(model, [f"model.language_model.layers.{block}"])
    assert len(model.model.language_model.layers) == model.config.text_config.num_hidden_layers == 2
    assert _same_state(model.state_dict(), before)


@pytest.mark.parametrize(("name", "attention"), [("qwen3_5", 1), ("lfm2_vl", 0)])
def test_dropping_every_attention_layer_of_a_hybrid_stack_is_refused(name, attention):
    """The zoo's Qwen3.5 (linear attention + full attention) and LFM2-VL (full attention + conv) text stacks: without
    their one full-attention layer transformers cannot build the masks / cache (the pruned model failed in its
    forward); the other layer drops as the model with it skipped."""
    entry = EXTRA_ZOO_BY_NAME[name]
    model = entry.build()
    inputs = entry.inputs(model)
    stack = "model.language_model.layers"
    assert model.config.text_config.layer_types[attention] == "full_attention"
    with pytest.raises(ValueError, match="every attention layer"):
        drop_blocks(model, [f"{stack}.{attention}"])
    assert len(model.get_submodule(stack)) == 2
    other = f"{stack}.{1 - attention}"
    ref = _run_skipped(model, [other], lambda m: entry.output(m, inputs))
    drop_blocks(model, [other])
    with torch.no_grad():
        torch.testing.assert_close(entry.output(model, inputs), ref, rtol=1e-5, atol=1e-5)


def test_phi4mm_image_feature_layer_follows_the_blocks():
    """Phi-4-multimodal reads ``hidden_states[feature_layer]`` (-2) of its SigLIP tower."""
    entry = EXTRA_ZOO_BY_NAME["phi4mm"]
    model = entry.build().float().eval()
    inputs = entry.inputs(model)
    emb = model.model.embed_tokens_extend.image_embed
    stack = "model.embed_tokens_extend.image_embed.img_processor.encoder.layers"
    assert emb.layer_idx == -2 and len(model.get_submodule(stack)) == 2
    names = [f"{stack}.1"]

    def image(m):
        e = m.model.embed_tokens_extend.image_embed
        hs = e.img_processor(inputs["pixel_values"], output_hidden_states=True).hidden_states
        return hs[e.layer_idx]
    ref = _run_skipped(model, names, image)
    drop_blocks(model, names)
    assert emb.layer_idx == -1 and model.config.vision_config.feature_layer == -1
    with torch.no_grad():
        torch.testing.assert_close(image(model), ref, rtol=1e-5, atol=1e-5)


# IDEFICS (v1): cross-attention layer k runs before text layer k * cross_layer_interval; 6 layers, interval 3
@pytest.mark.parametrize(("drop", "interval"), [([1, 4], 2), ([0, 2, 3, 5], 1), ([2, 5], 2)])
@pytest.mark.parametrize("direct", [True, False])
def test_idefics_cross_layer_interval_follows_the_blocks_and_reloads(drop, interval, direct, tmp_path):
    from transformers import IdeficsForVisionText2Text

    model, inputs = tiny_idefics(layers=6, interval=3), idefics_inputs()
    names = [f"model.layers.{i}" for i in drop]
    ref = _run_skipped(model, names, lambda m: m(**inputs).logits)
    if direct:
        drop_blocks(model, names)
    else:
        StructuredPruner(drop_blocks=names, scope="language", progress=False).prune(model)
    assert model.model.cross_layer_interval == interval and model.config.cross_layer_interval == interval
    assert len(model.model.layers) == model.config.num_hidden_layers == 6 - len(drop)
    _logits_equal_and_reload(model, IdeficsForVisionText2Text, inputs, ref, tmp_path / "m")


# kept per group [2, 3]; group 1 emptied (two cross-attention layers in a row); a cross-attention layer itself
@pytest.mark.parametrize("names", [["model.layers.1"], ["model.layers.3", "model.layers.4", "model.layers.5"],
                                   ["model.gated_cross_attn_layers.1"]])
def test_idefics_refuses_a_drop_no_interval_can_express(names):
    model = tiny_idefics(layers=6, interval=3)
    before = _state(model)
    with pytest.raises(ValueError, match="cross.attention"):
        drop_blocks(model, names)
    assert len(model.model.layers) == 6 and len(model.model.gated_cross_attn_layers) == 2
    assert model.model.cross_layer_interval == model.config.cross_layer_interval == 3
    assert _same_state(model.state_dict(), before)


# ---------------------------------------------------------------------------------------------- 3. float32 ratios
def test_float32_ratio_counts_as_typed():
    """``0.35`` of 10 is 3.5 and removes 4 (half up); the float32 nearest 0.35 is 0.3499999940395355, whose
    product 3.4999999 would remove 3: a float32 ratio is read as its shortest repr, the number typed."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from medquant.prune.ratios import check_ratio
    from medquant.testing.zoo import text_kwargs

    assert float(np.float32(0.35)) * 10 < 3.5  # the example is real
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**text_kwargs(intermediate_size=10))).eval()
    n_layers = model.config.num_hidden_layers
    for r in (0.35, np.float32(0.35), torch.tensor(0.35), np.array(0.35, dtype=np.float32),
              [np.float32(0.35)] * n_layers, np.full(n_layers, 0.35, dtype=np.float32),
              torch.full((n_layers,), 0.35), {f"model.layers.{i}": np.float32(0.35) for i in range(n_layers)}):
        plan = StructuredPruner(0.0, r, progress=False).plan(model)
        assert {len(v) for v in plan.neurons.values()} == {6}, r
    assert check_ratio(np.float32(0.35), "r") == 0.35
    assert check_ratio(np.float16(0.35), "r") == 0.35
    assert check_ratio(0.3499999940395355, "r") == 0.3499999940395355  # a float64 is taken as it is


# ---------------------------------------------------------------------------------------------- backbone stages
def test_dinov2_backbone_out_indices_follow_the_blocks_and_reload(tmp_path):
    """A DINOv2 / BEiT config's ``out_indices`` pick entries of ``stage_names`` (``stem`` = the embedding output,
    ``stage{p}`` = the output of block ``p - 1``); after a drop they must name the same hidden states, and the
    config must still load (``stage_names`` follows ``num_hidden_layers`` on reload)."""
    from transformers import Dinov2Backbone

    cfg = copy.deepcopy(EXTRA_ZOO_BY_NAME["dinov2"].build().config)
    cfg.num_hidden_layers = 3
    cfg.stage_names = ["stem", "stage1", "stage2", "stage3"]
    cfg.out_indices = [1, 3]
    torch.manual_seed(0)
    model = Dinov2Backbone(cfg).eval()
    px = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    # reference: the backbone records block outputs by its own hooks, so a skip hook cannot stand in for the
    # drop; a skipped block 2 outputs its input, block 1's output (stage2): the original with out_indices [1, 2]
    ref_model = copy.deepcopy(model)
    ref_model.config.out_indices = [1, 2]
    with torch.no_grad():
        ref = ref_model(px).feature_maps
    drop_blocks(model, ["encoder.layer.2"])
    assert model.config.out_indices == [1, 2] and model.config.out_features == ["stage1", "stage2"]
    assert model.config.stage_names == ["stem", "stage1", "stage2"]
    with torch.no_grad():
        out = model(px).feature_maps
    assert len(out) == len(ref) and all(torch.equal(a, b) for a, b in zip(out, ref))
    model.save_pretrained(tmp_path / "b")
    with torch.no_grad():
        again = Dinov2Backbone.from_pretrained(tmp_path / "b").eval()(px).feature_maps
    assert all(torch.equal(a, b) for a, b in zip(again, out, strict=True))
    with pytest.raises(ValueError, match="out_indices"):  # stage1 and stage2 would both be block 0's output
        drop_blocks(model, ["encoder.layer.1"])
    assert len(model.encoder.layer) == 2


def test_zoo_dinov2_model_with_a_dropped_block_reloads(tmp_path):
    from transformers import AutoModel

    entry = EXTRA_ZOO_BY_NAME["dinov2"]  # Dinov2Model, default out_indices [2] (the last stage)
    model = entry.build().eval()
    inputs = entry.inputs(model)
    drop_blocks(model, ["encoder.layer.1"])
    assert model.config.out_indices == [1]
    model.save_pretrained(tmp_path / "m")
    with torch.no_grad():
        torch.testing.assert_close(entry.output(AutoModel.from_pretrained(tmp_path / "m").eval(), inputs),
                                   entry.output(model, inputs), rtol=0, atol=0)
