"""``medquant.distributed.clip_grad_norm_`` over DTensor gradients of every 1-D placement, against torch.

Two gloo processes (CPU). The reference is ``torch.nn.utils.clip_grad_norm_`` on the full (gathered) gradients in
one process: the total norm and the clipped gradients must be the same. Gradients:

* an FSDP2-style ``Shard(0)`` DTensor with uneven shards (3 rows over 2 ranks);
* a ``Replicate()`` DTensor (every rank holds the whole gradient: it counts once, like a plain replicated
  tensor; its squared sum was all-reduced with the shards, counted once per rank);
* a plain replicated tensor.

A ``Partial()`` DTensor gradient (a pending sum over ranks, whose norm the local values do not give) raises the
``ValueError`` on every rank, before any gradient is scaled, also when only one rank holds it.
"""
from __future__ import annotations

import datetime

import pytest
import torch
import torch.distributed as dist
from torch import nn

from medquant.distributed import clip_grad_norm_
from tests.distributed._spawn import error_message, spawn_rank_results, write_rank_results

WORLD = 2


def _full_grads() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"shard": torch.randn(3, 4, generator=g), "repl": torch.randn(5, generator=g) * 3,
            "plain": torch.randn(2, 2, generator=g)}


def _worker(r: int, init_file: str, out: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=r, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=15))
    res: dict[str, torch.Tensor] = {}
    info: dict[str, str] = {}
    try:
        mesh = init_device_mesh("cpu", (WORLD,))
        full = _full_grads()
        params = []
        for name, placement in (("shard", Shard(0)), ("repl", Replicate()), ("plain", None)):
            if placement is None:
                p = nn.Parameter(torch.zeros_like(full[name]))
                p.grad = full[name].clone()
            else:
                p = nn.Parameter(distribute_tensor(torch.zeros_like(full[name]), mesh, [placement]))
                p.grad = distribute_tensor(full[name].clone(), mesh, [placement])
            params.append(p)
        norm = {}
        info["clip"] = error_message(lambda: norm.setdefault("n", clip_grad_norm_(params, 1.0)))
        if "n" in norm:
            res["norm"] = norm["n"].reshape(1)
        for name, p in zip(("shard", "repl", "plain"), params):
            res[f"grad/{name}"] = p.grad.full_tensor() if name != "plain" else p.grad
        # a Partial gradient: refused on every rank, nothing scaled
        p = nn.Parameter(DTensor.from_local(torch.zeros(3), mesh, [Partial()], run_check=False))
        p.grad = DTensor.from_local(torch.ones(3), mesh, [Partial()], run_check=False)
        q = nn.Parameter(torch.zeros(2))
        q.grad = torch.full((2,), 10.0)
        info["partial"] = error_message(lambda: clip_grad_norm_([q, p], 1.0))
        res["partial_plain"] = q.grad
        # only rank 1 has the Partial gradient (rank 0 none): both raise, rank 0 is not left waiting
        q.grad = torch.full((2,), 10.0)
        info["partial_one"] = error_message(lambda: clip_grad_norm_([q, p] if r == 1 else [q], 1.0))
        res["partial_one_plain"] = q.grad
        t = torch.tensor([float(r + 1)])
        dist.all_reduce(t)  # the ranks are still in step
        res["after"] = t
    finally:
        write_rank_results(out, "clip", r, res, info)
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    return spawn_rank_results(_worker, tmp_path_factory.mktemp("gloo_clip"), "clip", WORLD, timeout=180)


def test_clip_grad_norm_over_shard_replicate_and_plain_equals_torch(ranks):
    full = _full_grads()
    ref = [nn.Parameter(torch.zeros_like(t)) for t in full.values()]
    for p, t in zip(ref, full.values()):
        p.grad = t.clone()
    ref_norm = torch.nn.utils.clip_grad_norm_(ref, 1.0)
    for r in range(WORLD):
        assert ranks[r][1]["clip"] == "no error"
        torch.testing.assert_close(ranks[r][0]["norm"], ref_norm.reshape(1))
        for name, p in zip(full, ref):
            torch.testing.assert_close(ranks[r][0][f"grad/{name}"], p.grad)


def test_partial_gradient_is_refused_on_every_rank(ranks):
    for r in range(WORLD):
        msg = ranks[r][1]["partial"]
        assert msg.startswith("ValueError") and "Partial" in msg, msg
        torch.testing.assert_close(ranks[r][0]["partial_plain"], torch.full((2,), 10.0))
        msg = ranks[r][1]["partial_one"]
        assert msg.startswith("ValueError") and "Partial" in msg, msg
        torch.testing.assert_close(ranks[r][0]["partial_one_plain"], torch.full((2,), 10.0))
        torch.testing.assert_close(ranks[r][0]["after"], torch.tensor([3.0]))
