"""``medquant prune --calib-images`` on a folder the command refuses whatever the data (a medquant checkpoint, a folder
without ``config.json``): the refusal is the one the same command gives without ``--calib-images`` (the reference),
not a complaint about a missing processor that sends the user to copy processor files in first."""
from __future__ import annotations

import shutil

import numpy as np
import pytest

from medquant.cli import main
from tests.cli.tiny_folder import report_text_file, tiny_llava_folder


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("order")
    tiny_llava_folder(root / "src")
    report_text_file(root)
    np.savez(root / "images.npz", images=np.random.default_rng(0).integers(0, 256, (2, 30, 40), dtype=np.uint8))
    return root


def _prune(folder, model, out, *extra):
    return ["prune", str(model), "--out", str(out), "--heads", "0.5", "--ffn", "0.5", "--importance", "activation",
            "--calib-text", str(folder / "t.txt"), "--calib-samples", "2", "--max-length", "8", *extra]


def _error(argv, capsys) -> str:
    assert main(argv) == 2
    return capsys.readouterr().err.strip()


def test_a_medquant_checkpoint_is_named_as_one_with_images_too(folder, capsys, tmp_path):
    pruned = tmp_path / "pruned"  # a prune output: medquant.json, the tokenizer, no processor files
    assert main(_prune(folder, folder / "src", pruned, "--calib-images", str(folder / "images.npz"), "--scope",
                       "all")) == 0
    capsys.readouterr()
    reference = _error(_prune(folder, pruned, tmp_path / "a"), capsys)
    assert "medquant checkpoint" in reference
    got = _error(_prune(folder, pruned, tmp_path / "b", "--calib-images", str(folder / "images.npz")), capsys)
    assert got == reference.replace(str(tmp_path / "a"), str(tmp_path / "b"))


def test_a_folder_without_config_json_is_named_as_one_with_images_too(folder, capsys, tmp_path):
    bare = tmp_path / "bare"  # the processor is there, the model's config is not
    shutil.copytree(folder / "src", bare)
    (bare / "config.json").unlink()
    reference = _error(_prune(folder, bare, tmp_path / "a"), capsys)
    assert "no config.json" in reference
    assert _error(_prune(folder, bare, tmp_path / "b", "--calib-images", str(folder / "images.npz")),
                  capsys) == reference


def _quantize(folder, model, out, *extra):
    return ["quantize", str(model), str(out), "--bits", "4", "--group-size", "32", "--method", "gptq", "--calib",
            str(folder / "t.txt"), "--calib-samples", "2", "--seq-len", "8", *extra]


def test_quantize_names_a_medquant_checkpoint_as_one_with_images_too(folder, capsys, tmp_path):
    """The same order in ``medquant quantize``: it said the folder needs a processor."""
    pruned = tmp_path / "pruned"
    assert main(_prune(folder, folder / "src", pruned)) == 0
    capsys.readouterr()
    reference = _error(_quantize(folder, pruned, tmp_path / "a"), capsys)
    assert "medquant checkpoint" in reference
    got = _error(_quantize(folder, pruned, tmp_path / "b", "--calib-images", str(folder / "images.npz")), capsys)
    assert got == reference.replace(str(tmp_path / "a"), str(tmp_path / "b"))
