"""Small command-line review (5): what a killed ``medquant quantize`` leaves beside OUT_DIR is removed by the next
run, ``medquant demo --json / --plot`` into folders that do not exist yet creates them before training (as
``medquant score`` does for its outputs) and refuses an unusable one before training, and ``medquant export
--input-shape`` of the wrong rank (or channels) for an image model is refused in one line naming the option.
References: ``os.listdir`` of the parent folder, ``json`` / the PNG signature of the written files, the ViT's
own ``config.num_channels``."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

import medquant as mq
import medquant.cli.demo as cli_demo
from medquant.cli import main

# ---------------------------------------------------------------- 1. quantize: leftovers of a killed run

_KILLED = """
import os, signal, sys
import medquant.io.checkpoint as ck
ck.write_manifest = lambda folder: os.kill(os.getpid(), signal.SIGKILL)  # killed in the middle of the save
from medquant.cli import main
main(["quantize", sys.argv[1], sys.argv[2], "--group-size", "32", "--json"])
"""


def test_quantize_rerun_removes_what_a_killed_run_left_beside_out_dir(tmp_path, capsys):
    from tests.cli.tiny_folder import tiny_llama_folder

    src, out = tmp_path / "m", tmp_path / "q"
    tiny_llama_folder(src)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")])}
    killed = subprocess.run([sys.executable, "-c", _KILLED, str(src), str(out)], env=env,
                            capture_output=True, check=False)
    assert killed.returncode == -9, killed.stderr.decode()[-2000:]
    left = {e for e in os.listdir(tmp_path) if e not in ("m", ".q.mq-lock")}
    assert left, "the killed run left nothing: the test did not kill it in the middle of the save"
    assert main(["quantize", str(src), str(out), "--group-size", "32", "--json"]) == 0
    capsys.readouterr()
    # before the fix the killed run's .q.quantize-* scratch folder stayed beside OUT_DIR
    assert sorted(os.listdir(tmp_path)) == sorted(["m", "q", ".q.mq-lock"])
    assert main(["verify", str(out)]) == 0
    manifest = json.loads((out / "medquant.manifest.json").read_text())["files"]
    assert {"tokenizer.json", "tokenizer_config.json", "config.json"} <= set(manifest)
    assert not any(n.startswith(".") for n in os.listdir(out)), os.listdir(out)  # no scratch left inside


# ---------------------------------------------------------------- 2. demo: output folders that do not exist


def _demo(tmp_path, *extra):
    return main(["demo", "--data-dir", str(tmp_path / "no-data"), "--epochs", "1", "--bootstrap", "20", *extra])


def test_demo_creates_missing_output_folders(tmp_path, capsys):
    js, png = tmp_path / "new" / "sub" / "r.json", tmp_path / "other" / "p.png"
    # before the fix: trained, then "No such file or directory", exit code 2, nothing written
    assert _demo(tmp_path, "--json", str(js), "--plot", str(png)) == 0
    capsys.readouterr()
    rows = json.loads(js.read_text())["rows"]
    assert [r["weights"] for r in rows] == ["float32"] + [s[0] for s in cli_demo.SCHEMES]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("flag", ["--json", "--plot"])
def test_demo_unusable_output_path_is_refused_before_training(tmp_path, capsys, monkeypatch, flag):
    (tmp_path / "f").write_text("a file, not a folder")
    monkeypatch.setattr(cli_demo, "_train", lambda *a, **k: pytest.fail("trained before the check"))
    bad = str(tmp_path / "f" / "out.x")
    other = "--plot" if flag == "--json" else "--json"
    assert _demo(tmp_path, flag, bad, other, str(tmp_path / "ok.x")) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{flag} {bad}" in err, err

    monkeypatch.setattr(cli_demo, "_train", lambda *a, **k: pytest.fail("trained before the check"))
    assert _demo(tmp_path, flag, str(tmp_path)) == 2  # a folder given as the output file
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{flag} {tmp_path}" in err and "folder" in err, err


# ---------------------------------------------------------------- 3. export --input-shape of the wrong rank


@pytest.fixture(scope="module")
def vit(tmp_path_factory):
    from medquant.testing.zoo import ZOO_BY_NAME

    root = tmp_path_factory.mktemp("review5_export")
    model = ZOO_BY_NAME["vit"].build()
    mq.save(model, root / "vit")
    return root, model


@pytest.mark.parametrize("shape", ["1,3", "1,3,32", "1,3,32,32,2", "1,1,32,32"])
def test_export_input_shape_that_does_not_fit_the_model_is_refused(vit, tmp_path, capsys, shape):
    root, model = vit
    channels = model.config.num_channels
    assert channels == 3
    out = tmp_path / "v.onnx"
    # before the fix: "not enough values to unpack" (or the model's own channel error) from the trace
    assert main(["export", str(root / "vit"), str(out), "--format", "onnx", "--input-shape", shape]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert f"--input-shape {shape}" in err and f"N,{channels},H,W" in err, err
    assert not out.exists()


def test_export_input_shape_that_fits_is_accepted(vit, tmp_path, capsys):
    root, _ = vit
    assert main(["export", str(root / "vit"), str(tmp_path / "v.onnx"), "--format", "onnx", "--input-shape",
                 "2,3,32,32", "--json"]) == 0
    assert (tmp_path / "v.onnx").stat().st_size > 0


def test_image_input_layer_reads_a_first_conv2d_and_skips_token_models():
    from torch import nn

    from medquant.cli.export import check_input_shape, image_input_layer

    cnn = cli_demo.tiny_cnn(in_ch=1)
    assert image_input_layer(cnn) == ("0 (Conv2d)", cnn[0].in_channels)
    with pytest.raises(SystemExit, match=r"--input-shape 1,28,28: .* expects N,1,H,W .* got 3 numbers"):
        check_input_shape((1, 28, 28), cnn)
    check_input_shape((4, 1, 28, 28), cnn)  # fits: nothing raised
    assert image_input_layer(nn.Sequential(nn.Linear(4, 2), nn.Conv2d(1, 2, 3))) is None  # not an image input
