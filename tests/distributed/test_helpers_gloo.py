"""Generic helpers across 3 gloo processes (CPU), each checked against the same computation in one process.

* :func:`medquant.distributed.all_reduce_gradients` of half-precision gradients: the fp32 mean of the ranks'
  gradients rounded once to the gradient dtype (no half-precision partial sums, no fp16 overflow of the sum);
* :func:`medquant.distributed.broadcast_parameters` on a sub-group (ranks 1, 2): ``src`` is a rank of the group,
  so ``BAQWrapper.fit(distributed=True, group=sub)`` runs and equals one process on the two ranks' batches;
* :func:`medquant.fairquant.distributed.distributed_group_importance` with ``expected_groups``: the declared groups
  are checked over all ranks together (a rank may see one group), like one process on all the batches.

One ``torch.multiprocessing.spawn`` runs every case (module fixture); the process group has a 20 s timeout, and
every case catches its own error, so a failing case cannot leave a rank waiting.
"""
from __future__ import annotations

import datetime
import json

import pytest
import torch
import torch.distributed as dist
from torch import nn

from medquant.distributed import all_reduce_gradients, broadcast_parameters
from medquant.fairquant.baq import BAQWrapper
from medquant.fairquant.distributed import distributed_group_importance
from medquant.fairquant.importance import compute_group_importance
from tests.distributed._spawn import error_message, spawn_rank_results, write_rank_results

WORLD = 3
SUB = [1, 2]  # the sub-group of the broadcast / BAQ cases
N = 512  # gradient elements


def _grad(r: int, dtype: torch.dtype) -> torch.Tensor:
    """Rank ``r``'s float32 gradient: multiples of 1/64 that use the full significand of ``dtype`` (``k / 64`` with
    ``|k| <= 2^p``, ``p`` = 8 for bf16, 11 for fp16), so exact in ``dtype``; their float32 sums are exact too."""
    g = torch.Generator().manual_seed(10 + r)
    p = 8 if dtype == torch.bfloat16 else 11
    return torch.randint(-2**p, 2**p, (N,), generator=g).float() / 64


def _mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))


def _baq(model: nn.Module) -> BAQWrapper:
    init = {n: (5,) * m.out_features for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    return BAQWrapper(model, init_bits=init, target_bits=3.0, lambda_bit=1.0, lambda_fair=1.0)


BAQ_FIT = {"weight_lr": 1e-2, "logit_lr": 0.05, "progress": False}


def _sub_batches(r: int) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Rank ``r``'s 3 batches of the sub-group case: rank 1 mostly group 0, rank 2 mostly group 1, unequal sizes."""
    g = torch.Generator().manual_seed(20 + r)
    n = 5 if r == 1 else 7
    out = []
    for _ in range(3):
        x = torch.randn(n, 6, generator=g)
        y = torch.randint(0, 3, (n,), generator=g)
        grp = (torch.rand(n, generator=g) < (0.2 if r == 1 else 0.8)).long()
        out.append((x, y, grp))
    return out


def _calib() -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """6 calibration batches, each of a single group: batch ``i`` is group 1 when ``i % 3 == 1``, else group 0. With
    3 ranks (rank r takes batches r, r + 3) rank 1 sees only group 1, ranks 0 and 2 only group 0."""
    g = torch.Generator().manual_seed(3)
    return [(torch.randn(8, 6, generator=g), torch.randint(0, 3, (8,), generator=g),
             torch.full((8,), int(i % 3 == 1))) for i in range(6)]


def _worker(r: int, init_file: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=r, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=20))
    try:
        res: dict[str, torch.Tensor] = {}
        info: dict[str, str] = {}
        # half-precision gradients, averaged (and summed) over the 3 ranks
        for dt in (torch.bfloat16, torch.float16):
            for average in (True, False):
                p = nn.Parameter(torch.zeros(N, dtype=dt))
                p.grad = _grad(r, dt).to(dt)
                all_reduce_gradients([p], average=average)
                res[f"grad/{dt}/{average}"] = p.grad
        p = nn.Parameter(torch.zeros(2, dtype=torch.float16))
        p.grad = torch.tensor([40000.0, -40000.0], dtype=torch.float16)  # the mean is a float16 number, the sum not
        all_reduce_gradients([p])
        res["grad/fp16_large"] = p.grad
        # broadcast and BAQ on the sub-group of ranks 1 and 2 (new_group is called by every rank)
        sub = dist.new_group(SUB)
        if r in SUB:
            for src in (0, 1):
                t = torch.full((4,), float(r))
                info[f"broadcast{src}"] = error_message(lambda t=t, src=src: broadcast_parameters([t], src=src, group=sub))
                res[f"broadcast{src}"] = t
            w = _baq(_mlp(seed=r))  # different initial weights: fit broadcasts the group's rank 0 (global rank 1)
            info["baq_sub"] = error_message(lambda: w.fit(_sub_batches(r), distributed=True, group=sub, **BAQ_FIT))
            res.update({f"baq/{n}": p.theta.detach().clone() for n, p in w.params.items()})
            res.update({f"baq/w{i}": p.detach().clone() for i, p in enumerate(w.weights())})
        dist.barrier()
        # importance with declared groups: ranks 0 and 2 see group 0 only, rank 1 group 1 only
        imp = {}

        def run(expected):
            imp["x"] = distributed_group_importance(_mlp(), _calib(), expected_groups=expected, progress=False)

        info["imp_declared"] = error_message(lambda: run([0, 1]))
        if "x" in imp:
            res.update({f"imp/{g}/{n}": t for g, m in imp["x"].maps.items() for n, t in m.items()})
            info["imp_counts"] = json.dumps(imp["x"].counts)
        info["imp_missing"] = error_message(lambda: run([0, 1, 2]))  # group 2 has no sample on any rank
        info["imp_undeclared"] = error_message(lambda: run([1, 5]))  # group 0 (ranks 0 and 2) is not declared
        write_rank_results(out, "res", r, res, info)
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    return spawn_rank_results(_worker, tmp_path_factory.mktemp("gloo_helpers"), "res", WORLD)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("average", [True, False])
def test_half_precision_gradients_are_reduced_in_float32(ranks, dtype, average):
    # one process: the float32 sum (exact here) of the 3 gradients, divided by 3, rounded once to the dtype
    total = torch.stack([_grad(r, dtype) for r in range(WORLD)]).sum(0)
    ref = (total / WORLD if average else total).to(dtype)
    # a bf16 / fp16 running sum (round after every addition, then after the division) is a different answer
    run = _grad(0, dtype).to(dtype)
    for r in range(1, WORLD):
        run = (run + _grad(r, dtype).to(dtype)).to(dtype)
    assert not torch.equal(run / WORLD if average else run, ref)
    for r in range(WORLD):
        got = ranks[r][0][f"grad/{dtype}/{average}"]
        assert got.dtype == dtype
        assert torch.equal(got, ref)


def test_float16_mean_of_large_gradients_does_not_overflow(ranks):
    for r in range(WORLD):
        assert ranks[r][0]["grad/fp16_large"].tolist() == [40000.0, -40000.0]


def test_broadcast_on_a_sub_group_takes_src_as_a_rank_of_the_group(ranks):
    for r in SUB:
        res, info = ranks[r]
        assert info["broadcast0"] == info["broadcast1"] == "no error"
        assert res["broadcast0"].tolist() == [1.0] * 4  # group rank 0 is global rank 1
        assert res["broadcast1"].tolist() == [2.0] * 4  # group rank 1 is global rank 2


def test_baq_on_a_sub_group_equals_one_process_on_its_batches(ranks):
    glob = [tuple(torch.cat([a, b]) for a, b in zip(b1, b2)) for b1, b2 in zip(_sub_batches(1), _sub_batches(2))]
    single = _baq(_mlp(seed=1))  # the group's rank 0 (global rank 1) built its model with seed 1
    single.fit(glob, **BAQ_FIT)
    ref = {f"baq/{n}": p.theta.detach() for n, p in single.params.items()}
    ref.update({f"baq/w{i}": p.detach() for i, p in enumerate(single.weights())})
    init = _baq(_mlp(seed=1))
    start = {f"baq/{n}": p.theta.detach() for n, p in init.params.items()}
    start.update({f"baq/w{i}": p.detach() for i, p in enumerate(init.weights())})
    assert max(float((ref[k] - start[k]).abs().max()) for k in ref) > 1e-3  # training moved weights and logits
    for r in SUB:
        res, info = ranks[r]
        assert info["baq_sub"] == "no error"
        got = {k: v for k, v in res.items() if k.startswith("baq/")}
        assert set(got) == set(ref)
        for k, v in got.items():
            torch.testing.assert_close(v, ref[k], rtol=1e-4, atol=1e-5, msg=k)


def test_declared_groups_are_checked_over_all_ranks(ranks):
    single = compute_group_importance(_mlp(), _calib(), expected_groups=[0, 1], progress=False)
    for r in range(WORLD):
        res, info = ranks[r]
        assert info["imp_declared"] == "no error"
        assert {int(k): v for k, v in json.loads(info["imp_counts"]).items()} == single.counts
        for g, m in single.maps.items():
            for n, t in m.items():
                torch.testing.assert_close(res[f"imp/{g}/{n}"], t, rtol=1e-5, atol=1e-12)
    # a declared group absent from every rank, an undeclared group on some ranks: the same ValueError everywhere
    for case, words in (("imp_missing", "[2] have no samples"), ("imp_undeclared", "[0] outside the declared")):
        msgs = {ranks[r][1][case] for r in range(WORLD)}
        assert len(msgs) == 1, msgs
        msg = msgs.pop()
        assert msg.startswith("ValueError") and words in msg, msg
