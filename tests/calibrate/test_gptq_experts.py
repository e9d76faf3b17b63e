"""GPTQ of MoE experts stored as 3-D parameters (transformers 5): each expert's matrices get their own Hessian from
the calibration tokens routed to that expert.

The reference is independent of medquant's unfolding: a forward pre-hook on the *float* experts module records
``hidden_states`` and ``top_k_index`` (Mixtral, GPT-OSS: transposed with biases) or the per-expert rows (Llama 4's
dense experts), and plain torch forms each expert's inputs ``X_e`` (the rows of the tokens routed to it; for the down
projection the class's own gate applied to ``W_gu_e x``), ``H_e = 2 X_e^T X_e / n_e``; then
:func:`gptq_quantize_weight` of ``W_e`` with ``H_e`` must give the layer's weights.
"""
from __future__ import annotations

import copy
import re
import warnings

import pytest
import torch
from torch import nn

import medquant
from medquant import QuantConfig, QuantLinear
from medquant.calibrate import (
    awq_quantize_,
    awq_quantize_sequential,
    gptq_quantize_,
    gptq_quantize_sequential,
)
from medquant.calibrate.gptq import gptq_quantize_weight
from medquant.quant.core import dequantize
from medquant.quant.experts import QuantExperts, is_experts_module
from medquant.testing.zoo_moe import build_moe, moe_inputs

CFG = QuantConfig(4, group_size=16)


def _experts(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if is_experts_module(m)}


def _reference_inputs(model: nn.Module, name: str, batch: dict, keep: torch.Tensor | None = None
                      ) -> dict[str, list[torch.Tensor]]:
    """Per expert, the inputs of its up (``gate_up``) and down projections in the float ``model``, from the
    experts module ``name``'s call: plain torch on the recorded routing. ``keep``: per-token mask (flattened)."""
    mod = model.get_submodule(name)
    seen: dict = {}

    def pre(m, args, kwargs):
        seen["args"] = [a.detach().clone() if isinstance(a, torch.Tensor) else a for a in args]
        seen["kwargs"] = dict(kwargs)

    h = mod.register_forward_pre_hook(pre, with_kwargs=True)
    with torch.no_grad():
        model(**batch)
    h.remove()
    args = seen["args"] + [seen["kwargs"][k] for k in ("top_k_index", "top_k_weights") if k in seen["kwargs"]]
    x = args[0]
    weights = QuantExperts.expert_weights(mod)
    up_key = "gate_up_proj" if "gate_up_proj" in weights else "up_proj"
    ups: list[torch.Tensor] = []
    downs: list[torch.Tensor] = []
    n_exp = len(weights["down_proj"])
    for e in range(n_exp):
        if len(args) == 1:  # dense style: rows e*T .. e*T+T-1 are expert e's, 0 where the router did not pick e
            xe = x.view(n_exp, -1, x.shape[-1])[e]
            rows = torch.where((xe != 0).any(-1))[0]
            xe = xe[rows]
        else:
            rows = torch.where(args[1] == e)[0]
            xe = x[rows]
        if keep is not None:
            xe = xe[keep[rows]]
        w, b = weights[up_key][e]
        hid = xe @ w.T + (b if b is not None else 0)
        act = type(mod)._apply_gate(mod, hid) if hasattr(type(mod), "_apply_gate") else \
            (mod.act_fn(hid.chunk(2, -1)[0]) * hid.chunk(2, -1)[1])
        ups.append(xe)
        downs.append(act)
    return {"up": ups, "down": downs}


def _check_layer(layer: nn.Module, w: torch.Tensor, x: torch.Tensor) -> None:
    h = 2 * (x.double().T @ x.double()) / x.shape[0]
    qt, _ = gptq_quantize_weight(w.float(), h.float(), CFG)
    assert isinstance(layer, QuantLinear) and layer.calibration["method"] == "gptq"
    assert layer.calibration["rows"] == x.shape[0]
    ref = dequantize(qt)[:, :w.shape[1]]
    got = layer.dequantized_weight(torch.float32)
    assert (ref == got).float().mean() > 0.99 and torch.allclose(ref, got, atol=float(ref.abs().max()) / 7)


@pytest.mark.parametrize("arch", ["mixtral", "gpt_oss", "llama4_text"])
def test_each_expert_gets_the_hessian_of_its_routed_tokens(arch):
    model = build_moe(arch)
    ref_model = copy.deepcopy(model)
    batch = moe_inputs(batch=2, length=12, seed=3)
    batch["attention_mask"][1, 8:] = 0  # padding: left out of every Hessian
    first = next(iter(_experts(model)))  # block 0: captured on the float model
    keep = batch["attention_mask"].reshape(-1).bool()
    ref = _reference_inputs(ref_model, first, batch, keep)
    weights = QuantExperts.expert_weights(ref_model.get_submodule(first))
    up_key = "gate_up_proj" if "gate_up_proj" in weights else "up_proj"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gptq_quantize_(model, CFG, [batch], skip=["@head"], progress=False)
    q = model.get_submodule(first)
    assert isinstance(q, QuantExperts)
    for e in range(q.num_experts):
        if ref["up"][e].shape[0] == 0:
            continue
        _check_layer(getattr(q, q.up_name)[e], weights[up_key][e][0], ref["up"][e])
        _check_layer(q.down[e], weights["down_proj"][e][0], ref["down"][e])
    for name in _experts(ref_model):  # every experts module is quantized, every router stays float
        assert isinstance(model.get_submodule(name), QuantExperts)
    for name, m in model.named_modules():
        if name.endswith((".gate", ".router")):
            assert not isinstance(m, QuantLinear), name
    with torch.no_grad():
        a, b = ref_model(**batch).logits, model(**batch).logits
    assert torch.isfinite(b).all() and (a - b).abs().max() < 0.1 * a.abs().max()


@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe"])
def test_block_by_block_gives_the_whole_model_codes_and_the_checkpoint_round_trips(arch, tmp_path):
    model = build_moe(arch)
    seq = copy.deepcopy(model)
    batches = [moe_inputs(seed=0), moe_inputs(seed=1)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        recs = gptq_quantize_(model, CFG, batches, skip=["@head"], progress=False)
        recs_seq = gptq_quantize_sequential(seq, CFG, batches, skip=["@head"], device="cpu", progress=False)
    assert recs.keys() == recs_seq.keys() and any(".experts.down." in n for n in recs)
    a, b = model.state_dict(), seq.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    medquant.save(model, tmp_path / "q")
    loaded = medquant.load(tmp_path / "q", build_moe(arch))
    with torch.no_grad():
        assert torch.equal(model(**batches[0]).logits, loaded(**batches[0]).logits)


def test_an_expert_no_token_reaches_is_rounded_to_nearest_and_reported():
    model = build_moe("mixtral")  # top-2 of 4 experts: one token reaches two experts per layer
    float_experts = {n: copy.deepcopy(m) for n, m in _experts(model).items()}
    batch = {"input_ids": torch.tensor([[17]]), "attention_mask": torch.ones(1, 1, dtype=torch.long)}
    with pytest.warns(UserWarning, match=r"8 MoE expert layer\(s\) received no calibration token") as caught:
        recs = gptq_quantize_(model, CFG, [batch], skip=["@head"], progress=False)
    assert {w.filename for w in caught if "no calibration token" in str(w.message)} == {__file__}
    rtn = {n: r for n, r in recs.items() if r["method"] == "rtn"}
    assert len(rtn) == 8 and all(r["rows"] == 0 for r in rtn.values())  # 2 layers x 2 experts x 2 projections
    for n in rtn:
        parent, key, e = n.rsplit(".", 2)
        w, _ = QuantExperts.expert_weights(float_experts[parent])["gate_up_proj" if key == "gate_up" else
                                                                  "down_proj"][int(e)]
        lin = nn.Linear(w.shape[1], w.shape[0], bias=False)
        lin.weight = nn.Parameter(w.clone())
        assert torch.equal(model.get_submodule(n).dequantized_weight(),
                           QuantLinear.from_float(lin, CFG).dequantized_weight())


def test_per_sample_group_labels_follow_the_routed_tokens():
    model = build_moe("mixtral")
    ref_model = copy.deepcopy(model)
    batch = moe_inputs(batch=2, length=8, seed=5)
    first = next(iter(_experts(model)))
    mod = ref_model.get_submodule(first)
    seen = {}
    h = mod.register_forward_pre_hook(lambda m, a, k: seen.update(idx=a[1] if len(a) > 1 else k["top_k_index"]),
                                      with_kwargs=True)
    with torch.no_grad():
        ref_model(**batch)
    h.remove()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        recs = gptq_quantize_(model, CFG, [batch], groups=[["a", "b"]], skip=["@head"], progress=False)
    for e in range(4):
        tokens = torch.where(seen["idx"] == e)[0]
        want = {lab: int((tokens // 8 == s).sum()) for s, lab in enumerate("ab") if (tokens // 8 == s).any()}
        assert recs[f"{first}.gate_up.{e}"]["group_rows"] == want


def test_an_error_part_way_leaves_the_float_experts_in_place():
    model = build_moe("mixtral")
    before = {n: (m, {k: p.data_ptr() for k, p in m.named_parameters()}) for n, m in _experts(model).items()}
    batch = moe_inputs()
    with torch.no_grad():
        ref = model(**batch).logits

    def once_block_0_is_done(*_):  # block 1's capture, with block 0's layers (its experts too) quantized
        if isinstance(model.model.layers[0].mlp.experts, QuantExperts) and isinstance(
                model.model.layers[0].mlp.experts.down[0], QuantLinear):
            raise KeyboardInterrupt

    handle = model.model.layers[1].self_attn.o_proj.register_forward_pre_hook(once_block_0_is_done)
    with warnings.catch_warnings(), pytest.raises(KeyboardInterrupt):
        warnings.simplefilter("ignore")
        gptq_quantize_(model, CFG, [batch], skip=["@head"], progress=False)
    handle.remove()
    assert isinstance(model.model.layers[0].self_attn.q_proj, nn.Linear)
    for n, (m, ptrs) in before.items():
        assert model.get_submodule(n) is m
        assert {k: p.data_ptr() for k, p in m.named_parameters()} == ptrs
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, ref)


def test_awq_block_by_block_quantizes_the_experts_as_the_whole_model_awq():
    """With the plan of quantize_ in both: experts per expert (round-to-nearest after the scale search), routers
    float."""
    model = build_moe("mixtral")
    seq = copy.deepcopy(model)
    batch = moe_inputs()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        awq_quantize_(model, CFG, [batch], progress=False)
        awq_quantize_sequential(seq, CFG, [batch], device="cpu", progress=False)
    kinds = [{n: type(m).__name__ for n, m in x.named_modules()} for x in (model, seq)]
    assert kinds[0] == kinds[1]
    assert sum(isinstance(m, QuantExperts) for m in seq.modules()) == 2
    assert isinstance(seq.model.layers[0].mlp.gate, nn.Module) and not isinstance(seq.model.layers[0].mlp.gate,
                                                                                   QuantLinear)


def test_a_shared_expert_on_flattened_tokens_follows_the_padding_and_the_per_sample_labels(monkeypatch):
    """Llama 4's MoE block flattens its hidden states to ``(batch * tokens, H)`` before its shared expert (a plain
    MLP): its rows are the batch's tokens sample by sample, so the padding mask and per-sample group labels apply
    to them flattened the same way (before, per-sample labels were refused there and padding rows were kept)."""
    model = build_moe("llama4_text")
    ref_model = copy.deepcopy(model)
    batch = moe_inputs(batch=2, length=8, seed=4)
    batch["attention_mask"][1, 5:] = 0
    name = "model.layers.0.feed_forward.shared_expert.gate_proj"
    seen = {}
    h = ref_model.get_submodule(name).register_forward_pre_hook(lambda m, a: seen.update(x=a[0].detach().clone()))
    with torch.no_grad():
        ref_model(**batch)
    h.remove()
    x = seen["x"]
    assert x.dim() == 2 and x.shape[0] == 16
    keep = batch["attention_mask"].reshape(-1).bool()
    sample = torch.arange(16) // 8
    parts = [x[keep & (sample == s)].double() for s in range(2)]
    hess = sum(0.5 * 2 * (p.T @ p) / p.shape[0] for p in parts)
    from medquant.calibrate.gptq import HessianAccumulator

    formed: list[str] = []  # X^T X products formed, by layer: gate_proj and up_proj read one tensor, formed once
    real = HessianAccumulator.products
    monkeypatch.setattr(HessianAccumulator, "products",
                        lambda self, *a, **k: formed.append(self.name) or real(self, *a, **k))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        recs = gptq_quantize_(model, CFG, [batch], groups=[["a", "b"]], skip=["@head"], progress=False)
    assert recs[name]["rows"] == int(keep.sum()) == 13 and recs[name]["group_rows"] == {"a": 8, "b": 5}
    assert formed.count(name) == 1 and formed.count(name.replace("gate_proj", "up_proj")) == 0
    qt, _ = gptq_quantize_weight(ref_model.get_submodule(name).weight.detach(), hess.float(), CFG)
    ref = dequantize(qt)[:, :x.shape[1]]
    got = model.get_submodule(name).dequantized_weight(torch.float32)
    assert (ref == got).float().mean() > 0.99


def test_a_vision_language_moe_with_an_image_block_by_block_gives_the_whole_model_codes(tmp_path):
    """Qwen3-VL-MoE with an image: vision blocks, a deepstack feature added after text layer 0, and MoE experts in
    every text layer. With the blocks' layers planned, block-by-block GPTQ gives whole-model GPTQ's codes, every
    experts module is quantized per expert, and the checkpoint round trips."""
    from medquant.models import block_stacks
    from medquant.testing.zoo import _qwen_vl_inputs

    model = build_moe("qwen3_vl_moe")
    inputs = _qwen_vl_inputs(model, torch.Generator().manual_seed(0))
    blocks = [b for stack in block_stacks(model) for b in stack]
    cmap = {"re:^(" + "|".join(re.escape(b) for b in blocks) + r")\..*": CFG}  # the layers inside the blocks
    seq = copy.deepcopy(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        recs = gptq_quantize_(model, cmap, [inputs], progress=False)
        gptq_quantize_sequential(seq, cmap, [inputs], device="cpu", progress=False)
    a, b = model.state_dict(), seq.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert sum(isinstance(m, QuantExperts) for m in model.modules()) == 2
    assert any(".visual.blocks." in n for n in recs) and any(".experts.down." in n for n in recs)
    medquant.save(model, tmp_path / "q")
    loaded = medquant.load(tmp_path / "q", build_moe("qwen3_vl_moe"))
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, loaded(**inputs).logits)


@pytest.mark.parametrize("sequential", [False, True], ids=["whole", "sequential"])
def test_a_hessian_memory_budget_captures_in_several_passes_with_the_same_codes(sequential, monkeypatch):
    """``max_hessian_bytes``: a stage (block) whose Hessians exceed the budget is captured in several passes, each
    holding at most the budget; the codes are those of one pass."""
    from medquant.calibrate import gptq as gptq_mod

    model = build_moe("mixtral")  # per block: 4 attention + 8 expert Linear layers, K = 64 (down: 32)
    batches = [moe_inputs(seed=0), moe_inputs(seed=1)]
    run = (lambda m, **kw: gptq_quantize_sequential(m, CFG, batches, skip=["@head"], device="cpu", progress=False,
                                                    **kw)) if sequential else \
        (lambda m, **kw: gptq_quantize_(m, CFG, batches, skip=["@head"], progress=False, **kw))
    budget = 64 * 64 * 8 * 3  # three Hessians of K = 64
    passes: list[list[str]] = []  # the layers of each capture pass
    name = "_capture_block" if sequential else "_capture"
    real = getattr(gptq_mod, name)

    def spy(root, *args, **kwargs):
        out = real(root, *args, **kwargs)
        accs = args[1] if sequential else out
        passes.append([n for n in accs])
        assert sum(gptq_mod._hessian_bytes(a.module) for a in accs.values()) <= budget
        return out

    one, parts = copy.deepcopy(model), copy.deepcopy(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run(one)
        monkeypatch.setattr(gptq_mod, name, spy)
        run(parts, max_hessian_bytes=budget)
    a, b = one.state_dict(), parts.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # a block's Hessians: 8 of K = 64 and 4 of K = 32 (a quarter each), 3 budgets' worth: at least 3 passes a block
    assert len(passes) >= 2 * 3
    assert sum(len(p) for p in passes) == len([n for n in gptq_mod.calibration_records(one) if "layers." in n]) == 24
    with pytest.raises(ValueError, match="max_hessian_bytes must be a positive integer"):
        run(copy.deepcopy(model), max_hessian_bytes=0)
