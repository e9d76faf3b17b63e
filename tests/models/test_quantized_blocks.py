"""``transformer_blocks`` on a model whose linears are quantized (``QuantLinear``): the blocks are the float
model's (as ``block_stacks`` already gives them), and each unit whose projections are not float ``nn.Linear`` is
left out with the reason in ``Block.unsupported`` naming them, instead of the whole block list coming back empty
(StructuredPruner then found nothing, block influence said the model had no blocks)."""
from __future__ import annotations

import warnings

import torch

import medquant
from medquant.models import block_stacks, transformer_blocks
from medquant.testing.zoo import ZOO_BY_NAME
from medquant.testing.zoo_vlm import EXTRA_ZOO_BY_NAME

CFG = medquant.QuantConfig(4, group_size=32)


def _quantize(model: torch.nn.Module, skip: list[str]) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        medquant.quantize_(model, CFG, skip=skip)


def test_a_quantized_model_keeps_its_blocks_and_says_why_their_units_are_not_read():
    model = ZOO_BY_NAME["llama"].build()
    float_blocks = transformer_blocks(model, "all")
    _quantize(model, ["@head"])
    blocks = transformer_blocks(model, "all")
    assert [(b.name, b.stack, b.index, b.role) for b in blocks] == [
        (b.name, b.stack, b.index, b.role) for b in float_blocks]
    assert [b.name for b in blocks] == [n for g in block_stacks(model) for n in g]
    for b in blocks:
        assert b.attention is None and b.ffn is None
        heads, ffn = b.unsupported["heads"], b.unsupported["ffn"]
        assert f"{b.name}.self_attn.q_proj" in heads and "QuantLinear" in heads and "nn.Linear" in heads
        assert f"{b.name}.mlp.down_proj" in ffn and "QuantLinear" in ffn
        assert "prune the float model first, then quantize" in heads


def test_a_partly_quantized_block_keeps_its_float_unit():
    model = ZOO_BY_NAME["llama"].build()
    float_ffn = transformer_blocks(model)[0].ffn
    _quantize(model, ["@head", "re:.*\\.mlp\\..*"])
    b = transformer_blocks(model)[0]
    assert b.ffn == float_ffn and "ffn" not in b.unsupported
    assert b.attention is None and "QuantLinear" in b.unsupported["heads"]


def test_a_quantized_gemma4_vision_block_names_the_quantized_linear_inside_the_clamp_wrapper():
    model = EXTRA_ZOO_BY_NAME["gemma4"].build()
    _quantize(model, ["@head"])
    b = transformer_blocks(model, "vision", clamp_wrappers=True)[0]
    assert b.attention is None and b.ffn is None
    assert f"{b.name}.self_attn.q_proj.linear" in b.unsupported["heads"]
    assert f"{b.name}.mlp.gate_proj.linear" in b.unsupported["ffn"]
