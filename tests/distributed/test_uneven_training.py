"""Uneven data per rank: every training entry point stops every rank at the same step.

Two gloo processes (CPU); rank 0 gets 3 batches, rank 1 gets 2 (its share of the first two global batches).
:func:`medquant.training.train_steps` on a plain model (``sync_params``, 2 batches per step), then each entry point
with a DDP-wrapped model: :func:`medquant.fairquant.qat.fq_qat`, :meth:`medquant.distill.Distiller.fit`
(one pass, and ``steps=3``: the passes repeat) and :meth:`medquant.qlora.QLoRAAdapter.train` (``ddp=True``, NF4
bitsandbytes base). Both ranks must finish, take the same number of steps, end with identical parameters, and
equal one process trained on the global batches the ranks actually used (global batch ``i`` = rank 0's batch ``i``
and rank 1's batch ``i`` concatenated; DDP averages equal halves).

Before the fix rank 0 went on to its third batch and waited in a collective (the fairness objective's
``all_reduce``, DDP's gradient all-reduce) that rank 1 never joined. Each case runs in its own process group
(20 s timeout) and the ranks meet through files between cases, so a rank left waiting fails its case with the
gloo timeout instead of blocking the suite; the spawn's join timeout is the last resort.
"""
from __future__ import annotations

import datetime
import functools
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

from medquant.fairquant.qat import fq_qat
from medquant.training import train_steps
from tests.distributed._spawn import error_message, spawn_rank_results, write_rank_results
from tests.distributed.test_training_gloo import (
    QAT_FIT,
    QAT_MAP,
    _distiller,
    _global_batches,
    _kd_batches,
    _local,
    _mlp,
    _Net,
    _plain,
)

WORLD = 2
USED = 2  # global batches every rank trains on (rank 1 has 2, rank 0 has 3)
QLORA_BATCH = 4


def _rank_batches(batches, r: int):
    """Rank ``r``'s share: rank 0 of the first 3 global batches, rank 1 of the first 2."""
    return _local(batches[:3] if r == 0 else batches[:USED], r)


def _qlora_batches() -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(3):
        ids = torch.randint(4, 200, (QLORA_BATCH, 8), generator=g)
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()})
    return out


def _qlora_rank_batches(r: int) -> list[dict[str, torch.Tensor]]:
    n = QLORA_BATCH // WORLD
    mine = _qlora_batches()[:3] if r == 0 else _qlora_batches()[:USED]
    return [{k: v[r * n:(r + 1) * n] for k, v in b.items()} for b in mine]


def _adapter():
    from medquant.qlora import QLoRAAdapter
    from medquant.testing.zoo import ZOO_BY_NAME

    return QLoRAAdapter(ZOO_BY_NAME["llama"].build(), r=4, lora_dropout=0.0)  # NF4 base (quantize=True)


def _lora(ad) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in ad.model.named_parameters() if p.requires_grad}


# ------------------------------------------------------------------------------------------------ the cases
def _qat_case(r: int):
    model = _mlp()
    res = fq_qat(DDP(model), QAT_MAP, _rank_batches(_global_batches(), r), export=False, **QAT_FIT)
    return {k: v.clone() for k, v in model.state_dict().items()}, [h["loss"] for h in res.history]


def _kd_case(r: int, steps: int | None = None):
    student = _Net(8, seed=3)
    losses = _distiller(DDP(student)).fit(_kd_batches(_rank_batches(_global_batches(), r)), steps=steps, lr=1e-2,
                                          progress=False)
    return {k: v.clone() for k, v in student.state_dict().items()}, losses


def _qlora_case(r: int):
    ad = _adapter()
    losses = ad.train(_qlora_rank_batches(r), lr=1e-2, progress=False, ddp=True)
    return _lora(ad), losses


def _steps_loss(model):
    def loss_fn(batch):
        x, y, _g = batch
        loss = F.cross_entropy(model(x), y)
        return loss, float(loss.detach())
    return loss_fn


def _steps_case(r: int):
    """``train_steps`` itself on a plain (unwrapped) model, gradients averaged through ``sync_params``, 2 batches
    per step: rank 0's third batch would start a second step that rank 1 cannot take."""
    model = _mlp()
    params = list(model.parameters())
    opt = torch.optim.SGD(params, lr=0.1)
    losses = train_steps(_steps_loss(model), _rank_batches(_global_batches(), r), opt, params, grad_accum=2,
                         sync_params=params, progress=False)
    return {k: v.clone() for k, v in model.state_dict().items()}, losses


CASES = {"steps": _steps_case, "qat": _qat_case, "kd": _kd_case, "kd_steps": functools.partial(_kd_case, steps=3), "qlora": _qlora_case}


def _meet(out: str, tag: str, r: int, timeout: float = 120.0) -> None:
    """Wait (through files, no collective) until every rank has finished case ``tag``."""
    Path(f"{out}/{tag}.done{r}").touch()
    deadline = time.monotonic() + timeout
    while not all(Path(f"{out}/{tag}.done{q}").exists() for q in range(WORLD)):
        if time.monotonic() > deadline:
            raise TimeoutError(f"the ranks did not all finish case {tag}")
        time.sleep(0.05)


def _worker(r: int, init_file: str, out: str) -> None:
    torch.set_num_threads(1)
    tensors: dict[str, torch.Tensor] = {}
    info: dict[str, dict] = {}
    for name, case in CASES.items():
        dist.init_process_group("gloo", init_method=f"file://{init_file}_{name}", rank=r, world_size=WORLD,
                                timeout=datetime.timedelta(seconds=20))
        got: list = []
        try:
            err = error_message(lambda case=case, got=got: got.extend(case(r)))
        finally:
            _meet(out, name, r)
            dist.destroy_process_group()
        info[name] = {"error": err, "losses": got[1] if got else []}
        if got:
            tensors.update({f"{name}/{k}": v for k, v in got[0].items()})
    # the QLoRA reference: one process (no process group left) on the global batches the ranks used
    if r == 0:
        ad = _adapter()
        info["qlora_ref"] = {"losses": ad.train(_qlora_batches()[:USED], lr=1e-2, progress=False)}
        tensors.update({f"qlora_ref/{k}": v for k, v in _lora(ad).items()})
        start = _lora(_adapter())
        info["qlora_ref"]["moved"] = max(float((tensors[f"qlora_ref/{k}"] - v).abs().max()) for k, v in start.items())
    write_rank_results(out, "uneven", r, tensors, info)


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    return spawn_rank_results(_worker, tmp_path_factory.mktemp("uneven"), "uneven", WORLD, timeout=240.0)


def _part(tensors: dict, name: str) -> dict[str, torch.Tensor]:
    return {k[len(name) + 1:]: v for k, v in tensors.items() if k.startswith(f"{name}/")}


def _check_ranks(ranks, name: str, n_steps: int) -> list[dict[str, torch.Tensor]]:
    """Both ranks finished without error, took ``n_steps`` steps and hold bit-identical parameters."""
    for r in range(WORLD):
        assert ranks[r][1][name]["error"] == "no error", f"rank {r}: {ranks[r][1][name]['error']}"
        assert len(ranks[r][1][name]["losses"]) == n_steps, f"rank {r}"
    states = [_part(ranks[r][0], name) for r in range(WORLD)]
    assert states[0].keys() == states[1].keys() and states[0]
    for k in states[0]:
        assert torch.equal(states[0][k], states[1][k]), k
    return states


def _close(a: dict, b: dict, rtol: float = 1e-4, atol: float = 1e-5) -> None:
    assert set(a) == set(b)
    for k, v in a.items():
        torch.testing.assert_close(v, b[k], rtol=rtol, atol=atol, msg=k)


def test_train_steps_in_a_process_group_stops_every_rank_together(ranks):
    # rank 0: [b0, b1], [b2]; rank 1: [b0, b1] -> one step each (the default stop_together in a process group)
    states = _check_ranks(ranks, "steps", 1)
    model = _mlp()
    params = list(model.parameters())
    want = train_steps(_steps_loss(model), _global_batches()[:USED], torch.optim.SGD(params, lr=0.1), params,
                       grad_accum=2, progress=False)
    _close(states[0], model.state_dict())
    mean = [(a + b) / 2 for a, b in zip(ranks[0][1]["steps"]["losses"], ranks[1][1]["steps"]["losses"])]
    assert mean == pytest.approx(want, rel=1e-5)


def test_fq_qat_ddp_uneven_batches_stops_every_rank_together(ranks):
    states = _check_ranks(ranks, "qat", USED)
    model = _mlp()
    ref = fq_qat(model, QAT_MAP, _global_batches()[:USED], export=False, **QAT_FIT)
    trained, start = _plain(model.state_dict()), _mlp().state_dict()
    assert max(float((trained[k] - start[k]).abs().max()) for k in start) > 1e-3  # training moved the weights
    _close(states[0], model.state_dict())
    for r in range(WORLD):  # the global-batch objective: every rank logs the single-process loss
        assert ranks[r][1]["qat"]["losses"] == pytest.approx([h["loss"] for h in ref.history], rel=1e-5)


@pytest.mark.parametrize("name, steps, used", [("kd", None, [0, 1]), ("kd_steps", 3, [0, 1, 0])])
def test_distiller_ddp_uneven_batches_stops_every_rank_together(ranks, name, steps, used):
    # steps=3 repeats the passes: each pass ends when rank 1 runs out (2 steps), the second pass gives step 3
    states = _check_ranks(ranks, name, len(used))
    student = _Net(8, seed=3)
    glob = _kd_batches(_global_batches())
    losses = _distiller(student).fit(glob[:USED], steps=steps, lr=1e-2, progress=False)
    assert len(losses) == len(used)
    _close(states[0], student.state_dict())
    # each rank logs the loss of its half; the mean of the halves is the single-process loss (equal halves)
    mean = [(a + b) / 2 for a, b in zip(ranks[0][1][name]["losses"], ranks[1][1][name]["losses"])]
    assert mean == pytest.approx(losses, rel=1e-5)


def test_qlora_ddp_uneven_batches_stops_every_rank_together(ranks):
    states = _check_ranks(ranks, "qlora", USED)
    ref = _part(ranks[0][0], "qlora_ref")
    assert ranks[0][1]["qlora_ref"]["moved"] > 1e-3  # training moved the LoRA weights
    _close(states[0], ref)
    # equal token counts per rank: the mean of the ranks' losses is the single-process loss
    mean = [(a + b) / 2 for a, b in zip(ranks[0][1]["qlora"]["losses"], ranks[1][1]["qlora"]["losses"])]
    assert mean == pytest.approx(ranks[0][1]["qlora_ref"]["losses"], rel=1e-5)
