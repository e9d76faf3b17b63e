"""Fifth review of the adaptive package: the one-thread section of ``LearnedPolicy.fit`` under concurrent fits, and
``AdaptiveQuantizer.stats()`` for calls that quantize no activation.

References: ``torch.get_num_threads()`` before the fits (in the threads themselves and in a thread started after
them), and histograms counted by hand.
"""
from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
from torch import nn

from medquant.adaptive import AdaptiveQuantizer, LearnedPolicy


# --------------------------------------------------------------------------- LearnedPolicy.fit: thread count
def _count_in_new_thread() -> int:
    """The intra-op thread count a thread started now gets (OpenMP builds: the count last set by any thread)."""
    got: list[int] = []
    t = threading.Thread(target=lambda: got.append(torch.get_num_threads()))
    t.start()
    t.join()
    return got[0]


def test_concurrent_fits_leave_the_thread_count_as_it_was(monkeypatch):
    """Thread A fits (sets 1 thread); thread B starts a fit while A is inside (B first runs torch code then, so torch
    gives it the 1 A set); A leaves first and restores; B leaves last. B used to restore the 1 it had read, leaving
    its own thread, and every thread started afterwards, at one intra-op thread. A single restore by the last leaver
    (a depth counter) would leave A's thread at 1 instead (the count is per thread under OpenMP). Reference: the
    count set before the fits, in A, in B, here and in a thread started afterwards."""
    original = torch.get_num_threads()
    n = 3 if original != 3 else 2  # a count other than 1, set here (also on a one-core machine)
    torch.set_num_threads(n)
    a_inside, b_inside, a_done = threading.Event(), threading.Event(), threading.Event()
    inside_counts: dict[str, int] = {}
    after: dict[str, int] = {}
    errors: list[BaseException] = []

    def fake_train(self, *args, **kwargs):  # the training itself is beside the point: hold the section open
        name = threading.current_thread().name
        inside_counts[name] = torch.get_num_threads()
        if name == "A":
            a_inside.set()
            b_inside.wait(timeout=0.5)  # B enters meanwhile (old code); with the fix it waits for A to leave
        else:
            b_inside.set()
            a_done.wait(timeout=5)  # leave after A (old code); with the fix A left before B entered

    monkeypatch.setattr(LearnedPolicy, "_train", fake_train)
    rng = np.random.default_rng(0)
    metrics, labels = rng.random((8, 5)), [2, 4, 8, 32] * 2

    def run(name: str) -> None:
        try:
            if name == "B":
                assert a_inside.wait(timeout=5)
            LearnedPolicy().fit(metrics, labels, epochs=1)
            after[name] = torch.get_num_threads()
        except BaseException as e:  # noqa: BLE001  (reported below)
            errors.append(e)
        finally:
            if name == "A":
                a_done.set()

    try:
        threads = [threading.Thread(target=run, args=(k,), name=k) for k in "AB"]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=30)
        assert not errors, errors
        assert inside_counts == {"A": 1, "B": 1}  # one thread inside the fit
        assert after == {"A": n, "B": n}
        assert torch.get_num_threads() == n
        assert _count_in_new_thread() == n
    finally:
        torch.set_num_threads(original)


def test_nested_one_thread_sections_in_one_thread_restore_the_outer_count():
    from medquant.adaptive import policy

    original = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with policy._one_thread():
            with policy._one_thread():  # re-entrant: no deadlock
                assert torch.get_num_threads() == 1
            assert torch.get_num_threads() == 1
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(original)


# --------------------------------------------------------------------------- AdaptiveQuantizer.stats()
class _EarlyExit(nn.Module):
    """Returns before its one quantized site (the input of ``head``) when ``skip``; raises before it when
    ``fail``."""

    def __init__(self) -> None:
        super().__init__()
        self.body, self.head = nn.Linear(4, 4), nn.Linear(4, 2)

    def forward(self, x: torch.Tensor, skip: bool = False, fail: bool = False) -> torch.Tensor:
        if fail:
            raise RuntimeError("bad input")
        if skip:
            return torch.zeros(x.shape[0], 2)
        return self.head(self.body(x))


def test_calls_that_reach_no_quantized_site_are_not_counted():
    """``stats()`` reports the activation bits actually used: a call that returned before any quantized site ran
    used none, and used to be counted with its samples' bits. Reference: the histogram counted by hand from the
    calls that ran ``head``."""
    torch.manual_seed(0)
    aq = AdaptiveQuantizer(_EarlyExit(), bit_map={0: 2, 1: 4, 2: 8}, weight_config=None).eval()
    assert aq.sites == [("head", "input")]
    x = torch.randn(3, 4)
    with torch.no_grad():
        aq(x, levels=torch.tensor([0, 1, 1]))                  # runs head: 2, 4, 4
        out = aq(x, levels=torch.tensor([2, 2, 2]), skip=True)  # returns early: nothing quantized
        assert torch.equal(out, torch.zeros(3, 2))
        with pytest.raises(RuntimeError, match="bad input"):   # raises before the site
            aq(x, levels=torch.tensor([2, 2, 2]), fail=True)
        aq(x[:2], bits=torch.tensor([8, 32]))                  # runs head: 8, 32 (float row, nominal 32)
    st = aq.stats()
    assert st["histogram"] == {2: 1, 4: 2, 8: 1, 32: 1}
    assert st["samples"] == 5
    assert st["average_bits"] == pytest.approx((2 + 4 + 4 + 8 + 32) / 5)
    assert st["per_level"] == {0: {"samples": 1, "average_bits": 2.0}, 1: {"samples": 2, "average_bits": 4.0}}


def test_a_quantizer_called_inside_another_counts_its_own_sites_only():
    """An outer quantizer's model calls an inner quantizer, then returns before the outer's own site: the inner
    call counts (its site ran), the outer call does not (none of its sites ran). Reference: counted by hand."""
    torch.manual_seed(0)
    inner = AdaptiveQuantizer(_EarlyExit(), bit_map={0: 2, 1: 4}, weight_config=None).eval()

    class Outer(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.head = nn.Linear(2, 2)

        def forward(self, x, skip=False):
            h = inner(x, levels=torch.zeros(x.shape[0], dtype=torch.int64))  # head of inner at 2 bits
            return h if skip else self.head(h)

    outer = AdaptiveQuantizer(Outer(), bit_map={0: 2, 1: 4}, weight_config=None).eval()
    assert outer.sites == [("head", "input")]
    with torch.no_grad():
        outer(torch.randn(3, 4), levels=torch.tensor([1, 1, 1]), skip=True)  # outer: nothing; inner: 3 x 2 bits
        outer(torch.randn(2, 4), levels=torch.tensor([1, 0]))               # outer: 4, 2; inner: 2 x 2 bits
    assert inner.stats()["histogram"] == {2: 5}
    assert outer.stats()["histogram"] == {2: 1, 4: 1}
