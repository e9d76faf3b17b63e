"""Group importance vs an independent plain-torch computation; reducers vs hand computation (SPEC 4)."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from medquant.fairquant import compute_group_importance, reduce_groups
from tests.fairquant.fq_helpers import grouped_batches, tiny_mlp


def _reference_importance(model, batches, metric):
    """Independent: per batch and group, forward ONLY that group's samples, backward the mean CE with
    torch.autograd.grad on a deep copy, accumulate elementwise."""
    names = ["fc1", "fc2"]
    ref = {}
    for x, y, grp in batches:
        for g in torch.unique(grp).tolist():
            sel = grp == g
            loss = F.cross_entropy(model(x[sel]), y[sel])
            ws = [model.get_submodule(n).weight for n in names]
            grads = torch.autograd.grad(loss, ws)
            for n, w, gr in zip(names, ws, grads):
                term = (gr * w).pow(2) if metric == "grape" else gr.abs()
                ref.setdefault(g, {}).setdefault(n, torch.zeros_like(w))
                ref[g][n] = ref[g][n] + term.detach()
    return ref


@pytest.mark.parametrize("metric", ["grape", "gradient"])
def test_importance_matches_plain_torch(metric):
    model = tiny_mlp()
    batches = grouped_batches(n_batches=4, n_groups=3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()  # the calibration must put it in eval and restore train afterwards
    imp = compute_group_importance(model, batches, metric=metric, progress=False)
    assert model.training
    assert all(p.requires_grad for p in model.parameters())
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), "calibration changed the weights"
    model.eval()
    ref = _reference_importance(model, batches, metric)
    assert imp.groups == [0, 1, 2]
    assert imp.batches == 4
    assert imp.counts == {g: sum(int((b[2] == g).sum()) for b in batches) for g in range(3)}
    for g in range(3):
        for n in ("fc1", "fc2"):
            torch.testing.assert_close(imp.maps[g][n], ref[g][n], rtol=1e-5, atol=1e-9)
            assert imp.maps[g][n].abs().sum() > 0


def test_importance_max_batches_and_custom_loss():
    model = tiny_mlp()
    batches = grouped_batches(n_batches=5)
    calls = []

    def loss_fn(m, batch):  # (outputs, targets) style
        calls.append(1)
        return m(batch[0]), batch[1]

    imp = compute_group_importance(model, iter(batches), loss_fn=loss_fn, max_batches=2, progress=False)
    assert imp.batches == 2 and len(calls) == 2
    ref = _reference_importance(model, batches[:2], "grape")
    torch.testing.assert_close(imp.maps[1]["fc1"], ref[1]["fc1"], rtol=1e-5, atol=1e-9)


def test_importance_dict_batches():
    model = tiny_mlp()
    batches = grouped_batches(n_batches=2)

    class Wrap(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, x):
            return self.m(x)

    w = Wrap(model)
    dict_batches = [{"x": x, "labels": y, "groups": g} for x, y, g in batches]
    a = compute_group_importance(w, dict_batches, progress=False)
    b = compute_group_importance(model, batches, progress=False)
    torch.testing.assert_close(a.maps[0]["m.fc2"], b.maps[0]["fc2"])


def test_importance_errors():
    model = tiny_mlp()
    one_group = [(x, y, torch.zeros_like(g)) for x, y, g in grouped_batches()]
    with pytest.raises(ValueError, match="single group"):
        compute_group_importance(model, one_group, progress=False)
    empty = [tuple(t[:0] for t in b) for b in grouped_batches()[:2]]
    with pytest.raises(ValueError, match="saw no samples: its 2 batch"):
        compute_group_importance(model, empty, progress=False)
    with pytest.raises(ValueError, match=r"group\(s\) \[2\] have no samples"):
        compute_group_importance(model, grouped_batches(), expected_groups=[0, 1, 2], progress=False)
    with pytest.raises(ValueError, match="outside the declared groups"):
        compute_group_importance(model, grouped_batches(n_groups=3), expected_groups=[0, 1], progress=False)
    with pytest.raises(TypeError, match="integer tensor"):
        compute_group_importance(model, [(x, y, g.float()) for x, y, g in grouped_batches()], progress=False)
    with pytest.raises(ValueError, match="one per sample"):
        compute_group_importance(model, [(x, y, g[:-1]) for x, y, g in grouped_batches()], progress=False)
    with pytest.raises(ValueError, match="empty"):
        compute_group_importance(model, [], progress=False)
    with pytest.raises(ValueError, match="unknown importance metric"):
        compute_group_importance(model, grouped_batches(), metric="hessian", progress=False)
    no_layers = torch.nn.Sequential(torch.nn.BatchNorm1d(6))
    with pytest.raises(ValueError, match="no quantizable layers"):
        compute_group_importance(no_layers, grouped_batches(), progress=False)



def test_group_ids_must_be_1d_integers_one_per_sample():
    model = tiny_mlp()
    (x, y, g), = grouped_batches(n_batches=1, batch=6)
    # a (2, 3) tensor for 6 samples was silently flattened: refused, with the shape in the message
    with pytest.raises(ValueError, match=r"1-D with one id per sample, got shape \(2, 3\)"):
        compute_group_importance(model, [(x, y, g.reshape(2, 3))], progress=False)
    with pytest.raises(TypeError, match="must be integers.*strings"):
        compute_group_importance(model, [(x, y, ["a", "b"] * 3)], progress=False)
    # a list of ints is fine and equals the tensor form
    b = compute_group_importance(model, [(x, y, g)], progress=False)
    assert b.counts == {0: 3, 1: 3}
    for same in (g.tolist(), g.reshape(-1, 1)):  # a list of ints and a column (N, 1) equal the tensor form
        a = compute_group_importance(model, [(x, y, same)], progress=False)
        assert a.counts == b.counts
        for grp in a.maps:
            for n in a.maps[grp]:
                assert torch.equal(a.maps[grp][n], b.maps[grp][n])

# ------------------------------------------------------------------------------------------ reducers
def _hand_maps(seed=0, groups=(0, 1, 2)):
    rng = np.random.default_rng(seed)
    return {g: {"a": rng.random((3, 4)) * (g + 1) ** 2, "b": rng.random((2, 5)) * 0.1} for g in groups}


def _to_torch(maps):
    return {g: {k: torch.tensor(v, dtype=torch.float32) for k, v in m.items()} for g, m in maps.items()}


def test_reducers_against_hand_loops():
    maps = _hand_maps()
    groups = sorted(maps)
    tmaps = _to_torch(maps)
    # balanced: shares of whole-model totals
    totals = {g: sum(v.sum() for v in maps[g].values()) for g in groups}
    z = sum(totals.values())
    for layer in ("a", "b"):
        shape = maps[0][layer].shape
        want_bal = np.zeros(shape)
        want_max = np.zeros(shape)
        want_mean = np.zeros(shape)
        want_cvar = np.zeros(shape)
        for idx in np.ndindex(*shape):
            vals = [maps[g][layer][idx] for g in groups]
            want_bal[idx] = max(maps[g][layer][idx] / max(totals[g] / z, 1e-8) for g in groups)
            want_max[idx] = max(vals)
            want_mean[idx] = sum(vals) / len(vals)
            k = math.ceil((1 - 0.5) * len(vals))  # alpha 0.5, 3 groups -> top 2
            want_cvar[idx] = sum(sorted(vals, reverse=True)[:k]) / k
        got = {r: reduce_groups(tmaps, r, alpha=0.5)[layer].double().numpy() for r in ("balanced", "max", "mean", "cvar")}
        np.testing.assert_allclose(got["balanced"], want_bal, rtol=1e-5)
        np.testing.assert_allclose(got["max"], want_max, rtol=1e-6)
        np.testing.assert_allclose(got["mean"], want_mean, rtol=1e-6)
        np.testing.assert_allclose(got["cvar"], want_cvar, rtol=1e-6)


def test_cvar_default_alpha_and_balanced_upweights_small_group():
    maps = _hand_maps(groups=tuple(range(10)))
    tmaps = _to_torch(maps)
    # a = 0.1, G = 10 -> top ceil(9) = 9 groups: everything but the smallest value
    got = reduce_groups(tmaps, "cvar")["a"].double().numpy()
    stack = np.stack([maps[g]["a"] for g in range(10)])
    want = np.sort(stack, axis=0)[1:].mean(0)
    np.testing.assert_allclose(got, want, rtol=1e-6)
    # balanced: a group with tiny total importance but a spike gets that spike scaled up by 1/share
    small = {0: {"w": torch.tensor([[1.0, 1.0, 1.0, 1.0]])}, 1: {"w": torch.tensor([[0.0, 0.0, 0.0, 0.04]])}}
    r = reduce_groups(small, "balanced")["w"]
    share1 = 0.04 / 4.04
    assert torch.allclose(r[0, 3], torch.tensor(0.04 / share1), rtol=1e-5)
    assert torch.allclose(r[0, 0], torch.tensor(1.0 / (4 / 4.04)), rtol=1e-5)
    with pytest.raises(ValueError, match="unknown reducer"):
        reduce_groups(tmaps, "median")


def test_reducers_accept_group_maps_with_layers_in_another_order():
    """Hand-built maps with the same layers inserted in another order per group were refused as "different
    layers"; the result must be the one of the same maps in one order (plain torch max / mean)."""
    g = torch.Generator().manual_seed(0)
    a0, b0, a1, b1 = (torch.rand(*s, generator=g) for s in ((2, 3), (4, 1), (2, 3), (4, 1)))
    maps = {0: {"a": a0, "b": b0}, 1: {"b": b1, "a": a1}}
    got = reduce_groups(maps, "max")
    assert list(got) == ["a", "b"]
    assert torch.equal(got["a"], torch.maximum(a0, a1)) and torch.equal(got["b"], torch.maximum(b0, b1))
    got = reduce_groups(maps, "mean")
    assert torch.allclose(got["a"], (a0 + a1) / 2) and torch.allclose(got["b"], (b0 + b1) / 2)
    with pytest.raises(ValueError, match="different layers"):
        reduce_groups({0: {"a": a0, "b": b0}, 1: {"a": a1}}, "max")


@pytest.mark.parametrize("reducer", ["balanced", "max", "mean", "cvar"])
def test_reducers_refuse_maps_of_one_layer_with_different_shapes(reducer):
    """torch.stack's own "stack expects each tensor to be equal size" named neither the layer nor the groups."""
    maps = {0: {"a": torch.rand(3, 4), "b": torch.rand(2, 5)}, 1: {"a": torch.rand(3, 4), "b": torch.rand(5, 2)},
            2: {"a": torch.rand(3, 4), "b": torch.rand(2, 5)}}
    with pytest.raises(ValueError, match=r"layer 'b'.*group 0: \(2, 5\).*group 1: \(5, 2\).*group 2: \(2, 5\)"
                                         r".*same shape"):
        reduce_groups(maps, reducer)


def test_reducers_refuse_maps_that_are_not_tensors():
    maps = {0: {"a": torch.rand(3, 4)}, 1: {"a": np.random.default_rng(0).random((3, 4))}}
    with pytest.raises(TypeError, match=r"group 1, layer 'a'.*torch.Tensor.*ndarray"):
        reduce_groups(maps, "max")
