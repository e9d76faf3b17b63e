"""quantize_ over every zoo model: outputs equal the float model with independently dequantized weights."""
import copy
import warnings

import numpy as np
import pytest
import torch

import medquant as mq
from medquant.models import model_roles, unassigned_modules
from medquant.quant.api import quantized_modules
from medquant.testing.zoo import ZOO_BY_NAME, vlm_zoo_params, zoo_params
from medquant.testing.zoo_vlm import extra_zoo_params
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
    with pytest.raises(ValueError, match="has no vision part"):  # a role to quantize that the model lacks
        mq.quantize_(model, {"@vision": mq.QuantConfig(4)})
    with pytest.raises(ValueError, match="unknown role pattern '@decoder'"):
        mq.quantize_(model, {"@decoder": 4})
    with pytest.raises(ValueError, match="none of them is an nn.Linear"):
        mq.quantize_(model, {"model.norm": 4})
    with pytest.raises(TypeError, match="not a single string"):
        mq.quantize_(model, 4, skip="lm_head")
    assert not quantized_modules(model), "failed calls must not half-quantize the model"


def test_missing_role_in_skip_is_noted_once_and_skips_nothing():
    """A recipe written for VLMs (skip=["@vision", "@head"]) runs on a model without those roles: noted once."""

    class NotedLlama(type(ZOO_BY_NAME["llama"].build())):  # a fresh class: the note is once per class and pattern
        pass

    model = ZOO_BY_NAME["llama"].build()
    model.__class__ = NotedLlama
    plain = mq.quantize_(copy.deepcopy(model), mq.QuantConfig(4))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        mq.quantize_(model, mq.QuantConfig(4), skip=["@vision", "@projector"])
        again = ZOO_BY_NAME["llama"].build()
        again.__class__ = NotedLlama
        mq.quantize_(again, mq.QuantConfig(4), skip=["@vision"])  # same class and pattern: no second note
    notes = [str(w.message) for w in caught if "left out" in str(w.message)]
    assert notes == ["'@vision' left out: NotedLlama has no vision part (it has: @language, @head)",
                     "'@projector' left out: NotedLlama has no projector part (it has: @language, @head)"]
    assert set(quantized_modules(model)) == set(quantized_modules(plain))  # nothing was skipped
    with pytest.raises(ValueError, match="has no vision part"):  # mapped to a config: a target, still refused
        mq.quantize_(ZOO_BY_NAME["llama"].build(), {"@vision": 4, "_default": 4})
    # mapped to None (leave it float): noted like skip
    mq.quantize_(ZOO_BY_NAME["llama"].build(), {"@vision": None, "_default": 4})


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


# ---------------------------------------------------------------------------------------------- extra zoo (zoo_vlm)
def _extra_recipe(entry):
    """One recipe for every VLM layout (language 4-bit g32, the rest 8-bit per channel, vision and head float) and
    one for every vision encoder (4-bit per channel, head and projector float: a model without them is noted)."""
    if entry.is_vlm:
        return {"@language": mq.QuantConfig(4, group_size=32), "_default": mq.QuantConfig(8, scope="channel")}, [
            "@vision", "@head"]
    return mq.QuantConfig(4, scope="channel"), ["@head", "@projector"]


def _under_any(name, prefixes):
    return any(name == p or name.startswith(p + ".") for p in prefixes)


@extra_zoo_params
def test_extra_zoo_role_recipe_save_and_load(entry, tmp_path):
    """Roles drive the recipe; the quantized output equals the float model with numpy-dequantized weights; the
    vision tower and head stay bit-identical; mq.save / mq.load gives back the same tensors and output."""
    model = entry.build()
    inputs = entry.inputs(model)
    roles = model_roles(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    spec, skip = _extra_recipe(entry)
    q = copy.deepcopy(model)
    mq.quantize_(q, spec, skip=skip)  # roles the model lacks in skip are noted (tested below), not refused
    qmods = quantized_modules(q)
    assert qmods
    kept = roles.get("head", []) + (roles.get("vision", []) if isinstance(spec, dict) else [])
    assert not any(_under_any(n, kept) for n in qmods), "a skipped role was quantized"
    target = roles.get("language", []) if isinstance(spec, dict) else roles.get("vision", [])
    assert any(_under_any(n, target) for n in qmods)
    if isinstance(spec, dict):
        free = unassigned_modules(model)  # Phi-4's audio encoder: no role, so "_default" covers it
        for n in qmods:
            bits = 4 if _under_any(n, roles["language"]) else 8
            assert q.get_submodule(n).config.bits == bits, n
            assert _under_any(n, roles["language"] + roles.get("projector", [])) or n in free, n
    after = q.state_dict()
    for k, v in before.items():
        if _under_any(k, kept):
            assert torch.equal(after[k], v), k
    with torch.no_grad():
        out_q = entry.output(q, inputs)
        out_ref = entry.output(_reference_model(model, q), inputs)
    assert _close(out_q, out_ref), float((out_q - out_ref).abs().max())

    mq.save(q, tmp_path / "q")
    # LLaVA-Med's own class is not part of transformers: mq.load takes a float instance of it to load into
    back = mq.load(tmp_path / "q", model=entry.build() if entry.name == "llava_med" else None)
    assert type(back) is type(q)
    assert set(quantized_modules(back)) == set(qmods)
    sa, sb = q.state_dict(), back.state_dict()
    assert set(sa) == set(sb) and all(sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]) for k in sa)
    with torch.no_grad():
        assert torch.equal(entry.output(back, inputs), out_q)


def test_bf16_vlm_keeps_vision_and_embedding_dtype_through_save_and_load(tmp_path):
    """Issue 22 item 5: a bfloat16 VLM quantized on @language comes back with bfloat16 vision, projector and
    embedding weights and the same logits."""
    from transformers import AutoModelForImageTextToText

    entry = ZOO_BY_NAME["llava"]
    entry.build().save_pretrained(tmp_path / "float")
    # loaded the way users load checkpoints (dtype=...): non-persistent buffers (rotary inv_freq) keep float32
    model = AutoModelForImageTextToText.from_pretrained(tmp_path / "float", dtype=torch.bfloat16)
    inputs = entry.inputs(model)
    inputs["pixel_values"] = inputs["pixel_values"].to(torch.bfloat16)
    mq.quantize_(model, {"@language": mq.QuantConfig(4)}, skip=["@head"])
    expected = entry.output(model, inputs)
    mq.save(model, tmp_path / "q")
    back = mq.load(tmp_path / "q")
    floats = {n: p.dtype for n, p in back.named_parameters()}
    assert floats and set(floats.values()) == {torch.bfloat16}
    assert back.get_input_embeddings().weight.dtype == torch.bfloat16
    assert all(m.weight_dtype == torch.bfloat16 for m in quantized_modules(back).values())
    for n, b in model.named_buffers():
        assert dict(back.named_buffers())[n].dtype == b.dtype, n
    assert torch.equal(entry.output(back, inputs), expected)


@pytest.mark.parametrize("name", ["vit", "llava"])
def test_a_quantized_model_cast_to_bfloat16_runs_in_bfloat16(name):
    """Transformers' vision embeddings cast the pixels to ``patch_embedding.weight.dtype``: a quantized layer's
    weight dtype follows ``.to(dtype)`` (it stayed float32, and the bfloat16 model failed with mixed dtypes)."""
    entry = ZOO_BY_NAME[name]
    model = mq.quantize_(entry.build(), mq.QuantConfig(8, scope="channel"))
    inputs = entry.inputs(model)
    with torch.no_grad():
        ref = entry.output(model, inputs)
        model.to(torch.bfloat16)
        out = entry.output(model, inputs)
    layers = quantized_modules(model)
    assert any(isinstance(m, mq.QuantConv2d) for m in layers.values())
    assert {m.weight.dtype for m in layers.values()} == {torch.bfloat16}
    assert out.dtype == torch.bfloat16
    assert float((out.float() - ref).norm() / ref.norm()) < 3e-2  # bfloat16 activations and float parts
