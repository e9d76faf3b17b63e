"""``medquant export --format onnx --calib``: the calibration pixels are normalized with SRC's
``preprocessor_config.json`` as an explicit ``--mean`` / ``--std`` normalizes them (a number ``image_mean`` /
``image_std`` too), and a file that is no JSON object is named in the one-line error."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

import medquant as mq
from medquant.cli import main


@pytest.fixture(scope="module")
def vit8(tmp_path_factory):
    from medquant.testing.zoo import ZOO_BY_NAME

    root = tmp_path_factory.mktemp("s2023_export")
    model = mq.quantize_(ZOO_BY_NAME["vit"].build(), mq.QuantConfig(8, scope="channel"))
    mq.save(model, root / "vit8")
    rng = np.random.default_rng(0)
    np.save(root / "calib.npy", (rng.random((4, 32, 32, 3)) * 255).astype(np.uint8))
    return root


def _export(root, src, out, *extra):
    return main(["export", str(src), str(out), "--format", "onnx", "--calib", str(root / "calib.npy"), "--json",
                 *extra])


def test_a_number_image_mean_and_std_normalize_as_the_same_mean_and_std_given_on_the_command_line(vit8, tmp_path,
                                                                                                     capsys):
    src = tmp_path / "src"
    shutil.copytree(vit8 / "vit8", src)
    # the reference: the folder without a preprocessor config, normalized by --mean / --std
    assert _export(vit8, src, tmp_path / "given.onnx", "--mean", "0.5", "--std", "0.25") == 0
    assert _export(vit8, src, tmp_path / "plain.onnx") == 0
    capsys.readouterr()
    assert (tmp_path / "given.onnx").read_bytes() != (tmp_path / "plain.onnx").read_bytes()  # normalizing shows
    # transformers' image processors take a number image_mean / image_std (one value for every channel)
    (src / "preprocessor_config.json").write_text(json.dumps({"image_mean": 0.5, "image_std": 0.25}))
    assert _export(vit8, src, tmp_path / "config.onnx") == 0
    capsys.readouterr()
    assert (tmp_path / "config.onnx").read_bytes() == (tmp_path / "given.onnx").read_bytes()


@pytest.mark.parametrize("content", ["{bad", "[0.5, 0.5]"])
def test_a_preprocessor_config_that_is_no_json_object_is_named(vit8, tmp_path, capsys, content):
    try:  # the reference: no JSON object
        parsed = json.loads(content)
    except ValueError:
        parsed = None
    assert not isinstance(parsed, dict)
    src = tmp_path / "src"
    shutil.copytree(vit8 / "vit8", src)
    (src / "preprocessor_config.json").write_text(content)
    assert _export(vit8, src, tmp_path / "m.onnx") == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and str(src / "preprocessor_config.json") in err
    assert not (tmp_path / "m.onnx").exists()


@pytest.mark.parametrize("config", [{"image_mean": [0.5, 0.5, 0.5], "image_std": [0.0, 0.5, 0.5]},
                                    {"image_mean": [0.5, 0.5], "image_std": [0.5, 0.5]}])
def test_a_preprocessor_mean_or_std_that_cannot_normalize_is_blamed_on_the_file(vit8, tmp_path, capsys, config):
    src = tmp_path / "src"
    shutil.copytree(vit8 / "vit8", src)
    (src / "preprocessor_config.json").write_text(json.dumps(config))
    assert _export(vit8, src, tmp_path / "m.onnx") == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and str(src / "preprocessor_config.json") in err
    assert not (tmp_path / "m.onnx").exists()
    # the same values given on the command line are refused as they are, naming no file
    assert _export(vit8, tmp_path / "src", tmp_path / "m.onnx", "--mean", ",".join(map(str, config["image_mean"])),
                   "--std", ",".join(map(str, config["image_std"]))) == 2
    assert "preprocessor_config.json" not in capsys.readouterr().err
