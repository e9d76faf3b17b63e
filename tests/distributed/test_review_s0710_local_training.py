"""One rank of a two-process gloo job trains alone (a non-DDP Distiller student, a non-DDP QLoRA adapter, FQ-QAT of
a plain model, BAQ with ``distributed=False`` and ``train_steps(local=True)``) while the other does not train: rank 0 must finish (it waited in the loop's collectives
for a rank that never joined: the non-finite check and stop-together all-reduce over the world) and end exactly as
the same training in one process without a process group."""
from __future__ import annotations

import datetime

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from medquant.training import train_steps
from tests.distributed._spawn import spawn_rank_results, write_rank_results
from tests.distributed.test_training_gloo import (
    BAQ_FIT,
    QAT_FIT,
    QAT_MAP,
    _baq,
    _baq_state,
    _distiller,
    _global_batches,
    _kd_batches,
    _mlp,
    _Net,
)

WORLD = 2


def _steps(model):
    params = list(model.parameters())
    opt = torch.optim.SGD(params, lr=0.1)

    def loss_fn(batch):
        x, y, _g = batch
        loss = F.cross_entropy(model(x), y)
        return loss, float(loss.detach())

    return train_steps(loss_fn, _global_batches(), opt, params, local=True, progress=False)


def _kd(student):
    return _distiller(student).fit(_kd_batches(_global_batches()), lr=1e-2, progress=False)


def _qlora():
    from medquant.qlora import QLoRAAdapter
    from medquant.testing.zoo import ZOO_BY_NAME

    ad = QLoRAAdapter(ZOO_BY_NAME["llama"].build(), r=4, lora_dropout=0.0)
    g = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(2):
        ids = torch.randint(4, 200, (2, 8), generator=g)
        batches.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()})
    losses = ad.train(batches, lr=1e-2, progress=False)
    return {n: p.detach().clone() for n, p in ad.model.named_parameters() if p.requires_grad}, losses


def _run_all():
    import warnings

    from medquant.fairquant.qat import fq_qat

    model, student = _mlp(), _Net(8, seed=3)
    steps, kd = _steps(model), _kd(student)
    lora, qlora = _qlora()
    qat_model = _mlp(seed=1)
    qat = [h["loss"] for h in fq_qat(qat_model, QAT_MAP, _global_batches(), export=False, **QAT_FIT).history]
    baq = _baq(_mlp(seed=2))
    with warnings.catch_warnings():  # in a process group of several ranks BAQ warns that each rank fits alone
        warnings.simplefilter("ignore", UserWarning)
        baq_hist = [h["loss"] for h in baq.fit(_global_batches(), **BAQ_FIT)]
    tensors = {**{f"mlp.{k}": v.clone() for k, v in model.state_dict().items()},
               **{f"kd.{k}": v.clone() for k, v in student.state_dict().items()},
               **{f"lora.{k}": v for k, v in lora.items()},
               **{f"qat.{k}": v.detach().clone() for k, v in qat_model.state_dict().items()},
               **{f"baq.{k}": v for k, v in _baq_state(baq).items()}}
    return tensors, {"steps": steps, "kd": kd, "qlora": qlora, "qat": qat, "baq": baq_hist}


def _worker(r: int, init_file: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=r, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=20))
    try:
        tensors, info = _run_all() if r == 0 else ({"none": torch.zeros(1)}, {})
    finally:
        dist.destroy_process_group()
    write_rank_results(out, "local", r, tensors, info)


def test_a_rank_training_alone_finishes_and_trains_as_one_process(tmp_path):
    (t0, i0), _ = spawn_rank_results(_worker, tmp_path, "local", WORLD, timeout=300)
    want_t, want_i = _run_all()  # one process, no process group
    assert i0 == want_i
    assert set(t0) == set(want_t)
    for k, v in want_t.items():
        assert torch.equal(t0[k], v), k


def test_local_refuses_what_communicates():
    model = _mlp()
    params = list(model.parameters())
    opt = torch.optim.SGD(params, lr=0.1)

    def loss_fn(batch):
        return model(batch).sum(), 0.0

    for kw in ({"sync_params": params}, {"sharded": True}, {"stop_together": True}):
        with pytest.raises(ValueError, match="local=True"):
            train_steps(loss_fn, [torch.randn(2, 6)], opt, params, local=True, progress=False, **kw)
