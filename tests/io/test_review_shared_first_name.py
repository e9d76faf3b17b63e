"""A block bound under several names whose first name sorts after a further one (``layers[10] = layers[2]``:
``model.layers.10`` < ``model.layers.2`` as strings). ``medquant.json``'s ``shared_blocks`` and the docs say its
tensors are stored once, under the first name (``model.layers.2``); safetensors keeps the alphabetically first
name, so the float tensors were stored under ``model.layers.10`` (the quantized ones, under the first name, by
``shared_modules``): a quantized block was split over both names, and transformers' ``from_pretrained`` (which
cannot rebind the sharing, as documented) initialised the first name's block afresh instead of the further one.

References: the safetensors header (the safetensors library's own reader); transformers' ``from_pretrained`` of the
folder against the saved model's tensors; the saved model's own logits through ``medquant.load``."""
from __future__ import annotations

import hashlib

import pytest
import torch
from safetensors import safe_open
from transformers import LlamaConfig, LlamaForCausalLM

import medquant
from medquant import QuantConfig
from medquant.io import atomic
from medquant.testing.zoo import text_kwargs

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _model(quantized: bool) -> LlamaForCausalLM:
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**text_kwargs(num_hidden_layers=11))).eval()
    with torch.no_grad():  # norms away from 1, so a freshly initialised one differs
        for n, p in model.named_parameters():
            if n.endswith("layernorm.weight"):
                p.uniform_(0.5, 1.5)
    layers = model.model.layers
    layers[10] = layers[2]
    if quantized:
        medquant.quantize_(model, QuantConfig(4, group_size=32), skip=["@head"])
    return model


def _files(folder) -> dict[str, str]:
    root = atomic.resolve(folder)
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.iterdir()) if p.is_file()}


@pytest.mark.parametrize("quantized", [False, True])
def test_a_shared_block_is_stored_under_its_first_name(tmp_path, quantized):
    model = _model(quantized)
    ids = torch.randint(3, 200, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = model(ids).logits
    medquant.save(model, tmp_path / "a")
    assert medquant.io.read_metadata(tmp_path / "a")["shared_blocks"] == {"model.layers.10": "model.layers.2"}
    with safe_open(str(atomic.resolve(tmp_path / "a") / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert not [k for k in keys if k.startswith("model.layers.10.")]
    assert {"model.layers.2.input_layernorm.weight", "model.layers.2.post_attention_layernorm.weight"} <= keys
    loaded = medquant.load(tmp_path / "a")
    assert loaded.model.layers[10] is loaded.model.layers[2]
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, want)
    medquant.save(loaded, tmp_path / "b")  # save -> load -> save: the same files
    assert _files(tmp_path / "a") == _files(tmp_path / "b")
    if not quantized:  # transformers reads the first name's block as saved (the further name is its MISSING one)
        hf = LlamaForCausalLM.from_pretrained(tmp_path / "a")
        for n, p in model.model.layers[2].named_parameters():
            assert torch.equal(hf.model.layers[2].get_parameter(n), p), n


def test_a_block_shared_inside_a_shared_block_is_stored_under_its_first_name(tmp_path):
    """Nested: ``layers[3].mlp = layers[2].mlp`` (first name ``model.layers.2.mlp``), then ``layers[10] =
    layers[3]``: the MLP's tensors are reachable under three names; the one stored is the first,
    ``model.layers.2.mlp``, also when a further name (``model.layers.10.mlp``) sorts before it."""
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**text_kwargs(num_hidden_layers=11))).eval()
    layers = model.model.layers
    layers[3].mlp = layers[2].mlp
    layers[10] = layers[3]
    ids = torch.randint(3, 200, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = model(ids).logits
    medquant.save(model, tmp_path / "a")
    assert medquant.io.read_metadata(tmp_path / "a")["shared_blocks"] == {
        "model.layers.3.mlp": "model.layers.2.mlp", "model.layers.10": "model.layers.3"}
    with safe_open(str(atomic.resolve(tmp_path / "a") / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert [k for k in keys if ".mlp.down_proj." in k and k.startswith(("model.layers.2.", "model.layers.3.",
                                                                          "model.layers.10."))] == [
        "model.layers.2.mlp.down_proj.weight"]
    assert not [k for k in keys if k.startswith("model.layers.10.")]
    loaded = medquant.load(tmp_path / "a")
    assert loaded.model.layers[10] is loaded.model.layers[3]
    assert loaded.model.layers[3].mlp is loaded.model.layers[2].mlp
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, want)
    medquant.save(loaded, tmp_path / "b")
    assert _files(tmp_path / "a") == _files(tmp_path / "b")
