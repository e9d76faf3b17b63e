"""Pruning a quantized model is refused, clearly and before anything changes: heads and FFN neurons are removed
from float ``nn.Linear`` layers only (slicing ``QuantLinear``'s packed codes and per-group scales by input columns
would need the removed columns to fill whole quantization groups). Prune the float model first, then quantize."""
from __future__ import annotations

import copy
import warnings

import pytest
import torch

import medquant
from medquant.models import transformer_blocks
from medquant.prune import StructuredPruner, apply_plan
from medquant.prune.layers import block_influence
from medquant.prune.surgery import keep_linear, prune_attention, prune_ffn
from medquant.testing.zoo import ZOO_BY_NAME

CFG = medquant.QuantConfig(4, group_size=32)


def _quantized(skip: list[str] | None = None):
    model = ZOO_BY_NAME["llama"].build()
    float_model = copy.deepcopy(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        medquant.quantize_(model, CFG, skip=skip or ["@head"])
    return float_model, model


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(a[k].shape == b[k].shape and torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("skip", [None, ["@head", "re:.*self_attn.*"]], ids=["all", "mlp_only"])
def test_the_pruner_refuses_a_quantized_model_naming_the_layer_and_the_remedy(skip):
    float_model, model = _quantized(skip)
    plan = StructuredPruner(0.5, 0.3, progress=False).plan(float_model)
    before = _state(model)
    first = "model.layers.0.self_attn.q_proj" if skip is None else "model.layers.0.mlp.gate_proj"
    for call in (lambda: StructuredPruner(0.5, 0.3, progress=False).plan(model),
                 lambda: StructuredPruner(0.5, 0.3, progress=False).prune(model),
                 lambda: apply_plan(model, plan)):
        with pytest.raises(ValueError) as err:
            call()
        msg = str(err.value)
        assert first in msg and "QuantLinear" in msg and "float nn.Linear" in msg
        assert "prune the float model first, then quantize" in msg
        assert "more quantized layers" in msg
    assert _same(_state(model), before)


def test_surgery_on_a_quantized_layer_is_refused_before_anything_changes():
    """prune_attention / prune_ffn with units of the float model on its quantized copy: they set out_features on
    the QuantLinear and only then failed on its read-only weight, leaving a layer whose size and codes disagree."""
    float_model, model = _quantized()
    b = transformer_blocks(float_model)[0]
    before = _state(model)
    sizes = {n: (m.in_features, m.out_features) for n, m in model.named_modules() if hasattr(m, "in_features")}
    with pytest.raises(ValueError, match=r"model\.layers\.0\.self_attn\.q_proj is a QuantLinear.*float nn\.Linear"):
        prune_attention(model, copy.deepcopy(b.attention), [0, 1])
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp\.gate_proj is a QuantLinear.*prune the float model"):
        prune_ffn(model, copy.deepcopy(b.ffn), list(range(100)))
    with pytest.raises(ValueError, match="QuantLinear"):
        keep_linear(model.model.layers[0].mlp.down_proj, cols=torch.arange(10))
    assert _same(_state(model), before)
    assert sizes == {n: (m.in_features, m.out_features) for n, m in model.named_modules() if hasattr(m, "in_features")}


def test_prune_attention_checks_every_projection_before_changing_one():
    """Surgery checks every layer it would touch before touching one: q / k / v float, o quantized -> nothing
    changes."""
    float_model, model = _quantized(["@head", "re:.*self_attn\\.(q|k|v)_proj"])
    b = transformer_blocks(float_model)[0]
    before = _state(model)
    with pytest.raises(ValueError, match=r"self_attn\.o_proj is a QuantLinear"):
        prune_attention(model, copy.deepcopy(b.attention), [0, 1])
    assert _same(_state(model), before)


def test_block_influence_reads_a_quantized_model():
    """Scoring whole blocks only runs the model: a quantized model has its float model's blocks (it said it had
    none)."""
    float_model, model = _quantized()
    gen = torch.Generator().manual_seed(0)
    calib = [{"input_ids": torch.randint(4, 200, (2, 12), generator=gen)}]
    got = block_influence(model, calib, progress=False)
    assert [s["block"] for s in got] == [s["block"] for s in block_influence(float_model, calib, progress=False)]
