"""Manual probe (not collected by pytest): can QLoRA (NF4 bitsandbytes base + PEFT LoRA) train with FSDP2
``fully_shard`` in 2 gloo processes on CPU? Each rank builds the tiny LLaMA adapter, shards every decoder layer
and the root with ``fully_shard`` and runs ``train_loop`` on its half of every batch; the LoRA weights are then
gathered (``full_tensor``) and compared with single-process training on the whole batches.

    python -m tests.distributed.qlora_fsdp_check                 # prints OK / MISMATCH, or each rank's error
    python -m tests.distributed.qlora_fsdp_check --ignore-4bit   # keep the NF4 weights out of the sharding
                                                                 # (ignored_params: replicated on every rank)

The outcome on this machine (torch 2.13 CPU, bitsandbytes 0.50.2, PEFT 0.21) is recorded in
docs/reference/large_models.md (FSDP2, QLoRA).
"""
from __future__ import annotations

import os
import sys
import tempfile
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tests.distributed.qlora_ddp_check import BATCH, WORLD, _adapter, _batches, _lora


def _worker(r: int, d: str, ignore_4bit: bool) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{d}/init", rank=r, world_size=WORLD)
    try:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard
        from torch.distributed.tensor import DTensor

        from medquant.qlora.adapter import train_loop

        ad = _adapter()
        mesh = init_device_mesh("cpu", (WORLD,))
        layers = next(m for n, m in ad.model.named_modules() if n.endswith("layers") and hasattr(m, "__len__"))
        kw = {"mesh": mesh}
        if ignore_4bit:
            import bitsandbytes as bnb

            kw["ignored_params"] = {p for p in ad.model.parameters() if isinstance(p, bnb.nn.Params4bit)}
            assert kw["ignored_params"], "no 4-bit parameter found"
        for layer in layers:
            fully_shard(layer, **kw)
        fully_shard(ad.model, **kw)
        n = BATCH // WORLD
        local = [{k: v[r * n:(r + 1) * n] for k, v in b.items()} for b in _batches()]
        train_loop(ad.model, local, lr=1e-2, progress=False)
        lora = {k: (v.full_tensor() if isinstance(v, DTensor) else v) for k, v in _lora(ad).items()}
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in lora.items()}, f"{d}/lora{r}.safetensors")
    except Exception:  # noqa: BLE001 - the probe records any failure
        with open(f"{d}/error{r}.txt", "w") as f:
            f.write(traceback.format_exc())
    finally:
        dist.destroy_process_group()


def main() -> int:
    from safetensors.torch import load_file

    d = tempfile.mkdtemp()
    mp.spawn(_worker, args=(d, "--ignore-4bit" in sys.argv), nprocs=WORLD, join=True)
    errors = [p for p in sorted(os.listdir(d)) if p.startswith("error")]
    if errors:
        for p in errors:
            with open(os.path.join(d, p)) as f:
                text = f.read()
            print(f"--- {p}\n{text}")
        print("FAILED: QLoRA with FSDP2 fully_shard raised (above)")
        return 2
    single = _adapter()
    single.train(_batches(), lr=1e-2, progress=False)
    ref = _lora(single)
    ok = True
    for r in range(WORLD):
        got = load_file(f"{d}/lora{r}.safetensors")
        diff = max(float((got[k] - ref[k]).abs().max()) for k in ref)
        print(f"rank {r}: max |LoRA weight - single process| = {diff:.2e}")
        ok = ok and set(got) == set(ref) and diff < 1e-4
    print("OK" if ok else "MISMATCH")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
