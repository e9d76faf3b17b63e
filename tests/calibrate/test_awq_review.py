"""Review tests of AWQ against independent references: float invariance of the fold for the norm
parametrizations of real models, and a float64 plain-torch AWQ search of one block."""
from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from medquant import QuantConfig
from medquant.calibrate.awq import awq_groups, awq_quantize_sequential, search_and_fold
from medquant.testing.zoo import ZOO_BY_NAME, text_kwargs

CFG4 = QuantConfig(4, group_size=32, symmetric=True, scale_dtype="float32")


def _randomize_norms(model, scale=0.5, seed=0):
    """Random per-channel norm weights (plus a few outlier channels) so the fold's parametrization matters."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("layernorm.weight"):
                p.add_(torch.randn(p.shape, generator=gen) * scale)
                p[[3, 40, 77]] += 4.0
    return model


def _ids(seed=1, shape=(2, 12)):
    return torch.randint(4, 200, shape, generator=torch.Generator().manual_seed(seed))


def _assert_fold_keeps_outputs(model, ids):
    with torch.no_grad():
        ref = model(input_ids=ids).logits.double()
    groups = search_and_fold(model, CFG4, [{"input_ids": ids}], progress=False)
    with torch.no_grad():
        out = model(input_ids=ids).logits.double()
    rel = float((out - ref).norm() / ref.norm())
    assert rel < 1e-5, rel
    return groups


def _llama_with_norm(make_norm):
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(**text_kwargs())).eval()
    h = model.config.hidden_size
    for layer in model.model.layers:
        layer.input_layernorm = make_norm(h)
        layer.post_attention_layernorm = make_norm(h)
    return model


def _tiny_hf(arch, model_arch=None, **kw):
    import transformers

    cfg = {"vocab_size": 256, "hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4,
               "num_key_value_heads": 4, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}
    cfg.update(kw)
    model = getattr(transformers, f"{model_arch or arch}ForCausalLM")(getattr(transformers, f"{arch}Config")(**cfg))
    return _randomize_norms(model.eval(), scale=0.3)


# arch, config overrides, the norms a group may fold into (others are refused: folding would change the model)
HF_CASES = {
    # x_hat * (1 + w) RMSNorms whose class name does not start with Gemma
    "qwen3_5": ("Qwen3_5Text", {"model_arch": "Qwen3_5", "layer_types": ["full_attention"] * 2, "head_dim": 32},
                {"input_layernorm", "post_attention_layernorm"}),
    "qwen3_next": ("Qwen3Next", {"layer_types": ["full_attention"] * 2, "head_dim": 32, "num_experts": 0,
                                     "mlp_only_layers": [0, 1]}, {"input_layernorm", "post_attention_layernorm"}),
    # LayerNorm1P: an nn.LayerNorm subclass computing layer_norm(x, 1 + w, b)
    "nemotron": ("Nemotron", {}, {"input_layernorm"}),
    # post_attention_layernorm normalizes the attention output: it does not feed the MLP
    "olmo2": ("Olmo2", {}, set()),
    "exaone4": ("Exaone4", {}, set()),
    # parallel attention and MLP read the same input_layernorm
    "stablelm_parallel": ("StableLm", {"use_parallel_residual": True}, set()),
    # as many kv heads as heads, but v_proj's output goes through a per-head RMSNorm (v_norm) before o_proj: no
    # v -> o fold (a scale on v's rows would be normalized away)
    "gemma4_mha": ("Gemma4Text", {"model_arch": "Gemma4", "head_dim": 32, "sliding_window": 8,
                                  "layer_types": ["sliding_attention", "full_attention"],
                                  "hidden_size_per_layer_input": 0}, {"input_layernorm", "pre_feedforward_layernorm"}),
}


@pytest.mark.parametrize("case", list(HF_CASES))
def test_fold_keeps_float_outputs_of_hf_decoders(case):
    arch, kw, foldable = HF_CASES[case]
    model = _tiny_hf(arch, **kw)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        groups = _assert_fold_keeps_outputs(model, _ids())
    norms = {g.prev.rsplit(".", 1)[-1] for g in groups if not g.prev.endswith("proj")}
    assert norms == foldable
    assert any(g.alpha for g in groups)  # something was really folded
    refused = any("scales not folded" in str(w.message) for w in caught)  # refused norm groups are reported
    assert refused == (not foldable)


def test_sequential_does_not_fold_into_a_post_attention_norm():
    """The block-by-block path refuses the same groups: OLMo-2's post_attention_layernorm keeps its weights."""
    model = _tiny_hf("Olmo2")
    before = {n: p.detach().clone() for n, p in model.named_parameters() if n.endswith("post_attention_layernorm.weight")}
    with pytest.warns(UserWarning, match="post_attention_layernorm"):
        groups = awq_quantize_sequential(model, CFG4, [{"input_ids": _ids()}], device="cpu", progress=False)
    assert groups and {g.prev.rsplit(".", 1)[-1] for g in groups} == {"up_proj"}
    for n, w in before.items():
        assert torch.equal(model.get_parameter(n), w), n


def test_fold_into_plain_weight_rmsnorm_named_gemma():
    """Gemma3n's RMSNorm computes x_hat * w (no ``1 +``), though its class name starts with Gemma."""
    from transformers.models.gemma3n.modeling_gemma3n import Gemma3nRMSNorm

    model = _randomize_norms(_llama_with_norm(Gemma3nRMSNorm))
    groups = _assert_fold_keeps_outputs(model, _ids())
    assert any(g.prev.endswith("input_layernorm") and g.alpha for g in groups)


class ExpRMSNorm(nn.Module):
    """An RMSNorm with a log-parametrized gain, x_hat * exp(w): neither w / s nor (1 + w) / s - 1 folds into it."""

    def __init__(self, h):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(h))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * self.weight.exp()


def test_norm_of_unknown_parametrization_is_not_folded():
    model = _randomize_norms(_llama_with_norm(ExpRMSNorm), scale=0.3)
    ids = _ids()
    with torch.no_grad():
        ref = model(input_ids=ids).logits
    # not foldable: no group reads from these norms (and, as for post-norm blocks, the block forms no group)
    with pytest.warns(UserWarning, match="input_layernorm .a ExpRMSNorm"):  # the fallback is reported
        assert awq_groups(model) == []
    with pytest.raises(ValueError, match="no foldable"):
        search_and_fold(model, CFG4, [{"input_ids": ids}], progress=False)
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, ref)  # refused before anything changed


# ---------------------------------------------------------------------------------------------- float64 reference
def _rtn_sym(w: torch.Tensor, bits: int, group: int) -> torch.Tensor:
    """Plain-torch symmetric per-group round-to-nearest: s = absmax / q_max, w^ = clamp(round(w/s)) * s."""
    qmax = 2 ** (bits - 1) - 1
    g = w.reshape(w.shape[0], -1, group)
    s = g.abs().amax(-1, keepdim=True).clamp_min(1e-12) / qmax
    return (torch.clamp(torch.round(g / s), -qmax, qmax) * s).reshape(w.shape)


def test_search_matches_a_float64_reference_on_one_block():
    e = ZOO_BY_NAME["llama"]
    model = _randomize_norms(e.build().eval())
    ids = _ids(seed=3, shape=(3, 16))
    blk = model.model.layers[0]
    xs = {}
    h = blk.self_attn.q_proj.register_forward_pre_hook(lambda m, a: xs.setdefault("x", a[0].detach()))
    with torch.no_grad():
        model(input_ids=ids)
    h.remove()
    x = xs["x"].reshape(-1, xs["x"].shape[-1]).double()
    ws = [getattr(blk.self_attn, n).weight.detach().double().clone() for n in ("q_proj", "k_proj", "v_proj")]
    norm_w = blk.input_layernorm.weight.detach().double().clone()
    o_w = blk.self_attn.o_proj.weight.detach().double().clone()

    a = x.abs().mean(0)
    errs, scales = [], []
    for i in range(11):
        s = a.pow(i / 10)
        s = s / (s.max() * s.min()).sqrt()
        errs.append(sum(float((x @ (w - _rtn_sym(w * s, 4, 32) / s).T).pow(2).sum()) for w in ws))
        scales.append(s)
    best = min(range(11), key=errs.__getitem__)
    assert best > 0 and errs[best] < 0.95 * errs[0]  # the reference really prefers a scaled alpha

    groups = search_and_fold(model, CFG4, [{"input_ids": ids}], max_rows=None, progress=False)
    g = next(g for g in groups if g.prev == "model.layers.0.input_layernorm")
    assert g.alpha == pytest.approx(best / 10)
    assert g.err_rtn == pytest.approx(errs[0], rel=1e-4)
    assert g.err_awq == pytest.approx(errs[best], rel=1e-4)
    assert g.err_awq <= g.err_rtn
    s = scales[best]
    torch.testing.assert_close(blk.input_layernorm.weight.double(), norm_w / s, rtol=1e-5, atol=1e-7)
    for n, w in zip(("q_proj", "k_proj"), ws):
        torch.testing.assert_close(getattr(blk.self_attn, n).weight.double(), w * s, rtol=1e-5, atol=1e-7)
    # v is also the op folded by the v -> o group: its rows are divided by that group's scales c, o's columns
    # multiplied by them
    v_ref = ws[2] * s
    c = (v_ref.abs().sum(1) / blk.self_attn.v_proj.weight.double().abs().sum(1))
    torch.testing.assert_close(blk.self_attn.v_proj.weight.double(), v_ref / c[:, None], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(blk.self_attn.o_proj.weight.double(), o_w * c[None, :], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("share", ["norm_across_blocks", "norm_within_block", "v_proj_across_blocks"])
def test_shared_modules_are_not_folded_twice(share):
    """A module used in two places (cross-layer sharing, a norm reused inside a block) gets one fold per group
    reading it: every fold but one changes the other user. Such groups are refused."""
    from transformers import LlamaConfig, LlamaForCausalLM

    model = _randomize_norms(LlamaForCausalLM(LlamaConfig(**text_kwargs())).eval())
    l0, l1 = model.model.layers
    if share == "norm_across_blocks":
        l1.input_layernorm = l0.input_layernorm
    elif share == "norm_within_block":
        l0.post_attention_layernorm = l0.input_layernorm
    else:
        l1.self_attn.v_proj = l0.self_attn.v_proj
    with pytest.warns(UserWarning, match="shared"):
        groups = _assert_fold_keeps_outputs(model, _ids())
    assert any(g.alpha for g in groups)


def test_block_search_refuses_an_unfoldable_prev_before_changing_the_block():
    """A group whose ``prev`` cannot absorb scales (here a GELU) is refused before any group is folded: the
    block is not left half changed."""
    from medquant.calibrate import BlockInputs
    from medquant.calibrate.awq import ScaleGroup, search_and_fold_block

    torch.manual_seed(0)
    block = nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 16), nn.GELU(), nn.Linear(16, 8))
    before = {k: v.clone() for k, v in block.state_dict().items()}
    x = torch.randn(6, 16) * torch.linspace(0.1, 5, 16)
    ins = BlockInputs("blk", [(x,)], [{}])
    with pytest.raises(ValueError, match="2: cannot fold scales into a GELU"):
        search_and_fold_block(block, CFG4, ins, [ScaleGroup("0", ["1"]), ScaleGroup("2", ["3"])])
    now = block.state_dict()
    assert all(torch.equal(now[k], before[k]) for k in before)
