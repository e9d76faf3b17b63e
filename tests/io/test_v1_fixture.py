"""Checkpoints written by medquant before the recipe / swap refactor (FORMAT_VERSION 1, commit a8b0bf2) load
bit-exact with today's code, and today's writer produces the same tensors and recipes.

The fixture and the script that wrote it live in ``tests/fixtures/v1/`` (see ``write_v1.py`` there).
"""
import importlib.util
import json
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import medquant as mq
import medquant.hf
from medquant.io import META_NAME, WEIGHTS_NAME
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


def _safetensors_parts(path: Path) -> tuple[dict, bytes]:
    """(parsed header, tensor bytes): the header's ``__metadata__`` is a hash map that safetensors writes in
    no fixed order, so files are compared by header content and data bytes."""
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    return json.loads(raw[8:8 + n]), raw[8 + n:]


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
    with torch.no_grad():
        assert torch.equal(model(reference["plain_x"]), reference["plain_y"])


def test_plain_v1_is_written_again_byte_for_byte(writer, tmp_path):
    model = writer.build_plain()
    model.load_state_dict(load_file(str(FIXTURE / "plain_float.safetensors")))
    mq.quantize_(model, writer.plain_configs())
    mq.save(model, tmp_path)
    assert _safetensors_parts(tmp_path / WEIGHTS_NAME) == _safetensors_parts(FIXTURE / "plain" / WEIGHTS_NAME)
    new = json.loads((tmp_path / META_NAME).read_text())
    old = json.loads((FIXTURE / "plain" / META_NAME).read_text())
    for meta in (new, old):  # the checksum differs with the header's metadata order; the data is compared above
        meta.pop("medquant_version")
        meta["weights"].pop("sha256")
    assert new == old


def test_llama_v1_loads_bit_exact_and_saves_the_same_recipe(reference, tmp_path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(FIXTURE / "llama")
    stored = load_file(str(FIXTURE / "llama" / "model.safetensors"))
    _assert_same_tensors({k: v for k, v in model.state_dict().items() if k in stored}, stored)
    qmods = quantized_modules(model)
    assert len(qmods) == 14 and "lm_head" not in qmods
    assert all(m.config == mq.QuantConfig(4, group_size=32) for m in qmods.values())
    with torch.no_grad():
        assert torch.equal(model(input_ids=reference["llama_ids"]).logits, reference["llama_logits"])
    medquant.hf.save_pretrained(model, tmp_path)
    _assert_same_tensors(load_file(str(tmp_path / "model.safetensors")), stored)
    old = json.loads((FIXTURE / "llama" / "config.json").read_text())["quantization_config"]
    new = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    for key in ("modules", "skipped_modules", "format_version", "quant_method"):
        assert new[key] == old[key], key
