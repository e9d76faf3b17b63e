"""Which files a :class:`medquant.calibrate.CheckpointSource` of a folder reads: those ``from_pretrained`` reads
(transformers' loader is the reference). A folder that holds both ``model.safetensors`` and a sharded
``model.safetensors.index.json`` (a model re-saved with another shard size beside the older files, a copy of two
revisions) is read by ``from_pretrained`` from ``model.safetensors``; the source must give the same tensors."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from medquant.calibrate import CheckpointSource


def _llama(seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=False)
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg)


def test_a_folder_with_both_a_single_file_and_an_index_is_read_as_from_pretrained_reads_it(tmp_path):
    from transformers import LlamaForCausalLM

    _llama(0).save_pretrained(tmp_path / "single")
    _llama(1).save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    both = tmp_path / "both"
    both.mkdir()
    for f in (*(tmp_path / "single").iterdir(), *(tmp_path / "sharded").glob("model*")):
        (both / f.name).write_bytes(f.read_bytes())
    assert (both / "model.safetensors").is_file() and (both / "model.safetensors.index.json").is_file()
    ref = LlamaForCausalLM.from_pretrained(both).state_dict()
    single = load_file(str(tmp_path / "single" / "model.safetensors"))
    assert torch.equal(ref["model.layers.0.mlp.up_proj.weight"], single["model.layers.0.mlp.up_proj.weight"])
    source = CheckpointSource(both)
    assert source.keys() == set(single)
    for k in single:
        assert torch.equal(source.get(k), ref[k]), k


def _write(path, header, data: bytes) -> None:
    import json
    import struct

    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)


@pytest.mark.parametrize("header", [
    [1, 2],  # not an object
    {"a": {"dtype": "F32", "shape": [1]}},  # no data_offsets
    {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}},  # 2 floats in 4 bytes
    {"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 0]}},  # ends before it begins
    {"a": "F32"},  # an entry that is no object
], ids=["list", "no-offsets", "short-data", "reversed-offsets", "entry-not-object"])
def test_a_malformed_header_is_refused_when_opened_naming_the_file(tmp_path, header):
    """safetensors' own reader refuses these headers when the file is opened; the source must too, with the
    documented ``ValueError`` naming the file (not an ``AttributeError`` / ``KeyError``, nor an error only when the
    tensor is read, after the blocks before it were processed)."""
    from safetensors import SafetensorError, safe_open

    f = tmp_path / "bad.safetensors"
    _write(f, header, b"\0" * 8)
    with pytest.raises(SafetensorError), safe_open(str(f), "pt"):
        pass
    with pytest.raises(ValueError, match="bad.safetensors"):
        CheckpointSource(f)
