"""``medquant quantize`` of a VLM folder with report text as calibration (``tiny_llava_folder``):
with ``--skip @vision @projector`` the block-by-block runs (in memory and ``--stream``) write bit for bit the
tensors of the whole-model GPTQ run (the reference: ``gptq_quantize_`` through the same command); without the skip
``--block-by-block --stream`` exits with one line naming the vision blocks and ``--skip @vision``, writing nothing."""
from __future__ import annotations

import json

import pytest
import torch

from medquant.cli import main
from tests.cli.tiny_folder import report_text_file, tiny_llava_folder


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("vlm_text")
    tiny_llava_folder(root / "src")
    report_text_file(root)
    return root


def _args(folder, out, *extra):
    return ["quantize", str(folder / "src"), str(folder / out), "--bits", "4", "--group-size", "32", "--method",
            "gptq", "--calib", str(folder / "t.txt"), "--calib-samples", "2", "--seq-len", "16", "--json", *extra]


def _tensors(path):
    from safetensors.torch import load_file

    return load_file(str(path / "model.safetensors"))


def test_block_by_block_with_the_vision_tower_skipped_writes_the_whole_model_tensors(folder, capsys):
    skip = ["--skip", "@vision", "@projector"]
    paths = {}
    for out, extra in (("whole", []), ("bbb", ["--block-by-block"]), ("streamed", ["--block-by-block", "--stream"])):
        assert main(_args(folder, out, *skip, *extra)) == 0
        paths[out] = json.loads(capsys.readouterr().out)["path"]
    assert paths == {"whole": "whole-model", "bbb": "block-by-block", "streamed": "block-by-block-streamed"}
    ref = _tensors(folder / "whole")
    assert "language_model.model.layers.0.self_attn.q_proj.qweight_4" in ref  # the language blocks quantized,
    assert "vision_tower.encoder.layers.0.self_attn.q_proj.weight" in ref     # the vision tower float
    for out in ("bbb", "streamed"):
        got = _tensors(folder / out)
        assert sorted(got) == sorted(ref)
        assert [k for k in ref if got[k].dtype != ref[k].dtype or not torch.equal(got[k], ref[k])] == [], out


def test_stream_without_the_skip_names_the_vision_blocks_and_the_way_out(folder, capsys):
    assert main(_args(folder, "refused", "--block-by-block", "--stream")) == 2
    err = capsys.readouterr().err
    assert "never ran blocks model.vision_tower.encoder.layers.0" in err and "--skip @vision" in err
    assert "meta" not in err and len(err.strip().splitlines()) == 1
    assert not (folder / "refused").exists()
