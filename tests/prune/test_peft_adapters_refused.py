"""Pruning a model with PEFT adapters attached is refused with the remedy that fits: merge the adapters into the
weights (``merge_and_unload()``) or prune before attaching them - not "prune the float model first, then quantize
it", which is the remedy for quantized layers and misleads here (a LoRA layer is float)."""
from __future__ import annotations

import copy

import pytest
import torch

from medquant.models import transformer_blocks
from medquant.prune import StructuredPruner
from medquant.prune.surgery import prune_attention
from medquant.testing.zoo import ZOO_BY_NAME

peft = pytest.importorskip("peft")


def _with_lora():
    base = ZOO_BY_NAME["llama"].build()
    plain = copy.deepcopy(base)
    model = peft.get_peft_model(base, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj", "up_proj"]))
    return plain, model


def test_the_pruner_names_the_adapters_and_the_merge_remedy():
    _, model = _with_lora()
    with pytest.raises(ValueError) as err:
        StructuredPruner(0.5, 0.5, progress=False).plan(model)
    msg = str(err.value)
    assert "self_attn.q_proj" in msg and "PEFT" in msg and "merge_and_unload()" in msg
    assert "then quantize it" not in msg


def test_surgery_on_an_adapter_layer_names_the_merge_remedy():
    plain, model = _with_lora()
    unit = transformer_blocks(plain)[0].attention
    inner = model.base_model.model
    with pytest.raises(ValueError, match=r"q_proj is a PEFT .*merge_and_unload\(\)"):
        prune_attention(inner, copy.deepcopy(unit), [0])


def test_after_merging_the_adapters_the_model_prunes_and_matches_the_merged_float_model():
    _, model = _with_lora()
    for name, p in model.named_parameters():  # non-zero adapters, so merging changes the weights
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05)
    ids = torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(input_ids=ids).logits
    merged = model.merge_and_unload()
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, before, rtol=1e-4, atol=1e-4)
    attn = merged.model.layers[0].self_attn
    hd, width = attn.head_dim, attn.o_proj.in_features
    StructuredPruner(0.5, 0.0, progress=False).prune(merged)
    assert merged.model.layers[0].self_attn.o_proj.in_features == width // 2 and width // hd >= 2
    with torch.no_grad():
        assert torch.isfinite(merged(input_ids=ids).logits).all()
