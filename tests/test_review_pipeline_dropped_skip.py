"""A QuantStage.skip pattern naming a layer of a block the prune stage drops: compress checks the patterns before any
stage runs (the layer is there then), so the quantization stage must not refuse it after pruning and training have
changed the model; the result is that of the same run without the pattern (nothing of it is left to keep in float)."""
from __future__ import annotations

import pytest
import torch

from medquant import QuantConfig
from medquant.pipeline import PruneStage, QuantStage, TrainStage, compress
from medquant.quant.api import quantized_modules
from medquant.testing.zoo import ZOO_BY_NAME


@pytest.mark.parametrize("method", ["rtn", "awq"])
@pytest.mark.parametrize("drop", [["model.layers.1"], 1])
def test_skip_pattern_of_a_dropped_block(method, drop):
    """``drop=1``: block influence picks the block (the reference run's ``plan.drop_blocks`` names it), and the
    pattern names a layer of that block."""
    e = ZOO_BY_NAME["llama"]

    def run(skip):
        model = e.build()
        inputs = e.inputs(model)
        torch.manual_seed(0)
        res = compress(model, prune=PruneStage(0.0, 0.0, importance="magnitude", drop_blocks=drop),
                       train=TrainStage("finetune", steps=1, lr=1e-3),
                       quantize=QuantStage(QuantConfig(4, group_size=32), method=method, skip=skip),
                       calib=[inputs], train_data=[inputs], progress=False)
        with torch.no_grad():
            return sorted(quantized_modules(model)), res.plan, model(**inputs).logits

    ref_q, ref_plan, ref_logits = run(["@head"])
    (dropped,) = ref_plan.drop_blocks
    assert dropped == "model.layers.1" or isinstance(drop, int)
    q, _, logits = run(["@head", f"{dropped}.mlp.down_proj"])
    assert q == ref_q and "lm_head" not in q
    torch.testing.assert_close(logits, ref_logits, rtol=0, atol=0)
