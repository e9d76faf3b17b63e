"""Review of block-sharded quantization: a rank reads only its own blocks' float weights (rank 0 also the modules
outside the blocks), and ``assemble_shards`` keeps the weights the skeleton ties (one tensor under two names)."""
from __future__ import annotations

import pytest
import torch
from accelerate import init_empty_weights
from safetensors.torch import save_model

from medquant import QuantConfig, quantize_
from medquant.calibrate.sequential import CheckpointSource
from medquant.calibrate.shards import assemble_shards, quantize_shard, shard_blocks
from medquant.models import block_stacks
from medquant.testing.zoo import ZOO_BY_NAME


class _Recording(CheckpointSource):
    """A checkpoint source that records the names of the tensors read from disk."""

    def __init__(self, path) -> None:
        super().__init__(path)
        self.read: list[str] = []

    def get(self, key: str) -> torch.Tensor:
        self.read.append(key)
        return super().get(key)


@pytest.mark.parametrize("world", [2, 3])
def test_each_rank_reads_only_its_blocks_and_rank0_the_rest(world, tmp_path):
    entry = ZOO_BY_NAME["llama"]
    whole = entry.build()
    save_model(whole, str(tmp_path / "float.safetensors"))
    blocks = [b for g in block_stacks(whole) for b in g]
    for r in range(world):
        with init_empty_weights():
            part = entry.build()
        source = _Recording(tmp_path / "float.safetensors")
        quantize_shard(part, QuantConfig(4, group_size=32), source, tmp_path / "shards", rank=r,
                       world_size=world, device="cpu")
        mine = shard_blocks(blocks, r, world)
        others = tuple(b + "." for b in blocks if b not in mine)
        foreign = [k for k in source.read if k.startswith(others)]
        assert not foreign, f"rank {r} read other ranks' blocks: {foreign[:3]}"
        # nor holds them: they stay on the meta device
        assert all(p.device.type == "meta" for n, p in part.named_parameters() if n.startswith(others))
        expected = {k for k in source.keys() if  # noqa: SIM118 (a CheckpointSource method)
                    k.startswith(tuple(b + "." for b in mine))
                    or (r == 0 and not k.startswith(tuple(b + "." for b in blocks)))}
        assert set(source.read) == expected
    with init_empty_weights():
        full = entry.build()
    assemble_shards(full, tmp_path / "shards")
    quantize_(whole, QuantConfig(4, group_size=32))
    inputs = entry.inputs(whole)
    assert torch.equal(entry.output(full, inputs), entry.output(whole, inputs))


def test_assembled_model_keeps_tied_weights_tied(tmp_path):
    entry = ZOO_BY_NAME["gemma3_text"]  # ties lm_head.weight to embed_tokens.weight
    whole = entry.build()
    assert whole.lm_head.weight is whole.model.embed_tokens.weight
    save_model(whole, str(tmp_path / "float.safetensors"))
    quantize_(whole, QuantConfig(4, group_size=32), skip=["lm_head"])
    assert whole.lm_head.weight is whole.model.embed_tokens.weight  # quantize_ keeps the tie
    for r in range(2):
        with init_empty_weights():
            part = entry.build()
        quantize_shard(part, QuantConfig(4, group_size=32), tmp_path / "float.safetensors", tmp_path / "shards",
                       skip=["lm_head"], rank=r, world_size=2, device="cpu")
    with init_empty_weights():
        full = entry.build()
    assemble_shards(full, tmp_path / "shards")
    assert full.lm_head.weight is full.model.embed_tokens.weight
    assert torch.equal(full.lm_head.weight, whole.lm_head.weight)
    inputs = entry.inputs(whole)
    assert torch.equal(entry.output(full, inputs), entry.output(whole, inputs))
    # a training step on the assembled model moves both names together, as on the model quantize_ gave
    sd = {k: v for k, v in full.state_dict().items()}
    assert sd["lm_head.weight"].data_ptr() == sd["model.embed_tokens.weight"].data_ptr()


def test_a_skeleton_whose_unsaved_buffers_are_meta_is_refused(tmp_path):
    """Non-persistent buffers (the rotary ``inv_freq``) are in no state dict, so in no shard: a skeleton built
    under ``torch.device("meta")`` was 'assembled' with them still on the meta device, and failed in its first
    forward ("Cannot copy out of meta tensor")."""
    entry = ZOO_BY_NAME["llama"]
    whole = entry.build()
    save_model(whole, str(tmp_path / "float.safetensors"))
    with init_empty_weights():
        part = entry.build()
    quantize_shard(part, QuantConfig(4, group_size=32), tmp_path / "float.safetensors", tmp_path / "shards", rank=0,
                   world_size=1, device="cpu")
    with torch.device("meta"):
        bad = entry.build()
    assert any(b.device.type == "meta" for b in bad.buffers())
    with pytest.raises(ValueError, match=r"rotary_emb\.inv_freq.*meta device.*init_empty_weights"):
        assemble_shards(bad, tmp_path / "shards")
    with init_empty_weights():  # buffers real: assembled and runs as the whole-model result
        good = entry.build()
    assemble_shards(good, tmp_path / "shards")
    quantize_(whole, QuantConfig(4, group_size=32))
    inputs = entry.inputs(whole)
    assert torch.equal(entry.output(good, inputs), entry.output(whole, inputs))


def test_a_skeleton_of_another_size_is_refused_with_a_value_error_naming_the_module(tmp_path):
    """Shards of a 2-layer model into a 1-layer skeleton: ``AttributeError: ModuleList has no attribute `1```
    from inside ``get_submodule``, where the docstring promises a ValueError for a tensor the model has no slot
    for."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from medquant.testing.zoo import text_kwargs

    entry = ZOO_BY_NAME["llama"]
    save_model(entry.build(), str(tmp_path / "float.safetensors"))
    with init_empty_weights():
        part = entry.build()
    quantize_shard(part, QuantConfig(4, group_size=32), tmp_path / "float.safetensors", tmp_path / "shards", rank=0,
                   world_size=1, device="cpu")
    with init_empty_weights():
        small = LlamaForCausalLM(LlamaConfig(**text_kwargs(num_hidden_layers=1)))
    with pytest.raises(ValueError, match=r"shard medquant-shard-00000-of-00001\.safetensors holds "
                                         r"'model\.layers\.1\..*no module 'model\.layers\.1"):
        assemble_shards(small, tmp_path / "shards")
