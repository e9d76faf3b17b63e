"""``--calib-images`` names what the folder's processor is when it cannot pair an image with a text: a language
model's processor (a tokenizer: it takes no images, calibrate with text alone) and an image model's (an image
processor: it takes no text - it is not told to calibrate with text, which that folder cannot tokenize either).
The reference is what transformers' ``AutoProcessor`` loads from each folder."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from medquant.cli import main
from tests.cli.tiny_folder import report_text_file, tiny_llama_folder


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    root = tmp_path_factory.mktemp("processor_kind")
    torch.manual_seed(0)
    ViTForImageClassification(ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                        intermediate_size=64, image_size=28, patch_size=14)).save_pretrained(root / "vit")
    ViTImageProcessor(size={"height": 28, "width": 28}).save_pretrained(root / "vit")
    tiny_llama_folder(root / "llama")
    report_text_file(root)
    np.savez(root / "images.npz", images=np.random.default_rng(0).integers(0, 256, (2, 28, 28), dtype=np.uint8))
    return root


def _error(folder, model, command, capsys, tmp_path) -> str:
    images = ["--calib-images", str(folder / "images.npz")]
    if command == "prune":
        argv = ["prune", str(folder / model), "--out", str(tmp_path / "out"), "--calib-text", str(folder / "t.txt"),
                *images]
    else:
        argv = ["quantize", str(folder / model), str(tmp_path / "out"), "--method", "gptq", "--calib",
                str(folder / "t.txt"), *images]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]  # transformers may log above the command's one line
    assert err.startswith(f"medquant {command}: error: --calib-images") and not (tmp_path / "out").exists()
    return err


@pytest.mark.parametrize("command", ["prune", "quantize"])
def test_an_image_models_processor_is_named_as_taking_no_text(folder, command, capsys, tmp_path):
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(folder / "vit")
    assert getattr(processor, "tokenizer", None) is None and hasattr(processor, "preprocess")  # images only
    err = _error(folder, "vit", command, capsys, tmp_path)
    assert "takes no images" not in err and "text alone" not in err
    assert "takes no text" in err and type(processor).__name__ in err


def test_a_language_models_processor_is_named_as_taking_no_images(folder, capsys, tmp_path):
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(folder / "llama")
    assert getattr(processor, "image_processor", None) is None and hasattr(processor, "encode")  # a tokenizer
    err = _error(folder, "llama", "prune", capsys, tmp_path)
    assert "takes no images" in err and "text alone" in err
