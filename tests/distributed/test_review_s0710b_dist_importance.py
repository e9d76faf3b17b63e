"""``all_reduce_importance(importance)`` sums the whole importance in place, as its docstring says.

Two gloo processes (CPU), each with a hand-made :class:`GroupImportance`: rank 0 saw groups 0 and 1, rank 1
groups 1 and 2, different counts and batch numbers. The reference is the hand-computed sum over the ranks: maps
of every group (a group a rank did not see counts as zero maps there), counts per group and batches. Both the
returned object and the argument itself (the docstring: "in place") must hold it. The argument's maps were summed
in place while its counts, batches and the groups it had not seen stayed this rank's own, so a caller that kept
using its object had global maps with local counts.
"""
from __future__ import annotations

import datetime

import pytest
import torch
import torch.distributed as dist

from medquant.fairquant.distributed import all_reduce_importance
from medquant.fairquant.importance import GroupImportance
from tests.distributed._spawn import spawn_rank_results, write_rank_results

WORLD = 2
LAYERS = ["a", "b"]
SHAPES = {"a": (2, 3), "b": (4,)}
GROUPS = {0: [0, 1], 1: [1, 2]}  # the groups each rank saw
BATCHES = {0: 3, 1: 2}


def _local(r: int) -> GroupImportance:
    maps = {g: {n: torch.full(SHAPES[n], float(10 * r + g + i + 1)) for i, n in enumerate(LAYERS)}
            for g in GROUPS[r]}
    return GroupImportance(maps=maps, counts={g: 5 * r + g + 1 for g in GROUPS[r]}, metric="grape",
                           batches=BATCHES[r], layers=list(LAYERS))


def _worker(r: int, init_file: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=r, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=15))
    res: dict[str, torch.Tensor] = {}
    info: dict = {}
    try:
        imp = _local(r)
        total = all_reduce_importance(imp)
        for tag, obj in (("arg", imp), ("ret", total)):
            info[tag] = {"counts": {str(g): c for g, c in obj.counts.items()}, "batches": obj.batches,
                         "groups": sorted(obj.maps)}
            res.update({f"{tag}/{g}/{n}": t.clone() for g, m in obj.maps.items() for n, t in m.items()})
    finally:
        write_rank_results(out, "imp", r, res, info)
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    return spawn_rank_results(_worker, tmp_path_factory.mktemp("gloo_importance"), "imp", WORLD, timeout=180)


@pytest.mark.parametrize("tag", ["ret", "arg"])
def test_all_reduce_importance_sums_maps_counts_and_batches(ranks, tag):
    locals_ = [_local(r) for r in range(WORLD)]
    groups = sorted({g for imp in locals_ for g in imp.maps})
    counts = {str(g): sum(imp.counts.get(g, 0) for imp in locals_) for g in groups}
    batches = sum(imp.batches for imp in locals_)
    for r in range(WORLD):
        tensors, info = ranks[r]
        assert info[tag] == {"counts": counts, "batches": batches, "groups": groups}
        for g in groups:
            for n in LAYERS:
                want = sum((imp.maps[g][n] for imp in locals_ if g in imp.maps), torch.zeros(SHAPES[n]))
                torch.testing.assert_close(tensors[f"{tag}/{g}/{n}"], want)
