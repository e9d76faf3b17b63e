"""Review 3 of FairQuantAllocator: settings refused early and clearly; the budget compared without float slack."""
from __future__ import annotations

from decimal import Decimal
from fractions import Fraction

import numpy as np
import pytest
import torch

from medquant import FairQuantAllocator
from medquant.fairquant.allocation_rules import allocate_to_budget, bit_map_average_bits

from .fq_helpers import grouped_batches, tiny_mlp


@pytest.mark.parametrize("bad", [True, False, 2.5, 2.0, "3"])
def test_max_batches_that_is_not_an_integer_is_refused(bad):
    # True used to calibrate on one batch silently; 2.5 / 2.0 / "3" failed at fit time inside itertools.islice or
    # with a comparison error
    with pytest.raises(TypeError, match="max_batches must be a positive integer or None"):
        FairQuantAllocator(max_batches=bad)


@pytest.mark.parametrize("bad", [0, -1])
def test_max_batches_below_one_is_refused_when_built(bad):
    with pytest.raises(ValueError, match="max_batches must be >= 1 or None"):
        FairQuantAllocator(max_batches=bad)


def test_integer_max_batches_still_take_that_many_batches():
    batches = grouped_batches(n_batches=3)
    for mb, want in ((2, 2), (np.int64(1), 1), (None, 3)):
        a = FairQuantAllocator(max_batches=mb, progress=False).fit(tiny_mlp(), batches)
        assert a.importance_.batches == want
        assert FairQuantAllocator.from_state(a.state()).max_batches == mb


def test_a_budget_met_exactly_by_a_large_scope_is_not_refused_by_float_rounding():
    # 100M weights at target 2.3: the exact budget is 2.3 * 1e8 = 230_000_000 weight-bits, and raising scope "a"
    # (5M weights) from 2 to 8 bits uses exactly that: 2 * 95e6 + 8 * 5e6 = 2.3e8 (hand count). The float product
    # 2.3 * 1e8 is 229999999.99999997, and the upgrade used to be refused against it with an absolute 1e-9 slack,
    # leaving 2.0 average bits and a ValueError (2.0 is 0.3 from the target).
    scores = {"a": torch.tensor([1.0]), "b": torch.tensor([0.5])}
    sizes = {"a": 5_000_000, "b": 95_000_000}
    got = allocate_to_budget(scores, sizes, (2, 8), 2.3)
    assert got == {"a": (8,), "b": (2,)}
    used = 8 * 5_000_000 + 2 * 95_000_000
    assert Fraction(used, 100_000_000) == Fraction(Decimal("2.3"))  # exactly the budget, not over it
    assert bit_map_average_bits(got, sizes) == 2.3
    # one weight more and the same upgrade would exceed the budget: still refused
    over = allocate_to_budget(scores, {"a": 5_000_001, "b": 94_999_999}, (2, 8), 2.3, tolerance=1.0)
    assert over == {"a": (2,), "b": (2,)}
    # and the small-total behaviour is unchanged (test_allocation covers it): at or under the budget
    small = allocate_to_budget({"a": torch.tensor([3.0, 1.0])}, {"a": 5}, (2, 4, 8), 3.0)
    assert small == {"a": (4, 2)}


def _documented_projection(cont, sizes, b_min, limit):
    """The rule as the BAQ docstring states it: while the average exceeds ``limit``, the scope with the lowest
    continuous bits among those above ``b_min`` (ties by layer name, then index) loses one bit."""
    bits = {n: [round(float(x)) for x in c] for n, c in cont.items()}
    total = sum(len(b) * sizes[n] for n, b in bits.items())
    while sum(sum(b) * sizes[n] for n, b in bits.items()) / total > limit:
        _, n, i = min((float(cont[n][i]), n, i) for n in bits for i in range(len(bits[n])) if bits[n][i] > b_min)
        bits[n][i] -= 1
    return {n: tuple(b) for n, b in bits.items()}


def test_baq_projection_lowers_the_lowest_continuous_bits_first_as_documented():
    # fc1: 8 scopes of 6 weights at 4 bits, fc2: 3 scopes of 8 weights at 6 bits: 336 / 72 = 4.67 bits. The
    # limit 2.0 + 1.5 allows 252 weight-bits, so 84 must go: by the documented rule all from fc1 (the lowest
    # continuous bits), 7 scopes x 2 bits x 6 weights, fc2 untouched (hand count). The code used to sweep every
    # scope once per round, lowering fc2 (6 bits) before fc1 reached b_min: fc1 (2, 2, 3, ...), fc2 (5, 5, 5).
    from medquant.fairquant import BAQWrapper

    w = BAQWrapper(tiny_mlp(), lambda_bit=0.0, target_bits=2.0, init_bits={"fc1": (4,) * 8, "fc2": (6,) * 3})
    assert w.bits(project=False) == {"fc1": (4,) * 8, "fc2": (6,) * 3}
    got = w.bits(tolerance=1.5)
    assert got == {"fc1": (2,) * 7 + (4,), "fc2": (6,) * 3}
    assert got == _documented_projection(w.continuous_bits(), w.sizes, 2, 3.5)
    # distinct continuous bits, a tight budget: the same as the documented rule, and at or under the limit
    torch.manual_seed(0)
    init = {"fc1": tuple(int(b) for b in torch.randint(3, 9, (8,))), "fc2": (8, 5, 7)}
    w = BAQWrapper(tiny_mlp(), lambda_bit=0.0, target_bits=3.0, init_bits=init)
    got = w.bits()
    assert got == _documented_projection(w.continuous_bits(), w.sizes, 2, 3.1)
    assert w.average_bits() <= 3.1
