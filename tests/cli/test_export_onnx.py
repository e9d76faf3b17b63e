"""``medquant export --format onnx`` with example inputs and calibration from the command line: the file's activation
scales are those that ``calibrate_activations`` computes from the same samples (the Python API), ONNX Runtime
runs it within the derived tolerance of the simulation, and bad arguments stop with exit code 2 naming the argument.

References: onnx.numpy_helper (the stored scales), onnxruntime (the outputs), PIL + torch for the image-folder
preprocessing computed by hand.
"""
from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from onnx import numpy_helper

import medquant as mq
from medquant.cli import main
from medquant.deploy.onnx import calibrate_activations, logits_tolerance
from medquant.deploy.onnx_sim import ActQuant
from medquant.testing.zoo import ZOO_BY_NAME

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A zoo ViT classifier (32 px RGB) at 8 bits per channel and in float, saved with medquant.save; calibration
    samples as .npy."""
    root = tmp_path_factory.mktemp("export_onnx_cli")
    entry = ZOO_BY_NAME["vit"]
    model = entry.build()
    mq.save(model, root / "float")
    mq.quantize_(model, mq.QuantConfig(bits=8, scope="channel"))
    mq.save(model, root / "int8")
    g = torch.Generator().manual_seed(0)
    calib = torch.randn(12, 3, 32, 32, generator=g)
    np.save(root / "calib.npy", calib.numpy())
    return root, model, calib


def _scales(path) -> dict[str, float]:
    return {t.name: float(numpy_helper.to_array(t)) for t in onnx.load(str(path)).graph.initializer
            if t.name.endswith("_quant.scale")}


def _assert_file_has_the_simulations_scales(path, sim) -> None:
    """Every activation scale stored under its quantization point's name equals the simulation's, bit for bit."""
    got = _scales(path)
    points = {f"{name}.scale": float(m.scale) for name, m in sim.named_modules() if isinstance(m, ActQuant)}
    found = [k for k in points if k in got]
    assert len(found) >= len(points) // 2 > 1, (sorted(got)[:5], sorted(points)[:5])
    for k in found:
        assert got[k] == points[k], k


def _run(path, x: torch.Tensor) -> np.ndarray:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {"pixel_values": x.numpy()})[0]


@pytest.mark.parametrize("method", ["minmax", "percentile"])
def test_calib_npy_gives_the_python_apis_scales_and_ort_matches_the_simulation(saved, capsys, method):
    root, model, calib = saved
    out = root / f"vit_{method}.onnx"
    extra = ["--calib-method", "percentile", "--percentile", "99.5"] if method == "percentile" else []
    assert main(["export", str(root / "int8"), str(out), "--format", "onnx", "--calib", str(root / "calib.npy"),
                 "--calib-batch-size", "4", "--json", *extra]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["format"] == "onnx" and any("12 samples" in n and method in n for n in report["notes"])
    sim = calibrate_activations(model, list(calib.split(4)), method=method, percentile=99.5)
    _assert_file_has_the_simulations_scales(out, sim)
    x = torch.randn(5, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = sim(x).logits.numpy()
    assert np.abs(_run(out, x) - ref).max() <= logits_tolerance(sim)


def test_image_folder_is_resized_scaled_and_normalized(saved, tmp_path, capsys):
    from PIL import Image

    root, model, _ = saved
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (6, 40, 40, 3), dtype=np.uint8)
    (tmp_path / "imgs" / "sub").mkdir(parents=True)
    for i, p in enumerate(pixels):
        Image.fromarray(p).save(tmp_path / "imgs" / ("sub" if i % 2 else "") / f"im{i}.png")
    out = tmp_path / "vit.onnx"
    assert main(["export", str(root / "int8"), str(out), "--format", "onnx", "--calib", str(tmp_path / "imgs"),
                 "--image-size", "32", "--mean", "0.5", "--std", "0.25", "--calib-batch-size", "3"]) == 0
    assert "6 samples of shape (3, 32, 32)" in capsys.readouterr().out
    files = sorted((tmp_path / "imgs").rglob("*.png"))  # the folder's sorted order
    x = torch.stack([torch.from_numpy(np.array(Image.open(f))).permute(2, 0, 1).float() / 255 for f in files])
    x = (F.interpolate(x, size=(32, 32), mode="bilinear", align_corners=False, antialias=True) - 0.5) / 0.25
    sim = calibrate_activations(model, list(x.split(3)))
    _assert_file_has_the_simulations_scales(out, sim)


def test_a_gray_image_folder_calibrates_an_rgb_model_with_the_gray_channel_repeated(saved, tmp_path, capsys):
    from PIL import Image

    root, model, _ = saved
    pixels = np.random.default_rng(1).integers(0, 256, (4, 32, 32), dtype=np.uint8)
    (tmp_path / "gray").mkdir()
    for i, p in enumerate(pixels):
        Image.fromarray(p).save(tmp_path / "gray" / f"im{i}.png")  # mode L: one channel
    out = tmp_path / "vit.onnx"
    assert main(["export", str(root / "int8"), str(out), "--format", "onnx", "--calib", str(tmp_path / "gray"),
                 "--image-size", "32"]) == 0  # the ViT's config says 3 channels: no --input-shape needed
    assert "4 samples of shape (3, 32, 32)" in capsys.readouterr().out
    x = torch.from_numpy(pixels).float().div(255).unsqueeze(1).expand(-1, 3, -1, -1).contiguous()
    _assert_file_has_the_simulations_scales(out, calibrate_activations(model, [x]))


def test_float_model_needs_only_an_input_shape(saved, capsys):
    root, _, _ = saved
    out = root / "float.onnx"
    assert main(["export", str(root / "float"), str(out), "--format", "onnx", "--input-shape", "1,3,32,32"]) == 0
    capsys.readouterr()
    reference = ZOO_BY_NAME["vit"].build()
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = reference(pixel_values=x).logits.numpy()
    np.testing.assert_allclose(_run(out, x), want, atol=1e-4, rtol=1e-4)


def test_int8_without_calibration_is_refused_naming_calib(saved, capsys):
    root, _, _ = saved
    assert main(["export", str(root / "int8"), str(root / "nocalib.onnx"), "--format", "onnx",
                 "--input-shape", "1,3,32,32"]) == 2
    err = capsys.readouterr().err
    assert "pass --calib FILE" in err and "layer(s) (" in err and "static int8 activation" in err
    assert not (root / "nocalib.onnx").exists()


@pytest.mark.parametrize("args,expected", [
    (["--input-shape", "1,3,x"], "argument --input-shape: expected comma-separated positive integers"),
    (["--input-shape", "1,3,0,32"], "argument --input-shape: expected comma-separated positive integers"),
    (["--calib", "{root}/missing.npy"], "argument --calib: {root}/missing.npy: no such file or folder"),
    (["--calib", "{root}/notes.txt"], "argument --calib: {root}/notes.txt: expected a .npy / .npz / .safetensors"),
    (["--calib", "{root}/calib.npy", "--calib-method", "mean"], "argument --calib-method: invalid choice: 'mean'"),
    (["--calib", "{root}/calib.npy", "--percentile", "40", "--calib-method", "percentile"],
     "argument --percentile: expected a number in (50, 100], got 40"),
    ([], "--format onnx traces the model on an example input: pass --input-shape"),
    (["--calib", "{root}/calib.npy", "--percentile", "99"], "--percentile needs --calib-method percentile"),
    (["--input-shape", "1,3,32,32", "--calib-method", "percentile"], "--calib-method needs --calib FILE"),
    (["--calib", "{root}/imgdir"], "--calib {root}/imgdir is an image folder: pass --image-size"),
    (["--calib", "{root}/calib.npy", "--calib-key", "x"], "--calib-key applies to .npz / .safetensors"),
    (["--input-shape", "1,3,32,32", "--image-size", "64"], "--image-size 64 contradicts --input-shape 1,3,32,32"),
    (["--mean", "0.5,a", "--input-shape", "1,3,32,32"], "argument --mean: expected comma-separated numbers"),
])
def test_bad_onnx_arguments_exit_2_before_loading(saved, capsys, args, expected):
    root, _, _ = saved
    (root / "notes.txt").write_text("x")
    (root / "imgdir").mkdir(exist_ok=True)
    argv = [a.format(root=root) for a in args]
    with pytest.raises(SystemExit) as e:
        main(["export", str(root / "int8"), str(root / "bad.onnx"), "--format", "onnx", *argv])
    assert e.value.code == 2
    assert expected.format(root=root) in capsys.readouterr().err
    assert not (root / "bad.onnx").exists()


def test_onnx_options_with_another_format_are_refused(saved, capsys):
    root, _, _ = saved
    with pytest.raises(SystemExit):
        main(["export", str(root / "int8"), str(root / "ct"), "--format", "compressed-tensors", "--calib",
              str(root / "calib.npy"), "--calib-method", "minmax"])
    assert "--calib, --calib-method apply to --format onnx only" in capsys.readouterr().err


def test_bad_calibration_data_name_calib_and_the_sample(saved, tmp_path, capsys):
    root, _, calib = saved
    bad = calib.clone()
    bad[3, 0, 5, 5] = float("nan")
    np.save(tmp_path / "nan.npy", bad.numpy())
    np.savez(tmp_path / "two.npz", a=calib.numpy(), b=calib.numpy())
    np.save(tmp_path / "small.npy", calib[:, :, :16, :16].numpy())
    (tmp_path / "empty").mkdir()
    np.save(tmp_path / "gray.npy", calib[:, :1].numpy())
    cases = [
        (["--calib", str(tmp_path / "nan.npy")], f"--calib {tmp_path / 'nan.npy'}: ", "sample 3 contains 1 NaN"),
        (["--calib", str(tmp_path / "two.npz")], "holds 2 arrays ['a', 'b']", "(key)"),
        (["--calib", str(tmp_path / "gray.npy"), "--input-shape", "1,3,32,32", "--calib-samples", "2"],
         "", "preprocessed"),
        (["--calib", str(tmp_path / "empty"), "--image-size", "32"], "no calibration samples", ""),
    ]
    for args, first, second in cases:
        code = main(["export", str(root / "int8"), str(tmp_path / "o.onnx"), "--format", "onnx", *args])
        err = capsys.readouterr().err
        assert code == 2 and first in err and second in err and err.count("\n") == 1, err
        assert not (tmp_path / "o.onnx").exists()
    # smaller samples are resized to the input shape
    assert main(["export", str(root / "int8"), str(tmp_path / "s.onnx"), "--format", "onnx", "--calib",
                 str(tmp_path / "small.npy"), "--input-shape", "1,3,32,32"]) == 0
    # --calib-key picks one array of several
    assert main(["export", str(root / "int8"), str(tmp_path / "k.onnx"), "--format", "onnx", "--calib",
                 str(tmp_path / "two.npz"), "--calib-key", "b"]) == 0


def test_float_samples_with_a_preprocessor_config_are_used_as_given_and_said_so(saved, tmp_path, capsys):
    """SRC's preprocessor_config.json normalization applies to pixels; float samples are preprocessed inputs, used
    as given, and the report says the normalization was not applied (the note was dropped without a word)."""
    root, model, calib = saved
    mq.save(model, tmp_path / "src")
    (tmp_path / "src" / "preprocessor_config.json").write_text(json.dumps({"image_mean": [0.5] * 3,
                                                                          "image_std": [0.25] * 3}))
    out = tmp_path / "vit.onnx"
    assert main(["export", str(tmp_path / "src"), str(out), "--format", "onnx", "--calib", str(root / "calib.npy"),
                 "--calib-batch-size", "4", "--json"]) == 0
    notes = json.loads(capsys.readouterr().out)["notes"]
    assert any("taken as preprocessed" in n and "not applied" in n for n in notes), notes
    _assert_file_has_the_simulations_scales(out, calibrate_activations(model, list(calib.split(4))))
