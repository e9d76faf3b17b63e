"""Review of MoE expert quantization on more transformers MoE families, against references computed by hand.

References: the independent numpy dequantizer (``np_reference.np_dequant_layer``, written from the SPEC, no
medquant code) for every quantized weight; a plain-torch expert MLP written here; transformers' own model code
with the dequantized weights put back in (its routing, gating, shared experts).
"""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

from medquant import QuantConfig
from medquant.quant import QuantLinear
from medquant.quant.api import dequantize_, quantize_
from medquant.quant.experts import QuantExperts, experts_layout, moe_routers, unsupported_experts
from medquant.testing.zoo_moe import build_moe

from .np_reference import np_dequant_layer

CFG = QuantConfig(bits=4, group_size=16)
H, I_, E = 64, 32, 4  # hidden, expert intermediate, experts


def _deq(layer: nn.Module) -> torch.Tensor:
    """The weight a QuantLinear computes with, from its packed buffers by the numpy reference."""
    return torch.from_numpy(np_dequant_layer(layer)).float()


def _quiet_quantize(model: nn.Module, cfg, **kw) -> list[str]:
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        quantize_(model, cfg, **kw)
    return [str(w.message) for w in rec]


# ------------------------------------------------------------------------ tiny transformers MoE models from configs
_SMALL = {"vocab_size": 256, "hidden_size": H, "intermediate_size": 48, "moe_intermediate_size": I_,
          "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
          "num_experts": E, "num_local_experts": E, "n_routed_experts": E, "num_experts_per_tok": 2, "moe_topk": 2,
          "n_group": 1, "topk_group": 1, "first_k_dense_replace": 0, "shared_expert_intermediate_size": 48,
          "n_shared_experts": 1, "moe_num_shared_experts": 1, "num_shared_experts": 1,
          "max_position_embeddings": 64, "moe_layer_start_index": 0, "decoder_sparse_step": 1,
          "mlp_only_layers": [], "tie_word_embeddings": False}
# model type -> the module name of its first MoE block (shared experts, if any, are Linear MLPs below it)
_FAMILIES = {"olmoe": "model.layers.0.mlp", "phimoe": "model.layers.0.mlp",
             "granitemoe": "model.layers.0.block_sparse_moe", "glm4_moe": "model.layers.0.mlp",
             "ernie4_5_moe": "model.layers.0.mlp", "hunyuan_v1_moe": "model.layers.0.mlp",
             "dots1": "model.layers.0.mlp", "deepseek_v3": "model.layers.0.mlp"}
_OVERRIDES = {"deepseek_v3": {"head_dim": 8, "qk_rope_head_dim": 8, "qk_nope_head_dim": 8, "v_head_dim": 16,
                              "kv_lora_rank": 16, "q_lora_rank": 16}}


def _tiny(model_type: str) -> nn.Module:
    transformers = pytest.importorskip("transformers")
    cfg = transformers.AutoConfig.for_model(model_type)
    for k, v in {**_SMALL, **_OVERRIDES.get(model_type, {})}.items():
        if hasattr(cfg, k):
            setattr(cfg, k, v)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # transformers leaves some expert / router weights at zero: draw them all
        for n, p in model.named_parameters():
            if ".experts." in f".{n}" or "router" in n or ".gate." in n or "moe_statics" in n:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
    return model


@pytest.mark.parametrize("model_type", list(_FAMILIES))
def test_more_moe_families_compute_with_their_dequantized_weights(model_type):
    float_model = _tiny(model_type)
    q = copy.deepcopy(float_model)
    messages = _quiet_quantize(q, CFG)
    routers = moe_routers(float_model)
    assert routers and any("router(s) stay in floating point" in m for m in messages)
    block = float_model.get_submodule(_FAMILIES[model_type])
    assert any(experts_layout(c) is not None for c in block.children())
    assert not unsupported_experts(float_model)
    # nothing with 3-D weights left in float, routers untouched, every other Linear quantized
    assert not [n for n, p in q.named_parameters() if p.dim() == 3]
    for name, r in routers.items():
        qr = q.get_submodule(name)
        assert type(qr) is type(r) and torch.equal(qr.weight, r.weight), name
    for name, m in float_model.named_modules():
        if type(m) is nn.Linear and name not in routers and name != "lm_head":
            assert isinstance(q.get_submodule(name), QuantLinear), name  # shared experts included
    # reference: transformers' model holding the weights the quantized one computes with (numpy-dequantized)
    ref = copy.deepcopy(float_model)
    qmods = dict(q.named_modules())
    with torch.no_grad():
        for name, fm in ref.named_modules():
            lay = experts_layout(fm)
            if lay is None:
                continue
            qe = qmods[name]
            assert isinstance(qe, QuantExperts)
            for pname, child in (("gate_up_proj" if lay["gate"] else "up_proj", qe.up_name), ("down_proj", "down")):
                ws = [_deq(lin) for lin in getattr(qe, child)]
                getattr(fm, pname).copy_(torch.stack([w.t() for w in ws] if lay["transposed"] else ws))
        for name, m in qmods.items():
            if isinstance(m, QuantLinear) and not isinstance(qmods[name.rsplit(".", 2)[0]], QuantExperts):
                ref.get_submodule(name).weight.copy_(_deq(m))
    ids = torch.randint(3, 200, (2, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got, want, plain = (m(input_ids=ids).logits for m in (q, ref, float_model))
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5)
    assert (got - plain).abs().max() > 1e-3  # 4-bit weights do change the logits: the check above can fail


@pytest.mark.parametrize("name", ["mixtral", "qwen3_moe"])
def test_quant_experts_is_the_plain_torch_expert_mlp(name):
    """forward(x, top_k_index, top_k_weights) = sum_j w[t, j] * W^d_e (silu(g) * u), [g; u] = W^gu_e x_t, with
    the numpy-dequantized W^; the sentinel index E (expert parallelism) contributes nothing."""
    fm = next(m for m in build_moe(name).modules() if experts_layout(m) is not None)
    qe = QuantExperts.from_float(fm, CFG)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(7, H, generator=gen)
    idx = torch.randint(0, E, (7, 2), generator=gen)
    idx[0, 1] = E  # a slot routed to another rank
    w = torch.rand(7, 2, generator=gen)
    gu = [_deq(lin) for lin in qe.gate_up]
    dn = [_deq(lin) for lin in qe.down]
    want = torch.zeros(7, H)
    for t in range(7):
        for j in range(2):
            e = int(idx[t, j])
            if e == E:
                continue
            g, u = (gu[e] @ x[t]).chunk(2)
            want[t] += w[t, j] * (dn[e] @ (torch.nn.functional.silu(g) * u))
    with torch.no_grad():
        got = qe(x, idx, w)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)


# ------------------------------------------------------------------------ experts held as a ModuleList of MLPs
class _MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w1 = nn.Linear(H, I_, bias=False)
        self.w2 = nn.Linear(I_, H, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(torch.nn.functional.silu(self.w1(x)))


class _ListMoE(nn.Module):
    """transformers 4's Mixtral / remote-code DeepSeek layout: a Linear router ``gate`` beside a ModuleList of
    expert MLPs, top-1 routing."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = nn.Linear(H, E, bias=False)
        self.experts = nn.ModuleList(_MLP() for _ in range(E))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        probs = self.gate(x).softmax(-1)
        w, e = probs.max(-1)
        return torch.stack([w[t] * self.experts[int(e[t])](x[t]) for t in range(x.shape[0])])


class _DictRouter(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.classifier = nn.Linear(H, E, bias=False)


class _ListModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(H, H)
        self.moe = _ListMoE()
        self.switch = nn.Module()  # SwitchTransformers / NLLB-MoE: router.classifier beside a ModuleDict
        self.switch.router = _DictRouter()
        self.switch.experts = nn.ModuleDict({f"expert_{i}": _MLP() for i in range(E)})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.moe(self.inp(x))


def test_routers_beside_a_module_list_of_experts_stay_float():
    torch.manual_seed(0)
    m = _ListModel()
    f = copy.deepcopy(m)
    assert set(moe_routers(m)) == {"moe.gate", "switch.router.classifier"}
    messages = _quiet_quantize(m, CFG)
    assert any("router(s) stay in floating point" in s and "moe.gate" in s for s in messages)
    assert type(m.moe.gate) is nn.Linear and torch.equal(m.moe.gate.weight, f.moe.gate.weight)
    assert type(m.switch.router.classifier) is nn.Linear
    assert all(isinstance(x.w1, QuantLinear) and isinstance(x.w2, QuantLinear) for x in m.moe.experts)
    assert all(isinstance(x.w1, QuantLinear) for x in m.switch.experts.values())
    # the expert choice is the float model's: the same router logits
    x = torch.randn(5, H)
    with torch.no_grad():
        torch.testing.assert_close(m.moe.gate(m.inp(x)), f.moe.gate(m.inp(x)))
    # an exact name opts a router in
    g = copy.deepcopy(f)
    _quiet_quantize(g, {"moe.gate": CFG, "_default": CFG})
    assert isinstance(g.moe.gate, QuantLinear) and type(g.switch.router.classifier) is nn.Linear


def test_a_module_list_that_is_not_experts_has_no_router():
    """A ModuleList of layers beside a Linear named ``gate`` is not an MoE block: the gate is quantized."""
    m = nn.Module()
    m.block = nn.Module()
    m.block.gate = nn.Linear(H, H)
    m.block.layers = nn.ModuleList(nn.Linear(H, H) for _ in range(3))
    assert moe_routers(m) == {}
    _quiet_quantize(m, CFG)
    assert isinstance(m.block.gate, QuantLinear)


# ------------------------------------------------------------------------ lazy modules and the experts detection
def test_experts_detection_looks_past_uninitialized_parameters():
    m = nn.Module()
    m.mlp = nn.Module()
    m.mlp.experts = next(x for x in build_moe("mixtral").modules() if experts_layout(x) is not None)
    m.mlp.gate = nn.LazyLinear(E)  # not yet materialized
    m.odd = nn.LazyLinear(8)
    m.odd.num_experts = 4
    assert unsupported_experts(m) == []
    assert moe_routers(m) == {}  # its shape is unknown: not claimed as a router
    _quiet_quantize(m, CFG, skip=["mlp.gate", "odd"])
    assert isinstance(m.mlp.experts, QuantExperts)


# ------------------------------------------------------------------------ dequantize_ gives the float flags back
def test_dequantized_experts_keep_requires_grad_and_mode():
    model = build_moe("qwen2_moe")
    model.model.layers[0].mlp.experts.requires_grad_(False)
    model.train()
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    assert flags["model.layers.1.mlp.experts.gate_up_proj"] and not flags["model.layers.0.mlp.experts.down_proj"]
    _quiet_quantize(model, CFG)
    dequantize_(model)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert all(mod.training for mod in model.modules())
