"""Run a gloo worker on every rank and read back what each rank wrote (one safetensors + one JSON file per rank)."""
from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file


def write_rank_results(out: str, name: str, rank: int, tensors: dict[str, torch.Tensor], info: dict) -> None:
    """Rank ``rank``'s results as ``{out}/{name}{rank}.safetensors`` and ``{out}/{name}{rank}.json``."""
    save_file({k: v.contiguous() for k, v in tensors.items()}, f"{out}/{name}{rank}.safetensors")
    with open(f"{out}/{name}{rank}.json", "w") as f:
        json.dump(info, f)


def spawn_rank_results(worker, folder: Path, name: str, world: int) -> list[tuple[dict, dict]]:
    """``worker(rank, init_file, out_folder)`` on ``world`` processes, then each rank's ``(tensors, info)``."""
    mp.spawn(worker, args=(str(folder / "init"), str(folder)), nprocs=world, join=True)
    return [(load_file(str(folder / f"{name}{r}.safetensors")), json.loads((folder / f"{name}{r}.json").read_text()))
            for r in range(world)]
