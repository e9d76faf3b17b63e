"""MoE experts stored as 3-D parameters (transformers 5) are quantized per expert, and round-trip.

References: the transformers model itself with its expert weights replaced by the dequantized ones (its own
experts class and forward, so routing, gating, transposition and biases are transformers' code, not ours),
QuantLinear.from_float of each expert's slice, and transformers' from_pretrained.
"""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

import medquant as mq
from medquant import QuantConfig
from medquant.hf import save_pretrained
from medquant.kernels import force_backend
from medquant.quant import QuantLinear
from medquant.quant.api import quantizable_modules, quantize_
from medquant.quant.experts import (
    QuantExperts,
    experts_layout,
    is_experts_module,
    moe_routers,
    unsupported_experts,
)
from medquant.testing.zoo_moe import MOE_BUILDERS, build_moe, moe_inputs

CFG = QuantConfig(bits=4, group_size=32)
MODELS = list(MOE_BUILDERS)


@pytest.fixture(scope="module")
def quantized():
    """name -> (float model, quantized model), built once."""
    out = {}
    for name in MODELS:
        m = build_moe(name)
        q = copy.deepcopy(m)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            quantize_(q, CFG)
        out[name] = (m, q)
    return out


def _experts(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if experts_layout(m) is not None or isinstance(m, QuantExperts)}


def _dequantized_reference(float_model: nn.Module, q: nn.Module) -> nn.Module:
    """The float model (transformers' own experts classes) holding the weights the quantized model computes
    with: each 3-D expert parameter rebuilt by stacking QuantLinear.dequantized_weight() of every expert, by hand
    here (transposed back for transposed layouts), and every quantized Linear dequantized."""
    ref = copy.deepcopy(float_model)
    qmods = dict(q.named_modules())
    with torch.no_grad():
        for name, fm in _experts(ref).items():
            qe = qmods[name]
            assert isinstance(qe, QuantExperts)
            lay = experts_layout(fm)
            for pname, child in (("gate_up_proj" if lay["gate"] else "up_proj", qe.up_name), ("down_proj", "down")):
                ws = [lin.dequantized_weight() for lin in getattr(qe, child)]
                stacked = torch.stack([w.t() for w in ws] if lay["transposed"] else ws)
                assert stacked.shape == getattr(fm, pname).shape
                getattr(fm, pname).copy_(stacked)
        for name, m in qmods.items():
            if isinstance(m, QuantLinear) and not any(name.startswith(e + ".") for e in _experts(ref)):
                ref.get_submodule(name).weight.copy_(m.dequantized_weight())
    return ref


@pytest.mark.parametrize("name", MODELS)
def test_logits_match_dequantized_transformers_model(quantized, name):
    float_model, q = quantized[name]
    assert sum(isinstance(m, QuantExperts) for m in q.modules()) == float_model.config.num_hidden_layers
    ref = _dequantized_reference(float_model, q)
    x = moe_inputs()
    with torch.no_grad(), force_backend("torch"):
        got = q(**x).logits
        want = ref(**x).logits
        plain = float_model(**x).logits
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    assert (got - plain).abs().max() > 1e-3  # 4-bit experts do change the logits (the check above can fail)


@pytest.mark.parametrize("name", MODELS)
def test_each_expert_is_its_slice_quantized(quantized, name):
    float_model, q = quantized[name]
    fname, fm = next(iter(_experts(float_model).items()))
    qe = q.get_submodule(fname)
    lay = experts_layout(fm)
    e = lay["num_experts"] - 1
    w = fm.down_proj.detach()[e]
    w = w.t() if lay["transposed"] else w
    lin = nn.Linear(w.shape[1], w.shape[0], bias=False)
    lin.weight.data.copy_(w)
    expected = QuantLinear.from_float(lin, CFG)
    assert torch.equal(qe.down[e].qweight_4, expected.qweight_4)
    assert torch.equal(qe.down[e].scales_4, expected.scales_4)


@pytest.mark.parametrize("name", MODELS)
def test_no_expert_weight_left_in_float(quantized, name):
    """The 92%-float problem: after quantize_ only norms, routers, embeddings and the head are float."""
    float_model, q = quantized[name]
    routers = set(moe_routers(q))
    assert routers  # every model here has routers, kept in float by default
    total = sum(p.numel() for p in float_model.parameters())
    float_left = {n: p for n, p in q.named_parameters()
                  if p.dim() >= 2 and "embed" not in n and "lm_head" not in n
                  and not any(n.startswith(r + ".") for r in routers)}
    assert not float_left, sorted(float_left)[:5]
    experts_params = sum(p.numel() for m in _experts(float_model).values() for p in m.parameters())
    assert experts_params > 0.3 * total
    assert not unsupported_experts(float_model)


def test_routers_stay_float_and_are_reported():
    m = build_moe("qwen2_moe")
    with pytest.warns(UserWarning, match=r"4 MoE router\(s\) stay in floating point"):
        quantize_(m, CFG)
    for name in ("model.layers.0.mlp.gate", "model.layers.0.mlp.shared_expert_gate"):
        assert type(m.get_submodule(name)).__name__ != "QuantLinear"
    m = build_moe("qwen2_moe")  # a plain-Linear router named exactly is quantized
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantize_(m, {"model.layers.0.mlp.shared_expert_gate": CFG, "_default": CFG})
    assert isinstance(m.get_submodule("model.layers.0.mlp.shared_expert_gate"), QuantLinear)
    assert not isinstance(m.get_submodule("model.layers.1.mlp.shared_expert_gate"), QuantLinear)


def test_patterns_select_experts_and_requantize():
    m = build_moe("mixtral")
    assert "model.layers.0.mlp.experts" in quantizable_modules(m)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantize_(m, {"model.layers.0.mlp.experts": CFG})
    assert isinstance(m.model.layers[0].mlp.experts, QuantExperts)
    assert not isinstance(m.model.layers[1].mlp.experts, QuantExperts)
    with pytest.raises(ValueError, match="already quantized"):
        quantize_(m, {"model.layers.0.mlp.experts": CFG})
    with pytest.warns(UserWarning, match="requantizing"):
        quantize_(m, {"model.layers.0.mlp.experts": QuantConfig(bits=8)}, requantize=True)
    assert m.model.layers[0].mlp.experts.gate_up[0].config.bits == 8


def test_channel_bits_refused_for_experts():
    m = build_moe("mixtral")
    with pytest.raises(ValueError, match="channel_bits"):
        quantize_(m, {"model.layers.0.mlp.experts": QuantConfig(bits=4, channel_bits=[4] * 8)})


def test_to_float_gives_back_the_original_class(quantized):
    float_model, q = quantized["gpt_oss"]
    name, fm = next(iter(_experts(float_model).items()))
    back = q.get_submodule(name).to_float()
    assert type(back) is type(fm)
    assert back.gate_up_proj.shape == fm.gate_up_proj.shape and back.down_proj_bias.shape == fm.down_proj_bias.shape
    torch.testing.assert_close(back.gate_up_proj_bias, fm.gate_up_proj_bias)  # biases stay float


@pytest.mark.parametrize("name", ["mixtral", "llama4_text", "gpt_oss"])
def test_save_load_and_transformers_round_trip_bit_exact(quantized, name, tmp_path):
    from transformers import AutoModelForCausalLM

    _, q = quantized[name]
    x = moe_inputs()
    with torch.no_grad():
        want = q(**x).logits
    state = q.state_dict()
    mq.save(q, tmp_path / "mq")
    loaded = mq.load(tmp_path / "mq")
    save_pretrained(q, tmp_path / "hf")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    for back in (loaded, hf):
        assert sum(isinstance(m, QuantExperts) for m in back.modules()) == q.config.num_hidden_layers
        got = back.state_dict()
        assert sorted(got) == sorted(state)
        assert all(torch.equal(got[k], state[k]) for k in state)
        with torch.no_grad():
            assert torch.equal(back(**x).logits, want)


def test_quantize_on_load_matches_quantize_(quantized, tmp_path):
    from transformers import AutoModelForCausalLM

    from medquant.hf import MedQuantConfig

    float_model, q = quantized["mixtral"]
    float_model.save_pretrained(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=MedQuantConfig(CFG))
    assert sum(isinstance(m, QuantExperts) for m in loaded.modules()) == 2
    want, got = q.state_dict(), loaded.state_dict()
    assert sorted(got) == sorted(want) and all(torch.equal(got[k], want[k]) for k in want)


class _OddExperts(nn.Module):
    """Experts in a layout QuantExperts does not know (one fused tensor)."""

    def __init__(self) -> None:
        super().__init__()
        self.num_experts = 2
        self.weights = nn.Parameter(torch.randn(2, 8, 8))

    def forward(self, x):
        return x @ self.weights.sum(0)


def test_unknown_expert_layout_is_reported():
    model = nn.Sequential(nn.Linear(8, 8), _OddExperts())
    assert unsupported_experts(model) == ["1"]
    with pytest.warns(UserWarning, match="layout medquant does not quantize.*: 1"):
        quantize_(model, CFG)
    assert isinstance(model[0], QuantLinear) and isinstance(model[1], _OddExperts)


def test_calibration_plans_leave_experts_out_with_a_warning():
    from medquant.quant.api import resolve_configs

    m = build_moe("qwen3_moe")
    with pytest.warns(UserWarning, match="2 MoE experts module.*not quantized by this calibration path"):
        plan = resolve_configs(m, CFG)
    assert plan and not any(n.endswith(".experts") for n in plan)
    assert "model.layers.0.self_attn.q_proj" in plan
    # experts=True: quantize_'s plan (what GPTQ, block-by-block and sharded quantization use): the experts in,
    # the routers out, the same modules quantize_ quantizes
    with pytest.warns(UserWarning, match="2 MoE router"):
        moe_plan = resolve_configs(m, CFG, experts=True)
    assert "model.layers.0.mlp.experts" in moe_plan and "model.layers.0.mlp.gate" not in moe_plan
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantize_(m, CFG)
    done = {n for n, q in m.named_modules() if isinstance(q, (QuantLinear, QuantExperts))}
    assert set(moe_plan) == {n for n in done if ".experts." not in n}  # not the QuantExperts' own layers


@pytest.mark.parametrize("name", ["mixtral", "gpt_oss"])
def test_size_report_counts_float_experts_at_their_width(name):
    # only attention quantized: the float experts' 3-D weights count as E float matrices each, so the effective
    # bits are the parameter-weighted mean over every linear weight (hand sum), not the attention's 4 bits
    m = build_moe(name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantize_(m, CFG, skip=["re:.*experts.*", "@head"])
    float_w = [p for mod in m.modules() if experts_layout(mod) is not None
               for p in mod._parameters.values() if p is not None and p.dim() == 3]
    float_w += [mod.weight for mod in m.modules() if type(mod) is nn.Linear]
    quant = [mod for mod in m.modules() if isinstance(mod, QuantLinear)]
    assert float_w and quant
    n_float = sum(w.numel() for w in float_w)
    n_quant = sum(q.out_rows * q.k for q in quant)
    want = (32 * n_float + 4 * n_quant) / (n_float + n_quant)
    rep = mq.model_size(m)
    assert rep.linear_params == n_float + n_quant
    assert rep.effective_bits == pytest.approx(want, rel=1e-9) and rep.effective_bits > 16
    rows = {r["name"]: r for r in mq.quant.size.layer_table(m)}
    gu = next(r for n, r in rows.items() if n.endswith("experts.gate_up_proj"))
    lay = experts_layout(m.get_submodule(next(n for n in rows if n.endswith("experts.gate_up_proj")).rsplit(".", 1)[0]))
    assert gu["shape"] == [lay["num_experts"] * 2 * lay["inter"], lay["hidden"]] and gu["bits"] == "32"
    # quantizing the experts too: every expert matrix at 4 bits
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantize_(m, CFG, skip=["@head"], filter_fn=lambda mod, n: "experts" in n)
    head = [mod.weight for mod in m.modules() if type(mod) is nn.Linear]
    n_head = sum(w.numel() for w in head)
    assert mq.model_size(m).effective_bits == pytest.approx(
        (32 * n_head + 4 * (n_float - n_head + n_quant)) / (n_float + n_quant), rel=1e-9)


def _tiny_ergo() -> nn.Module:
    """Ergo: layer 1's ``ErgoExperts`` subclasses a ``use_experts_implementation`` class but has its own forward
    (a per-expert RMSNorm, ``post_expert_norm``, between each expert's down projection and its routing weight)."""
    from transformers import ErgoConfig, ErgoForCausalLM

    torch.manual_seed(0)
    cfg = ErgoConfig(vocab_size=256, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                     first_dense_intermediate_size=32, num_dense_blocks=1, moe_intermediate_size=32,
                     shared_intermediate_size=32, num_experts=4, num_experts_per_tok=2, max_position_embeddings=64,
                     sliding_window=8, global_attention_every_n_layers=2)
    m = ErgoForCausalLM(cfg).eval()
    with torch.no_grad():
        for n, p in m.named_parameters():
            if ".experts." in n:
                p.copy_(torch.rand(p.shape) + 0.5 if "post_expert_norm" in n else torch.randn(p.shape) * 0.02)
    return m


def test_experts_subclass_with_its_own_forward_stays_float():
    # QuantExperts reproduces the forward use_experts_implementation dispatches to; ErgoExperts.forward adds a
    # per-expert norm: quantized, that norm (and its weights) would be dropped and the logits changed
    m = _tiny_ergo()
    experts = m.model.layers[1].mlp.experts
    assert type(experts).__name__ == "ErgoExperts"
    assert experts_layout(experts) is not None  # its weights are in a known layout (size accounting, pruning)
    assert not is_experts_module(experts)
    with pytest.raises(TypeError, match="ErgoExperts is not an experts module.*overrides the forward"):
        QuantExperts.from_float(experts, CFG)
    assert unsupported_experts(m) == ["model.layers.1.mlp.experts"]
    with pytest.warns(UserWarning, match=r"layout medquant does not quantize.*model\.layers\.1\.mlp\.experts"):
        quantize_(m, CFG)
    assert isinstance(m.model.layers[1].mlp.shared_experts.up_proj, QuantLinear)  # the rest is quantized
    assert m.model.layers[1].mlp.experts is experts  # transformers' own module, norm and all
    assert "model.layers.1.mlp.experts.post_expert_norm.weight" in m.state_dict()


@pytest.mark.parametrize("name", ["mixtral", "llama4_text", "gpt_oss"])
def test_to_float_follows_a_dtype_cast_after_quantization(name):
    # quantized in float32, then cast: every expert layer dequantizes to bfloat16, so must the float experts
    m = build_moe(name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantize_(m, CFG)
    m.to(torch.bfloat16)
    qe = next(mod for mod in m.modules() if isinstance(mod, QuantExperts))
    back = qe.to_float()
    hand = torch.stack([lin.dequantized_weight(torch.bfloat16) for lin in qe.down])
    hand = hand.transpose(1, 2) if qe.layout["transposed"] else hand
    assert back.down_proj.dtype == torch.bfloat16 and torch.equal(back.down_proj, hand)
    if qe.layout["bias"]:
        assert back.down_proj_bias.dtype == torch.bfloat16
    x = moe_inputs()
    with torch.no_grad(), force_backend("torch"):
        want = m(**x).logits
        mq.dequantize_(m)
        assert {p.dtype for p in m.parameters()} == {torch.bfloat16}
        got = m(**x).logits  # transformers' own experts classes, with the bfloat16 dequantized weights
    torch.testing.assert_close(got, want, rtol=0, atol=4e-3)  # one bfloat16 ulp at the logits' size (~0.6)


def test_router_computing_with_a_child_linear_stays_float():
    m = build_moe("gemma4")
    float_proj = m.model.layers[0].router.proj.weight.detach().clone()
    assert set(moe_routers(m)) == {"model.layers.0.router.proj", "model.layers.1.router.proj"}
    with pytest.warns(UserWarning, match=r"2 MoE router\(s\) stay in floating point"):
        quantize_(m, CFG)
    assert isinstance(m.model.layers[0].experts, QuantExperts)
    proj = m.model.layers[0].router.proj
    assert type(proj) is nn.Linear and torch.equal(proj.weight, float_proj)  # the top-k choice is unchanged
    m = build_moe("gemma4")  # named exactly, it is quantized
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantize_(m, {"model.layers.0.router.proj": CFG, "_default": CFG})
    assert isinstance(m.model.layers[0].router.proj, QuantLinear)
    assert type(m.model.layers[1].router.proj) is nn.Linear


def test_constructor_refuses_children_that_do_not_fit_the_layout():
    fm = build_moe("mixtral").model.layers[0].mlp.experts  # E=4, H=64, I=32: gate_up (64 -> 64), down (32 -> 64)

    def lins(n_in, n_out, n=4):
        return [nn.Linear(n_in, n_out, bias=False) for _ in range(n)]

    ok = QuantExperts(fm, {"gate_up": lins(64, 64), "down": lins(32, 64)})
    assert isinstance(ok.gate_up[3], nn.Linear)
    with pytest.raises(ValueError, match=r"missing \['down'\]\); MixtralExperts expects exactly 'gate_up', 'down'"):
        QuantExperts(fm, {"gate_up": lins(64, 64)})
    with pytest.raises(ValueError, match=r"unexpected \['up'\], missing \['gate_up'\]"):
        QuantExperts(fm, {"up": lins(64, 32), "down": lins(32, 64)})
    with pytest.raises(ValueError, match=r"down\.2: 64 -> 64 .*expects 32 -> 64"):
        QuantExperts(fm, {"gate_up": lins(64, 64), "down": lins(32, 64, 2) + lins(64, 64, 1) + lins(32, 64, 1)})
    with pytest.raises(ValueError, match=r"down: 3 expert layers for 4 experts"):
        QuantExperts(fm, {"gate_up": lins(64, 64), "down": lins(32, 64, 3)})


def test_subnormal_fp16_scales_of_an_expert_are_warned_about():
    # expert 1's down matrix of layer 0 holds weights ~1e-9: 8-bit float16 scales (~8e-12 wanted) are below the
    # smallest float16 number, so that expert's weights come back as zeros; the warning names that expert layer
    m = build_moe("mixtral")
    down = m.model.layers[0].mlp.experts.down_proj
    with torch.no_grad():
        down[1].mul_(1e-9 / down[1].abs().max())
    tiny = down[1].detach().clone()
    m32 = copy.deepcopy(m)
    with pytest.warns(RuntimeWarning, match=r"model\.layers\.0\.mlp\.experts\.down\.1: .*scale_dtype='float32'") \
            as rec:
        quantize_(m, QuantConfig(8, scope="channel"))
    named = [str(w.message) for w in rec if issubclass(w.category, RuntimeWarning)]
    assert named and all(s.startswith("model.layers.0.mlp.experts.down.1: ") for s in named), named
    assert not m.model.layers[0].mlp.experts.down[1].dequantized_weight().any()  # the weights are lost indeed
    # float32 scales keep them (error within half a step, max|w| / 254 per row) and nothing is warned about
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        quantize_(m32, QuantConfig(8, scope="channel", scale_dtype="float32"))
    got = m32.model.layers[0].mlp.experts.down[1].dequantized_weight(torch.float32)
    half_step = tiny.abs().amax(dim=1, keepdim=True) / 254
    assert ((got - tiny).abs() <= half_step * 1.001).all()
