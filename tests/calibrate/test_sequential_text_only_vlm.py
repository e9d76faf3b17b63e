"""Block-by-block calibration of a VLM with text-only batches (what ``medquant quantize --calib reports.txt`` gives).

Text never runs the vision tower. With the tower (and the projector it feeds) left in float - ``skip=["@vision",
"@projector"]`` - block-by-block GPTQ gives the codes of whole-model :func:`gptq_quantize_` with the same skip (the
reference), in memory and with the model built on the meta device and its weights read from a safetensors file;
without the skip, both refuse with a message naming the blocks the batches never ran and the way out, before any
layer is quantized (with the weights on disk the forward used to stop on a tensor still on the meta device).
"""
from __future__ import annotations

import copy

import pytest
import torch

from medquant import QuantConfig
from medquant.calibrate import awq_quantize_sequential
from medquant.calibrate.gptq import gptq_quantize_, gptq_quantize_sequential
from medquant.quant.modules import QUANT_MODULES
from medquant.testing.zoo import ZOO_BY_NAME

CFG = QuantConfig(4, group_size=32)
SKIP = ["@vision", "@projector"]


def _llava_and_text():
    """The zoo's LLaVA and two text-only batches (no image token, no pixels), the second with left padding."""
    model = ZOO_BY_NAME["llava"].build()
    image = model.config.image_token_id
    batches = []
    for seed in (0, 1):
        ids = torch.randint(0, 200, (2, 12), generator=torch.Generator().manual_seed(seed))
        assert not (ids == image).any()
        mask = torch.ones_like(ids)
        if seed:
            mask[0, :3] = 0
        batches.append({"input_ids": ids, "attention_mask": mask})
    return model, batches


def _skeleton(model, tmp_path):
    """``model``'s architecture built on the meta device and its float weights in a safetensors file."""
    from accelerate import init_empty_weights
    from safetensors.torch import save_model

    file = tmp_path / "model.safetensors"
    save_model(model, str(file))
    with init_empty_weights():
        skeleton = type(model)(model.config)
    skeleton.tie_weights()
    return skeleton.eval(), file


def _assert_same_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    assert [k for k in sa if sa[k].dtype != sb[k].dtype or not torch.equal(sa[k], sb[k])] == []


def test_text_only_batches_with_the_vision_tower_skipped_give_whole_model_gptq_codes(tmp_path):
    model, batches = _llava_and_text()
    whole, seq = copy.deepcopy(model), copy.deepcopy(model)
    ref = gptq_quantize_(whole, CFG, batches, skip=SKIP, progress=False)
    got = gptq_quantize_sequential(seq, CFG, batches, skip=SKIP, device="cpu", progress=False)
    assert {n: r["method"] for n, r in got.items()} == {n: r["method"] for n, r in ref.items()}
    assert "lm_head" in got and not any("vision_tower" in n or "projector" in n for n in got)
    _assert_same_state(seq, whole)
    # streamed: the vision tower's float weights are read from the file although no block of it is calibrated
    skeleton, file = _skeleton(model, tmp_path)
    gptq_quantize_sequential(skeleton, CFG, batches, skip=SKIP, device="cpu", checkpoint=file, progress=False)
    assert not any(t.is_meta for t in skeleton.state_dict().values())
    _assert_same_state(skeleton, whole)


def test_awq_block_by_block_with_the_vision_tower_skipped_runs_on_text_and_streams(tmp_path):
    model, batches = _llava_and_text()
    mem = copy.deepcopy(model)
    awq_quantize_sequential(mem, CFG, batches, skip=SKIP, device="cpu", progress=False)
    assert not any(isinstance(m, QUANT_MODULES) for m in mem.model.vision_tower.modules())
    assert isinstance(mem.model.language_model.layers[0].self_attn.q_proj, QUANT_MODULES)
    skeleton, file = _skeleton(model, tmp_path)
    awq_quantize_sequential(skeleton, CFG, batches, skip=SKIP, device="cpu", checkpoint=file, progress=False)
    _assert_same_state(skeleton, mem)


@pytest.mark.parametrize("streamed", [False, True])
def test_a_vision_tower_the_text_never_runs_is_named_with_the_way_out(tmp_path, streamed):
    model, batches = _llava_and_text()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    target, checkpoint = (model, None) if not streamed else _skeleton(model, tmp_path)
    with pytest.raises(RuntimeError) as info:
        gptq_quantize_sequential(target, CFG, batches, device="cpu", checkpoint=checkpoint, progress=False)
    msg = str(info.value)
    assert "model.vision_tower.encoder.layers.0" in msg and "never" in msg and "@vision" in msg, msg
    assert "meta" not in msg
    assert not any(isinstance(m, QUANT_MODULES) for m in target.modules())
    if not streamed:
        assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_whole_model_gptq_on_text_names_the_vision_tower_and_the_way_out():
    model, batches = _llava_and_text()
    with pytest.raises(ValueError, match=r"vision_tower.*received no calibration inputs.*@vision.*--calib-images"):
        gptq_quantize_(model, CFG, batches, progress=False)
    assert not any(isinstance(m, QUANT_MODULES) for m in model.modules())
