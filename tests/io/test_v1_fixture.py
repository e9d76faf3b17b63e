"""Checkpoints written by medquant before the recipe / swap refactor (FORMAT_VERSION 1, commit a8b0bf2) load
bit-exact with today's code, and today's writer produces the same tensors and recipes, except that 3/5/6/7-bit
rows are now stored densely (FORMAT_VERSION 2): their words hold the same codes, bit-stream packed.

Tensors are compared bit for bit; outputs (the fixture's were computed by an older torch) on the torch reference
path (``force_backend("torch")``) to float32 rounding (1e-6), and through the CPU fast path at its float32
tolerance (1e-5).

The fixture and the script that wrote it live in ``tests/fixtures/v1/`` (see ``write_v1.py`` there).
"""
import importlib.util
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import medquant as mq
import medquant.hf
from medquant.io import META_NAME, WEIGHTS_NAME
from medquant.kernels import force_backend
from medquant.kernels.layout import DENSE_BITS, unpack
from medquant.quant import quantized_modules

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "v1"


def _writer():
    spec = importlib.util.spec_from_file_location("medquant_v1_fixture_writer", FIXTURE / "write_v1.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def writer():
    return _writer()


@pytest.fixture(scope="module")
def reference():
    return load_file(str(FIXTURE / "reference.safetensors"))


def _close(y: torch.Tensor, ref: torch.Tensor) -> None:
    torch.testing.assert_close(y, ref, rtol=1e-6, atol=1e-6)


def _assert_same_tensors(state: dict, stored: dict) -> None:
    assert set(state) == set(stored)
    for k, t in stored.items():
        assert state[k].dtype == t.dtype, k
        assert torch.equal(state[k], t), k


def test_plain_v1_loads_bit_exact(writer, reference):
    model = mq.load(FIXTURE / "plain", model=writer.build_plain())
    _assert_same_tensors(model.state_dict(), load_file(str(FIXTURE / "plain" / WEIGHTS_NAME)))
    mixed = model.get_submodule("4")
    assert isinstance(mixed, mq.QuantLinear) and mixed.mixed
    assert mixed.bit_groups == [0, 2, 3, 4, 5, 8, 16, 32]
    assert isinstance(model.get_submodule("0"), mq.QuantConv2d)
    assert all(m.layout_version == 1 for m in quantized_modules(model).values())  # kept as loaded
    with torch.no_grad():
        with force_backend("torch"):
            _close(model(reference["plain_x"]), reference["plain_y"])
        torch.testing.assert_close(model(reference["plain_x"]), reference["plain_y"], rtol=1e-5, atol=1e-5)


def _v1_codes(key: str, t: torch.Tensor, k: int) -> torch.Tensor:
    return unpack(t, int(key.rsplit("_", 1)[1]))[:, :k]


def test_plain_v1_is_written_again_with_dense_3_5_6_bit_rows(writer, tmp_path):
    """Today's writer: every tensor of a layer without 3/5/6/7-bit rows is byte-identical to version 1; the
    dense rows' words unpack to the same codes (and the same scales); the recipes differ only by "layout": 2."""
    model = writer.build_plain()
    model.load_state_dict(load_file(str(FIXTURE / "plain_float.safetensors")))
    mq.quantize_(model, writer.plain_configs())
    mq.save(model, tmp_path)
    new_t, old_t = load_file(str(tmp_path / WEIGHTS_NAME)), load_file(str(FIXTURE / "plain" / WEIGHTS_NAME))
    assert set(new_t) == set(old_t)
    dense_layers = set()
    for key, old in old_t.items():
        layer, name = key.split(".", 1)
        b = int(name.rsplit("_", 1)[1]) if name.startswith(("qweight_", "scales_", "zeros_")) else 0
        if b not in DENSE_BITS:
            assert new_t[key].dtype == old.dtype and torch.equal(new_t[key], old), key
            continue
        dense_layers.add(layer)
        k = model.get_submodule(layer).k
        if name.startswith("qweight_"):
            assert torch.equal(unpack(new_t[key], b, k, dense=True), _v1_codes(key, old, k)), key
            assert new_t[key].numel() <= old.numel()  # b bits per code instead of 4 or 8 (K padded to 32)
        else:  # scales / zeros: the same groups (a dense layer may pad one all-zero group more)
            assert torch.equal(new_t[key][:, : old.shape[1]], old[:, : new_t[key].shape[1]]), key
    assert dense_layers == {"4", "6"}
    new = json.loads((tmp_path / META_NAME).read_text())
    old = json.loads((FIXTURE / "plain" / META_NAME).read_text())
    assert (new["format_version"], old["format_version"]) == (2, 1)
    for name in dense_layers:
        assert new["modules"][name].pop("layout") == 2
    for meta in (new, old):  # the checksum and size change with the dense words; the data is compared above
        for key in ("medquant_version", "format_version", "weights"):
            meta.pop(key)
    assert new == old
    reloaded = mq.load(tmp_path, model=writer.build_plain())
    with torch.no_grad(), force_backend("torch"):
        assert torch.equal(reloaded(torch.ones(2, 3, 8, 8)), model(torch.ones(2, 3, 8, 8)))


def test_a_loaded_v1_layer_is_saved_densely_and_reloads_bit_exact(writer, reference, tmp_path):
    model = mq.load(FIXTURE / "plain", model=writer.build_plain())
    mq.save(model, tmp_path)  # re-packs the 3/5/6-bit row groups in place (same codes)
    assert model.get_submodule("4").layout_version == 2
    again = mq.load(tmp_path, model=writer.build_plain())
    assert again.get_submodule("4").layout_version == 2 and again.get_submodule("6").layout_version == 2
    with torch.no_grad(), force_backend("torch"):
        assert torch.equal(again(reference["plain_x"]), model(reference["plain_x"]))
        _close(again(reference["plain_x"]), reference["plain_y"])


def test_llama_v1_loads_bit_exact_and_saves_the_same_recipe(reference, tmp_path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(FIXTURE / "llama")
    stored = load_file(str(FIXTURE / "llama" / "model.safetensors"))
    _assert_same_tensors({k: v for k, v in model.state_dict().items() if k in stored}, stored)
    qmods = quantized_modules(model)
    assert len(qmods) == 14 and "lm_head" not in qmods
    assert all(m.config == mq.QuantConfig(4, group_size=32) for m in qmods.values())
    with torch.no_grad():
        with force_backend("torch"):
            _close(model(input_ids=reference["llama_ids"]).logits, reference["llama_logits"])
        torch.testing.assert_close(model(input_ids=reference["llama_ids"]).logits, reference["llama_logits"],
                                   rtol=1e-5, atol=1e-5)
    medquant.hf.save_pretrained(model, tmp_path)
    _assert_same_tensors(load_file(str(tmp_path / "model.safetensors")), stored)
    old = json.loads((FIXTURE / "llama" / "config.json").read_text())["quantization_config"]
    new = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    for key in ("modules", "skipped_modules", "quant_method"):
        assert new[key] == old[key], key
    assert old["format_version"] == 1 <= new["format_version"] <= mq.FORMAT_VERSION  # 4-bit only: v1 tensors
