"""FairQuant importance split over 2 processes (gloo, CPU) equals the single-process result on the same data."""
from __future__ import annotations

import json

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file
from torch import nn

from medquant.distributed import rank, world_size
from medquant.fairquant.allocator import FairQuantAllocator
from medquant.fairquant.distributed import fit_allocator_distributed
from medquant.fairquant.importance import compute_group_importance

N_BATCHES = 8


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 32), nn.Tanh(), nn.Linear(32, 16), nn.Tanh(), nn.Linear(16, 3)).eval()


def _batches() -> list[tuple]:
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(N_BATCHES):
        x = torch.randn(12, 6, generator=g)
        y = torch.randint(0, 3, (12,), generator=g)
        grp = (torch.arange(12) % 2)[torch.randperm(12, generator=g)]
        out.append((x, y, grp))
    return out


def _allocators() -> list[FairQuantAllocator]:
    return [FairQuantAllocator(bits=(2, 4, 8), proportions=(0.3, 0.4, 0.3), max_batches=N_BATCHES, progress=False),
            FairQuantAllocator(bits=(2, 4, 8), target_bits=4.0, reducer="max", max_batches=N_BATCHES,
                               progress=False)]


def _flat(maps) -> dict[str, torch.Tensor]:
    return {f"{g}/{n}": t.contiguous() for g, m in maps.items() for n, t in m.items()}


def _worker(r: int, world: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=r, world_size=world)
    try:
        assert (rank(), world_size()) == (r, world)
        results = []
        for alloc in _allocators():
            fit_allocator_distributed(alloc, _model(), _batches())
            results.append({"bit_map": {k: list(v) for k, v in alloc.bit_map().items()},
                            "counts": alloc.importance_.counts, "batches": alloc.importance_.batches})
            save_file(_flat(alloc.importance_.maps), f"{out_dir}/maps{r}_{len(results)}.safetensors")
        local = compute_group_importance(_model(), _batches()[r::world], max_batches=None, progress=False)
        save_file(_flat(local.maps), f"{out_dir}/local{r}.safetensors")
        with open(f"{out_dir}/rank{r}.json", "w") as f:
            json.dump(results, f)
    finally:
        dist.destroy_process_group()


def test_two_gloo_processes_give_the_single_process_allocation(tmp_path):
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    for i, single in enumerate(_allocators(), start=1):
        single.fit(_model(), _batches())
        ref_maps = _flat(single.importance_.maps)
        ref_bits = {k: list(v) for k, v in single.bit_map().items()}
        assert len({b for bits in ref_bits.values() for b in bits}) > 1  # a real mixed allocation
        for r in range(2):
            res = json.loads((tmp_path / f"rank{r}.json").read_text())[i - 1]
            assert res["bit_map"] == ref_bits
            assert {int(k): v for k, v in res["counts"].items()} == single.importance_.counts
            assert res["batches"] == single.importance_.batches == N_BATCHES
            maps = load_file(str(tmp_path / f"maps{r}_{i}.safetensors"))
            assert set(maps) == set(ref_maps)
            for k in maps:  # equal up to the order of the floating-point additions
                torch.testing.assert_close(maps[k], ref_maps[k], rtol=1e-5, atol=1e-12)
    # control: one rank's half of the data alone gives different importance
    local = load_file(str(tmp_path / "local0.safetensors"))
    assert any(not torch.allclose(local[k], ref_maps[k], rtol=1e-3) for k in ref_maps)


def test_rank_env_vars_without_process_group_give_the_single_process_importance(monkeypatch):
    """torchrun-like $RANK / $WORLD_SIZE but no process group: nothing can be all-reduced, so every process must
    compute the importance of all the batches (not its share, returned as if it were global)."""
    from medquant.fairquant.distributed import distributed_group_importance

    ref = compute_group_importance(_model(), _batches(), progress=False)
    single = _allocators()[0].fit(_model(), _batches())
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert (rank(), world_size()) == (1, 2)  # the env fallback stays for work split without collectives
    got = distributed_group_importance(_model(), _batches(), progress=False)
    assert got.batches == ref.batches == N_BATCHES
    assert got.counts == ref.counts
    for g in ref.maps:
        for n in ref.maps[g]:
            torch.testing.assert_close(got.maps[g][n], ref.maps[g][n], rtol=0, atol=0)
    alloc = fit_allocator_distributed(_allocators()[0], _model(), _batches())
    assert alloc.bit_map() == single.bit_map()
    assert alloc.importance_.batches == N_BATCHES


def test_importance_of_only_empty_batches_says_no_samples():
    from medquant.fairquant.distributed import distributed_group_importance

    empty = [tuple(t[:0] for t in b) for b in _batches()[:2]]
    with pytest.raises(ValueError, match="saw no samples: its 2 batch"):
        distributed_group_importance(_model(), empty, progress=False)
