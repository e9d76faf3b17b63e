"""``--calib-images`` refuses images that are not 8-bit (the processor's ``do_rescale`` reads integers as 0..255).
A DICOM file, which :func:`medquant.data.load_image` reads as float64 in [0, 1], is named as a DICOM image with the
way out, not only as an image that "holds float64 values" (the file stores 12-bit integers, not floats)."""
from __future__ import annotations

import numpy as np

from medquant.cli import main
from tests.cli.tiny_folder import report_text_file, tiny_llava_folder
from tests.data._dicom import write_dicom


def test_a_dicom_image_is_named_as_such(tmp_path, capsys):
    from medquant.data import load_image

    tiny_llava_folder(tmp_path / "src")
    report_text_file(tmp_path)
    dicom = write_dicom(tmp_path / "xray.dcm", np.random.default_rng(0).integers(0, 4096, (32, 32)), bits=12)
    assert load_image(dicom).dtype == np.float64  # the reference: what medquant's reader makes of it
    out = tmp_path / "out"
    assert main(["prune", str(tmp_path / "src"), "--out", str(out), "--importance", "activation", "--scope", "all",
                 "--calib-text", str(tmp_path / "t.txt"), "--calib-images", str(dicom)]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]  # transformers may log above the command's one line
    assert err.startswith("medquant prune: error: --calib-images") and "xray.dcm" in err
    assert "DICOM" in err and "8-bit" in err and "convert" in err
    assert not out.exists()
