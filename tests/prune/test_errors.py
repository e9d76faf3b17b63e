"""Impossible pruning requests are refused with messages that say what is wrong."""
from __future__ import annotations

import pytest
import torch

from medquant import QuantConfig, quantize_
from medquant.models import transformer_blocks
from medquant.prune import StructuredPruner
from medquant.prune.surgery import prune_attention, prune_ffn
from medquant.testing.zoo import ZOO_BY_NAME, tiny_cnn


@pytest.mark.parametrize("bad", [1.0, -0.1, float("nan"), "0.3"])
def test_bad_ratio(bad):
    with pytest.raises((ValueError, TypeError), match=r"head_ratio must be a number in \[0, 1\)"):
        StructuredPruner(bad, 0.0)


def test_ratio_leaving_nothing():
    model = ZOO_BY_NAME["llama"].build()
    with pytest.raises(ValueError, match="would remove all 4 attention heads"):
        StructuredPruner(0.9, 0.0, progress=False).plan(model)
    with pytest.raises(ValueError, match="would remove all 256 FFN neurons"):
        StructuredPruner(0.0, 0.999, progress=False).plan(model)
    gqa = ZOO_BY_NAME["qwen2"].build()
    with pytest.raises(ValueError, match="every key/value group"):
        StructuredPruner(0.8, 0.0, progress=False).plan(gqa)


def test_surgery_refuses_all_heads_and_inconsistent_groups():
    model = ZOO_BY_NAME["qwen2"].build()
    b = transformer_blocks(model)[0]
    with pytest.raises(ValueError, match="refusing to prune all 4 attention heads"):
        prune_attention(model, b.attention, [])
    with pytest.raises(ValueError, match="same number of query heads"):
        prune_attention(model, b.attention, [0, 1, 2])
    with pytest.raises(ValueError, match="refusing to prune all 256 FFN neurons"):
        prune_ffn(model, b.ffn, [])
    assert model.model.layers[0].self_attn.q_proj.out_features == 128  # nothing changed


def test_other_errors():
    model = ZOO_BY_NAME["llama"].build()
    with pytest.raises(ValueError, match="unknown block names"):
        StructuredPruner({"model.layers.7": 0.3}, progress=False).plan(model)
    with pytest.raises(ValueError, match="got 1 per-layer ratios for 2 blocks"):
        StructuredPruner([0.1], progress=False).plan(model)
    with pytest.raises(ValueError, match="needs calibration data"):
        StructuredPruner(0.3, importance="activation", progress=False).plan(model)
    with pytest.raises(ValueError, match="unknown importance"):
        StructuredPruner(0.3, importance="random")
    quantize_(model, QuantConfig(4, group_size=32), skip=["@head"])
    with pytest.raises(ValueError, match="prune the float model first"):
        StructuredPruner(0.3, progress=False).plan(model)


def test_fused_qkv_vision_heads_refused():
    model = ZOO_BY_NAME["qwen2_vl"].build()
    with pytest.raises(ValueError, match="fused qkv"):
        StructuredPruner(0.3, 0.0, scope="vision", progress=False).plan(model)
    # its FFNs can still be pruned
    plan = StructuredPruner(0.0, 0.3, scope="vision", progress=False).plan(model)
    assert all(len(v) == 256 - 77 for v in plan.neurons.values())


def test_cnn_errors():
    model = tiny_cnn()
    x = torch.randn(2, 3, 16, 16)
    with pytest.raises(ValueError, match="cannot be pruned or do not exist"):
        StructuredPruner(channel_ratio={"classifier": 0.3}, progress=False).plan(model, calib=[x])
    with pytest.raises(ValueError, match="example input"):
        StructuredPruner(channel_ratio=0.3, progress=False).plan(model)
