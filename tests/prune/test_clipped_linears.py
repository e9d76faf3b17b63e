"""Pruning Gemma 4's vision blocks, whose projections are ``Gemma4ClippableLinear`` clamp wrappers: heads and FFN
neurons are removed from the inner ``nn.Linear`` layers, and the result equals the float model with the removed
heads' and neurons' contributions masked out, computed independently with forward pre-hooks on the unpruned model
(the input columns of o / down that belong to them set to 0 after the input clamp) - with the clamps off, and with
finite clamps that change the output."""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

from medquant.models import transformer_blocks, vision_layers
from medquant.prune import StructuredPruner, load_pruned, save_pruned
from medquant.testing.zoo_vlm import EXTRA_ZOO_BY_NAME

ENTRY = EXTRA_ZOO_BY_NAME["gemma4"]
HEAD_DIM, N_HEADS, INTER = 32, 4, 256


def _clipped(model: nn.Module) -> nn.Module:
    """The same weights with ``use_clipped_linears`` and finite bounds at 60% of the largest value each
    projection sees / gives on the zoo inputs (so every bound is reached)."""
    cfg = copy.deepcopy(model.config)
    cfg.vision_config.use_clipped_linears = True
    torch.manual_seed(0)
    out = type(model)(cfg).eval()
    out.load_state_dict(model.state_dict(), strict=False)
    seen: dict[str, tuple[float, float]] = {}
    wrappers = {n: m for n, m in out.named_modules() if type(m).__name__ == "Gemma4ClippableLinear"}
    handles = [m.register_forward_hook(lambda mod, a, y, n=n: seen.__setitem__(
        n, (float(a[0].abs().max()), float(y.abs().max())))) for n, m in wrappers.items()]
    with torch.no_grad():
        ENTRY.output(out, ENTRY.inputs(out))
    for h in handles:
        h.remove()
    assert set(seen) == set(wrappers)
    with torch.no_grad():
        for n, m in wrappers.items():
            xin, yout = seen[n]
            m.input_min.fill_(-0.6 * xin)
            m.input_max.fill_(0.6 * xin)
            m.output_min.fill_(-0.6 * yout)
            m.output_max.fill_(0.6 * yout)
    return out


@torch.no_grad()
def _masked_output(model: nn.Module, removed_heads: dict[str, list[int]], removed_neurons: dict[str, list[int]],
                   inputs) -> torch.Tensor:
    """The unpruned model's output with the inputs of o (removed heads' columns) and of down (removed neurons)
    zeroed by forward pre-hooks on the inner linears."""
    handles = []

    def mask(cols: list[int]):
        def hook(mod, args):
            x = args[0].clone()
            x[..., cols] = 0
            return (x,)
        return hook

    for block, heads in removed_heads.items():
        cols = [h * HEAD_DIM + i for h in heads for i in range(HEAD_DIM)]
        o = model.get_submodule(f"{block}.self_attn.o_proj").linear
        handles.append(o.register_forward_pre_hook(mask(cols)))
    for block, neurons in removed_neurons.items():
        handles.append(model.get_submodule(f"{block}.mlp.down_proj").linear.register_forward_pre_hook(mask(neurons)))
    try:
        return ENTRY.output(model, inputs)
    finally:
        for h in handles:
            h.remove()


@pytest.mark.parametrize("clipped", [False, True], ids=["no_clamps", "finite_clamps"])
def test_pruned_vision_blocks_equal_the_masked_float_model(clipped, tmp_path):
    model = ENTRY.build()
    if clipped:
        model = _clipped(model)
    inputs = ENTRY.inputs(model)
    original = copy.deepcopy(model)
    if clipped:  # the clamps are reached: they change the output
        plain = ENTRY.build()
        with torch.no_grad():
            assert not torch.allclose(ENTRY.output(plain, inputs), ENTRY.output(original, inputs), atol=1e-3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plan = StructuredPruner(0.5, 0.3, scope="vision", progress=False).prune(model)
    layers = vision_layers(original)
    assert set(plan.heads) == set(plan.neurons) == set(layers) and plan.skipped == {}
    removed_heads = {b: plan.removed_heads(b) for b in layers}
    removed_neurons = {b: plan.removed_neurons(b) for b in layers}
    assert all(len(h) == 2 for h in removed_heads.values())
    assert all(len(n) == round(0.3 * INTER) for n in removed_neurons.values())
    for b in layers:  # the inner linears lost the rows / columns; the wrappers keep their scalar clamps
        attn, mlp = model.get_submodule(f"{b}.self_attn"), model.get_submodule(f"{b}.mlp")
        assert attn.q_proj.linear.out_features == attn.o_proj.linear.in_features == 2 * HEAD_DIM
        assert mlp.down_proj.linear.in_features == mlp.up_proj.linear.out_features == INTER - len(removed_neurons[b])
        if clipped:
            assert attn.o_proj.input_max.dim() == 0 and bool(attn.o_proj.input_max.isfinite())
    with torch.no_grad():
        out = ENTRY.output(model, inputs)
    ref = _masked_output(original, removed_heads, removed_neurons, inputs)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5 * max(1.0, float(ref.abs().max())))
    with torch.no_grad():  # something was removed that mattered
        assert not torch.allclose(ENTRY.output(original, inputs), ref, atol=1e-4)

    save_pruned(model, tmp_path / "p", plan=plan)
    with torch.no_grad():
        back = load_pruned(tmp_path / "p")
        assert torch.equal(ENTRY.output(back, inputs), out)
    units = {b.name: b for b in transformer_blocks(back, "vision", clamp_wrappers=True)}
    assert all(units[b].attention.n_heads == 2 for b in layers)


def test_pruned_then_quantized_vision_blocks_reload(tmp_path):
    """Per-layer head counts of the vision tower (the config cannot express them) survive quantization: the shape
    table reads the QuantLinear inside each clamp wrapper with its logical shape, and load_pruned rebuilds the
    pruned, quantized model with its finite clamps."""
    import medquant

    model = _clipped(ENTRY.build())
    inputs = ENTRY.inputs(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plan = StructuredPruner({"model.vision_tower.encoder.layers.0": 0.5}, 0.3, scope="vision",
                                progress=False).prune(model)
        medquant.quantize_(model, medquant.QuantConfig(4, group_size=32), skip=["@head"])
    assert isinstance(model.get_submodule("model.vision_tower.encoder.layers.0.self_attn.q_proj.linear"),
                      medquant.QuantLinear)
    assert [len(plan.heads.get(b, range(N_HEADS))) for b in vision_layers(model)] == [2, 4]
    with torch.no_grad():
        out = ENTRY.output(model, inputs)
    save_pruned(model, tmp_path / "q", plan=plan)
    with torch.no_grad():
        back = load_pruned(tmp_path / "q")
        assert torch.equal(ENTRY.output(back, inputs), out)
    assert back.get_submodule("model.vision_tower.encoder.layers.0.self_attn").num_key_value_groups == 1
    assert back.get_submodule("model.vision_tower.encoder.layers.0.self_attn.o_proj").linear.in_features == 64
