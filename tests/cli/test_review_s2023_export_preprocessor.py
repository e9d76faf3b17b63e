"""``medquant export --format onnx --calib``: a ``preprocessor_config.json`` in SRC that is no JSON object is named in
the one-line error."""
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
