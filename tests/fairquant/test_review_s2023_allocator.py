"""Review (s2023) of FairQuantAllocator, its importance and its allocation rules: each test failed before its fix."""
import pytest
import torch

from medquant.fairquant import FairQuantAllocator, GroupImportance
from tests.fairquant.fq_helpers import grouped_batches, tiny_mlp


def test_a_refit_that_fails_leaves_the_previous_allocation_whole():
    """A failed fit_importance / fit_reduced must not mix the new layers with the old bits (bit_map() raised
    KeyError and state() saved the old bit map under the new weight shapes and group counts)."""
    alloc = FairQuantAllocator(target_bits=3.0, scope="tensor", tolerance=0.6, progress=False)
    alloc.fit(tiny_mlp(), grouped_batches())
    before_state, before_bits = alloc.state(), alloc.bit_map()
    # one per-tensor scope of a single layer: 2 or 4 bits, never within 0.6 of 3.0
    other = GroupImportance(maps={0: {"z": torch.rand(4, 5)}, 1: {"z": torch.rand(4, 5)}}, counts={0: 3, 1: 4},
                            metric="grape", batches=1)
    with pytest.raises(ValueError, match="could not meet"):
        alloc.fit_importance(other)
    with pytest.raises(ValueError, match="could not meet"):
        alloc.fit_reduced({"z": torch.rand(4, 5)})
    assert alloc.bit_map() == before_bits
    assert alloc.state() == before_state
    assert set(alloc.reduced_) == set(alloc.scores_) == set(alloc.weight_shape_) == {"fc1", "fc2"}


def test_grape_of_a_float16_model_is_squared_in_float32_not_flushed_to_zero():
    """(dL_g/dw * w)^2 below float16's smallest number (|dL/dw * w| < 2.4e-4, the common case) was computed in the
    weight's dtype and became 0 (ties at zero; values above 256 became inf)."""
    import torch.nn.functional as F

    from medquant.fairquant import compute_group_importance

    model = tiny_mlp().half()
    batches = [(x.half(), y, g) for x, y, g in grouped_batches(n_batches=2)]
    imp = compute_group_importance(model, batches, progress=False)
    ws = [model.fc1.weight, model.fc2.weight]
    for g in (0, 1):
        ref = [torch.zeros(w.shape) for w in ws]
        for x, y, grp in batches:  # plain torch: the float16 gradients, their products squared in float32
            sel = grp == g
            grads = torch.autograd.grad(F.cross_entropy(model(x[sel]), y[sel]), ws)
            for r, w, gr in zip(ref, ws, grads):
                r += (gr.float() * w.detach().float()).pow(2)
        for name, r in zip(("fc1", "fc2"), ref):
            assert bool((r > 0).all())
            torch.testing.assert_close(imp.maps[g][name], r, rtol=1e-5, atol=0)


def test_a_moe_model_is_allocated_over_its_linear_layers_and_keeps_its_experts_float():
    """quantize_'s module list holds MoE experts modules with 3-D weights and no ``.weight``: fit raised
    AttributeError. FairQuant allocates to Linear / Conv2d weights (its documented scope); the experts stay float."""
    import warnings

    from torch import nn

    from medquant.testing.zoo_moe import build_moe, moe_inputs

    model = build_moe("mixtral")
    batch = moe_inputs(batch=4, seed=0)
    batch["groups"] = torch.tensor([0, 1, 0, 1])

    def loss_fn(m, b):
        logits = m(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        return torch.nn.functional.cross_entropy(logits[:, -1], b["input_ids"][:, 0], reduction="none")

    alloc = FairQuantAllocator(target_bits=4.0, progress=False).fit(model, [batch], loss_fn=loss_fn)
    linears = [n for n, m in model.named_modules() if type(m) is nn.Linear]
    assert list(alloc.bit_map()) == linears
    experts = [n for n, m in model.named_modules() if n.endswith("mlp.experts")]
    assert experts
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        alloc.apply(model)
    assert all(type(model.get_submodule(n)).__name__ == "MixtralExperts" for n in experts)


@pytest.mark.parametrize("setting", ["target_bits", "tolerance", "cvar_alpha"])
@pytest.mark.parametrize("bad", ["abc", "4", [4], True, None, 2j])
def test_a_numeric_setting_that_is_not_a_number_names_the_setting(setting, bad):
    """"abc" gave float()'s bare "could not convert string to float", [4] "float() argument must be ...", "4" was
    read as 4.0 and True as 1.0; none named the setting."""
    if bad is None and setting == "target_bits":  # None is rank mode
        return
    with pytest.raises(TypeError, match=rf"{setting} must be a (real )?number.*got {type(bad).__name__}"):
        FairQuantAllocator(**{setting: bad})


def test_numeric_settings_still_accept_ints_floats_and_numpy_numbers():
    import numpy as np

    a = FairQuantAllocator(target_bits=np.float32(4.5), tolerance=np.int64(1), cvar_alpha=0)
    assert (a.target_bits, a.tolerance, a.cvar_alpha) == (4.5, 1.0, 0.0)
    assert all(type(v) is float for v in (a.target_bits, a.tolerance, a.cvar_alpha))


class _NanBranch(torch.nn.Module):
    """Finite losses whose gradient on fc1 is NaN: torch.where's unused branch sqrt(-|h|) is NaN, and its zero
    upstream gradient times d sqrt/dh = NaN reaches fc1 (the classic torch.where gradient trap)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc1 = torch.nn.Linear(6, 4)
        self.fc2 = torch.nn.Linear(4, 3)

    def forward(self, x):
        h = self.fc1(x)
        return self.fc2(torch.where(h > 100, torch.sqrt(-h.abs()), h))


@pytest.mark.parametrize("metric", ["grape", "gradient"])
def test_a_non_finite_gradient_is_reported_by_the_importance_with_its_layer_and_group(metric):
    """The maps came back NaN without a word (fit failed later with "scores of layer 'fc1' contain NaN/inf",
    which blames the scores, not the gradients)."""
    import torch.nn.functional as F

    from medquant.fairquant import compute_group_importance

    model, batches = _NanBranch(), grouped_batches()
    x, y, g = batches[0]
    sel = g == 0  # plain torch: the losses are finite and fc1's gradient is not
    loss = F.cross_entropy(model(x[sel]), y[sel])
    assert torch.isfinite(loss)
    assert not torch.isfinite(torch.autograd.grad(loss, model.fc1.weight)[0]).all()
    with pytest.raises(ValueError, match=r"(?s)group 0.*'fc1'.*NaN/inf.*gradient"):
        compute_group_importance(model, batches, metric=metric, progress=False)


def test_layers_outside_the_forward_pass_give_an_error_that_says_so():
    """layers=[a layer the loss does not use] raised torch's bare "element 0 of tensors does not require grad"."""

    class WithUnusedHead(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = tiny_mlp()
            self.unused = torch.nn.Linear(3, 3)

        def forward(self, x):
            return self.body(x)

    with pytest.raises(ValueError, match=r"(?s)do not depend on.*'unused'"):
        FairQuantAllocator(layers=["unused"], progress=False).fit(WithUnusedHead(), grouped_batches())
    # the same with a loss_fn that detaches the losses
    with pytest.raises(ValueError, match=r"(?s)do not depend on.*'fc1'"):
        FairQuantAllocator(progress=False).fit(tiny_mlp(), grouped_batches(),
                                               loss_fn=lambda m, b: torch.nn.functional.cross_entropy(
                                                   m(b[0]), b[1], reduction="none").detach())


@pytest.mark.parametrize("arch", ["qwen2_moe", "gemma4"])
def test_moe_routers_stay_float_as_quantize_keeps_them(arch):
    """quantize_ keeps MoE routers (gate / router / shared_expert_gate Linear layers) in floating point unless named
    exactly; the allocation gave them bits and to_quant_map named them exactly, which opted them in."""
    import copy
    import warnings

    from torch import nn

    from medquant import QuantConfig, quantize_
    from medquant.quant import QuantLinear
    from medquant.testing.zoo_moe import build_moe, moe_inputs

    model = build_moe(arch)
    batch = moe_inputs(batch=4, seed=0)
    batch["groups"] = torch.tensor([0, 1, 0, 1])

    def loss_fn(m, b):
        logits = m(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        return torch.nn.functional.cross_entropy(logits[:, -1].float(), b["input_ids"][:, 0], reduction="none")

    alloc = FairQuantAllocator(target_bits=4.0, progress=False).fit(model, [batch], loss_fn=loss_fn)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = quantize_(copy.deepcopy(model), QuantConfig(4))  # quantize_'s own default plan
    float_modules = dict(model.named_modules())
    want = [n for n, m in ref.named_modules() if isinstance(m, QuantLinear)
            and isinstance(float_modules.get(n), nn.Linear)]  # not the QuantLinear inside QuantExperts
    assert list(alloc.bit_map()) == want
    routers = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n not in want]
    assert routers  # the model has Linear routers
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        alloc.apply(model)
    assert all(type(model.get_submodule(n)) is nn.Linear for n in routers)


@pytest.mark.parametrize("metric", ["grape", "gradient"])
def test_importance_of_a_parametrized_weight_is_that_of_the_weight_the_forward_uses(metric):
    """A weight under torch.nn.utils.parametrize (weight_norm, spectral_norm, FQ-QAT's fake quantization) is
    recomputed at every access: the gradient went to a copy the forward never used, and the layer's importance was
    silently 0 (its channels took the lowest bits). Reference: plain torch on a copy with the parametrization
    removed (the weight kept), which is the weight quantize_ quantizes."""
    import copy

    import torch.nn.functional as F
    from torch.nn.utils import parametrize
    from torch.nn.utils.parametrizations import weight_norm

    from medquant.fairquant import compute_group_importance

    model = tiny_mlp()
    weight_norm(model.fc1)
    batches = grouped_batches(n_batches=2)
    imp = compute_group_importance(model, batches, metric=metric, progress=False)
    assert parametrize.is_parametrized(model.fc1)  # left as it was
    plain = copy.deepcopy(model)
    parametrize.remove_parametrizations(plain.fc1, "weight", leave_parametrized=True)
    ws = [plain.fc1.weight, plain.fc2.weight]
    for g in (0, 1):
        ref = [torch.zeros(w.shape) for w in ws]
        for x, y, grp in batches:
            sel = grp == g
            grads = torch.autograd.grad(F.cross_entropy(plain(x[sel]), y[sel]), ws)
            for r, w, gr in zip(ref, ws, grads):
                r += ((gr * w).pow(2) if metric == "grape" else gr.abs()).detach()
        for name, r in zip(("fc1", "fc2"), ref):
            assert bool((r > 0).any())
            torch.testing.assert_close(imp.maps[g][name], r, rtol=1e-5, atol=1e-12)


def _edited_states():
    import copy
    import json

    alloc = FairQuantAllocator(progress=False).fit(tiny_mlp(), grouped_batches())
    st = json.loads(json.dumps(alloc.state()))  # as medquant.save / load_extras store it
    out = []
    s = copy.deepcopy(st)
    s["bit_map"]["fc1"][0] = 3  # not a palette width
    out.append((s, r"'fc1'.*3.*palette"))
    s = copy.deepcopy(st)
    s["bit_map"]["fc1"] = s["bit_map"]["fc1"][:5]  # 5 bit-widths for 8 output channels
    out.append((s, r"'fc1'.*5.*8"))
    s = copy.deepcopy(st)
    del s["weight_shape"]["fc2"]
    out.append((s, r"'fc2'"))
    return st, alloc, out


def test_from_state_refuses_an_allocation_that_does_not_fit_its_palette_or_shapes():
    """from_state took bits outside the palette and a bit map with fewer entries than output channels (reporting
    a wrong average_bits; apply failed later or quantized at a width the allocator never gives)."""
    st, alloc, bad = _edited_states()
    back = FairQuantAllocator.from_state(st)
    assert back.bit_map() == alloc.bit_map() and back.average_bits_ == alloc.average_bits_
    for s, msg in bad:
        with pytest.raises(ValueError, match=rf"(?s){msg}"):
            FairQuantAllocator.from_state(s)


@pytest.mark.parametrize("bad", ["abc", "3", 1.5, [1], True])
def test_a_seed_that_is_not_an_integer_is_refused_when_built(bad):
    """seed="abc" / [1] failed only in fit with int()'s bare message; "3" and 1.5 were read as 3 and 1 (the state
    then saved 1 for seed=1.5)."""
    with pytest.raises(TypeError, match=r"seed must be an integer or None.*got"):
        FairQuantAllocator(seed=bad)


def test_fit_importance_checks_the_declared_groups_as_fit_does():
    """groups=[0, 1, 2] made fit raise for data without group 2 (or with a group 3), while fit_importance of the
    same data's importance allocated silently without it."""
    from medquant.fairquant import compute_group_importance

    model, batches = tiny_mlp(), grouped_batches(n_groups=2)
    imp = compute_group_importance(model, batches, progress=False)
    with pytest.raises(ValueError, match=r"(?s)\[2\].*no samples"):
        FairQuantAllocator(groups=[0, 1, 2], progress=False).fit(model, batches)
    with pytest.raises(ValueError, match=r"(?s)\[2\].*no samples"):
        FairQuantAllocator(groups=[0, 1, 2], progress=False).fit_importance(imp)
    with pytest.raises(ValueError, match=r"(?s)\[1\].*outside the declared groups"):
        FairQuantAllocator(groups=[0, 2], progress=False).fit_importance(imp)
    got = FairQuantAllocator(groups=[1, 0], progress=False).fit_importance(imp)
    assert got.bit_map() == FairQuantAllocator(progress=False).fit_importance(imp).bit_map()
