"""Learned policy: labels by hand, per-sample losses vs a manual loop, budget, errors."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from medquant.adaptive import AdaptiveQuantizer, CompactCNN, LearnedPolicy, per_sample_losses, policy_labels
from tests.adaptive.test_adaptive_fakequant import independent_fq


def test_policy_labels_by_hand():
    # 4 samples; losses at 2 / 4 / 8 / 32 bits and at full precision
    fp = torch.tensor([0.50, 0.20, 1.00, 0.30])
    losses = {
        2: torch.tensor([0.505, 0.40, 1.50, 0.29]),
        4: torch.tensor([0.50, 0.25, 1.20, 0.31]),
        8: torch.tensor([0.50, 0.205, 1.04, 0.30]),
        32: torch.tensor([0.50, 0.20, 1.00, 0.30]),
    }
    # epsilon 0.01: s0 ok at 2 (0.505 <= 0.51); s1 first ok at 8 (0.205); s2 only 32; s3 ok at 2 (lower loss)
    assert policy_labels(losses, fp, 0.01).tolist() == [2, 8, 32, 2]
    # epsilon 0.05: s1 ok at 4 (0.25 <= 0.25), s2 ok at 8 (1.04)
    assert policy_labels(losses, fp, 0.05).tolist() == [2, 4, 8, 2]
    # no width qualifies (no float entry in the dict): the highest width
    assert policy_labels({2: torch.tensor([9.0]), 4: torch.tensor([8.0])}, torch.tensor([1.0]), 0.0).tolist() == [4]
    with pytest.raises(ValueError, match="epsilon"):
        policy_labels(losses, fp, -1.0)
    with pytest.raises(ValueError, match="shape"):
        policy_labels({2: torch.zeros(3)}, fp, 0.1)
    with pytest.raises(ValueError, match="NaN"):
        policy_labels({2: torch.tensor([float("nan")] * 4)}, fp, 0.1)


def test_policy_labels_take_numpy_scalar_epsilon():
    """An epsilon computed from float32 numpy losses (np.float32) was refused as "not a non-negative number"."""
    fp = torch.tensor([0.50, 0.20, 1.00, 0.30])
    losses = {2: torch.tensor([0.505, 0.40, 1.50, 0.29]), 4: torch.tensor([0.50, 0.25, 1.20, 0.31]),
              8: torch.tensor([0.50, 0.205, 1.04, 0.30]), 32: fp.clone()}
    eps = np.float32(0.05)  # a float32 numpy scalar
    assert policy_labels(losses, fp, eps).tolist() == [2, 4, 8, 2]  # by hand, as in the test above
    with pytest.raises(ValueError, match="epsilon"):
        policy_labels(losses, fp, np.float32(-0.1))

def test_per_sample_losses_match_a_manual_loop():
    torch.manual_seed(0)
    model = CompactCNN(2, in_channels=1, widths=(8, 8), hidden=8).eval()
    aq = AdaptiveQuantizer(model, weight_config=None).eval()
    x = torch.randn(5, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    y = torch.tensor([[1.0, 0], [0, 1], [1, 1], [0, 0], [1, 0]])

    def lossf(logits, t):
        return torch.nn.functional.binary_cross_entropy_with_logits(logits, t, reduction="none")

    with torch.no_grad():
        aq(x[:2], levels=[0, 1])  # existing stats must survive
    losses, fp = per_sample_losses(aq, x, y, lossf, bits_list=[2, 4], batch_size=2)
    assert aq.stats()["samples"] == 2
    with torch.no_grad(), aq.disabled():
        e = model.embed(x)
        want_fp = lossf(model.head(e), y).sum(1)
        assert torch.allclose(fp, want_fp.double(), atol=1e-6)
        for b in (2, 4):
            q = torch.stack([independent_fq(e[i], b) for i in range(5)])
            assert torch.allclose(losses[b], lossf(model.head(q), y).sum(1).double(), atol=1e-6)


def test_learned_policy_learns_and_respects_budget():
    rng = np.random.default_rng(0)
    m = rng.normal(size=(120, 5)).astype(np.float32)
    # label rule the policy can learn: feature 0 decides the width
    labels = np.where(m[:, 0] < -0.5, 2, np.where(m[:, 0] < 0.3, 8, 32))
    pol = LearnedPolicy(hidden=16).fit(m, labels, epochs=200)
    pred_bits = np.array([{0: 2, 1: 4, 2: 8, 3: 32}[v] for v in pol.levels(metrics=m).tolist()])
    assert (pred_bits == labels).mean() > 0.9
    unconstrained = pred_bits.mean()
    budget = 8.0
    assert unconstrained > budget  # so the budget binds
    pol_b = LearnedPolicy(hidden=16).fit(m, labels, budget=budget, epochs=200)
    bits_b = np.array([{0: 2, 1: 4, 2: 8, 3: 32}[v] for v in pol_b.levels(metrics=m).tolist()])
    assert bits_b.mean() <= budget + 1e-9
    assert float(pol_b.lam) > 0
    # the budget is spent on the samples the labels say need bits: their mean bits exceed the others'
    assert bits_b[labels == 32].mean() > bits_b[labels == 2].mean()


def test_learned_policy_errors():
    m = np.zeros((4, 5), dtype=np.float32)
    with pytest.raises(ValueError, match="impossible"):
        LearnedPolicy().fit(m, [2, 4, 8, 32], budget=1.0)
    with pytest.raises(ValueError, match="not in the bit map"):
        LearnedPolicy().fit(m, [2, 4, 8, 6])
    with pytest.raises(ValueError, match="need metrics \\(N, 5\\)"):
        LearnedPolicy().fit(np.zeros((4, 3)), [2, 4, 8, 32])
    with pytest.raises(RuntimeError, match="not fitted"):
        LearnedPolicy().levels(metrics=m)


def test_learned_policy_refuses_fractional_label_widths():
    """Fractional labels were cast to int64: 4.5 and 4.9 silently trained as 4 bits."""
    rng = np.random.default_rng(0)
    m = rng.normal(size=(8, 5)).astype(np.float32)
    pol = LearnedPolicy()
    with pytest.raises(ValueError, match=r"whole numbers.*\[2, 4, 8, 32\]; got \[4.5, 4.9\]"):
        pol.fit(m, [2, 4.5, 8, 32, 4.9, 2, 8, 32], epochs=2)
    with pytest.raises(ValueError, match=r"whole numbers.*got \[4.5\]"):
        pol.fit(m, np.array([2, 4.5, 8, 32, 4, 2, 8, 32], dtype=np.float32), epochs=2)
    with pytest.raises(ValueError, match="whole numbers"):
        pol.fit(m, torch.tensor([2, float("nan"), 8, 32, 4, 2, 8, 32]), epochs=2)
    with pytest.raises(ValueError, match="whole numbers"):  # not rounded through float32 first
        pol.fit(m, [2, 4.0000001, 8, 32, 4, 2, 8, 32], epochs=2)
    assert not bool(pol.fitted)
    # whole-valued floats are widths of the bit map: the same policy as int labels
    ints = [2, 4, 8, 32, 4, 2, 8, 32]
    a = LearnedPolicy().fit(m, ints, epochs=20)
    b = LearnedPolicy().fit(m, np.array(ints, dtype=np.float64), epochs=20)
    assert torch.equal(a.levels(metrics=m), b.levels(metrics=m))


class _MetricsAreInputs:
    """A stand-in complexity scorer: the 5 metrics of a sample are its 5 input features."""

    def metrics(self, x):
        return x


def test_policy_with_non_contiguous_levels_drives_the_quantizer():
    """A LearnedPolicy returns the keys of its bit map (here 0 and 5), not 0..n-1: the quantizer built with the
    same bit map accepts it and quantizes each sample at the bits of the level the policy chose."""
    bm = {0: 2, 5: 8}
    g = torch.Generator().manual_seed(0)
    metrics = torch.randn(40, 5, generator=g)
    labels = torch.where(metrics[:, 0] > 0, 8, 2)
    pol = LearnedPolicy(bit_map=bm, scorer=_MetricsAreInputs()).fit(metrics, labels, epochs=30)
    x = torch.randn(6, 5, generator=g)
    lv = pol.levels(metrics=x)
    assert set(lv.tolist()) <= {0, 5}
    torch.manual_seed(1)
    model = torch.nn.Sequential()
    model.head = torch.nn.Linear(5, 2)
    head = copy.deepcopy(model.head)
    aq = AdaptiveQuantizer(model, bit_map=bm, scorer=pol, weight_config=None)
    out = aq(x)  # levels from the policy (scorer) on the input
    ref = head(torch.stack([independent_fq(x[i], bm[int(lv[i])]) for i in range(6)]))
    assert torch.equal(out, ref)
    # a quantizer whose bit map lacks a level the policy returns is still refused, naming it
    with pytest.raises(ValueError, match=r"missing \[5\]"):
        AdaptiveQuantizer(torch.nn.Sequential(torch.nn.Linear(5, 2)), bit_map={0: 2, 1: 8}, scorer=pol,
                          sites=["0"], weight_config=None)


def test_policy_labels_loss_vectors_of_different_lengths_raise_value_error():
    """Loss vectors whose lengths differ from each other (one of them the right one) reached torch.stack and
    raised its RuntimeError, not the documented ValueError naming the expected shape."""
    fp = torch.zeros(4)
    with pytest.raises(ValueError, match=r"shape of full_precision_loss \(4,\)"):
        policy_labels({2: torch.zeros(3), 4: torch.zeros(4)}, fp, 0.1)


def test_failed_refit_on_nan_metrics_leaves_the_fitted_policy_unchanged():
    """A refit on metrics with a NaN raised, but only after storing the NaN mean: the policy stayed
    ``fitted`` and then standardised every input to NaN."""
    g = torch.Generator().manual_seed(0)
    m = torch.randn(20, 5, generator=g)
    labels = torch.tensor([2, 8] * 10)
    pol = LearnedPolicy(bit_map={0: 2, 1: 8}).fit(m, labels, epochs=5)
    before = pol.levels(metrics=m)
    bad = m.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        pol.fit(bad, labels, epochs=5)
    # the stored standardisation is still the plain-torch mean / std of the first fit set
    assert torch.equal(pol.mean, m.mean(0))
    assert torch.equal(pol.std, m.std(0).clamp_min(1e-6))
    assert torch.equal(pol.levels(metrics=m), before)


def test_policy_inside_a_quantizer_cast_to_half_precision_keeps_deciding_in_float32():
    """``aq.half()`` / ``aq.to(torch.bfloat16)`` also cast the policy (a submodule of the quantizer): its MLP got
    half-precision weights, ``levels`` fed it float32 features and raised torch's "mat1 and mat2 must have the same
    dtype" (and the stored mean / std / lambda were rounded, moving the decisions off the calibrated budget)."""
    g = torch.Generator().manual_seed(0)
    metrics = torch.randn(60, 5, generator=g) * 3 + 1.7
    labels = torch.tensor([2, 4, 8, 32])[torch.bucketize(metrics[:, 0].contiguous(), torch.tensor([-1.0, 1.7, 4.0]))]
    pol = LearnedPolicy(scorer=_MetricsAreInputs()).fit(metrics, labels, budget=8.0, epochs=40)
    state = {k: v.clone() for k, v in pol.state_dict().items()}
    model = torch.nn.Sequential()
    model.head = torch.nn.Linear(5, 2)
    aq = AdaptiveQuantizer(model, scorer=pol, weight_config=None)
    x = torch.randn(16, 5, generator=g) * 3 + 1.7
    for dtype in (torch.bfloat16, torch.float16):
        aq.to(dtype)
        assert model.head.weight.dtype == dtype  # the model is cast ...
        xd = x.to(dtype)
        with torch.no_grad():
            out = aq(xd)  # levels from the policy on the (half-precision) input
        assert out.dtype == dtype
        for k, v in pol.state_dict().items():  # ... the policy keeps its float32 values, unrounded
            assert v.dtype == state[k].dtype and torch.equal(v, state[k]), k
        # the decisions are those of the float32 policy on the same metric values, by the documented rule
        feats = (xd.float() - state["mean"]) / state["std"]
        h = torch.relu(feats @ state["net.0.weight"].t() + state["net.0.bias"])
        logits = h @ state["net.2.weight"].t() + state["net.2.bias"]
        want = (logits - state["lam"] * state["level_bits"] / state["level_bits"].max()).argmax(-1)
        assert torch.equal(pol.levels(metrics=xd), want)
        assert aq.stats()["samples"] == 16
        aq.reset_stats()


def test_policy_state_loads_only_into_a_policy_with_the_same_bit_map():
    """The state of a policy fitted on ``{..., 3: 16}`` loaded silently into ``LearnedPolicy()`` (``{..., 3: 32}``):
    its ``level_bits`` said 16 while its bit map said 32, so the budget it was calibrated for no longer held."""
    g = torch.Generator().manual_seed(0)
    metrics = torch.randn(40, 5, generator=g)
    bm = {0: 2, 1: 4, 2: 8, 3: 16}
    pol = LearnedPolicy(bit_map=bm).fit(metrics, [2, 4, 8, 16] * 10, budget=6.0, epochs=20)
    other = LearnedPolicy()  # the default bit map: 32 bits at level 3
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(ValueError, match=r"bit map.*\[2, 4, 8, 16\].*\[2, 4, 8, 32\]"):
        other.load_state_dict(pol.state_dict())
    assert all(torch.equal(v, before[k]) for k, v in other.state_dict().items())  # left as it was
    same = LearnedPolicy(bit_map=bm)
    same.load_state_dict(pol.state_dict())  # the round trip with the same bit map
    assert torch.equal(same.levels(metrics=metrics), pol.levels(metrics=metrics))
