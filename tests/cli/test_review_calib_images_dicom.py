"""``--calib-images`` with images that are not 8-bit. The processor's ``do_rescale`` reads integers as 0..255, so
the command brings the pixels to 8 bits by the same fixed white levels as the ONNX export's ``--calib``: a DICOM file
(read by :func:`medquant.data.load_image` as float64 in [0, 1], its window applied) as ``round(255 x)``, a 16-bit
PNG as ``round(255 x / 65535)``. Reference: the batches the command makes from an 8-bit PNG holding those pixels,
converted here with numpy and written with PIL (the 8-bit path is checked against transformers' processor API in
``test_cli_calib_images.py``). Images without a fixed white level (32-bit integer or floating-point TIFFs) are
refused naming the type and what is accepted."""
from __future__ import annotations

import numpy as np
import pytest

from medquant.cli import main
from medquant.cli.prune import image_calibration_batches
from tests.cli.tiny_folder import report_text_file, tiny_llava_folder
from tests.data._dicom import write_dicom

SEQ = 12


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("vlm_deep_images")
    tiny_llava_folder(root / "src")
    report_text_file(root)
    return root


def _texts(folder):
    return [p.strip() for p in (folder / "t.txt").read_text().split("\n") if p.strip()]


def _batch(folder, path):
    (batch,) = image_calibration_batches(str(folder / "src"), str(path), _texts(folder), 1, SEQ)
    return batch


def _eight_bit_png(path, pixels):
    from PIL import Image

    Image.fromarray(pixels.astype(np.uint8), mode="L").save(path)
    return path


def _same(a, b):
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and bool((a[k] == b[k]).all()), k


def test_a_dicom_image_calibrates_as_its_8_bit_rendering(folder, tmp_path):
    from medquant.data import load_image

    stored = np.random.default_rng(0).integers(0, 4096, (32, 32))
    dicom = write_dicom(tmp_path / "xray.dcm", stored, bits=12)
    unit = load_image(dicom)
    assert unit.dtype == np.float64 and 0 <= unit.min() and unit.max() <= 1  # what medquant's reader makes of it
    reference = _eight_bit_png(tmp_path / "ref.png", np.round(unit * 255))
    _same(_batch(folder, dicom), _batch(folder, reference))


def test_a_16_bit_png_is_scaled_by_its_white_level(folder, tmp_path):
    from PIL import Image

    stored = np.random.default_rng(1).integers(0, 65536, (30, 26)).astype(np.uint16)
    deep = tmp_path / "deep.png"
    Image.fromarray(stored).save(deep)
    with Image.open(deep) as im:
        assert im.mode.startswith("I") and np.array_equal(np.asarray(im), stored)  # 16 bits on disk
    reference = _eight_bit_png(tmp_path / "ref.png", np.round(stored.astype(np.float64) * 255 / 65535))
    _same(_batch(folder, deep), _batch(folder, reference))


@pytest.mark.parametrize("mode, values", [("I", np.arange(-600, 424, dtype=np.int32).reshape(32, 32)),
                                          ("F", np.linspace(0, 3, 1024, dtype=np.float32).reshape(32, 32))])
def test_images_without_a_white_level_are_refused_naming_what_is_accepted(folder, tmp_path, capsys, mode, values):
    from PIL import Image

    from medquant.data import load_image

    tif = tmp_path / "ct.tif"
    Image.fromarray(values, mode=mode).save(tif)
    dtype = load_image(tif).dtype
    assert dtype in (np.int32, np.float32)
    out = tmp_path / "out"
    assert main(["prune", str(folder / "src"), "--out", str(out), "--importance", "activation", "--scope", "all",
                 "--calib-text", str(folder / "t.txt"), "--calib-images", str(tif)]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]  # transformers may log above the command's one line
    assert err.startswith("medquant prune: error: --calib-images") and "ct.tif" in err and dtype.name in err
    assert "uint8" in err and "uint16" in err and "DICOM" in err and "convert" in err
    assert not out.exists()
