"""A ``QuantStage.skip`` pattern naming a layer of a block that the prune stage keeps while dropping a block before it:
the blocks after a dropped one are renumbered (``model.layers.1`` becomes ``model.layers.0``), and the pattern, given
against the model as it was, was matched against the new names: the layer asked to stay float was quantized (its
pattern matched nothing any more and was left out as if its block had been dropped), or another block's layer was kept
float in its place. Reference: the layer module object the pattern named before the call, which must come out of
:func:`compress` in float (an ``nn.Linear``), with every other layer quantized, as ``quantize_`` by hand with the
layer's new name leaves it."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from medquant import QuantConfig, quantize_
from medquant.pipeline import PruneStage, QuantStage, compress
from medquant.prune import StructuredPruner
from medquant.quant.api import quantized_modules
from medquant.testing.zoo import text_kwargs


def _llama3():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**text_kwargs(num_hidden_layers=3))).eval()


@pytest.mark.parametrize("method", ["rtn", "awq"])
@pytest.mark.parametrize("pattern", ["model.layers.1.mlp.down_proj", r"re:model\.layers\.1\.mlp\.down_proj"])
def test_a_skipped_layer_stays_float_when_an_earlier_block_is_dropped(method, pattern):
    model = _llama3()
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(1))
    calib = [{"input_ids": ids}]
    by_hand = copy.deepcopy(model)
    kept = model.model.layers[1].mlp.down_proj  # the layer the pattern names, before any stage
    cfg = QuantConfig(4, group_size=32)
    compress(model, prune=PruneStage(0.0, 0.0, importance="magnitude", drop_blocks=["model.layers.0"]),
             quantize=QuantStage(cfg, method=method, skip=["@head", pattern]), calib=calib, progress=False)
    assert len(model.model.layers) == 2
    assert model.model.layers[0].mlp.down_proj is kept and type(kept) is nn.Linear
    assert isinstance(model.model.layers[1].mlp.down_proj, nn.Module) and type(model.model.layers[1].mlp.down_proj) \
        is not nn.Linear  # the block that was model.layers.2 is quantized whole
    if method == "rtn":  # the same steps by hand, the layer named as it is after pruning
        StructuredPruner(0.0, 0.0, importance="magnitude", drop_blocks=["model.layers.0"], progress=False).prune(
            by_hand, calib=calib)
        quantize_(by_hand, cfg, skip=["@head", "model.layers.0.mlp.down_proj"], progress=False)
        assert sorted(quantized_modules(model)) == sorted(quantized_modules(by_hand))
        with torch.no_grad():
            assert torch.equal(model(input_ids=ids).logits, by_hand(input_ids=ids).logits)
