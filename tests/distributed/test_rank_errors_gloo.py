"""Bad input on one rank only: every rank takes part in the same collectives and raises, no rank is left waiting.

Two gloo processes (CPU), rank 1 with the bad input, rank 0 with good input:

* :func:`medquant.distributed.clip_grad_norm_` where rank 1 has no gradient (no parameter of its own): both ranks
  take part in the reduction of the sharded squared sums and return the same norm, which clips rank 0's shard;
* :func:`medquant.distributed.fsdp_shard` of a model rank 1 already sharded: a ``ValueError`` on both ranks,
  naming rank 1 (rank 0 used to wait in the broadcast of the parameters);
* :func:`medquant.distributed.load_full_state` into a skeleton of rank 1 that lacks a tensor: a ``ValueError`` on
  both ranks naming rank 1 (rank 0 used to wait in the gathering of the next tensor);
* :func:`medquant.distributed.all_reduce_gradients` of parameter lists that differ between the ranks (rank 1 has an
  extra parameter; the same shapes in another order, the same total size; another dtype): the same ``ValueError``
  on both ranks naming what differs, gradients untouched. Before the check an extra parameter made a longer bucket
  than rank 0's, and the reordered list summed the gradients of different parameters without an error. The same
  lists (given as a list, or as an iterator) are averaged, with and without the check.

One ``torch.multiprocessing.spawn`` runs every case in order (module fixture); each case catches its own error, a
last ``all_reduce`` shows that the ranks are still in step. The process group has a 15 s timeout and the spawn a
join timeout, so a rank waiting in a collective fails the tests instead of blocking the suite.

The NCCL device choice of the flags (:func:`medquant.distributed.any_rank`) is tested on the backend name alone.
"""
from __future__ import annotations

import datetime

import pytest
import torch
import torch.distributed as dist
from torch import nn

from medquant.distributed import (
    all_reduce_gradients,
    clip_grad_norm_,
    fsdp_shard,
    load_full_state,
    meta_skeleton,
)
from tests.distributed._spawn import error_message, spawn_rank_results, write_rank_results

WORLD = 2
SHARD0 = [3.0, 4.0]  # rank 0's shard of the sharded gradient; rank 1 has none: total norm 5
# all_reduce_gradients: each rank's list of (shape, dtype); rank 0 always passes GRADS0
GRADS0 = [((2, 3), torch.float32), ((4,), torch.float32)]
GRADS1 = {"extra": GRADS0 + [((2,), torch.float32)],  # one more parameter
          "order": GRADS0[::-1],  # the same parameters in another order: the same total size, one bucket
          "dtype": [((2, 3), torch.float32), ((4,), torch.float64)],
          "same": GRADS0, "same_nocheck": GRADS0}


def _grads(r: int, case: str) -> list[torch.Tensor]:
    """Rank ``r``'s gradients of ``case``: integers (exact sums), different on every rank and parameter."""
    spec = GRADS0 if r == 0 else GRADS1[case]
    return [torch.arange(1, 1 + torch.Size(s).numel(), dtype=dt).reshape(s) * (10 * r + i + 1)
            for i, (s, dt) in enumerate(spec)]


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 2))


def _worker(r: int, init_file: str, out: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor, Shard

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=r, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=15))
    res: dict[str, torch.Tensor] = {}
    info: dict[str, str] = {}
    try:
        mesh = init_device_mesh("cpu", (WORLD,))
        # clip_grad_norm_: rank 0 holds a sharded gradient, rank 1 no parameter at all
        params = []
        if r == 0:
            p = nn.Parameter(DTensor.from_local(torch.zeros(2), mesh, [Shard(0)], run_check=False))
            p.grad = DTensor.from_local(torch.tensor(SHARD0), mesh, [Shard(0)], run_check=False)
            params.append(p)
        norm = {}
        info["clip"] = error_message(lambda: norm.setdefault("n", clip_grad_norm_(params, 1.0)))
        if "n" in norm:
            res["clip_norm"] = norm["n"].reshape(1)
        if r == 0:
            res["clip_grad"] = params[0].grad.to_local()
        # fsdp_shard of a model rank 1 has already sharded
        model = _mlp()
        if r == 1:
            fully_shard(model, mesh=mesh)
        info["shard_twice"] = error_message(lambda: fsdp_shard(model, mesh=mesh))
        # load_full_state into a skeleton of rank 1 without the last Linear
        model = _mlp()
        skeleton = meta_skeleton(model if r == 0 else nn.Sequential(nn.Linear(4, 4)))
        fsdp_shard(model, mesh=mesh)
        info["load_mismatch"] = error_message(lambda: load_full_state(skeleton, model))
        # all_reduce_gradients of parameter lists that differ between the ranks (and two that do not)
        for case in GRADS1:
            params = [nn.Parameter(torch.zeros_like(g)) for g in _grads(r, case)]
            for p, g in zip(params, _grads(r, case)):
                p.grad = g.clone()
            kw = {"check": False} if case == "same_nocheck" else {}
            arg = iter(params) if case == "same" else params  # an iterator (model.parameters()) is read once
            info[f"grads_{case}"] = error_message(lambda arg=arg, kw=kw: all_reduce_gradients(arg, **kw))
            res.update({f"grads_{case}/{i}": p.grad for i, p in enumerate(params)})
        # the ranks are still in step: one more collective gives the sum of the ranks
        t = torch.tensor([float(r + 1)])
        dist.all_reduce(t)
        res["after"] = t
    finally:
        write_rank_results(out, "err", r, res, info)
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    return spawn_rank_results(_worker, tmp_path_factory.mktemp("gloo_rank_errors"), "err", WORLD, timeout=180)


def test_clip_grad_norm_with_no_gradient_on_one_rank(ranks):
    ref = torch.linalg.vector_norm(torch.tensor(SHARD0))  # the only shard: 5
    for r in range(WORLD):
        assert ranks[r][1]["clip"] == "no error"
        torch.testing.assert_close(ranks[r][0]["clip_norm"], ref.reshape(1))
    # rank 0's shard clipped to norm 1 (torch's coefficient max_norm / (norm + 1e-6))
    torch.testing.assert_close(ranks[0][0]["clip_grad"], torch.tensor(SHARD0) / (ref + 1e-6))


@pytest.mark.parametrize("case, words", [("shard_twice", "already sharded"), ("load_mismatch", "no slot")])
def test_bad_input_on_one_rank_raises_on_every_rank(ranks, case, words):
    msgs = [ranks[r][1][case] for r in range(WORLD)]
    for m in msgs:
        assert m.startswith("ValueError") and "rank(s) [1]" in m, msgs
    assert words in msgs[1] and words not in msgs[0], msgs  # the reason where it is; rank 0 points there
    for r in range(WORLD):
        assert ranks[r][0]["after"].tolist() == [3.0]  # 1 + 2: the ranks stayed in step


@pytest.mark.parametrize("case, words", [
    ("extra", ("rank 1 passes 3 parameters (cpu float32[2, 3], cpu float32[4], cpu float32[2]), rank 0 passes 2 "
               "(cpu float32[2, 3], cpu float32[4])")),
    ("order", "parameter 0 is cpu float32[4] on rank 1 but cpu float32[2, 3] on rank 0"),
    ("dtype", "parameter 1 is cpu float64[4] on rank 1 but cpu float32[4] on rank 0")])
def test_all_reduce_gradients_of_different_parameter_lists_raises_on_every_rank(ranks, case, words):
    msgs = [ranks[r][1][f"grads_{case}"] for r in range(WORLD)]
    assert msgs[0] == msgs[1], msgs  # the same error on both ranks
    assert msgs[0].startswith("ValueError") and words in msgs[0], msgs
    assert "the same parameters, in the same order, on every rank" in msgs[0], msgs
    for r in range(WORLD):  # raised before any reduction: each rank keeps its own gradients
        for i, g in enumerate(_grads(r, case)):
            assert torch.equal(ranks[r][0][f"grads_{case}/{i}"], g), (case, r, i)
        assert ranks[r][0]["after"].tolist() == [3.0]  # the ranks stayed in step


@pytest.mark.parametrize("case", ["same", "same_nocheck"])
def test_all_reduce_gradients_of_the_same_parameter_lists_averages(ranks, case):
    ref = [(a + b) / WORLD for a, b in zip(_grads(0, case), _grads(1, case))]  # one process: the mean
    for r in range(WORLD):
        assert ranks[r][1][f"grads_{case}"] == "no error"
        for i, g in enumerate(ref):
            assert torch.equal(ranks[r][0][f"grads_{case}/{i}"], g), (case, r, i)


@pytest.mark.parametrize("backend, device", [
    ("gloo", torch.device("cpu")), ("mpi", torch.device("cpu")), ("nccl", torch.device("cuda", 3)),
    ("cpu:gloo,cuda:nccl", torch.device("cpu")), ("cuda:nccl", torch.device("cuda", 3))])
def test_flag_device_follows_the_backend(monkeypatch, backend, device):
    from medquant.distributed import _flag_device

    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)  # no GPU here: the current CUDA device, faked
    assert _flag_device(backend) == device
