"""Run a gloo worker on every rank and read back what each rank wrote (one safetensors + one JSON file per rank)."""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file


def error_message(fn) -> str:
    """``"<Type>: <message>"`` of the exception ``fn()`` raises, ``"no error"`` when it returns: a rank records its
    outcome instead of raising, so every rank goes on to the next case and the test compares the ranks' messages."""
    try:
        fn()
    except Exception as e:  # noqa: BLE001 - the test compares the messages of the ranks
        return f"{type(e).__name__}: {e}"
    return "no error"


def write_rank_results(out: str, name: str, rank: int, tensors: dict[str, torch.Tensor], info: dict) -> None:
    """Rank ``rank``'s results as ``{out}/{name}{rank}.safetensors`` and ``{out}/{name}{rank}.json``."""
    save_file({k: v.contiguous() for k, v in tensors.items()}, f"{out}/{name}{rank}.safetensors")
    with open(f"{out}/{name}{rank}.json", "w") as f:
        json.dump(info, f)


def spawn_rank_results(worker, folder: Path, name: str, world: int,
                       timeout: float = 600.0) -> list[tuple[dict, dict]]:
    """``worker(rank, init_file, out_folder)`` on ``world`` processes, then each rank's ``(tensors, info)``.

    A rank that raises fails the call (the others are ended); ranks still running ``timeout`` seconds after the
    start (one waiting in a collective the others never enter) are ended and ``TimeoutError`` raised, so a hang
    fails the test instead of blocking the suite.
    """
    ctx = mp.spawn(worker, args=(str(folder / "init"), str(folder)), nprocs=world, join=False)
    deadline = time.monotonic() + timeout
    while not ctx.join(timeout=max(0.0, deadline - time.monotonic())):
        if time.monotonic() >= deadline:
            for p in ctx.processes:
                if p.is_alive():
                    p.terminate()
            for p in ctx.processes:
                p.join(10)
            raise TimeoutError(f"the {world} ranks did not finish within {timeout} s (a rank left waiting in a "
                               "collective?)")
    return [(load_file(str(folder / f"{name}{r}.safetensors")), json.loads((folder / f"{name}{r}.json").read_text()))
            for r in range(world)]
