"""Review of :mod:`medquant.distributed` / :mod:`medquant.fairquant.distributed` over 2 gloo processes (CPU),
each case compared with the same computation in one process.

* :func:`medquant.distributed.all_reduce_gradients` and gradients missing on some or on every rank: a gradient
  missing on one rank counts as zeros there, but a parameter without a gradient on *every* rank keeps
  ``.grad = None``, as in one process (optimizers skip it). It used to get a zero gradient, so AdamW's weight
  decay moved a parameter that single-process training leaves alone: ``BAQWrapper.fit(distributed=True)`` of a
  model with a layer outside the loss path ended with other weights than the single-process fit.
* errors in :func:`medquant.fairquant.distributed.distributed_group_importance`: a rank's own error (a ``loss_fn``
  that raises, a misspelt ``metric``) is raised as such, as one process raises it, instead of being reported as
  "no samples" (one process: "calibration saw no samples: its 1 batch(es) are all empty"; several: "fewer
  calibration batches with samples than processes"), which hid the real cause; the other ranks raise a
  ``RuntimeError`` naming the failing ranks.
* uneven data: :func:`medquant.fairquant.distributed.distributed_group_importance` of 5 batches of unequal sizes
  (rank 0 gets 3, rank 1 gets 2) equals the importance of one process; a distributed BAQ fit where rank 1 has one
  batch fewer stops both ranks together and equals one process on the global batches both ranks have.

One ``torch.multiprocessing.spawn`` runs every case (module fixture); the process group has a 20 s timeout, the
spawn a 120 s one, so a rank left waiting in a collective fails the tests instead of blocking the suite.
"""
from __future__ import annotations

import datetime

import pytest
import torch
import torch.distributed as dist
from torch import nn

from medquant.distributed import all_reduce_gradients
from medquant.fairquant.baq import BAQWrapper
from medquant.fairquant.batches import default_loss
from medquant.fairquant.distributed import distributed_group_importance
from medquant.fairquant.importance import compute_group_importance
from tests.distributed._spawn import error_message, spawn_rank_results, write_rank_results

WORLD = 2
BAQ_FIT = {"weight_lr": 1e-2, "logit_lr": 0.05, "weight_decay": 0.5, "progress": False}


class _WithUnusedHead(nn.Module):
    """An MLP whose ``aux`` layer is outside the loss path (an auxiliary head the loss does not use)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
        self.aux = nn.Linear(6, 3)

    def forward(self, x):
        return self.body(x)


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))


def _baq(model: nn.Module) -> BAQWrapper:
    init = {n: (5,) * m.out_features for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    return BAQWrapper(model, init_bits=init, target_bits=3.0, lambda_bit=1.0, lambda_fair=1.0)


def _state(w: BAQWrapper) -> dict[str, torch.Tensor]:
    out = {f"theta/{n}": p.theta.detach().clone() for n, p in w.params.items()}
    out.update({f"w/{n}": p.detach().clone() for n, p in w.model.named_parameters() if "theta" not in n})
    return out


def _global_batches(n: int) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(8, 6, generator=g), torch.randint(0, 3, (8,), generator=g),
             torch.randint(0, 2, (8,), generator=g)) for _ in range(n)]


def _local(batches, r: int):
    return [tuple(t[r * 4:(r + 1) * 4] for t in b) for b in batches]


def _calib() -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """5 calibration batches of 4..8 samples: rank 0 takes batches 0, 2, 4 (18 samples), rank 1 1, 3 (12)."""
    g = torch.Generator().manual_seed(3)
    return [(torch.randn(4 + i, 6, generator=g), torch.randint(0, 3, (4 + i,), generator=g),
             torch.randint(0, 2, (4 + i,), generator=g)) for i in range(5)]


def _loss_failing_on_rank1(model: nn.Module, batch):
    """The default loss, but a ``KeyError`` (a batch without the expected field) on rank 1's batches 1 and 3 of
    :func:`_calib` (5 and 7 samples)."""
    if batch[0].shape[0] in (5, 7):
        raise KeyError("pixel_values")
    return default_loss(model, batch)


def _raise_missing_field(model: nn.Module, batch):
    raise KeyError("pixel_values")


def _grads(r: int) -> dict[str, torch.Tensor]:
    """Rank ``r``'s gradients: ``a`` and ``d`` (bfloat16, the last bucket) on both ranks, ``b`` on rank 1 only, ``c``
    on neither."""
    out = {"a": torch.tensor([1.0, 2.0, 3.0]) * (r + 1), "d": torch.tensor([0.5, -2.0], dtype=torch.bfloat16) * (r + 1)}
    if r == 1:
        out["b"] = torch.tensor([4.0, -6.0])
    return out


def _worker(r: int, init_file: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=r, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=20))
    res: dict[str, torch.Tensor] = {}
    info: dict[str, str] = {}
    try:
        # gradients missing on one rank / on every rank, with and without the parameter-list check (and then
        # one bucket per gradient)
        for check in (True, False):
            params = {"a": nn.Parameter(torch.zeros(3)), "b": nn.Parameter(torch.zeros(2)),
                      "c": nn.Parameter(torch.zeros(4)), "d": nn.Parameter(torch.zeros(2, dtype=torch.bfloat16))}
            for k, g in _grads(r).items():
                params[k].grad = g.clone()
            kw = {"check": check} if check else {"check": check, "bucket_bytes": 8}
            info[f"grads{check}"] = error_message(lambda p=params, kw=kw: all_reduce_gradients(p.values(), **kw))
            for k, p in params.items():
                info[f"grads{check}/{k}"] = "None" if p.grad is None else "set"
                if p.grad is not None:
                    res[f"grads{check}/{k}"] = p.grad
        # BAQ of a model with a layer outside the loss path
        w = _baq(_WithUnusedHead())
        info["baq_unused"] = error_message(lambda: w.fit(_local(_global_batches(3), r), distributed=True, **BAQ_FIT))
        res.update({f"baq_unused/{k}": v for k, v in _state(w).items()})
        # uneven data: calibration batches of unequal sizes, 3 on rank 0 and 2 on rank 1
        imp = {}
        info["imp"] = error_message(lambda: imp.setdefault("x", distributed_group_importance(
            _mlp(), _calib(), max_batches=None, progress=False)))
        if "x" in imp:
            res.update({f"imp/{g}/{n}": t for g, m in imp["x"].maps.items() for n, t in m.items()})
            info["imp_counts"] = repr(sorted(imp["x"].counts.items()))
            info["imp_batches"] = str(imp["x"].batches)
        # a rank's own error: a loss_fn raising on rank 1's batches, a misspelt metric on every rank
        for name, kw in (("imp_loss_error", {"loss_fn": _loss_failing_on_rank1}), ("imp_metric", {"metric": "grap"})):
            info[name] = error_message(lambda kw=kw: distributed_group_importance(_mlp(), _calib(), progress=False,
                                                                                  **kw))
        # uneven data: a BAQ fit where rank 1 has one batch fewer
        local = _local(_global_batches(3), r)[:3 if r == 0 else 2]
        w = _baq(_mlp())
        hist: list = []
        info["baq_uneven"] = error_message(lambda: hist.extend(w.fit(local, distributed=True, **BAQ_FIT)))
        info["baq_uneven_steps"] = str(len(hist))
        res.update({f"baq_uneven/{k}": v for k, v in _state(w).items()})
    finally:
        write_rank_results(out, "rev", r, res, info)
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    return spawn_rank_results(_worker, tmp_path_factory.mktemp("gloo_review"), "rev", WORLD, timeout=120)


def _close(got: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> None:
    assert set(got) == set(ref)
    for k, v in got.items():
        torch.testing.assert_close(v, ref[k], rtol=1e-4, atol=1e-5, msg=k)


@pytest.mark.parametrize("check", [True, False])
def test_gradient_missing_on_every_rank_stays_none(ranks, check):
    g0, g1 = _grads(0), _grads(1)
    for r in range(WORLD):
        res, info = ranks[r]
        assert info[f"grads{check}"] == "no error"
        assert torch.equal(res[f"grads{check}/a"], (g0["a"] + g1["a"]) / WORLD)
        assert torch.equal(res[f"grads{check}/d"], ((g0["d"].float() + g1["d"].float()) / WORLD).bfloat16())
        # missing on rank 0 only: zeros there, the mean on both ranks
        assert info[f"grads{check}/b"] == "set"
        assert torch.equal(res[f"grads{check}/b"], g1["b"] / WORLD)
        # missing on every rank: no gradient, as in one process
        assert info[f"grads{check}/c"] == "None", (r, info)


def test_baq_with_a_layer_outside_the_loss_equals_single_process(ranks):
    single = _baq(_WithUnusedHead())
    single.fit(_global_batches(3), **BAQ_FIT)
    ref = _state(single)
    untouched = _WithUnusedHead().aux
    # one process leaves the unused layer alone (AdamW skips a parameter without gradient)
    assert torch.equal(ref["w/aux.parametrizations.weight.original"], untouched.weight.detach())
    assert torch.equal(ref["w/aux.bias"], untouched.bias.detach())
    for r in range(WORLD):
        res, info = ranks[r]
        assert info["baq_unused"] == "no error"
        _close({k.removeprefix("baq_unused/"): v for k, v in res.items() if k.startswith("baq_unused/")}, ref)


def test_importance_of_uneven_batches_equals_single_process(ranks):
    single = compute_group_importance(_mlp(), _calib(), max_batches=None, progress=False)
    for r in range(WORLD):
        res, info = ranks[r]
        assert info["imp"] == "no error"
        assert info["imp_counts"] == repr(sorted(single.counts.items()))
        assert info["imp_batches"] == str(single.batches) == "5"
        for g, m in single.maps.items():
            for n, t in m.items():
                torch.testing.assert_close(res[f"imp/{g}/{n}"], t, rtol=1e-5, atol=1e-12)


def test_baq_with_one_batch_fewer_on_one_rank_stops_together(ranks):
    single = _baq(_mlp())
    single.fit(_global_batches(2), **BAQ_FIT)  # the global batches both ranks have
    ref = _state(single)
    for r in range(WORLD):
        res, info = ranks[r]
        assert info["baq_uneven"] == "no error"
        assert info["baq_uneven_steps"] == "2"
        _close({k.removeprefix("baq_uneven/"): v for k, v in res.items() if k.startswith("baq_uneven/")}, ref)


def test_importance_error_of_a_rank_is_raised_as_such(ranks):
    # rank 1's loss_fn fails: rank 1 raises that error, rank 0 a RuntimeError naming rank 1
    assert ranks[1][1]["imp_loss_error"] == "KeyError: 'pixel_values'"
    msg = ranks[0][1]["imp_loss_error"]
    assert msg.startswith("RuntimeError: rank(s) [1] failed computing their share"), msg
    # a misspelt metric: every rank raises the error one process raises
    with pytest.raises(ValueError) as single:
        compute_group_importance(_mlp(), _calib(), metric="grap", progress=False)
    for r in range(WORLD):
        assert ranks[r][1]["imp_metric"] == f"ValueError: {single.value}"


def test_importance_without_process_group_raises_the_loss_error_as_one_process():
    with pytest.raises(KeyError, match="pixel_values"):  # one process: the loss_fn's own error
        compute_group_importance(_mlp(), _calib(), loss_fn=_raise_missing_field, progress=False)
    with pytest.raises(KeyError, match="pixel_values"):
        distributed_group_importance(_mlp(), _calib(), loss_fn=_raise_missing_field, progress=False)
