"""``all_reduce_gradients`` over a parameter list that holds integer parameters (NF4 / packed weights).

``all_reduce_gradients(model.parameters())`` of a QLoRA model passes bitsandbytes' uint8 ``Params4bit`` weights
(frozen; autograd gives only floating-point / complex tensors gradients). Such a parameter has no gradient to
reduce, so it is left out: it keeps ``.grad = None`` and the float gradients are averaged (summed) as without it.
It used to get a uint8 zero gradient, be summed in its bucket and fail in the division by the world size
(``RuntimeError: result type Float can't be cast to the desired output type Byte``), after an earlier bucket had
been reduced and with the zero gradient left on the integer parameter. Two gloo processes (CPU); the reference is
the hand-computed mean / sum of the ranks' gradients.
"""
from __future__ import annotations

import datetime

import pytest
import torch
import torch.distributed as dist
from torch import nn

from medquant.distributed import all_reduce_gradients
from tests.distributed._spawn import error_message, spawn_rank_results, write_rank_results

WORLD = 2


def _grad(r: int, shape: tuple[int, ...], k: int) -> torch.Tensor:
    return torch.arange(1, 1 + torch.Size(shape).numel(), dtype=torch.float32).reshape(shape) * (10 * r + k)


def _worker(r: int, init_file: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=r, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=15))
    res: dict[str, torch.Tensor] = {}
    info: dict = {}
    try:
        for average in (True, False):
            a = nn.Parameter(torch.zeros(3))
            q = nn.Parameter(torch.zeros(4, dtype=torch.uint8), requires_grad=False)
            b = nn.Parameter(torch.zeros(2, 2))
            a.grad, b.grad = _grad(r, (3,), 1), _grad(r, (2, 2), 2)
            # a small bucket: a, q and b each in their own bucket
            tag = "mean" if average else "sum"
            info[tag] = error_message(lambda a=a, q=q, b=b, average=average: all_reduce_gradients(
                [a, q, b], average=average, bucket_bytes=4))
            info[f"{tag}_q_grad_none"] = q.grad is None
            res[f"{tag}/a"], res[f"{tag}/b"] = a.grad, b.grad
        t = torch.tensor([float(r + 1)])
        dist.all_reduce(t)  # the ranks are still in step
        res["after"] = t
    finally:
        write_rank_results(out, "intp", r, res, info)
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    return spawn_rank_results(_worker, tmp_path_factory.mktemp("gloo_int_params"), "intp", WORLD, timeout=180)


@pytest.mark.parametrize("tag", ["mean", "sum"])
def test_integer_parameters_are_left_out(ranks, tag):
    for r in range(WORLD):
        tensors, info = ranks[r]
        assert info[tag] == "no error"
        assert info[f"{tag}_q_grad_none"] is True
        for name, shape, k in (("a", (3,), 1), ("b", (2, 2), 2)):
            want = sum(_grad(s, shape, k) for s in range(WORLD))
            torch.testing.assert_close(tensors[f"{tag}/{name}"], want / WORLD if tag == "mean" else want)
        torch.testing.assert_close(tensors["after"], torch.tensor([3.0]))
