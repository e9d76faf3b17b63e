"""``drop_blocks`` checks that the updated config still builds the pruned model.

Dropping a Swin stage updates ``num_hidden_layers`` but not ``depths`` / the stage widths, which the config cannot
express: transformers' ``from_pretrained`` then builds the dropped stage again and initialises it at random (a
load report, no error). Reference: transformers' own ``save_pretrained`` / ``from_pretrained`` (the reloaded model
differs) and medquant's ``save_pruned`` / ``load_pruned`` with the plan (the model comes back exactly).
"""
from __future__ import annotations

import warnings

import pytest
import torch

from medquant.prune import StructuredPruner, drop_blocks, load_pruned, save_pruned
from medquant.testing.zoo import ZOO_BY_NAME
from medquant.testing.zoo_vlm import EXTRA_ZOO_BY_NAME


def _swin():
    import transformers

    cfg = transformers.SwinConfig(image_size=32, patch_size=4, embed_dim=32, depths=[1, 1], num_heads=[2, 4],
                                  window_size=4)
    torch.manual_seed(0)
    return transformers.SwinModel(cfg).eval(), torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def test_a_dropped_swin_stage_warns_that_from_pretrained_would_not_give_it_back(tmp_path):
    from transformers import SwinModel

    model, x = _swin()
    with pytest.warns(UserWarning, match=r"no longer builds the pruned model .*encoder\.layers\.1\..* \(extra\)"):
        drop_blocks(model, ["encoder.layers.1"])
    with torch.no_grad():
        out = model(pixel_values=x).last_hidden_state
    model.save_pretrained(tmp_path / "hf")
    with torch.no_grad():
        again = SwinModel.from_pretrained(tmp_path / "hf").eval()(pixel_values=x).last_hidden_state
    assert again.shape != out.shape or not torch.allclose(again, out)  # what the warning says


def test_the_pruner_marks_the_config_inexact_and_load_pruned_gives_the_model_back(tmp_path):
    """The zoo's LLaVA-Med builds its CLIP tower from a dict in the config (``mm_vision_tower``), which the drop
    cannot update: each block fits the tower's config, but the saved config builds the dropped block again."""
    entry = EXTRA_ZOO_BY_NAME["llava_med"]
    model = entry.build()
    inputs = entry.inputs(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the plan reports it: no warning from apply_plan
        plan = StructuredPruner(drop_blocks=["model.vision_tower.encoder.layers.1"], scope="vision",
                                progress=False).prune(model)
    assert plan.hf_config_exact is False
    assert any("vision_tower.encoder.layers.1." in n and "load_pruned" in n for n in plan.config_notes)
    with torch.no_grad():
        out = entry.output(model, inputs)
    model.save_pretrained(tmp_path / "hf")
    with torch.no_grad():  # transformers' reload: the dropped block is back (at random)
        assert not torch.equal(entry.output(type(model).from_pretrained(tmp_path / "hf").float().eval(), inputs), out)
    save_pruned(model, tmp_path / "p", plan=plan)
    with torch.no_grad():
        assert torch.equal(entry.output(load_pruned(tmp_path / "p", model=entry.build()).eval(), inputs), out)


def test_load_pruned_rebuilds_a_hugging_face_model_whose_config_keeps_the_dropped_stage(tmp_path):
    model, x = _swin()
    plan = StructuredPruner(drop_blocks=["encoder.layers.1"], scope="vision", progress=False).prune(model)
    with torch.no_grad():
        out = model(pixel_values=x).last_hidden_state
    save_pruned(model, tmp_path / "p", plan=plan)
    with torch.no_grad():
        again = load_pruned(tmp_path / "p").eval()  # built from the saved config (two stages), stage 1 dropped
        assert len(again.encoder.layers) == 1 and torch.equal(again(pixel_values=x).last_hidden_state, out)


@pytest.mark.parametrize(("entry", "block"), [(ZOO_BY_NAME["llama"], "model.layers.0"),
                                              (EXTRA_ZOO_BY_NAME["qwen3_vl"], "model.visual.blocks.1"),
                                              (EXTRA_ZOO_BY_NAME["dinov2"], "encoder.layer.1")])
def test_a_drop_the_config_expresses_gives_no_warning_and_round_trips(entry, block, tmp_path):
    model = entry.build()
    inputs = entry.inputs(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        drop_blocks(model, [block])
    with torch.no_grad():
        out = entry.output(model, inputs)
    model.save_pretrained(tmp_path / "hf")
    with torch.no_grad():
        again = type(model).from_pretrained(tmp_path / "hf").float().eval()
        assert torch.equal(entry.output(again, inputs), out)
