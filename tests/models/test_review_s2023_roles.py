"""Review: roles of parameters held directly by a vision sub-model that also holds the projector."""
from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from medquant.models import model_roles, role_of


def _pp_formulanet():
    """PP-FormulaNet on the meta device (structure only): its vision encoder holds ``pos_embed`` directly and nests
    the ``multi_modal_projector``."""
    if not hasattr(transformers, "PPFormulaNetForConditionalGeneration"):
        pytest.skip("this transformers has no PP-FormulaNet")
    cfg = transformers.AutoConfig.for_model("pp_formulanet")
    cfg.vision_config.num_hidden_layers = 2
    cfg.vision_config.global_attn_indexes = [1]
    cfg.text_config.encoder_layers = 1
    cfg.text_config.decoder_layers = 1
    with torch.device("meta"):
        return transformers.PPFormulaNetForConditionalGeneration(cfg)


def test_pos_embed_of_a_vision_sub_model_is_vision():
    model = _pp_formulanet()
    # transformers' own structure: the vision model (config = vision_config) owns pos_embed, which its forward adds
    # to the patch embeddings; the projector is a separate child module that does not hold it
    vision = next(m for m in model.modules() if getattr(m, "config", None) is model.config.vision_config)
    owned = {id(p) for p in vision.parameters(recurse=False)}
    assert id(vision.pos_embed) in owned
    projector = vision.multi_modal_projector
    assert all(p is not vision.pos_embed for p in projector.parameters())
    roles = model_roles(model)
    name = next(n for n, p in model.named_parameters() if p is vision.pos_embed)
    assert role_of(model, name) == "vision", roles
    assert name not in roles.get("projector", [])


def test_quantized_bias_free_projections_stay_head():
    """CLIP's ``visual_projection`` / ``text_projection`` (``nn.Linear`` without bias) are the head; once quantized they
    hold packed buffers and no parameter, and must keep that role (a quantized model reloaded with ``from_pretrained``
    is read with the same role patterns as its float model)."""
    from medquant import QuantConfig, quantize_
    from medquant.models import modules_in_role
    from medquant.testing.zoo_vlm import EXTRA_ZOO_BY_NAME

    model = EXTRA_ZOO_BY_NAME["clip"].build()
    # transformers' CLIPModel: get_image_features / get_text_features end with these bias-free projections
    assert model.visual_projection.bias is None and model.text_projection.bias is None
    before = model_roles(model)
    assert {"visual_projection", "text_projection"} <= set(before["head"])
    quantize_(model, QuantConfig(4))
    assert type(model.visual_projection).__name__ == "QuantLinear"
    assert not list(model.visual_projection.parameters())
    assert model_roles(model) == before
    assert role_of(model, "visual_projection") == "head"
    assert "text_projection" in modules_in_role(model, "head")


def test_protein_encoder_is_not_language():
    """Evolla (listed by transformers for image-text-to-text) reads ``protein_input_ids`` with a SaProt encoder whose
    config is ``config.protein_encoder_config``: another modality, like an audio tower, so no role (reported by
    ``unassigned_modules``), not a second text stack of ``@language``."""
    if not hasattr(transformers, "EvollaForProteinText2Text"):
        pytest.skip("this transformers has no Evolla")
    import inspect

    from medquant.models import language_model_layers, unassigned_modules

    cfg = transformers.AutoConfig.for_model("evolla")
    cfg.num_hidden_layers = 2
    cfg.protein_encoder_config.num_hidden_layers = 2
    with torch.device("meta"):
        model = transformers.EvollaForProteinText2Text(cfg)
    assert "protein_input_ids" in inspect.signature(model.forward).parameters
    tower = next(n for n, m in model.named_modules() if getattr(m, "config", None) is cfg.protein_encoder_config)
    tower_linears = [n for n, m in model.named_modules() if n.startswith(tower + ".") and isinstance(m, torch.nn.Linear)]
    assert tower_linears
    roles = model_roles(model)
    assert all(role_of(model, n) is None for n in tower_linears), roles
    assert set(tower_linears) <= set(unassigned_modules(model))
    # the text decoder stays the language model: transformers' own layer list
    assert language_model_layers(model) == [f"model.layers.{i}" for i in range(len(model.model.layers))]


def test_quantized_unhinted_projector_beside_the_layers_stays_projector():
    """LLaVA-Med's layout with a tower found by its config and a projector named without hint (``bridge``) beside
    ``model.layers``: the trace of ``get_image_features`` makes it projector. Quantized, its Linear layers hold packed
    buffers (and a 1-D bias), no weight matrix parameter; it must stay projector, not fall into the language model."""
    from medquant import QuantConfig, quantize_
    from medquant.testing.zoo_vlm import EXTRA_ZOO_BY_NAME, llava_med_class

    _, base = llava_med_class()
    model = EXTRA_ZOO_BY_NAME["llava_med"].build()

    class Renamed(base):
        def get_image_features(self, pixel_values):
            return self.model.bridge(self.model.backbone(pixel_values).last_hidden_state)

    model.__class__ = Renamed
    inner = model.model
    inner.backbone, inner.bridge = inner.vision_tower, inner.mm_projector
    del inner.vision_tower, inner.mm_projector
    model.config.vision_config = inner.backbone.config
    model.config.mm_vision_tower = {}
    # the reference: the modules that run on the image in the model's own get_image_features
    ran: list[str] = []
    handles = [m.register_forward_pre_hook(lambda _m, _a, n=n: ran.append(n)) for n, m in model.named_modules() if n]
    try:
        with torch.no_grad():
            model.get_image_features(torch.zeros(1, 3, model.config.vision_config.image_size,
                                                 model.config.vision_config.image_size))
    finally:
        for h in handles:
            h.remove()
    assert "model.bridge" in ran
    before = model_roles(model)
    assert before["projector"] == ["model.bridge"]
    quantize_(model, QuantConfig(4))
    assert {type(m).__name__ for m in model.model.bridge.modules()} >= {"QuantLinear"}
    assert model_roles(model) == before
    assert role_of(model, "model.bridge.0") == "projector"


@pytest.mark.parametrize("name", ["deepseek_vl", "blip2"])
def test_quantized_token_embedding_still_anchors_the_language_model(name):
    """``quantize_embeddings_`` turns the token table into a ``QuantEmbedding`` (rows packed in buffers, not an
    ``nn.Embedding``). The structural roles are anchored on that table: the language model (the sub-model whose config
    is ``text_config``) must stay ``language``, not be swallowed by the vision role with the rest of the model."""
    from medquant import QuantConfig
    from medquant.models import language_model_layers, vision_layers
    from medquant.quant.embeddings import quantize_embeddings_
    from medquant.testing.zoo_vlm import EXTRA_ZOO_BY_NAME

    model = EXTRA_ZOO_BY_NAME[name].build()
    text = next(n for n, m in model.named_modules() if getattr(m, "config", None) is model.config.text_config)
    before = (model_roles(model), language_model_layers(model), vision_layers(model))
    quantize_embeddings_(model, QuantConfig(8, scope="channel"))
    assert type(model.get_input_embeddings()).__name__ == "QuantEmbedding"
    roles = model_roles(model)
    assert (roles, language_model_layers(model), vision_layers(model)) == before
    assert not any(text == p or text.startswith(p + ".") for p in roles["vision"])
    assert any(p == text or p.startswith(text + ".") for p in roles["language"])
