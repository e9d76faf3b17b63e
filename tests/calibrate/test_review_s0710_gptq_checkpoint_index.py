"""Review of CheckpointSource: a broken ``model.safetensors.index.json`` is refused with a ValueError naming the
file and what an index needs, not a bare KeyError / TypeError / JSON error from inside the reader."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from medquant.calibrate.sequential import CheckpointSource


@pytest.mark.parametrize("text", ['{"metadata": {}}', "not json", "[1, 2]", '{"weight_map": {"a": 3}}',
                                  '{"weight_map": ["a.safetensors"]}'])
def test_a_broken_index_is_refused_naming_it(text, tmp_path):
    (tmp_path / "model.safetensors.index.json").write_text(text)
    with pytest.raises(ValueError, match=r"model\.safetensors\.index\.json"):
        CheckpointSource(tmp_path)


def test_a_valid_index_reads_its_shards(tmp_path):
    a, b = torch.randn(3, 2), torch.arange(4)
    save_file({"a": a}, str(tmp_path / "one.safetensors"))
    save_file({"b": b}, str(tmp_path / "two.safetensors"))
    (tmp_path / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": {"a": "one.safetensors", "b": "two.safetensors"}}))
    src = CheckpointSource(tmp_path)
    assert src.keys() == {"a", "b"}
    assert torch.equal(src.get("a"), a) and torch.equal(src.get("b"), b)
