"""A module bound under several names (``layers[1] = layers[0]``: one block run twice, weights shared) through
:func:`medquant.save` / :func:`medquant.load`.

safetensors stores a shared tensor once, under its first name; a model rebuilt from its config has two separate
blocks, so the load refused the folder ("missing model.layers.1.*") and a model passed in got the second block
un-loaded. The save now records the further names of such a module (``shared_blocks`` in ``medquant.json``) and
the load binds them to the one module again, float or quantized. Reference: the saved model's own logits, and the
identity of the two names' modules."""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import medquant
from medquant import QuantConfig
from medquant.testing.zoo import ZOO_BY_NAME


def _shared_llama(quantized: bool):
    entry = ZOO_BY_NAME["llama"]
    model = entry.build().eval()
    model.model.layers[1] = model.model.layers[0]
    if quantized:
        medquant.quantize_(model, QuantConfig(4, group_size=32), skip=["@head"])
    return model, entry.inputs(model)


def _logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits


@pytest.mark.parametrize("quantized", [False, True])
def test_a_block_bound_twice_loads_as_one_block_with_the_saved_logits(tmp_path, quantized):
    model, batch = _shared_llama(quantized)
    medquant.save(model, tmp_path / "ckpt")
    meta = json.loads((tmp_path / "ckpt" / "medquant.json").read_text())
    assert meta["shared_blocks"] == {"model.layers.1": "model.layers.0"}
    loaded = medquant.load(tmp_path / "ckpt")
    assert loaded.model.layers[1] is loaded.model.layers[0]
    assert torch.equal(_logits(loaded, batch), _logits(model, batch))
    # into a model built without the sharing: bound as saved
    fresh = ZOO_BY_NAME["llama"].build().eval()
    assert fresh.model.layers[1] is not fresh.model.layers[0]
    loaded = medquant.load(tmp_path / "ckpt", fresh)
    assert loaded.model.layers[1] is loaded.model.layers[0]
    assert torch.equal(_logits(loaded, batch), _logits(model, batch))


def test_a_plain_module_sharing_a_submodule_round_trips_and_a_mismatched_target_is_refused(tmp_path):
    def make():
        m = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
        return m

    torch.manual_seed(0)
    model = make()
    model[2] = model[0]
    x = torch.randn(3, 8)
    medquant.save(model, tmp_path / "plain")
    torch.manual_seed(1)
    loaded = medquant.load(tmp_path / "plain", make())
    assert loaded[2] is loaded[0] and torch.equal(loaded(x), model(x))
    other = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Conv1d(8, 8, 1), nn.ReLU(), nn.Linear(8, 4))
    with pytest.raises(medquant.io.CheckpointError, match=r"'2'.*shares.*'0'"):
        medquant.load(tmp_path / "plain", other)
    assert isinstance(other[2], nn.Conv1d)  # a refused load leaves the model as given
