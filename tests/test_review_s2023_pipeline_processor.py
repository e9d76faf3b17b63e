"""``medquant pipeline`` of a VLM folder saves its processor beside the model, as ``medquant quantize`` and
``medquant prune`` do: it saved the tokenizer only, so ``AutoProcessor.from_pretrained(OUT)`` lost the image
processor and chat template. Reference: the source folder's own processor (transformers' ``AutoProcessor``), whose
outputs on a real chest X-ray and a report sentence the output folder's processor must reproduce exactly."""
from __future__ import annotations

import torch

from medquant.cli import main
from tests.cli.test_cli_saves_the_processor import PROCESSOR_FILES, _inputs
from tests.cli.tiny_folder import report_text_file, tiny_llava_folder


def test_pipeline_output_folder_has_the_source_processor(tmp_path):
    src = tiny_llava_folder(tmp_path / "src")
    text = report_text_file(tmp_path)
    out = tmp_path / "out"
    assert main(["pipeline", str(src), "--out", str(out), "--text", str(text), "--heads", "0", "--ffn", "0.25",
                 "--train", "none", "--quant", "rtn", "--calib-samples", "4", "--max-length", "16"]) == 0
    assert any((out / f).is_file() for f in PROCESSOR_FILES)
    want, got = _inputs(src), _inputs(out)
    assert want.keys() == got.keys() and "pixel_values" in got
    assert all(torch.equal(want[k], got[k]) for k in want)
