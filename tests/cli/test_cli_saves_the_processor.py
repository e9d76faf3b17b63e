"""``medquant quantize`` and ``medquant prune`` of a VLM folder save its processor beside the model: before, the
output held the tokenizer only, so ``AutoProcessor.from_pretrained(OUT)`` failed and the user had to copy the
processor files over. Reference: the source folder's own processor (transformers' ``AutoProcessor``), whose
outputs on a real chest X-ray and a report sentence the output folder's processor must reproduce exactly; a text
model's output keeps its tokenizer files and gets no processor file."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from medquant.cli import main
from medquant.data import default_data_dir
from tests.cli.test_cli_remote_code import tinymed_folder
from tests.cli.tiny_folder import tiny_llava_folder
from tests.prune.real_models import minilm_dir

PROCESSOR_FILES = ("processor_config.json", "preprocessor_config.json")


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    return tiny_llava_folder(tmp_path_factory.mktemp("processor") / "src")


def _image() -> np.ndarray:
    from PIL import Image

    files = sorted((default_data_dir() / "kermany_pediatric_cxr_224" / "images" / "train").rglob("*.jpeg"))
    if not files:
        pytest.skip("the real chest X-rays are not there (set MEDQUANT_DATA_DIR)")
    return np.asarray(Image.open(files[0]).convert("RGB"))


def _inputs(folder) -> dict:
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(folder)
    turn = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Lungs are clear."}]}]
    text = processor.apply_chat_template(turn, add_generation_prompt=True, tokenize=False)
    return dict(processor(text=[text], images=[_image()], return_tensors="pt"))


@pytest.mark.parametrize("command", ["quantize", "prune"])
def test_the_output_folder_has_the_source_processor(src, tmp_path, command):
    out = tmp_path / "out"
    if command == "quantize":
        argv = ["quantize", str(src), str(out), "--bits", "4", "--group-size", "32", "--json"]
    else:
        argv = ["prune", str(src), "--out", str(out), "--heads", "0.5", "--ffn", "0.5"]
    assert main(argv) == 0
    assert any((out / f).is_file() for f in PROCESSOR_FILES)
    want, got = _inputs(src), _inputs(out)
    assert want.keys() == got.keys() and "pixel_values" in got
    assert all(torch.equal(want[k], got[k]) for k in want)


def test_a_text_model_keeps_its_tokenizer_and_gets_no_processor_file(tmp_path):
    from transformers import AutoTokenizer

    text_src = tinymed_folder(tmp_path / "lm")  # a text LM folder with MiniLM's real tokenizer
    out = tmp_path / "out"
    assert main(["quantize", str(text_src), str(out), "--bits", "4", "--group-size", "32", "--json",
                 "--trust-remote-code"]) == 0
    assert not any((out / f).exists() for f in PROCESSOR_FILES)
    ids = AutoTokenizer.from_pretrained(out)("no acute disease")["input_ids"]
    assert ids == AutoTokenizer.from_pretrained(minilm_dir())("no acute disease")["input_ids"]
