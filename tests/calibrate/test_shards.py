"""Block-sharded sequential quantization: the union of the shards is the whole-model ``quantize_`` result."""
from __future__ import annotations

import warnings

import pytest
import torch
from accelerate import init_empty_weights
from safetensors.torch import save_model

from medquant import QuantConfig, quantize_
from medquant.calibrate.shards import assemble_shards, quantize_shard, shard_blocks
from medquant.quant.experts import QuantExperts
from medquant.testing.zoo import ZOO_BY_NAME
from medquant.testing.zoo_moe import MOE_ZOO_BY_NAME


def test_shard_blocks_cover_every_block_once():
    blocks = [f"b{i}" for i in range(7)]
    for world in (1, 2, 3, 7, 9):
        parts = [shard_blocks(blocks, r, world) for r in range(world)]
        assert [b for p in parts for b in p] == blocks
    with pytest.raises(ValueError, match="rank must be"):
        shard_blocks(blocks, 2, 2)


@pytest.mark.parametrize(("name", "world"), [("llama", 2), ("llava", 3), ("mixtral", 2)])
def test_shards_assemble_to_whole_model(name, world, tmp_path):
    """MoE (Mixtral): the experts quantized per expert, the routers float, as ``quantize_`` does."""
    entry = MOE_ZOO_BY_NAME[name] if name in MOE_ZOO_BY_NAME else ZOO_BY_NAME[name]
    whole = entry.build()
    inputs = entry.inputs(whole)
    save_model(whole, str(tmp_path / "float.safetensors"))
    rows = whole.get_submodule(_first_linear(whole)).weight.shape[0]
    mapping = {_first_linear(whole): QuantConfig(4, scope="channel", channel_bits=tuple((2, 8, 16)[i % 3]
                                                                                       for i in range(rows))),
               "re:.*": QuantConfig(4, group_size=32)}
    quantize_(whole, mapping)
    for r in range(world):
        with init_empty_weights():
            part = entry.build()
        with warnings.catch_warnings():  # the experts of the other ranks' blocks are not said to stay float
            warnings.filterwarnings("error", message=".*outside the blocks")
            quantize_shard(part, mapping, tmp_path / "float.safetensors", tmp_path / "shards", rank=r,
                           world_size=world, device="cpu")
    with init_empty_weights():
        full = entry.build()
    assemble_shards(full, tmp_path / "shards")
    sw, sf = whole.state_dict(), full.state_dict()
    assert set(sw) == set(sf)
    for k in sw:
        assert sw[k].dtype == sf[k].dtype and torch.equal(sw[k], sf[k]), k
    assert torch.equal(entry.output(full, inputs), entry.output(whole, inputs))
    assert [n for n, m in full.named_modules() if isinstance(m, QuantExperts)] == \
        [n for n, m in whole.named_modules() if isinstance(m, QuantExperts)]
    assert (name == "mixtral") == any(isinstance(m, QuantExperts) for m in full.modules())
    # an incomplete set of shards is refused
    (tmp_path / "shards" / f"medquant-shard-00001-of-{world:05d}.safetensors").unlink()
    with init_empty_weights():
        again = entry.build()
    with pytest.raises(ValueError, match="incomplete"):
        assemble_shards(again, tmp_path / "shards")


def _first_linear(model):
    return next(n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear))
