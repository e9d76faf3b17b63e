"""``distributed_group_importance(..., min_groups=1)``: compute_group_importance's ``min_groups`` over all ranks.

``**kwargs`` go to :func:`medquant.fairquant.importance.compute_group_importance`, whose ``min_groups=1`` accepts
calibration data of a single group. ``distributed_group_importance`` passed ``min_groups=1`` itself (for a rank's
share) besides the caller's, so the call failed with ``TypeError: ... got multiple values for keyword argument
'min_groups'`` on every rank, and the global check always demanded two groups. Two gloo processes (CPU), data of
one group: with ``min_groups=1`` the result equals the single-process ``compute_group_importance(...,
min_groups=1)`` of all the batches; the default (2) still refuses a single group on every rank, and an invalid
value is refused as one process refuses it.
"""
from __future__ import annotations

import datetime

import pytest
import torch
import torch.distributed as dist
from torch import nn

from medquant.fairquant.distributed import distributed_group_importance
from medquant.fairquant.importance import compute_group_importance
from tests.distributed._spawn import error_message, spawn_rank_results, write_rank_results

WORLD = 2
N_BATCHES = 4


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).eval()


def _batches() -> list[tuple]:
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(5, 6, generator=g), torch.randint(0, 3, (5,), generator=g), torch.full((5,), 7))
            for _ in range(N_BATCHES)]


def _worker(r: int, init_file: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=r, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=15))
    res: dict[str, torch.Tensor] = {}
    info: dict = {}
    try:
        got = {}
        info["one"] = error_message(lambda: got.setdefault("imp", distributed_group_importance(
            _model(), _batches(), min_groups=1, progress=False)))
        if "imp" in got:
            imp = got["imp"]
            info["counts"], info["batches"] = {str(g): c for g, c in imp.counts.items()}, imp.batches
            res.update({f"{g}/{n}": t.clone() for g, m in imp.maps.items() for n, t in m.items()})
        info["default"] = error_message(lambda: distributed_group_importance(_model(), _batches(), progress=False))
        info["bad"] = error_message(lambda: distributed_group_importance(_model(), _batches(), min_groups=3,
                                                                         progress=False))
        t = torch.tensor([float(r + 1)])
        dist.all_reduce(t)  # the ranks are still in step
        res["after"] = t
    finally:
        write_rank_results(out, "mg", r, res, info)
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    return spawn_rank_results(_worker, tmp_path_factory.mktemp("gloo_min_groups"), "mg", WORLD, timeout=180)


def test_min_groups_1_over_ranks_equals_one_process(ranks):
    ref = compute_group_importance(_model(), _batches(), min_groups=1, progress=False)
    for r in range(WORLD):
        tensors, info = ranks[r]
        assert info["one"] == "no error"
        assert info["counts"] == {str(g): c for g, c in ref.counts.items()}
        assert info["batches"] == ref.batches == N_BATCHES
        for g, m in ref.maps.items():
            for n, t in m.items():
                torch.testing.assert_close(tensors[f"{g}/{n}"], t, rtol=1e-5, atol=1e-12)


def test_default_min_groups_still_refuses_one_group_and_bad_values_are_refused(ranks):
    with pytest.raises(ValueError) as single:
        compute_group_importance(_model(), _batches(), min_groups=3, progress=False)
    for r in range(WORLD):
        info = ranks[r][1]
        assert info["default"].startswith("ValueError") and "single group" in info["default"]
        assert info["bad"] == f"ValueError: {single.value}"
        torch.testing.assert_close(ranks[r][0]["after"], torch.tensor([3.0]))
