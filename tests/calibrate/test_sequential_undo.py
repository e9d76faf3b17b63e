"""Block-by-block calibration is all or nothing; ``damp=0`` with a singular Hessian; modules shared across blocks.

Reference for a failed call: a deep copy of the model's state dict taken before it (``torch.equal`` on every tensor
after), the module and parameter objects bound under every name before it (identity), the train / eval modes and a
forward hook registered before it. Reference for shared modules: :func:`medquant.quantize_` of the same float model
(round-to-nearest: one quantized module bound under every name) and ``quantize_`` of a copy of the float layer alone.
"""
from __future__ import annotations

import copy

import pytest
import torch
from accelerate import init_empty_weights
from safetensors.torch import save_model
from torch import nn

from medquant import QuantConfig, QuantLinear, quantize_
from medquant.calibrate import awq as awq_mod
from medquant.calibrate import gptq as gptq_mod
from medquant.calibrate import sequential as seq_mod
from medquant.calibrate.awq import awq_quantize_sequential
from medquant.calibrate.gptq import gptq_quantize_sequential, gptq_quantize_weight
from medquant.calibrate.sequential import quantize_sequential
from medquant.testing.zoo import ZOO_BY_NAME

CFG = QuantConfig(4, group_size=32)
LLAMA = ZOO_BY_NAME["llama"]  # 2 decoder layers, hidden 128, intermediate 256


def _model():
    model = LLAMA.build()
    model.train()
    model.model.layers[1].mlp.eval()  # mixed modes: each module must get its own mode back
    return model


def _calib(model, n=8):
    base = LLAMA.inputs(model)
    out = []
    for i in range(n):
        ids = torch.randint(3, 256, base["input_ids"].shape, generator=torch.Generator().manual_seed(100 + i))
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    return out


def _snapshot(model):
    calls: list[type] = []
    handle = model.model.layers[0].mlp.up_proj.register_forward_hook(lambda m, a, o: calls.append(type(m)))
    with torch.no_grad():
        model(**LLAMA.inputs(model))
    uses = len(calls)  # 2 when the layer is shared by both blocks
    calls.clear()
    return {
        "state": copy.deepcopy(model.state_dict()),
        "modules": dict(model.named_modules(remove_duplicate=False)),
        "params": dict(model.named_parameters(remove_duplicate=False)),
        "modes": {n: m.training for n, m in model.named_modules(remove_duplicate=False)},
        "calls": calls,
        "uses": uses,
        "handle": handle,
    }


def _assert_restored(model, snap):
    state = model.state_dict()
    assert state.keys() == snap["state"].keys()
    for k, v in snap["state"].items():
        assert state[k].dtype == v.dtype and state[k].device == v.device, k
        assert torch.equal(state[k], v), k
    mods = dict(model.named_modules(remove_duplicate=False))
    assert mods.keys() == snap["modules"].keys()
    assert all(mods[n] is m for n, m in snap["modules"].items())
    assert not any(isinstance(m, QuantLinear) for m in model.modules())
    params = dict(model.named_parameters(remove_duplicate=False))
    assert params.keys() == snap["params"].keys() and all(params[n] is p for n, p in snap["params"].items())
    assert {n: m.training for n, m in mods.items()} == snap["modes"]
    assert "save_pretrained" not in vars(model)
    # the user's hook is still on the float layer, and its handle still removes it
    snap["calls"].clear()
    with torch.no_grad():
        model(**LLAMA.inputs(model))
    assert snap["uses"] >= 1 and snap["calls"] == [nn.Linear] * snap["uses"]
    snap["handle"].remove()
    with torch.no_grad():
        model(**LLAMA.inputs(model))
    assert snap["calls"] == [nn.Linear] * snap["uses"]


# ---------------------------------------------------------------------------------------------- GPTQ
def test_gptq_sequential_interrupted_in_block_2_restores_the_model(monkeypatch):
    """A KeyboardInterrupt while block 2 is quantized: block 1 was already swapped to QuantLinear (left so before);
    the model must be exactly as it was, and the interrupt propagates."""
    model = _model()
    calib = _calib(model, 2)
    snap = _snapshot(model)
    real = gptq_mod._quantize_layer

    def interrupted(module, hessian, config, damp, block_size, act_order, name, *rest):
        if name.startswith("model.layers.1."):
            raise KeyboardInterrupt
        return real(module, hessian, config, damp, block_size, act_order, name, *rest)

    monkeypatch.setattr(gptq_mod, "_quantize_layer", interrupted)
    with pytest.raises(KeyboardInterrupt):
        gptq_quantize_sequential(model, CFG, calib, device="cpu", progress=False)
    _assert_restored(model, snap)


def test_gptq_sequential_singular_hessian_with_damp_0_in_block_2():
    """damp=0: block 1's q/k/v are well conditioned (192 input rows for 128 inputs), block 2's o_proj reads the
    outputs of a rank-1 v_proj (rank <= 4 inputs): its Hessian is singular and retrying with 10 x 0 = 0 dampening
    cannot help. The error names the layer and says to use damp > 0; the model is left as it was."""
    model = _model()
    with torch.no_grad():
        v = model.model.layers[1].self_attn.v_proj.weight
        v.copy_(torch.outer(torch.randn(v.shape[0]), torch.randn(v.shape[1])))
    calib = _calib(model, 8)
    plan = {r"re:model\.layers\.0\.self_attn\.[qkv]_proj|model\.layers\.1\.self_attn\.o_proj": CFG}
    snap = _snapshot(model)
    with pytest.raises(ValueError, match=r"layer model\.layers\.1\.self_attn\.o_proj: .*damp > 0"):
        gptq_quantize_sequential(model, plan, calib, damp=0.0, device="cpu", progress=False)
    _assert_restored(model, snap)
    # with dampening the same call succeeds
    gptq_quantize_sequential(model, plan, calib, damp=0.01, device="cpu", progress=False)
    assert isinstance(model.model.layers[1].self_attn.o_proj, QuantLinear)


def test_damp_0_singular_hessian_error_says_to_use_damp():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(4, 16, generator=g)
    x = torch.randn(100, 8, generator=g)
    xx = torch.cat([x, x], 1)
    h = 2 * xx.T.double() @ xx.double() / 100                       # rank 8 of 16, no dead input
    with pytest.raises(ValueError, match=r"layer proj: the Hessian is not positive definite .*damp=0 .*damp > 0"):
        gptq_quantize_weight(w, h, QuantConfig(4, group_size=8), damp=0.0, name="proj")
    _, info = gptq_quantize_weight(w, h, QuantConfig(4, group_size=8), damp=0.01, name="proj")
    assert info["damp"] == pytest.approx(0.01)
    # damp=0 on a positive definite Hessian is fine
    _, info = gptq_quantize_weight(w, h + torch.eye(16, dtype=torch.float64), QuantConfig(4, group_size=8), damp=0.0)
    assert info["damp"] == 0.0


# ---------------------------------------------------------------------------------------------- AWQ
def test_awq_sequential_error_in_block_2_restores_the_folded_scales(monkeypatch):
    """The fold scales norms and linears in place: an error after block 2's fold left block 1 quantized and the
    norms / linears of both blocks rescaled."""
    model = _model()
    with torch.no_grad():
        for layer in model.model.layers:  # outlier channels: the search picks alpha > 0, the fold changes weights
            layer.input_layernorm.weight[[3, 40, 77]] *= 8.0
            layer.post_attention_layernorm.weight[[5, 60]] *= 8.0
    calib = _calib(model, 2)
    snap = _snapshot(model)
    real = awq_mod.search_and_fold_block
    folded = []

    def fail_after_fold(block, config, inputs, groups, **kw):
        out = real(block, config, inputs, groups, **kw)
        folded.extend(g.alpha for g in out)
        if inputs.name == "model.layers.1":
            raise RuntimeError("boom in block 2")
        return out

    monkeypatch.setattr(awq_mod, "search_and_fold_block", fail_after_fold)
    with pytest.raises(RuntimeError, match="boom in block 2"):
        awq_quantize_sequential(model, CFG, calib, device="cpu", progress=False, grid=4)
    assert any(a > 0 for a in folded)  # the folds did change weights before the error
    _assert_restored(model, snap)


# ---------------------------------------------------------------------------------------------- quantize_sequential
@pytest.mark.parametrize("offload", ["cpu", "meta"])
def test_quantize_sequential_error_in_block_2_restores_the_model(monkeypatch, offload):
    """A bad layer in block 2 (round-to-nearest, no calibration). offload "meta": the blocks done leave the compute
    device; the model's own tensors must stay where they were (the same objects, on the CPU)."""
    model = _model()
    snap = _snapshot(model)
    real = seq_mod.quantize_module

    def bad_layer(mod, cfg, name=None):
        if name == "model.layers.1.mlp.down_proj":
            raise ValueError("layer model.layers.1.mlp.down_proj: bad layer")
        return real(mod, cfg, name=name)

    monkeypatch.setattr(seq_mod, "quantize_module", bad_layer)
    with pytest.raises(ValueError, match="bad layer"):
        quantize_sequential(model, CFG, device="cpu", offload_device=offload)
    _assert_restored(model, snap)


def test_quantize_sequential_error_restores_a_meta_skeleton(tmp_path):
    """A model built on the meta device, its weights streamed from a checkpoint: after a failure it holds its meta
    tensors again (the same objects), no materialized or quantized layer."""
    real = LLAMA.build()
    save_model(real, str(tmp_path / "float.safetensors"))
    with init_empty_weights():
        meta = LLAMA.build()
    params = dict(meta.named_parameters(remove_duplicate=False))
    modules = dict(meta.named_modules(remove_duplicate=False))

    def per_block(block, inputs):
        if inputs.name == "model.layers.1":
            raise RuntimeError("per-block failure")

    with pytest.raises(RuntimeError, match="per-block failure"):
        quantize_sequential(meta, CFG, [LLAMA.inputs(real)], device="cpu", per_block_fn=per_block,
                            checkpoint=tmp_path / "float.safetensors")
    assert all(dict(meta.named_parameters(remove_duplicate=False))[n] is p for n, p in params.items())
    assert all(p.device.type == "meta" for p in meta.parameters())
    assert all(dict(meta.named_modules(remove_duplicate=False))[n] is m for n, m in modules.items())
    # and the skeleton still quantizes from the checkpoint afterwards, as quantize_ quantizes the real model
    quantize_sequential(meta, CFG, device="cpu", checkpoint=tmp_path / "float.safetensors")
    quantize_(real, CFG)
    sa, sb = meta.state_dict(), real.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# ---------------------------------------------------------------------------------------------- shared modules
def _share(model, where):
    layers = model.model.layers
    if where == "across_blocks":
        layers[1].mlp.up_proj = layers[0].mlp.up_proj
    else:
        layers[0].mlp.up_alias = layers[0].mlp.up_proj
    return model


@pytest.mark.parametrize("where", ["across_blocks", "within_block"])
def test_quantize_sequential_binds_a_shared_module_under_every_name(where):
    """As quantize_: one quantized module bound under every name; before, the second name kept the float layer."""
    seq, whole = _share(LLAMA.build(), where), _share(LLAMA.build(), where)
    quantize_(whole, CFG)
    quantize_sequential(seq, CFG, device="cpu")
    l0, l1 = seq.model.layers
    other = l1.mlp.up_proj if where == "across_blocks" else l0.mlp.up_alias
    assert isinstance(l0.mlp.up_proj, QuantLinear) and other is l0.mlp.up_proj
    sa, sb = seq.state_dict(), whole.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_gptq_sequential_refuses_a_module_shared_across_blocks():
    """gptq_quantize_ quantizes a shared module once from the inputs of every use; block by block, its later uses
    are not seen when its first block is quantized, so it is refused up front, naming it (before, the second
    block's name silently kept the float layer)."""
    model = _share(_model(), "across_blocks")
    calib = _calib(model, 2)
    snap = _snapshot(model)
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp\.up_proj .*model\.layers\.1\.mlp\.up_proj.*"
                                         r"gptq_quantize_"):
        gptq_quantize_sequential(model, CFG, calib, device="cpu", progress=False)
    _assert_restored(model, snap)
    # left in float (skip), the rest quantizes
    gptq_quantize_sequential(model, CFG, calib, skip=["model.layers.0.mlp.up_proj"], device="cpu", progress=False)
    assert type(model.model.layers[1].mlp.up_proj) is nn.Linear
    assert isinstance(model.model.layers[1].mlp.down_proj, QuantLinear)


def test_awq_sequential_quantizes_a_module_shared_across_blocks_once():
    """AWQ does not fold scales into a shared module (warning), so it is quantized by round-to-nearest as
    awq_quantize_ does: one quantized module under both names, equal to quantize_ of the float layer alone."""
    model = _share(_model(), "across_blocks")
    alone = nn.Sequential(copy.deepcopy(model.model.layers[0].mlp.up_proj))
    quantize_(alone, CFG)
    with pytest.warns(UserWarning, match="shared"):
        awq_quantize_sequential(model, CFG, _calib(model, 2), device="cpu", progress=False, grid=4)
    up0, up1 = model.model.layers[0].mlp.up_proj, model.model.layers[1].mlp.up_proj
    assert isinstance(up0, QuantLinear) and up1 is up0
    sa, sb = up0.state_dict(), alone[0].state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
