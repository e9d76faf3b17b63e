"""Manual check (not collected by pytest: ~1.5 min on a loaded 2-core CPU, mostly imports of transformers, PEFT
and bitsandbytes in three processes): QLoRA on an NF4 (bitsandbytes) base, trained with
``QLoRAAdapter.train(..., ddp=True)`` in 2 gloo processes on CPU, each with half of every batch, ends with the
LoRA weights of single-process training on the whole batches.

    python -m tests.distributed.qlora_ddp_check        # exit status 0 = equal within tolerance
"""
from __future__ import annotations

import sys
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

STEPS, BATCH, WORLD = 3, 4, 2


def _batches() -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(STEPS):
        ids = torch.randint(4, 200, (BATCH, 8), generator=g)
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()})
    return out


def _adapter():
    from medquant.qlora import QLoRAAdapter
    from medquant.testing.zoo import ZOO_BY_NAME

    return QLoRAAdapter(ZOO_BY_NAME["llama"].build(), r=4, lora_dropout=0.0)  # NF4 base (quantize=True)


def _lora(ad) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in ad.model.named_parameters() if p.requires_grad}


def _worker(r: int, d: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{d}/init", rank=r, world_size=WORLD)
    try:
        ad = _adapter()
        n = BATCH // WORLD
        local = [{k: v[r * n:(r + 1) * n] for k, v in b.items()} for b in _batches()]
        ad.train(local, lr=1e-2, progress=False, ddp=True)
        from safetensors.torch import save_file

        save_file(_lora(ad), f"{d}/lora{r}.safetensors")
    finally:
        dist.destroy_process_group()


def main() -> int:
    from safetensors.torch import load_file

    d = tempfile.mkdtemp()
    mp.spawn(_worker, args=(d,), nprocs=WORLD, join=True)
    single = _adapter()
    start = _lora(single)
    single.train(_batches(), lr=1e-2, progress=False)
    ref = _lora(single)
    moved = max(float((ref[k] - start[k]).abs().max()) for k in ref)
    ok = moved > 1e-3
    for r in range(WORLD):
        got = load_file(f"{d}/lora{r}.safetensors")
        diff = max(float((got[k] - ref[k]).abs().max()) for k in ref)
        print(f"rank {r}: max |LoRA weight - single process| = {diff:.2e} (training moved them by {moved:.2e})")
        ok = ok and set(got) == set(ref) and diff < 1e-4
    print("OK" if ok else "MISMATCH")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
