"""One recipe writer, one reader: layer_recipe / layer_from_recipe round-trip every layer kind, and refuse bad
recipes with a RecipeError that says what is wrong."""
import json

import pytest
import torch
from torch import nn

from medquant.quant import (
    QuantConfig,
    QuantConv2d,
    QuantLinear,
    RecipeError,
    layer_from_recipe,
    layer_recipe,
    model_recipe,
)

LAYERS = {
    "mixed_linear": (lambda: nn.Linear(40, 10), QuantConfig(4, group_size=16, channel_bits=(2, 3, 4, 8, 16, 32, 0,
                                                                                             5, 4, 4))),
    "asym_bf16": (lambda: nn.Linear(24, 6, bias=False, dtype=torch.bfloat16),
                  QuantConfig(3, symmetric=False, scope="channel")),
    "conv_same": (lambda: nn.Conv2d(4, 8, 3, padding="same", groups=2), QuantConfig(8, scope="tensor")),
    "conv": (lambda: nn.Conv2d(3, 4, (3, 1), stride=(2, 1), padding=(1, 0), dilation=1), QuantConfig(2)),
}


@pytest.mark.parametrize("kind", list(LAYERS))
def test_recipe_round_trip_is_exact(kind):
    torch.manual_seed(0)
    build, cfg = LAYERS[kind]
    float_layer = build()
    q = (QuantLinear if isinstance(float_layer, nn.Linear) else QuantConv2d).from_float(float_layer, cfg)
    entry = layer_recipe(q, weight_dtype=True)
    shell = layer_from_recipe(entry)
    assert type(shell) is type(q) and shell.weight_dtype == q.weight_dtype
    shell.load_state_dict(q.state_dict())
    assert layer_recipe(shell, weight_dtype=True) == entry
    x = torch.randn(2, q.in_features) if isinstance(q, QuantLinear) else torch.randn(1, q.in_channels, 6, 6)
    x = x.to(q.weight_dtype)
    assert torch.equal(shell(x), q(x))
    meta = layer_from_recipe(entry, device="meta")
    assert all(t.device.type == "meta" for t in meta.state_dict().values())


def test_recipe_keys_and_order_are_format_version_1():
    lin = QuantLinear.from_float(nn.Linear(8, 4), QuantConfig(4))
    assert list(layer_recipe(lin)) == ["type", "config", "bias", "in_features", "out_features", "dtype"]
    assert list(layer_recipe(lin, weight_dtype=True))[-1] == "weight_dtype"
    conv = QuantConv2d.from_float(nn.Conv2d(3, 4, 3, bias=False), QuantConfig(4))
    assert list(layer_recipe(conv)) == ["type", "config", "bias", "in_channels", "out_channels", "kernel_size",
                                        "stride", "padding", "dilation", "groups", "dtype"]
    assert layer_recipe(conv)["dtype"] == "float32"
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), lin)
    assert list(model_recipe(model)) == ["2"]
    with pytest.raises(TypeError, match="QuantLinear, QuantConv2d or QuantEmbedding"):
        layer_recipe(nn.Linear(2, 2))


def test_bad_recipes_raise_recipe_errors():
    good = layer_recipe(QuantLinear.from_float(nn.Linear(8, 4), QuantConfig(4)))
    cases = {
        "unknown type 'Dense'": {**good, "type": "Dense"},
        "'in_features' is missing": {k: v for k, v in good.items() if k != "in_features"},
        "'out_features' must be an integer": {**good, "out_features": "4"},
        "not a floating-point dtype": {**good, "dtype": "int8"},
        "unknown QuantConfig fields": {**good, "config": {**good["config"], "bitz": 4}},
        "channel_bits has 3 entries": {**good, "config": {**good["config"], "channel_bits": [2, 4, 8]}},
        "'bias' must be true or false": {**good, "bias": 1},
    }
    for message, entry in cases.items():
        with pytest.raises(RecipeError, match=message):
            layer_from_recipe(entry)
    assert issubclass(RecipeError, ValueError)


def test_embedding_recipe_round_trip_and_dense_layout_key():
    from medquant.quant.modules import QuantEmbedding

    torch.manual_seed(0)
    emb = QuantEmbedding.from_float(nn.Embedding(50, 64, padding_idx=3), QuantConfig(3, group_size=32))
    entry = layer_recipe(emb)
    assert entry["type"] == "QuantEmbedding" and entry["padding_idx"] == 3 and entry["layout"] == 2
    assert (entry["in_features"], entry["out_features"], entry["bias"]) == (64, 50, False)
    shell = layer_from_recipe(json.loads(json.dumps(entry)))
    shell.load_state_dict(emb.state_dict())
    ids = torch.tensor([0, 3, 49])
    assert torch.equal(shell(ids), emb(ids)) and shell.layout_version == 2
    v1 = layer_recipe(QuantLinear.from_float(nn.Linear(64, 8), QuantConfig(3, group_size=32), layout=1))
    assert "layout" not in v1  # version-1 layers write the recipe as before
    with pytest.raises(RecipeError, match="layout"):
        layer_from_recipe({**entry, "layout": 3})
