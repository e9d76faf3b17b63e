"""Review tests of FairQuantAllocator, its allocation rules and batch reading (edge cases a user meets)."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from torch import nn

from medquant import FairQuantAllocator
from medquant.fairquant.allocation_rules import allocate_to_budget, bit_map_average_bits, check_palette
from medquant.fairquant.batches import batch_losses, check_groups

from .fq_helpers import grouped_batches, tiny_mlp


def _deep_mlp() -> nn.Sequential:
    """Linear layers named "0", "2", ..., "10" (ReLUs in between)."""
    torch.manual_seed(0)
    mods: list[nn.Module] = []
    for i in range(6):
        mods.append(nn.Linear(6, 6 if i < 5 else 3))
        if i < 5:
            mods.append(nn.ReLU())
    return nn.Sequential(*mods).eval()


def test_a_single_string_of_layer_patterns_is_refused_not_split_into_characters():
    # skip="10" used to become the patterns ["1", "0"]: layer "0" was skipped and layer "10" allocated
    model = _deep_mlp()
    with pytest.raises(TypeError, match="list of patterns"):
        FairQuantAllocator(skip="10", progress=False).fit(model, grouped_batches())
    with pytest.raises(TypeError, match="list of patterns"):
        FairQuantAllocator(layers="10", progress=False)
    a = FairQuantAllocator(skip=["10"], progress=False).fit(model, grouped_batches())
    assert list(a.bit_map()) == ["0", "2", "4", "6", "8"]


@pytest.mark.parametrize("groups", ["01", ["0", "1"], [np.bool_(False), np.bool_(True)],
                                    [torch.tensor(False), torch.tensor(True)]])
def test_declared_groups_that_are_strings_or_bools_are_refused(groups):
    # the calibration data refuses string and bool ids (check_groups); the declared groups must too
    with pytest.raises(TypeError, match="integer group ids"):
        FairQuantAllocator(groups=groups)


def test_declared_integer_groups_still_accepted():
    assert FairQuantAllocator(groups=[np.int64(0), 1, 2.0, torch.tensor(3)]).groups == (0, 1, 2, 3)


@pytest.mark.parametrize("ids", [[], torch.tensor([]), np.array([])])
def test_empty_batch_group_ids_are_accepted(ids):
    # an empty list / tensor has torch's default float dtype but holds no non-integer id
    out = check_groups(ids, 0)
    assert out.dtype == torch.int64 and out.numel() == 0
    with pytest.raises(TypeError, match="integer"):
        check_groups(torch.tensor([0.0, 1.0]), 2)


def test_fit_skips_an_empty_batch_like_an_absent_one():
    batches = grouped_batches()
    empty = (torch.randn(0, 6), torch.zeros(0, dtype=torch.long), [])
    losses, groups = batch_losses(tiny_mlp(), empty, None, None)
    assert losses.shape == (0,) and groups.shape == (0,)
    ref = FairQuantAllocator(progress=False).fit(tiny_mlp(), batches)
    got = FairQuantAllocator(progress=False).fit(tiny_mlp(), [batches[0], empty, *batches[1:]])
    assert got.bit_map() == ref.bit_map()
    for g in ref.importance_.maps:
        for k, v in ref.importance_.maps[g].items():
            torch.testing.assert_close(got.importance_.maps[g][k], v)


@pytest.mark.parametrize("bad", [(2, float("inf")), (float("nan"), 4), (True, 4)])
def test_non_finite_or_bool_palette_bits_give_the_palette_error(bad):
    with pytest.raises(ValueError, match="integers in 1..8"):
        check_palette(bad)


def test_budget_greedy_claims_hold_against_brute_force():
    # hand-held references: the parameter-weighted average, the within-one-step-of-budget claim, monotonicity in
    # score for equal-size scopes, and (not claimed optimal) never above the budget; compare with enumeration
    scores = {"a": torch.tensor([0.1, 3.0, 0.0]), "b": torch.tensor([2.0, 2.0]), "c": torch.tensor([5.0])}
    sizes = {"a": 4, "b": 9, "c": 2}
    pal = (2, 4, 8)
    flat = [(k, j) for k in scores for j in range(len(scores[k]))]
    total = sum(sizes[k] for k, _ in flat)
    for target in (2.0, 3.0, 4.0, 5.5, 8.0):
        got = allocate_to_budget(scores, sizes, pal, target, tolerance=10)
        used = sum(b * sizes[k] for k, v in got.items() for b in v)
        assert used <= target * total + 1e-9
        assert bit_map_average_bits(got, sizes) == pytest.approx(used / total)
        step = max((pal[i + 1] - pal[i]) * sizes[k] for k, _ in flat for i in range(len(pal) - 1))
        assert target * total - used < step
        best = min(sum(float(scores[k][j]) * sizes[k] * 4.0 ** -b for (k, j), b in zip(flat, combo))
                   for combo in itertools.product(pal, repeat=len(flat))
                   if sum(sizes[k] * b for (k, _), b in zip(flat, combo)) <= target * total + 1e-9)
        mine = sum(float(scores[k][j]) * sizes[k] * 4.0 ** -got[k][j] for k, j in flat)
        assert mine >= best - 1e-12  # the optimum is a lower bound
        assert got["b"][0] == got["b"][1] or got["b"][0] > got["b"][1]  # tie: lower index first


def test_multilabel_loss_keeps_the_logits_precision_with_half_precision_targets():
    # 0/1 labels stored as float16 (exact) used to make the per-sample BCE float16
    from medquant.fairquant.batches import per_sample_loss

    torch.manual_seed(0)
    logits = torch.randn(5, 4, dtype=torch.float64).float()
    y = torch.randint(0, 2, (5, 4)).float()
    x, t = logits.double(), y.double()
    ref = (torch.clamp(x, min=0) - x * t + torch.log1p(torch.exp(-x.abs()))).mean(1)  # BCE-with-logits by hand
    got = per_sample_loss(logits, y.half())
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(per_sample_loss(logits, y).double(), ref, rtol=1e-6, atol=1e-6)
