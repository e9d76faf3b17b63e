"""Bit allocation: rank rule, proportions, ties, budget mode, determinism, errors (SPEC 4, acceptance of issue 7)."""
import math

import numpy as np
import pytest
import torch

from medquant.fairquant import FairQuantAllocator, allocate_by_quantile, allocate_by_rank, allocate_to_budget
from medquant.fairquant.importance import GroupImportance
from medquant.quant import ConfigMap
from tests.fairquant.fq_helpers import grouped_batches, tiny_mlp


def _hand_scores(seed=0, sizes=(("l1", 7), ("l2", 13), ("l3", 20))):
    g = torch.Generator().manual_seed(seed)
    return {name: torch.rand(n, generator=g, dtype=torch.float64) for name, n in sizes}


def _flat(d):
    return [b for v in d.values() for b in v]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_rank_rule_exact_on_hand_built_vector(seed):
    scores = _hand_scores(seed)
    bits, props = (2, 4, 8), (0.2, 0.4, 0.4)
    got = _flat(allocate_by_rank(scores, bits, props))
    flat = np.concatenate([v.numpy() for v in scores.values()])
    n = flat.size
    # independent statement of the rule: rank r (0 = least important) -> tier by the fraction r / n
    ranks = np.empty(n, int)
    ranks[np.argsort(flat, kind="stable")] = np.arange(n)
    c1, c2 = math.floor(0.2 * n + 0.5), math.floor(0.6 * n + 0.5)
    want = [2 if r < c1 else 4 if r < c2 else 8 for r in ranks]
    assert got == want
    counts = [got.count(b) for b in bits]
    for c, p in zip(counts, props):
        assert abs(c - p * n) <= 1
    # low importance -> low bits
    order = np.argsort(flat)
    assert all(got[order[i]] <= got[order[i + 1]] for i in range(n - 1))


def test_rank_rule_equals_authors_quantile_rule_on_distinct_scores():
    scores = _hand_scores(5, sizes=(("a", 15), ("b", 25)))  # n = 40, 0.2 * 40 and 0.6 * 40 are integers
    assert allocate_by_rank(scores, (2, 4, 8), (0.2, 0.4, 0.4)) == allocate_by_quantile(scores, (2, 4, 8),
                                                                                          (0.2, 0.4, 0.4))


def test_ties_still_meet_proportions():
    scores = {"dead": torch.zeros(30), "alive": torch.zeros(20)}
    got = allocate_by_rank(scores, (2, 4, 8), (0.2, 0.4, 0.4))
    flat = _flat(got)
    assert [flat.count(b) for b in (2, 4, 8)] == [10, 20, 20]
    assert flat == [2] * 10 + [4] * 20 + [8] * 20  # ties broken by index
    # the authors' quantile rule puts every tied scope in the lowest tier: the proportions are missed
    assert _flat(allocate_by_quantile(scores, (2, 4, 8), (0.2, 0.4, 0.4))).count(2) == 50


def test_palette_order_and_normalisation():
    scores = _hand_scores(3)
    a = allocate_by_rank(scores, (8, 2, 4), (4, 2, 4))  # unsorted palette, unnormalised proportions
    b = allocate_by_rank(scores, (2, 4, 8), (0.2, 0.4, 0.4))
    assert a == b


@pytest.mark.parametrize("target", [2.0, 2.5, 3.3, 4.0, 5.5, 7.9, 8.0])
def test_budget_mode_meets_average_bits(target):
    scores = _hand_scores(1, sizes=(("l1", 16), ("l2", 32), ("l3", 64)))
    sizes = {"l1": 27, "l2": 288, "l3": 64}
    got = allocate_to_budget(scores, sizes, (2, 4, 8), target)
    num = sum(b * sizes[k] for k, v in got.items() for b in v)
    den = sum(sizes[k] * len(v) for k, v in got.items())
    assert abs(num / den - target) <= 0.1
    # within a layer (equal scope sizes), a more important scope never gets fewer bits
    for k, v in got.items():
        s = scores[k].numpy()
        o = np.argsort(s)
        assert all(v[o[i]] <= v[o[i + 1]] for i in range(len(v) - 1))


def test_budget_mode_with_ties():
    scores = {"a": torch.zeros(40), "b": torch.zeros(24)}
    got = allocate_to_budget(scores, {"a": 10, "b": 10}, (2, 4, 8), 4.0)
    flat = _flat(got)
    assert abs(sum(flat) / len(flat) - 4.0) <= 0.1


def test_impossible_budgets_raise():
    scores = _hand_scores()
    sizes = {k: 4 for k in scores}
    for bad in (1.5, 8.5, float("nan")):
        with pytest.raises(ValueError, match="impossible"):
            allocate_to_budget(scores, sizes, (2, 4, 8), bad)
    with pytest.raises(ValueError, match="impossible"):
        FairQuantAllocator(target_bits=1.0)
    with pytest.raises(ValueError, match="impossible"):
        FairQuantAllocator(bits=(2, 4), target_bits=4.5)
    # per-tensor scopes too coarse to land within 0.1 of the budget
    with pytest.raises(ValueError, match=r"within 0.1: .* reaches 2.006 .* up to 5.994 average bits"):
        allocate_to_budget({"big": torch.ones(1), "small": torch.ones(1)}, {"big": 1000, "small": 1}, (2, 8), 5.0)


def test_bad_palettes_and_settings():
    with pytest.raises(ValueError, match="1..8"):
        FairQuantAllocator(bits=(2, 16))
    with pytest.raises(ValueError, match="distinct"):
        FairQuantAllocator(bits=(4, 4))
    with pytest.raises(ValueError, match="one proportion per bit"):
        FairQuantAllocator(bits=(2, 4, 8), proportions=(0.5, 0.5))
    with pytest.raises(ValueError, match=">= 0"):
        FairQuantAllocator(proportions=(0.5, -0.1, 0.6))
    with pytest.raises(ValueError, match="at least two groups"):
        FairQuantAllocator(groups=[1])
    for bad in ([0, 1.7], [0, True], [0, "a"]):  # int() would read 1.7 as group 1, True as 1
        with pytest.raises(TypeError, match="integer group ids"):
            FairQuantAllocator(groups=bad)
    assert FairQuantAllocator(groups=[0, 1.0, torch.tensor(2)]).groups == (0, 1, 2)
    with pytest.raises(ValueError, match="unknown scope"):
        FairQuantAllocator(scope="group")
    for tol in (-1, float("nan")):  # refused when built, not when fitting
        with pytest.raises(ValueError, match="tolerance must be a non-negative number"):
            FairQuantAllocator(target_bits=4, tolerance=tol)
    with pytest.raises(ValueError, match=r"cvar_alpha must be in \[0, 1\), got -0.1"):
        FairQuantAllocator(reducer="cvar", cvar_alpha=-0.1)
    from medquant.fairquant import BAQWrapper

    for kw in ({"lambda_bit": float("nan")}, {"lambda_fair": float("inf")}, {"lambda_bit": -1.0}):
        with pytest.raises(ValueError, match="finite numbers >= 0"):
            BAQWrapper(tiny_mlp(), **kw)
    with pytest.raises(RuntimeError, match="not fitted"):
        FairQuantAllocator().to_quant_map()


def test_allocator_end_to_end_errors():
    model = tiny_mlp()
    with pytest.raises(ValueError, match="single group"):
        FairQuantAllocator(progress=False).fit(model, [(x, y, g * 0 + 3) for x, y, g in grouped_batches()])
    with pytest.raises(ValueError, match="have no samples"):
        FairQuantAllocator(groups=[0, 1, 2], progress=False).fit(model, grouped_batches())
    with pytest.raises(ValueError, match="no quantizable layers"):
        FairQuantAllocator(progress=False).fit(torch.nn.Sequential(torch.nn.Tanh()), grouped_batches())


def test_same_seed_identical_allocation():
    model = tiny_mlp()
    data = grouped_batches(n_batches=1, batch=200, seed=4)[0]
    ds = torch.utils.data.TensorDataset(*data)

    def fit(seed):
        loader = torch.utils.data.DataLoader(ds, batch_size=10, shuffle=True)
        a = FairQuantAllocator(seed=seed, max_batches=3, progress=False).fit(model, loader)
        return a.bit_map(), a.scores_

    m1, s1 = fit(7)
    m2, s2 = fit(7)
    _m3, s3 = fit(8)
    assert m1 == m2
    assert all(torch.equal(s1[k], s2[k]) for k in s1)
    assert any(not torch.equal(s1[k], s3[k]) for k in s1)  # the seed does control which batches are drawn


def test_per_tensor_scope_and_reducers_from_group_maps():
    shapes = {"a": (4, 3), "b": (6, 2), "c": (2, 5), "d": (5, 5), "e": (3, 3)}
    g = torch.Generator().manual_seed(0)
    maps = {gr: {k: torch.rand(*s, generator=g) for k, s in shapes.items()} for gr in (0, 1)}
    imp = GroupImportance(maps=maps, counts={0: 5, 1: 5}, metric="grape", batches=1, layers=list(shapes))
    a = FairQuantAllocator(bits=(2, 4, 8), proportions=(0.2, 0.4, 0.4), scope="tensor", reducer="mean").fit_importance(imp)
    # per-tensor score = mean |mean_g I_g| over the tensor; rank 5 tensors -> 1 x 2b, 2 x 4b, 2 x 8b
    sc = {k: float(((maps[0][k] + maps[1][k]) / 2).mean()) for k in shapes}
    ranked = sorted(shapes, key=lambda k: sc[k])
    want = dict(zip(ranked, [2, 4, 4, 8, 8]))
    assert {k: v[0] for k, v in a.bit_map_.items()} == want
    assert a.bit_map()["a"] == (want["a"],) * 4
    qm = a.to_quant_map()
    assert isinstance(qm, ConfigMap) and set(qm) == set(shapes) and not qm.skip
    assert qm["a"].scope == "tensor" and qm["a"].symmetric is True and qm["a"].bits == want["a"]
    n = {k: s[0] * s[1] for k, s in shapes.items()}
    assert a.average_bits_ == pytest.approx(sum(want[k] * n[k] for k in n) / sum(n.values()))


# ------------------------------------------------------------------------------- saved state (state / from_state)
_SETTINGS = ("bits", "proportions", "target_bits", "metric", "reducer", "scope", "cvar_alpha", "max_batches",
             "groups", "layers", "skip", "seed", "tolerance")


def _typed_settings(a):
    """Each constructor setting with its type (and its items' types), so that 1 != 1.0 and (0, 1) != [0, 1]."""
    out = {}
    for k in _SETTINGS:
        v = getattr(a, k)
        items = tuple(type(x) for x in v) if isinstance(v, (list, tuple)) else None
        out[k] = (v, type(v), items)
    return out


def _json(st):
    import json

    return json.loads(json.dumps(st))  # what medquant.save / load_extras do to it


def test_state_round_trips_every_setting_and_refits_identically():
    model = tiny_mlp()
    ds = torch.utils.data.TensorDataset(*grouped_batches(n_batches=1, batch=200, seed=4)[0])

    def loader():
        return torch.utils.data.DataLoader(ds, batch_size=10, shuffle=True)

    a = FairQuantAllocator(bits=(2, 4, 8), target_bits=5.0, metric="gradient", reducer="cvar", cvar_alpha=0.25,
                           max_batches=3, groups=[0, 1], layers=["fc1", "fc2"], skip=["fc2"], seed=11,
                           tolerance=0.5, progress=False).fit(model, loader())
    b = FairQuantAllocator.from_state(_json(a.state()))
    assert _typed_settings(b) == _typed_settings(a)
    assert b.bit_map() == a.bit_map() and b.average_bits_ == a.average_bits_
    # refitting the rebuilt allocator calibrates and allocates as the original did (same batches, layers, ...)
    b.fit(model, loader())
    assert b.bit_map() == a.bit_map() == {"fc1": a.bit_map_["fc1"]}
    assert b.importance_.batches == a.importance_.batches == 3
    assert set(b.scores_) == {"fc1"} and torch.equal(b.scores_["fc1"], a.scores_["fc1"])
    # the declared groups are kept: a third group is refused by both
    three = grouped_batches(n_groups=3)
    for alloc in (a, b):
        with pytest.raises(ValueError, match="outside the declared groups"):
            alloc.fit(model, three)


def test_state_keeps_the_tolerance_a_refit_needs():
    # two per-tensor scopes of 100 and 60 weights, palette (2, 8): the averages within reach are 2, 4.25, 5.75
    # and 8, so a target of 5 is met within a tolerance of 1.0 but not within the default 0.1
    g = torch.Generator().manual_seed(0)
    maps = {gr: {"big": torch.rand(10, 10, generator=g), "small": torch.rand(6, 10, generator=g)} for gr in (0, 1)}
    imp = GroupImportance(maps=maps, counts={0: 5, 1: 5}, metric="grape", batches=1, layers=["big", "small"])
    a = FairQuantAllocator(bits=(2, 8), target_bits=5.0, scope="tensor", tolerance=1.0).fit_importance(imp)
    with pytest.raises(ValueError, match="within 0.1"):
        FairQuantAllocator(bits=(2, 8), target_bits=5.0, scope="tensor").fit_importance(imp)
    b = FairQuantAllocator.from_state(_json(a.state()))
    assert b.tolerance == 1.0
    assert b.fit_importance(imp).bit_map_ == a.bit_map_


def test_state_without_version_loads_with_the_old_defaults():
    """A state written before the settings were saved (no "version"): the settings it lacks get the values
    from_state gave them then (the constructor defaults at the time)."""
    old = {"bits": [2, 4, 8], "proportions": [0.2, 0.4, 0.4], "target_bits": None, "metric": "grape",
           "reducer": "balanced", "scope": "channel", "cvar_alpha": 0.1, "average_bits": 4.0,
           "bit_map": {"fc1": [2, 4, 8, 2, 4, 8, 2, 4], "fc2": [2, 4, 8]},
           "weight_shape": {"fc1": [8, 6], "fc2": [3, 8]}, "group_counts": {"0": 15, "1": 15},
           "calibration_batches": 3}
    a = FairQuantAllocator.from_state(old)
    assert (a.max_batches, a.groups, a.layers, a.skip, a.seed, a.tolerance) == (50, None, None, None, 0, 0.1)
    assert a.bit_map() == {"fc1": (2, 4, 8, 2, 4, 8, 2, 4), "fc2": (2, 4, 8)}
    assert a.average_bits_ == pytest.approx((34 * 6 + 14 * 8) / (8 * 6 + 3 * 8))  # bits x scope size


def test_state_with_unknown_version_or_missing_setting_is_refused():
    a = FairQuantAllocator(progress=False).fit(tiny_mlp(), grouped_batches())
    st = _json(a.state())
    with pytest.raises(ValueError, match="unsupported FairQuantAllocator state version 99"):
        FairQuantAllocator.from_state({**st, "version": 99})
    st.pop("tolerance")
    with pytest.raises(ValueError, match=r"state version \d+ lacks 'tolerance'"):
        FairQuantAllocator.from_state(st)
