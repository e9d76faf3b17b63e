"""quantize_ over every zoo model: outputs equal the float model with independently dequantized weights."""
import copy

import numpy as np
import pytest
import torch

import medquant as mq
from medquant.models import model_roles
from medquant.quant.api import quantized_modules
from medquant.testing.zoo import ZOO_BY_NAME, vlm_zoo_params, zoo_params
from tests.quant.np_reference import np_dequant_layer

BITS = range(2, 9)
SCOPES = {"group128": {"scope": "group", "group_size": 128}, "channel": {"scope": "channel"}}


def _reference_model(float_model, qmodel):
    """The float model with each quantized layer's weight replaced by the numpy-dequantized stored weight."""
    ref = copy.deepcopy(float_model)
    for name, qm in quantized_modules(qmodel).items():
        lin = ref.get_submodule(name)
        w = torch.from_numpy(np_dequant_layer(qm)).to(lin.weight.dtype).reshape(lin.weight.shape)
        # a new Parameter, not copy_: a tied lm_head must not overwrite the (float) input embedding
        lin.weight = torch.nn.Parameter(w, requires_grad=False)
    return ref


def _close(a, b):
    tol = 1e-4 * max(1.0, float(b.abs().max()))
    return float((a - b).abs().max()) <= tol


@zoo_params
@pytest.mark.parametrize("scope", list(SCOPES))
def test_quantized_output_matches_independent_dequantization(entry, scope):
    model = entry.build()
    inputs = entry.inputs(model)
    # nn.MultiheadAttention reads out_proj.weight directly, so its out_proj is left in float by design
    mha = [n + "." for n, m in model.named_modules() if isinstance(m, torch.nn.MultiheadAttention)]
    n_linear = sum(isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)) and not n.startswith(tuple(mha))
                   for n, m in model.named_modules())
    for bits in BITS:
        q = mq.quantize_(copy.deepcopy(model), mq.QuantConfig(bits, **SCOPES[scope]))
        qmods = quantized_modules(q)
        assert len(qmods) == n_linear, "every Linear/Conv2d should be quantized"
        with torch.no_grad():
            out_q = entry.output(q, inputs)
            out_ref = entry.output(_reference_model(model, q), inputs)
        assert torch.isfinite(out_q).all()
        assert _close(out_q, out_ref), (bits, float((out_q - out_ref).abs().max()))
        if bits == 4:
            # negative control: one wrong scale in one layer must be detected
            name, layer = next(iter(qmods.items()))
            with torch.no_grad():
                layer.scales_4.mul_(1.5)
                out_bad = entry.output(q, inputs)
            assert not _close(out_bad, out_ref), f"a wrong scale in {name} went unnoticed"


@vlm_zoo_params
def test_skipping_the_vision_tower_leaves_it_untouched(entry):
    model = entry.build()
    roles = model_roles(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    mq.quantize_(model, mq.QuantConfig(4), skip=["@vision"])
    vision_prefixes = tuple(p + "." for p in roles["vision"])
    vision_keys = [k for k in before if k.startswith(vision_prefixes)]
    assert vision_keys
    after = model.state_dict()
    for k in vision_keys:
        assert torch.equal(after[k], before[k]), k
    for name, m in model.named_modules():
        if name.startswith(vision_prefixes):
            assert not isinstance(m, (mq.QuantLinear, mq.QuantConv2d)), name
    assert any(n.startswith(tuple(roles["language"])) for n in quantized_modules(model))
    with torch.no_grad():
        assert torch.isfinite(entry.output(model, entry.inputs(model))).all()


def test_role_map_quantizes_language_keeps_vision_and_head_float():
    entry = ZOO_BY_NAME["llava"]
    model = entry.build()
    roles = model_roles(model)
    mq.quantize_(model, {"@language": mq.QuantConfig(4), "@vision": None}, skip=["@head"])
    q = quantized_modules(model)
    assert q and all(any(n.startswith(p) for p in roles["language"]) for n in q)
    for p in roles["head"]:
        assert isinstance(model.get_submodule(p), torch.nn.Linear)
    # the projector was not named: it stays float
    for n, m in model.named_modules():
        if any(n.startswith(p) for p in roles["projector"]):
            assert not isinstance(m, mq.QuantLinear)


def test_unmatched_patterns_raise_naming_the_pattern():
    model = ZOO_BY_NAME["llama"].build()
    with pytest.raises(ValueError, match="'model.layerz.0' matches no module"):
        mq.quantize_(model, mq.QuantConfig(4), skip=["model.layerz.0"])
    with pytest.raises(ValueError, match=r"'re:.*vision.*' matches no module"):
        mq.quantize_(model, {"re:.*vision.*": mq.QuantConfig(4)})
    with pytest.raises(ValueError, match="has no vision part"):
        mq.quantize_(model, mq.QuantConfig(4), skip=["@vision"])
    with pytest.raises(ValueError, match="unknown role pattern '@decoder'"):
        mq.quantize_(model, {"@decoder": 4})
    with pytest.raises(ValueError, match="none of them is an nn.Linear"):
        mq.quantize_(model, {"model.norm": 4})
    with pytest.raises(TypeError, match="not a single string"):
        mq.quantize_(model, 4, skip="lm_head")
    assert not quantized_modules(model), "failed calls must not half-quantize the model"


def test_pattern_precedence_exact_then_in_order():
    model = ZOO_BY_NAME["llama"].build()
    mq.quantize_(model, {"re:.*proj": mq.QuantConfig(4), "model.layers.0.mlp.up_proj": mq.QuantConfig(8),
                         "re:.*mlp.*": mq.QuantConfig(2)})
    assert model.get_submodule("model.layers.0.mlp.up_proj").config.bits == 8  # exact name wins
    assert model.get_submodule("model.layers.0.mlp.down_proj").config.bits == 4  # first regex in order
    assert isinstance(model.get_submodule("lm_head"), torch.nn.Linear)  # matched by nothing


def test_quantize_plain_cnn_and_dequantize_back():
    from medquant.testing.zoo import tiny_cnn

    model = tiny_cnn()
    x = torch.randn(2, 3, 32, 32)
    q = mq.quantize_(copy.deepcopy(model), mq.QuantConfig(8, scope="channel"))
    assert any(isinstance(m, mq.QuantConv2d) for m in q.modules())
    ref = _reference_model(model, q)
    with torch.no_grad():
        assert _close(q(x), ref(x))
        back = mq.dequantize_(copy.deepcopy(q))
        assert not quantized_modules(back)
        assert np.allclose(back(x).numpy(), q(x).numpy(), atol=1e-5)


def test_nan_weight_error_names_the_module():
    model = ZOO_BY_NAME["llama"].build()
    with torch.no_grad():
        model.get_submodule("model.layers.1.mlp.down_proj").weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.down_proj: weights contain 1 NaN/inf"):
        mq.quantize_(model, mq.QuantConfig(4))
    assert not quantized_modules(model), "a failed quantize_ must leave the model unchanged"
