"""``CheckpointSource(path, rename=fn)``: the tensors are read under the names ``fn`` gives the stored ones (what
``safetensors`` reads under the stored name), two stored tensors given one name are refused naming both, and the
errors name the stored name where it differs from the one read."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from medquant.calibrate import CheckpointSource


@pytest.fixture
def stored(tmp_path):
    g = torch.Generator().manual_seed(0)
    tensors = {"language_model.model.w": torch.randn(3, 4, generator=g), "vision.b": torch.randn(4, generator=g),
               "same": torch.arange(5)}
    path = tmp_path / "model.safetensors"
    save_file(tensors, str(path))
    return path


def _rename(key: str) -> str:
    if key.startswith("language_model.model."):
        return "model.language_model." + key.removeprefix("language_model.model.")
    if key.startswith("vision."):
        return "model.vision_tower." + key.removeprefix("vision.")
    return key


def test_renamed_source_reads_each_stored_tensor_under_its_new_name(stored):
    ref = load_file(str(stored))  # safetensors' own reader, under the stored names
    source = CheckpointSource(stored, rename=_rename)
    assert source.keys() == {"model.language_model.w", "model.vision_tower.b", "same"}
    for key, tensor in ref.items():
        name = _rename(key)
        assert name in source
        assert source.stored_name(name) == key
        got = source.get(name)
        assert got.dtype == tensor.dtype and torch.equal(got, tensor)
    assert "language_model.model.w" not in source and "vision.b" not in source
    assert source.stored_name("not.there") == "not.there"


def test_without_rename_the_stored_names_are_kept(stored):
    source = CheckpointSource(stored)
    assert source.keys() == set(load_file(str(stored)))
    assert source.stored_name("vision.b") == "vision.b"
    assert torch.equal(source.get("vision.b"), load_file(str(stored))["vision.b"])


def test_two_stored_tensors_with_one_name_are_refused_naming_both(stored):
    with pytest.raises(ValueError) as info:
        CheckpointSource(stored, rename=lambda k: "model.x" if k != "same" else k)
    msg = str(info.value)
    assert "'language_model.model.w'" in msg and "'vision.b'" in msg and "'model.x'" in msg
    assert "one name cannot hold two tensors" in msg


def test_a_stored_name_read_under_another_is_named_in_the_error(stored):
    source = CheckpointSource(stored, rename=_rename)
    with pytest.raises(KeyError) as info:
        source.get("language_model.model.w")
    assert "the checkpoint stores a tensor under that name, read as 'model.language_model.w'" in str(info.value)
    with pytest.raises(KeyError) as info:
        source.get("model.nothing")
    assert "no tensor 'model.nothing'" in str(info.value) and "stores a tensor" not in str(info.value)


def test_the_unsupported_dtype_error_names_both_names(tmp_path):
    path = tmp_path / "f8.safetensors"
    save_file({"language_model.model.w": torch.zeros(2, 2).to(torch.float8_e4m3fn)}, str(path))
    source = CheckpointSource(path, rename=_rename)
    with pytest.raises(ValueError, match=r"'model.language_model.w' \(stored as 'language_model.model.w'\) .* "
                                         r"has dtype F8_E4M3"):
        source.get("model.language_model.w")
