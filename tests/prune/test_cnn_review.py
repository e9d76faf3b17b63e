"""CNN channel pruning (:mod:`medquant.prune.cnn`): dict calibration batches, parametrized layers and tied weights.

Reference: the original model with the removed channels zeroed at the producer's output (a plain-torch forward hook
on the BatchNorm, or the conv when there is none)."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from medquant.prune import StructuredPruner
from medquant.prune.cnn import channel_groups


def _close(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * max(1.0, float(b.abs().max())))


def _x(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def _masked(model: nn.Module, removed: dict[str, list[int]]) -> nn.Module:
    """A copy of ``model`` whose modules named in ``removed`` output 0 on the given channels (forward hooks)."""
    ref = copy.deepcopy(model)
    for name, idx in removed.items():
        def zero(mod, args, out, idx=idx):
            out = out.clone()
            out[:, idx] = 0
            return out
        ref.get_submodule(name).register_forward_hook(zero)
    return ref


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _same_state(model: nn.Module, before: dict[str, torch.Tensor]) -> bool:
    after = model.state_dict()
    return after.keys() == before.keys() and all(torch.equal(after[k], v) for k, v in before.items())


class _Pixels(nn.Module):
    """A CNN whose forward takes named inputs, as image datasets yielding ``{"pixel_values": ...}`` feed it."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.c2 = nn.Conv2d(8, 4, 1)
        with torch.no_grad():
            self.bn.running_mean.uniform_(-1, 1)
            self.bn.running_var.uniform_(0.5, 2)
            self.bn.weight.uniform_(0.5, 1.5)
            self.bn.bias.uniform_(-1, 1)

    def forward(self, pixel_values, scale: float = 2.0):
        return self.c2(torch.relu(self.bn(self.c1(pixel_values)))) * scale


@pytest.mark.parametrize("method", ["magnitude", "activation", "taylor"])
def test_dict_calibration_batches_trace_by_name_and_prune_exactly(method):
    """Mapping batches (``model(**batch)``, as ``run_model`` calls them) are bound to the forward's parameters by
    name for tracing (an omitted parameter takes its default), and the pruned model equals the masked original."""
    model = _Pixels().eval()
    x = _x(4, 3, 6, 6)
    pruner = StructuredPruner(channel_ratio=0.5, importance=method, progress=False)
    plan = pruner.plan(model, calib=[{"pixel_values": x}])
    removed = plan.removed_channels("c1")
    assert len(removed) == 4 and plan.channel_groups[0]["bn"] == "bn"
    with torch.no_grad():
        want = _masked(model, {"bn": removed})(pixel_values=x)
        full = model(pixel_values=x)
    pruner.apply(model, plan)
    assert (model.c1.out_channels, model.bn.num_features, model.c2.in_channels) == (4, 4, 4)
    with torch.no_grad():
        _close(model(pixel_values=x), want)
    assert (full - want).abs().max() > 1e-3


def test_dict_example_input_with_an_unknown_key_is_named():
    with pytest.raises(ValueError, match=r"\['labels'\].*pixel_values"):
        channel_groups(_Pixels(), {"pixel_values": _x(1, 3, 6, 6), "labels": torch.tensor([0])})


class _Chain(nn.Module):
    """c0 -> c1 -> c2; ``wrap`` (e.g. weight norm) is applied to the conv named ``which``."""

    def __init__(self, which: str | None = None, wrap=None):
        super().__init__()
        torch.manual_seed(0)
        self.c0 = nn.Conv2d(3, 8, 3, padding=1)
        self.c1 = nn.Conv2d(8, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 2, 1)
        if which is not None:
            setattr(self, which, wrap(getattr(self, which)))

    def forward(self, x):
        return self.c2(torch.relu(self.c1(torch.relu(self.c0(x)))))


def _weight_norm(m: nn.Module) -> nn.Module:
    return nn.utils.parametrizations.weight_norm(m)


def _legacy_spectral_norm(m: nn.Module) -> nn.Module:
    return nn.utils.spectral_norm(m)  # hooks: ``weight`` is a plain tensor recomputed from ``weight_orig``


@pytest.mark.parametrize("wrap", [_weight_norm, _legacy_spectral_norm], ids=["parametrized", "hook"])
def test_reparametrized_consumer_is_not_pruned_and_the_rest_is_exact(wrap):
    """A layer whose ``weight`` is computed (``torch.nn.utils.parametrize``, legacy weight / spectral norm hooks)
    cannot have its columns sliced: the conv feeding it is left whole (named in the reason), the others pruned."""
    model = _Chain("c2", wrap).eval()
    x = _x(2, 3, 6, 6)
    groups, skipped = channel_groups(model, x)
    assert [g.conv for g in groups] == ["c0"] and "c2" in skipped["c1"] and "weight" in skipped["c1"]
    pruner = StructuredPruner(channel_ratio=0.5, progress=False)
    plan = pruner.plan(model, calib=[x])
    assert set(plan.channels) == {"c0"}
    with torch.no_grad():
        want = _masked(model, {"c0": plan.removed_channels("c0")})(x)
    pruner.apply(model, plan)
    assert (model.c0.out_channels, model.c1.in_channels, model.c1.out_channels) == (4, 4, 8)
    with torch.no_grad():
        _close(model(x), want)


@pytest.mark.parametrize("which", ["c0", "c1", "c2"])
def test_plan_for_a_plain_twin_applied_to_a_reparametrized_model_changes_nothing(which):
    """A plan made on the plain model, applied to one whose conv is weight-normed: ``ValueError`` before any layer
    changes (not a half-pruned model)."""
    x = _x(2, 3, 6, 6)
    pruner = StructuredPruner(channel_ratio=0.5, progress=False)
    plan = pruner.plan(_Chain().eval(), calib=[x])
    assert set(plan.channels) == {"c0", "c1"}
    model = _Chain(which, _weight_norm).eval()
    before = _state(model)
    with pytest.raises(ValueError, match=rf"{which}.*weight"):
        pruner.apply(model, plan)
    assert _same_state(model, before)
    with torch.no_grad():
        model(x)  # still runs


class _Tied(nn.Module):
    """Two convs sharing one weight tensor, and a third, independent branch."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(3, 8, 3, padding=1)
        self.b.weight = self.a.weight
        self.c = nn.Conv2d(3, 8, 3, padding=1)
        self.oa, self.ob, self.oc = nn.Conv2d(8, 2, 1), nn.Conv2d(8, 2, 1), nn.Conv2d(8, 2, 1)

    def forward(self, x):
        return self.oa(torch.relu(self.a(x))) * self.ob(torch.relu(self.b(x))) + self.oc(torch.relu(self.c(x)))


@pytest.mark.parametrize("method", ["magnitude", "activation"])
def test_convs_with_tied_weights_are_not_pruned(method):
    """Slicing one of two convs that share a weight tensor would untie them (and their filters would differ from
    the masked original's): both are left whole, named in the reason; the independent conv is pruned exactly."""
    model = _Tied().eval()
    x = _x(2, 3, 6, 6)
    _, skipped = channel_groups(model, x)
    assert "shares" in skipped["a"] and "shares" in skipped["b"]
    pruner = StructuredPruner(channel_ratio=0.5, importance=method, progress=False)
    plan = pruner.plan(model, calib=[x])
    assert set(plan.channels) == {"c"}
    with torch.no_grad():
        want = _masked(model, {"c": plan.removed_channels("c")})(x)
    pruner.apply(model, plan)
    assert model.a.weight is model.b.weight and model.a.out_channels == 8 and model.c.out_channels == 4
    with torch.no_grad():
        _close(model(x), want)


@pytest.mark.parametrize(("conv", "bn", "shape"), [(nn.Conv1d, nn.BatchNorm1d, (2, 3, 9)),
                                                   (nn.Conv3d, nn.BatchNorm3d, (2, 3, 5, 5, 5)),
                                                   (nn.ConvTranspose2d, nn.BatchNorm2d, (2, 3, 5, 5))])
def test_other_convs_are_refused_with_the_reason(conv, bn, shape):
    """Only ``nn.Conv2d`` output channels are pruned: a 1-D / 3-D / transposed conv CNN is refused naming why, and
    is left unchanged."""
    torch.manual_seed(0)
    model = nn.Sequential(conv(3, 8, 3), bn(8), nn.ReLU(), conv(8, 2, 1)).eval()
    x = _x(*shape)
    before = _state(model)
    with pytest.raises(ValueError, match=rf"no prunable conv channels.*0: {conv.__name__}: only nn.Conv2d"):
        StructuredPruner(channel_ratio=0.5, progress=False).prune(model, calib=[x])
    assert _same_state(model, before)
