"""Review round 3 of medquant.adaptive: each test failed before its fix."""
from __future__ import annotations

import pytest
import torch

from medquant.adaptive import AdaptiveQuantizer, CompactCNN


def _aq():
    torch.manual_seed(0)
    return AdaptiveQuantizer(CompactCNN(2, widths=(8,)).eval(), weight_config=None)


@pytest.mark.parametrize("bad", [float("inf"), float("-inf"), float("nan")])
def test_non_finite_float_levels_are_refused_as_not_integers(bad):
    # the int64 cast of inf made it level -2**63, reported as an "unknown level" the user never passed
    aq = _aq()
    x = torch.rand(2, 1, 16, 16)
    with pytest.raises(TypeError, match="levels must be integers") as err:
        aq(x, levels=torch.tensor([bad, 0.0]))
    assert str(bad) in str(err.value) and "9223372036854775808" not in str(err.value)
    with pytest.raises(TypeError, match="levels must be integers"):
        aq.levels_to_bits([0.0, bad])


def test_whole_float_levels_beyond_int64_are_reported_as_given():
    aq = _aq()
    with pytest.raises(ValueError, match=r"unknown level\(s\) \[1e\+30\]: bit_map has levels \[0, 1, 2, 3\]"):
        aq.levels_to_bits(torch.tensor([1e30, 0.0], dtype=torch.float64))
    # whole floats that are levels still map through the bit map, as ints do
    want = torch.tensor([aq.bit_map[k] for k in (3, 0, 2)], dtype=torch.int64)
    assert torch.equal(aq.levels_to_bits(torch.tensor([3.0, 0.0, 2.0])), want)
    assert torch.equal(aq.levels_to_bits([3, 0, 2]), want)


def test_calls_under_disabled_are_not_counted_at_bits_they_did_not_use():
    # stats() reports the bits actually used; a call under disabled() runs float activations but was recorded at
    # the bits its levels asked for (here 2), so a float baseline pulled the reported average down
    aq = _aq()
    ref = CompactCNN(2, widths=(8,)).eval()
    ref.load_state_dict(aq.model.state_dict())
    x = torch.rand(3, 1, 16, 16)
    with torch.no_grad():
        aq(x[:1], levels=[3])  # 32 bits
        before = aq.stats()
        with aq.disabled():
            out = aq(x, levels=[0, 0, 0])
        assert torch.equal(out, ref(x))  # float activations indeed
        assert aq.stats() == before
        assert before["histogram"] == {32: 1} and before["average_bits"] == 32.0
        aq(x[:2], levels=[0, 1])  # enabled again: counted
    st = aq.stats()
    assert st["histogram"] == {2: 1, 4: 1, 32: 1} and st["average_bits"] == (32 + 2 + 4) / 3


def test_policy_levels_refuse_images_and_metrics_together():
    from medquant.adaptive import LearnedPolicy
    from medquant.complexity import ComplexityScorer

    ims = torch.rand(8, 16, 16, generator=torch.Generator().manual_seed(2))
    scorer = ComplexityScorer()
    m = scorer.metrics(ims)
    pol = LearnedPolicy(scorer=scorer).fit(m, [2] * 4 + [8] * 4, epochs=5)
    with pytest.raises(ValueError, match="not both"):
        pol.levels(ims, metrics=m.flip(0))
    assert torch.equal(pol.levels(ims), pol.levels(metrics=m))


def test_bit_map_built_from_numpy_integers_is_accepted_as_ints():
    # dict(zip(np.arange(4), widths)) was refused with "levels must be non-negative ints ..., got np.int64(0)"
    import numpy as np

    from medquant.adaptive import LearnedPolicy

    torch.manual_seed(0)
    bm = dict(zip(np.arange(4), np.array([2, 4, 8, 32])))
    aq = AdaptiveQuantizer(CompactCNN(2, widths=(8,)).eval(), bit_map=bm, weight_config=None)
    assert aq.bit_map == {0: 2, 1: 4, 2: 8, 3: 32}
    assert all(type(k) is int and type(v) is int for k, v in aq.bit_map.items())
    assert LearnedPolicy(bit_map=bm).bit_map == {0: 2, 1: 4, 2: 8, 3: 32}
    for bad in ({0: True}, {True: 4}, {0: 9}, {-1: 4}, {0: 4.0}):
        with pytest.raises(ValueError, match="bit_map"):
            AdaptiveQuantizer(CompactCNN(2, widths=(8,)).eval(), bit_map=bad, weight_config=None)


def test_plain_argmax_that_meets_the_budget_exactly_keeps_lambda_zero():
    # labels whose average is exactly the budget: 7 x 2 + 8 x 4 + 5 x 8 = 86 bits over 20 samples = 4.3. The
    # float32 mean (4.3000002) was read as over the budget, so lambda > 0 moved a sample to fewer bits (4.1)
    from medquant.adaptive import LearnedPolicy

    labels = [2] * 7 + [4] * 8 + [8] * 5
    g = torch.Generator().manual_seed(0)
    centre = {2: 0.0, 4: 5.0, 8: 10.0}  # well separated: the MLP learns the labels exactly
    m = torch.stack([torch.full((5,), centre[b]) + 0.1 * torch.randn(5, generator=g) for b in labels]).double()
    free = LearnedPolicy().fit(m, labels, budget=None, penalty=0.0, epochs=300)
    assert free.level_bits[free.levels(metrics=m)].tolist() == [float(b) for b in labels]  # plain argmax: 4.3
    p = LearnedPolicy().fit(m, labels, budget=4.3, penalty=0.0, epochs=300)
    assert float(p.lam) == 0.0
    assert torch.equal(p.levels(metrics=m), free.levels(metrics=m))
    # a budget just below it does need lambda, and is met
    q = LearnedPolicy().fit(m, labels, budget=4.2, penalty=0.0, epochs=300)
    assert float(q.lam) > 0 and sum(q.level_bits[q.levels(metrics=m)].tolist()) / 20 <= 4.2


def test_sites_as_one_string_is_one_site_and_a_bare_pair_gets_a_hint():
    # sites="head" was read character by character ("unknown module name 'h'"); sites=("blocks.0", "output")
    # as two module names, with no word that the pair belongs inside a list
    torch.manual_seed(0)
    model = CompactCNN(2, widths=(8,)).eval()
    aq = AdaptiveQuantizer(model, sites="head", weight_config=None)
    assert aq.sites == [("head", "input")]
    x = torch.rand(2, 1, 16, 16)
    with torch.no_grad():
        e = model.embed(x)
        out = aq(x, bits=[2, 2])
    # independent reference: the head on the embedding quantized by hand (2 bits, per sample, asymmetric)
    want = []
    for row in e:
        lo, hi = min(float(row.min()), 0.0), max(float(row.max()), 0.0)
        s = (hi - lo) / 3
        z = min(max(round(-lo / s), 0), 3)
        q = torch.clamp(torch.round(row / s) + z, 0, 3)
        want.append((q - z) * s)
    with aq.disabled():
        ref = model.head(torch.stack(want))
    assert torch.allclose(out, ref, atol=1e-6, rtol=0)
    aq.remove()
    with pytest.raises(ValueError, match=r"pass sites=\[\('blocks.0', 'output'\)\]"):
        AdaptiveQuantizer(model, sites=("blocks.0", "output"), weight_config=None)


def test_a_model_declaring_one_default_site_as_a_string():
    from medquant.adaptive import default_sites

    class Net(torch.nn.Module):
        default_adaptive_sites = "body"

        def __init__(self):
            super().__init__()
            self.body = torch.nn.Linear(4, 3)

        def forward(self, x):
            return self.body(x)

    assert default_sites(Net()) == [("body", "input")]
