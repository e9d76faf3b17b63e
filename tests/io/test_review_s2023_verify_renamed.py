"""``verify_pretrained`` / ``medquant verify`` / ``medquant upgrade`` of a quantized folder whose stored tensor names
are not the model's: transformers 5 renames some models' modules (ViT: ``vit.encoder.layer.0.attention.attention.key``
is ``vit.layers.0.attention.k_proj`` in memory) and ``save_pretrained`` writes the stored layout back, while
``quantization_config.modules`` records the model's names. The checks now read the stored names through the
renaming ``from_pretrained`` applies for the class ``config.json`` names (they said a packed tensor was missing, so
a folder transformers loads fine failed ``medquant verify``). Reference: transformers' own ``from_pretrained`` loads
the folder to the in-memory model's logits; an edited recipe is still caught."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

import medquant as mq
from medquant.cli import main
from medquant.io import CheckpointError, verify_pretrained
from medquant.testing.zoo import ZOO_BY_NAME


@pytest.fixture()
def folder(tmp_path):
    torch.manual_seed(0)
    model = ZOO_BY_NAME["vit"].build().eval()
    mq.quantize_(model, mq.QuantConfig(bits=4, group_size=32))
    model.save_pretrained(tmp_path / "vitq")
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = model(pixel_values=x).logits
    return tmp_path / "vitq", x, logits


def _modules(path):
    return json.loads((path / "config.json").read_text())["quantization_config"]["modules"]


def test_the_stored_names_are_not_the_recorded_ones_and_transformers_loads_the_folder(folder):
    from transformers import AutoModelForImageClassification

    path, x, logits = folder
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "vit.layers.0.attention.k_proj" in _modules(path)
    assert not any(k.startswith("vit.layers.0.attention.k_proj.") for k in keys)  # stored under another name
    loaded = AutoModelForImageClassification.from_pretrained(path).eval()
    with torch.no_grad():
        assert torch.equal(loaded(pixel_values=x).logits, logits)


def test_verify_pretrained_reads_the_stored_names_as_from_pretrained_renames_them(folder):
    path, _, _ = folder
    verify_pretrained(path, _modules(path))


def test_the_command_line_verifies_and_upgrades_the_folder(folder, capsys):
    from transformers import AutoModelForImageClassification

    path, x, logits = folder
    assert main(["verify", str(path)]) == 0
    assert main(["upgrade", str(path)]) == 0
    assert (path / "medquant.manifest.json").is_file()
    assert main(["verify", str(path)]) == 0
    capsys.readouterr()
    with torch.no_grad():
        assert torch.equal(AutoModelForImageClassification.from_pretrained(path).eval()(pixel_values=x).logits,
                           logits)


def test_an_edited_recipe_is_still_caught_under_the_renaming(folder):
    path, _, _ = folder
    modules = _modules(path)
    modules["vit.layers.0.attention.k_proj"] = {**modules["vit.layers.0.attention.k_proj"], "bits": 8}
    with pytest.raises(CheckpointError, match="k_proj"):
        verify_pretrained(path, modules)
