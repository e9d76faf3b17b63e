"""A worker of ``test_qlora_fixes.test_a_nan_loss_on_one_ddp_rank_stops_every_rank_with_floating_point_error``:
``train_loop`` on a ``DistributedDataParallel`` model in 2 gloo processes, rank 1's second batch NaN."""
from __future__ import annotations

import datetime
import json

import torch
import torch.distributed as dist
from torch import nn


class _Out:
    def __init__(self, loss: torch.Tensor) -> None:
        self.loss = loss


class _Regressor(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(4, 1)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> _Out:
        return _Out(((self.lin(x).squeeze(-1) - y) ** 2).mean())


def worker(rank: int, folder: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{folder}/init", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=30))  # a rank left waiting fails instead of hanging
    from torch.nn.parallel import DistributedDataParallel

    from medquant.qlora import train_loop

    g = torch.Generator().manual_seed(rank)
    batches = [{"x": torch.randn(3, 4, generator=g), "y": torch.randn(3, generator=g)} for _ in range(3)]
    if rank == 1:
        batches[1]["x"][0, 0] = float("nan")
    model = DistributedDataParallel(_Regressor())
    try:
        train_loop(model, batches, progress=False, seed=None)
        result = {"error": None}
    except Exception as e:  # noqa: BLE001 - any error is reported to the test
        result = {"error": type(e).__name__, "message": str(e)[:300]}
    result["weight"] = model.module.lin.weight.detach().flatten().tolist()
    with open(f"{folder}/rank{rank}.json", "w") as f:
        json.dump(result, f)
    dist.destroy_process_group()
