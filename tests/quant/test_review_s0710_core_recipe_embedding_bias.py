"""Review s0710: a QuantEmbedding recipe saying ``"bias": true`` is refused (an embedding table has no bias); it
built a layer without one, silently."""
import pytest
from torch import nn

from medquant.quant import QuantConfig
from medquant.quant.modules import QuantEmbedding
from medquant.quant.recipe import RecipeError, layer_from_recipe, layer_recipe


def test_embedding_recipe_with_a_bias_is_refused():
    emb = QuantEmbedding.from_float(nn.Embedding(10, 32), QuantConfig(bits=4, group_size=32))
    recipe = layer_recipe(emb)
    assert recipe["bias"] is False and nn.Embedding(10, 32).state_dict().keys() == {"weight"}
    with pytest.raises(RecipeError, match="bias"):
        layer_from_recipe(dict(recipe, bias=True))
    assert layer_from_recipe(recipe).bias is None
