"""The traversal, the swap, the handler registry and ConfigMap's precedence of medquant.quant.api."""
from collections import OrderedDict
from dataclasses import dataclass

import pytest
import torch
from torch import nn

from medquant.quant import (
    ConfigMap,
    QuantConfig,
    QuantLinear,
    quantizable_modules,
    quantize_,
    quantize_module,
    register_quantize_module_handler,
    resolve_configs,
    swap_module,
)


def _model() -> nn.Module:
    torch.manual_seed(0)
    enc = nn.Sequential(OrderedDict(a=nn.Linear(32, 32), b=nn.Linear(32, 32)))
    return nn.Sequential(OrderedDict(enc=enc, act=nn.ReLU(), head=nn.Linear(32, 8)))


def _bits(plan: dict) -> dict:
    return {n: c.bits for n, c in plan.items()}


def test_precedence_exact_then_insertion_order_then_default():
    m = _model()
    # an exact name beats an earlier pattern
    assert _bits(resolve_configs(m, ConfigMap({"re:.*": 2, "enc.a": 8}))) == {"enc.a": 8, "enc.b": 2, "head": 2}
    # a container name, a regex and a role rank by insertion order alone
    assert _bits(resolve_configs(m, ConfigMap({r"re:enc\..*": 3, "enc": 5}))) == {"enc.a": 3, "enc.b": 3}
    assert _bits(resolve_configs(m, ConfigMap({"enc": 5, r"re:enc\..*": 3}))) == {"enc.a": 5, "enc.b": 5}
    # the default takes what nothing else matched; without it that stays float
    assert _bits(resolve_configs(m, ConfigMap({"enc": 4, "_default": 8}))) == {"enc.a": 4, "enc.b": 4, "head": 8}
    assert _bits(resolve_configs(m, {"enc": 4})) == {"enc.a": 4, "enc.b": 4}
    # None keeps float (also against the default); skip wins over everything; 16 bits means float
    assert _bits(resolve_configs(m, ConfigMap({"enc.a": None, "_default": 4}))) == {"enc.b": 4, "head": 4}
    assert _bits(resolve_configs(m, ConfigMap({"head": 8, "_default": 4}, skip=["head"]))) == {"enc.a": 4,
                                                                                             "enc.b": 4}
    assert _bits(resolve_configs(m, ConfigMap({"enc.b": 16, "_default": 4}))) == {"enc.a": 4, "head": 4}


def test_plain_dicts_single_configs_and_config_maps_resolve_alike():
    m = _model()
    d = {"re:.*b": QuantConfig(2), "_default": 4}
    assert resolve_configs(m, d, skip=["head"]) == resolve_configs(m, ConfigMap(d, skip=["head"]))
    assert resolve_configs(m, QuantConfig(3)) == resolve_configs(m, ConfigMap({"_default": QuantConfig(3)}))
    assert resolve_configs(m, None) == {}
    with pytest.raises(ValueError, match="matches no module"):
        resolve_configs(m, ConfigMap({"enc.c": 4}))
    with pytest.raises(ValueError, match="matches no module"):
        resolve_configs(m, ConfigMap({"_default": 4}, skip=["nope"]))
    with pytest.raises(ValueError, match="none of them is an nn.Linear"):
        resolve_configs(m, {"act": 4})
    with pytest.raises(TypeError, match="single string"):
        ConfigMap({}, skip="head")


def test_config_map_is_an_immutable_json_round_tripping_mapping():
    cm = ConfigMap({"@language": 4, "re:.*mlp.*": QuantConfig(2, scope="channel"), "x": None,
                    "_default": QuantConfig(8, channel_bits=(2, 4))}, skip=["@head"])
    assert cm["@language"] == QuantConfig(4) and cm.default == QuantConfig(8, channel_bits=(2, 4))
    assert list(cm) == ["@language", "re:.*mlp.*", "x", "_default"] and cm.skip == ("@head",)
    again = ConfigMap.from_json(cm.to_json())
    assert again == cm and hash(again) == hash(cm)
    assert ConfigMap({"a": 4}) == {"a": QuantConfig(4)}  # a Mapping: equal to the plain dict it holds
    assert cm != dict(cm)  # ... but not when it skips something
    assert ConfigMap(cm, skip=["x"]).skip == ("@head", "x")
    with pytest.raises(AttributeError, match="immutable"):
        cm.skip = ()
    with pytest.raises(TypeError, match="must be a QuantConfig"):
        ConfigMap({"a": "4"})
    with pytest.raises(ValueError, match="given twice"):
        ConfigMap([("a", 4), ("a", 2)])


def test_quantize_accepts_a_config_map_like_a_dict():
    a, b = _model(), _model()
    quantize_(a, {"enc.a": 2, "re:.*": QuantConfig(4, group_size=32)})
    quantize_(b, ConfigMap({"enc.a": 2, "_default": QuantConfig(4, group_size=32)}))
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_traversal_leaves_multihead_attention_and_foreign_subclasses():
    class Foreign(nn.Linear):  # computes differently: left alone (quantize_ reports it)
        def forward(self, x):
            return super().forward(x).relu()

    class Plain(nn.Linear):  # computes exactly as nn.Linear: quantized
        pass

    Foreign.__module__ = Plain.__module__ = "somelib.layers"
    m = nn.Sequential(OrderedDict(mha=nn.MultiheadAttention(16, 2), lin=nn.Linear(16, 16), foreign=Foreign(4, 4),
                                  plain=Plain(4, 4), conv=nn.Conv2d(3, 4, 3)))
    assert list(quantizable_modules(m)) == ["lin", "plain", "conv"]


def test_swap_module_replaces_one_name_and_returns_the_old_module():
    m = _model()
    shared = m.enc.a
    m.alias = shared  # the same module under a second name
    new = nn.Identity()
    assert swap_module(m, "enc.a", new) is shared
    assert m.enc.a is new and m.alias is shared
    assert swap_module(m, "enc.a", shared) is new
    with pytest.raises(AttributeError, match="no submodule"):
        swap_module(m, "enc.z", new)
    with pytest.raises(ValueError, match="root"):
        swap_module(m, "", new)


def test_swap_under_all_names_replaces_a_shared_module_once_and_can_be_undone():
    from medquant.quant.api import names_by_module, swap_under_all_names

    m = _model()
    shared, other = m.enc.a, nn.Linear(2, 2)
    m.alias = shared
    m.other = other
    table = names_by_module(m)  # taken before any swap, as the callers do
    new = nn.Identity()
    done = swap_under_all_names(m, "alias", new, table)
    assert m.enc.a is new and m.alias is new and m.other is other
    assert done == [("enc.a", shared), ("alias", shared)]
    for alias, old in reversed(done):
        swap_module(m, alias, old)
    assert m.enc.a is shared and m.alias is shared
    # a name of the table that holds another module by now is left alone; the name asked for is always swapped
    m.alias = nn.Linear(2, 2)
    moved = m.alias
    assert swap_under_all_names(m, "enc.a", new, table) == [("enc.a", shared)]
    assert m.enc.a is new and m.alias is moved
    stale = {id(other): ["alias"]}  # an id the table held for a module that is gone, now another module's
    assert swap_under_all_names(m, "other", new, stale) == [("other", other)] and m.alias is moved
    assert swap_under_all_names(m, "other", other) == [("enc.a", new), ("other", new)]  # read from the model now
    with pytest.raises(ValueError, match="root"):
        swap_under_all_names(m, "", new)
    with pytest.raises(AttributeError, match="no submodule|has no attribute"):
        swap_under_all_names(m, "enc.z", new)


def test_skip_by_the_second_name_of_a_shared_module_keeps_it_float_under_both_names():
    import copy

    def shared_model():
        m = _model()
        m.alias = m.enc.a  # one module under two names; named_modules() yields only "enc.a"
        m.outer = nn.Sequential(OrderedDict(inner=m.enc))  # a shared container: "outer.inner.a" names it too
        return m

    x = torch.randn(3, 32)
    for skip in (["alias"], ["re:ali.s"], ["outer.inner.a"], ["outer"]):
        m = shared_model()
        lin, ref = m.enc.a, copy.deepcopy(m.enc.a)
        quantize_(m, QuantConfig(4, group_size=32), skip=skip)
        assert m.enc.a is lin and m.alias is lin and m.outer.inner.a is lin, skip  # float, under every name
        torch.testing.assert_close(m.alias(x), ref(x), rtol=0, atol=0)
        assert isinstance(m.head, QuantLinear), skip  # the others are quantized
        assert isinstance(m.enc.b, QuantLinear) == (skip != ["outer"]), skip
    assert _bits(resolve_configs(shared_model(), 4, skip=["alias"])) == {"enc.b": 4, "head": 4}
    m = shared_model()
    quantize_(m, QuantConfig(4, group_size=32))  # without skip: one quantized module under both names
    assert isinstance(m.enc.a, QuantLinear) and m.alias is m.enc.a
    with pytest.raises(ValueError, match="'aliaz' matches no module"):  # a name of no module still raises
        quantize_(shared_model(), 4, skip=["aliaz"])


def test_config_patterns_name_a_shared_module_by_any_of_its_names():
    """A config pattern, like a skip pattern, may name a module bound under several names by any of them (weights
    shared across blocks: ``nn.ModuleList([block] * n)``); two names of one module given different configs are
    refused rather than one of them silently ignored."""
    def shared_model():
        m = _model()
        m.alias = m.enc.a  # one module under two names; named_modules() yields only "enc.a"
        m.outer = nn.Sequential(OrderedDict(inner=m.enc))  # a shared container: "outer.inner.a" names it too
        return m

    assert _bits(resolve_configs(shared_model(), {"alias": 8, "_default": 4})) == {"enc.a": 8, "enc.b": 4, "head": 4}
    assert _bits(resolve_configs(shared_model(), {"re:outer\\.inner\\.a": 2})) == {"enc.a": 2}
    assert _bits(resolve_configs(shared_model(), {"outer": 3, "_default": 5})) == {"enc.a": 3, "enc.b": 3, "head": 5}
    assert _bits(resolve_configs(shared_model(), {"enc.a": 6, "alias": 6})) == {"enc.a": 6}  # the same config
    m = shared_model()
    quantize_(m, {"alias": QuantConfig(8, group_size=32)})
    assert isinstance(m.alias, QuantLinear) and m.alias is m.enc.a and m.alias.config.bits == 8
    assert not isinstance(m.head, QuantLinear)
    with pytest.raises(ValueError, match="one module bound under several names"):
        resolve_configs(shared_model(), {"enc.a": 4, "alias": 8})


@dataclass(frozen=True)
class _HalfConfig:
    scale: float = 0.5


class _Scaled(nn.Module):
    def __init__(self, inner: nn.Linear, scale: float) -> None:
        super().__init__()
        self.inner, self.scale = inner, scale

    def forward(self, x):
        return self.inner(x) * self.scale


@register_quantize_module_handler(_HalfConfig, (nn.Linear,))
def _scaled_linear(module, config):
    if config.scale <= 0:
        raise ValueError("scale must be positive")
    return _Scaled(module, config.scale)


def test_handlers_are_dispatched_by_config_type():
    lin = nn.Linear(4, 4).eval()
    q = quantize_module(lin, _HalfConfig())
    assert isinstance(q, _Scaled) and not q.training  # same train/eval mode as the module it replaces
    x = torch.randn(2, 4)
    assert torch.equal(q(x), lin(x) * 0.5)
    assert isinstance(quantize_module(nn.Linear(64, 8), QuantConfig(4)), QuantLinear)
    with pytest.raises(TypeError, match="quantizes Linear modules, got Conv2d"):
        quantize_module(nn.Conv2d(3, 3, 1), _HalfConfig())
    with pytest.raises(ValueError, match="^layer.x: scale must be positive"):
        quantize_module(lin, _HalfConfig(-1.0), name="layer.x")
    with pytest.raises(TypeError, match="no quantization handler"):
        quantize_module(lin, object())
    assert list(quantizable_modules(_model(), _HalfConfig)) == ["enc.a", "enc.b", "head"]


def test_quantize_takes_any_config_type_with_a_registered_handler():
    """quantize_ dispatches by type(config): a registered config type is accepted alone or as a map value (it was
    refused with TypeError by the map's value check); modules its handler does not take stay float with a warning."""
    m = _model()
    a, b, head = m.enc.a, m.enc.b, m.head
    x = torch.randn(3, 32)
    with torch.no_grad():
        ref = 0.5 * head(torch.relu(0.5 * b(0.5 * a(x))))  # by hand: every Linear's output halved
    quantize_(m, _HalfConfig())
    assert all(isinstance(m.get_submodule(n), _Scaled) for n in ("enc.a", "enc.b", "head"))
    with torch.no_grad():
        assert torch.equal(m(x), ref)
    m = _model()
    quantize_(m, {"enc": _HalfConfig(0.25), "head": 4})
    assert isinstance(m.enc.a, _Scaled) and m.enc.a.scale == 0.25 and isinstance(m.head, QuantLinear)
    conv = nn.Sequential(OrderedDict(conv=nn.Conv2d(3, 4, 1), lin=nn.Linear(4, 4)))
    with pytest.warns(UserWarning, match=r"conv \(Conv2d, _HalfConfig\)"):
        quantize_(conv, _HalfConfig())
    assert isinstance(conv.conv, nn.Conv2d) and isinstance(conv.lin, _Scaled)
    with pytest.raises(ValueError, match="none of them is an nn.Linear or nn.Conv2d to quantize with _HalfConfig"):
        quantize_(nn.Sequential(OrderedDict(conv=nn.Conv2d(3, 4, 1))), {"conv": _HalfConfig()})
    # other types: still a TypeError, which lists the registered config types
    with pytest.raises(TypeError, match=r"must be a QuantConfig, .*registered handler \(.*_HalfConfig.*got object"):
        quantize_(_model(), {"enc": object()})
    with pytest.raises(TypeError, match="got type"):
        quantize_(_model(), _HalfConfig)  # the class, not an instance


def test_filter_fn_leaves_already_quantized_layers_alone():
    """filter_fn is applied before the already-quantized check: a layer it leaves out is neither refused as
    already quantized nor named in the requantize warning (which used to list layers it did not redo)."""
    import warnings

    model = _model()
    quantize_(model, {"enc.a": QuantConfig(4, group_size=32)})
    a_codes = model.enc.a.get_buffer("qweight_4").clone()
    quantize_(model, QuantConfig(4, group_size=32), filter_fn=lambda m, n: not isinstance(m, QuantLinear))
    assert all(isinstance(m, QuantLinear) for m in (model.enc.a, model.enc.b, model.head))
    assert torch.equal(model.enc.a.get_buffer("qweight_4"), a_codes)  # untouched
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quantize_(model, QuantConfig(3, group_size=32), requantize=True, filter_fn=lambda m, n: n == "head")
    redo = [str(w.message) for w in caught if "requantizing" in str(w.message)]
    assert redo == ["requantizing 1 already quantized layer(s) from their dequantized weights (head)"]
    assert model.head.bit_groups == [3] and model.enc.a.bit_groups == [4]


def test_subnormal_scale_warning_ignores_all_zero_groups():
    """An all-zero (pruned) group gets the smallest float16 scale, 2^-24, and is reconstructed exactly: it is no
    reason to warn about lost precision; groups of weights around 1e-6 at 8 bits still are."""
    import warnings

    def subnormal_warnings(weight: torch.Tensor, cfg: QuantConfig) -> list[str]:
        lin = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
        with torch.no_grad():
            lin.weight.copy_(weight)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            q = quantize_module(lin, cfg, name="lin")
        assert torch.equal(q.dequantized_weight()[weight == 0], torch.zeros(int((weight == 0).sum())))
        return [str(w.message) for w in caught if "subnormal" in str(w.message)]

    torch.manual_seed(0)
    w = torch.randn(8, 64)
    w[2] = 0  # a pruned row
    w[5, :32] = 0  # a pruned group
    for cfg in (QuantConfig(4, group_size=32), QuantConfig(2, scope="channel"),
                QuantConfig(4, channel_bits=(2, 3, 4, 8, 16, 4, 0, 4), group_size=32)):
        assert subnormal_warnings(w, cfg) == []
    tiny = torch.randn(8, 64) * 1e-6
    tiny[1] = 0
    # 8 rows x 2 groups, less the zero row's two groups: 14 scales under 2^-14 that do lose precision
    assert subnormal_warnings(tiny, QuantConfig(8, group_size=32)) == [
        ("lin: 14 float16 scale(s) are subnormal (< 6.1e-05), so the quantized weights lose precision; "
         "QuantConfig(scale_dtype='float32') or 'bfloat16' keeps them")]


def test_config_map_reads_numpy_bit_widths_and_refuses_a_map_that_is_not_one():
    import numpy as np

    assert ConfigMap({"enc": np.int64(3)}) == {"enc": QuantConfig(3)}
    with pytest.raises(TypeError, match="'map' maps patterns to configs, got list"):
        ConfigMap.from_dict({"map": [["enc", 4]]})


def test_a_bare_layer_is_refused_before_any_work_naming_what_to_do():
    """quantize_ swaps submodules: the model being itself the one layer failed only after quantizing it, with
    swap_module's "root module cannot be swapped"; now refused first, naming QuantLinear.from_float."""
    layer = nn.Linear(64, 8)
    before = layer.weight.detach().clone()
    with pytest.raises(ValueError, match=r"is itself the layer.*QuantLinear\.from_float"):
        quantize_(layer, QuantConfig(4))
    assert type(layer) is nn.Linear and torch.equal(layer.weight, before)
    q = QuantLinear.from_float(layer, QuantConfig(4))  # what the message names works
    x = torch.randn(3, 64)
    torch.testing.assert_close(q(x), x @ q.dequantized_weight(torch.float32).T + layer.bias)


def test_groups_of_non_zero_weights_lost_to_zero_are_named():
    """Weights around 1e-9 (a float32 model holds them) are below what a float16 scale resolves: every group came
    back as all zeros and, being all zeros, was not even counted as subnormal. Now the lost groups are counted
    (a group that was zero before is not), and float32 scales keep them."""
    import warnings

    w = torch.randn(4, 64, generator=torch.Generator().manual_seed(1)) * 1e-9
    w[3] = 0  # a pruned row: exact, not lost
    lin = nn.Linear(64, 4, bias=False)
    with torch.no_grad():
        lin.weight.copy_(w)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        q = quantize_module(lin, QuantConfig(4, group_size=32), name="lin")
    assert torch.equal(q.dequantized_weight(), torch.zeros(4, 64))  # what the warning is about
    lost = [str(c.message) for c in caught if "come back as all zeros" in str(c.message)]
    assert lost == [("lin: 6 scale group(s) of non-zero weights come back as all zeros (their weights are below "
                     "what a float16 scale can resolve): QuantConfig(scale_dtype='float32') or 'bfloat16' keeps them")]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        q = quantize_module(lin, QuantConfig(4, group_size=32, scale_dtype="float32"), name="lin")
    assert not [c for c in caught if "all zeros" in str(c.message)]
    assert bool((q.dequantized_weight()[:3] != 0).any(-1).all())


def test_requantizing_a_head_tied_to_a_quantized_embedding_is_refused():
    """requantize=True rebuilt lm_head on its own, silently untying it from the quantized embedding whose packed
    tensors it shared (two copies, different bits, while the config still says tied): refused, naming the pair and
    what works (skip the head, or dequantize_ first)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from medquant.quant import dequantize_
    from medquant.quant.embeddings import quantize_embeddings_
    from medquant.quant.modules import tied_heads

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    m = LlamaForCausalLM(cfg).eval()
    quantize_embeddings_(m, QuantConfig(8, scope="channel"))
    assert tied_heads(m) == {"lm_head": "model.embed_tokens"}
    with pytest.raises(ValueError, match=r"lm_head.*model\.embed_tokens.*skip.*dequantize_"):
        quantize_(m, QuantConfig(4, group_size=32), requantize=True)
    assert tied_heads(m) == {"lm_head": "model.embed_tokens"}  # unchanged
    quantize_(m, QuantConfig(4, group_size=32), skip=["lm_head"])  # the other layers: fine
    assert tied_heads(m) == {"lm_head": "model.embed_tokens"}
    dequantize_(m)
    quantize_(m, QuantConfig(4, group_size=32))  # from float: one quantized head again
    ids = torch.tensor([[1, 2, 3]])
    assert m(ids).logits.shape == (1, 3, 128)
