"""Review s0710: QuantConv2d refuses the geometries nn.Conv2d refuses, so a malformed recipe is refused when the
layer is built, not at its first forward (after its state dict had loaded)."""
import pytest
import torch
from torch import nn

from medquant.quant import QuantConfig
from medquant.quant.modules import QuantConv2d
from medquant.quant.recipe import RecipeError, layer_from_recipe, layer_recipe

GEOMETRIES = [
    {"in_channels": 4, "out_channels": 6, "kernel_size": 3, "groups": 3},  # in_channels not divisible
    {"in_channels": 6, "out_channels": 4, "kernel_size": 3, "groups": 3},  # out_channels not divisible
    {"in_channels": 5, "out_channels": 6, "kernel_size": 3, "groups": 2},
    {"in_channels": 4, "out_channels": 6, "kernel_size": 3, "padding": "foo"},
    {"in_channels": 4, "out_channels": 6, "kernel_size": 3, "padding": "same", "stride": 2},
    {"in_channels": 4, "out_channels": 6, "kernel_size": 3, "groups": 0},
    {"in_channels": 4, "out_channels": 6, "kernel_size": 3, "padding": "same", "groups": 2},  # valid
    {"in_channels": 4, "out_channels": 6, "kernel_size": (3, 1), "padding": "valid", "stride": 2},  # valid
]


@pytest.mark.parametrize("geometry", GEOMETRIES)
def test_refuses_what_nn_conv2d_refuses(geometry):
    try:
        nn.Conv2d(**geometry)
    except (ValueError, ZeroDivisionError, RuntimeError):
        with pytest.raises(ValueError):
            QuantConv2d(**geometry, config=QuantConfig(bits=4))
    else:
        q = QuantConv2d(**geometry, config=QuantConfig(bits=4))
        assert q.weight.shape == nn.Conv2d(**geometry).weight.shape


@pytest.mark.parametrize("change", [{"groups": 3}, {"in_channels": 5}, {"padding": "foo"},
                                    {"padding": "same", "stride": [2, 2]}])
def test_a_recipe_with_an_impossible_geometry_is_a_recipe_error(change):
    layer = QuantConv2d.from_float(nn.Conv2d(4, 6, 3, groups=2), QuantConfig(bits=4))
    recipe = dict(layer_recipe(layer), **change)
    with pytest.raises(RecipeError):
        layer_from_recipe(recipe)


def test_a_valid_recipe_still_round_trips():
    conv = nn.Conv2d(4, 6, 3, groups=2, padding="same")
    layer = QuantConv2d.from_float(conv, QuantConfig(bits=4))
    shell = layer_from_recipe(layer_recipe(layer))
    shell.load_state_dict(layer.state_dict())
    x = torch.randn(1, 4, 7, 7)
    assert torch.equal(shell(x), layer(x))
