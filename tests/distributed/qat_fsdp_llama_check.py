"""Manual check (not collected by pytest: importing transformers in three processes takes ~30 s here): FQ-QAT
(and, last, BAQ) with FSDP2 on the tiny LLaMA of tests/zoo.py, sharded by decoder block (``fsdp_units``), in 2 gloo processes on
CPU, equals single-process FQ-QAT on the whole batches (exported codes equal, scales and float tensors within
rtol 1e-4 / atol 1e-5). Run once with untied and once with tied input/output embeddings.

lr is 1e-3: at 1e-2, *single-process* FQ-QAT of this model on the full batch and on the same batch computed as
two halves (the numerics of 2 ranks; gradients equal within 1e-8) already end 7e-4 apart after 3 steps (a weight
crossing a rounding boundary of the fake quantizer, amplified by Adam); DDP and FSDP land on that same
two-halves result. At 1e-3 that difference is 1e-6.

    python -m tests.distributed.qat_fsdp_llama_check      # exit status 0 = equal

BAQ (untied only): ``BAQWrapper(..., layers=decoder Linears).fit(distributed=True, fsdp=True)`` sharded by
decoder block; bits, bit logits and the exported model compared with single-process BAQ.
"""
from __future__ import annotations

import sys
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

STEPS, BATCH, WORLD, SEQ = 3, 4, 2, 8
QMAP = {"re:.*layers.*": 4}  # every Linear of the decoder blocks; embeddings and lm_head stay float


def _model(tied: bool, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    from medquant.testing.zoo import text_kwargs

    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**text_kwargs(), tie_word_embeddings=tied))


def _batches() -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return [{"input_ids": torch.randint(4, 200, (BATCH, SEQ), generator=g),
             "groups": torch.tensor([0, 1, 0, 1])} for _ in range(STEPS)]


def _loss(model, batch):
    """Per-sequence mean next-token cross-entropy."""
    logits = model(input_ids=batch["input_ids"]).logits[:, :-1]
    tgt = batch["input_ids"][:, 1:]
    return F.cross_entropy(logits.transpose(1, 2), tgt, reduction="none").mean(1)


def _qat(model, batches, **kw):
    from medquant.fairquant.qat import fq_qat

    n_layers = model.config.num_hidden_layers
    return fq_qat(model, QMAP, batches, loss_fn=_loss, groups_fn=lambda b: b["groups"], lr=1e-3, lambda_fair=1.0,
                  progress=False, **({"fsdp_units": [f"model.layers.{i}" for i in range(n_layers)]} | kw)
                  if kw.get("fsdp") else kw)


def _baq(model):
    from medquant.fairquant.baq import BAQWrapper

    init = {n: (5,) * m.out_features for n, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and ".layers." in n}  # warm start at 5 bits, budget 3
    return BAQWrapper(model, layers=["re:.*layers.*"], init_bits=init, target_bits=3.0, lambda_bit=1.0,
                      lambda_fair=1.0)


BAQ_FIT = {"loss_fn": _loss, "groups_fn": lambda b: b["groups"], "weight_lr": 1e-3, "logit_lr": 0.05,
           "progress": False}


def _baq_worker(r: int, d: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{d}/init_baq", rank=r, world_size=WORLD)
    try:
        import json

        from safetensors.torch import save_file

        n = BATCH // WORLD
        local = [{k: v[r * n:(r + 1) * n] for k, v in b.items()} for b in _batches()]
        model = _model(False, seed=r)
        w = _baq(model)
        w.fit(local, distributed=True, fsdp=True, fsdp_units=[f"model.layers.{i}" for i in range(len(
            model.model.layers))], **BAQ_FIT)
        theta = {f"theta/{k}": p.theta.detach().clone() for k, p in w.params.items()}
        with open(f"{d}/baq_bits{r}.json", "w") as f:
            json.dump(w.bits(project=False), f)
        save_file(theta | {k: v.contiguous() for k, v in w.export().state_dict().items()},
                  f"{d}/baq{r}.safetensors")
    finally:
        dist.destroy_process_group()


def _worker(r: int, d: str, tied: bool) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{d}/init{int(tied)}", rank=r, world_size=WORLD)
    try:
        from safetensors.torch import save_file

        n = BATCH // WORLD
        local = [{k: v[r * n:(r + 1) * n] for k, v in b.items()} for b in _batches()]
        model = _model(tied, seed=r)  # different weights per rank: rank 0's are broadcast
        res = _qat(model, local, fsdp=True)
        shard = model.model.layers[0].mlp.up_proj.parametrizations.weight.original
        assert shard.to_local().shape[0] * WORLD == shard.shape[0], "the block was not sharded"
        if tied:
            assert res.model.lm_head.weight is res.model.model.embed_tokens.weight, "tie lost"
        sd = res.model.state_dict()
        save_file({k: v.contiguous() for k, v in sd.items() if not (tied and k == "lm_head.weight")},
                  f"{d}/qat{int(tied)}_{r}.safetensors")
    finally:
        dist.destroy_process_group()


def main() -> int:
    from safetensors.torch import load_file

    d = tempfile.mkdtemp()
    ok = True
    for tied in (False, True):
        mp.spawn(_worker, args=(d, tied), nprocs=WORLD, join=True)
        ref = _qat(_model(tied), _batches()).model.state_dict()
        base = _model(tied)
        from medquant.quant.api import quantize_

        quantize_(base, QMAP)
        moved = max(float((ref[k] - v).abs().max()) for k, v in base.state_dict().items()
                    if v.dtype.is_floating_point)  # scales, embeddings, norms
        for r in range(WORLD):
            got = load_file(f"{d}/qat{int(tied)}_{r}.safetensors")
            worst, codes_equal = 0.0, True
            for k, v in got.items():
                if v.dtype.is_floating_point:
                    worst = max(worst, float(((v - ref[k]).abs() / (1e-5 + 1e-4 * ref[k].abs())).max()))
                else:
                    codes_equal = codes_equal and torch.equal(v, ref[k])
            print(f"tied={tied} rank {r}: codes equal {codes_equal}, worst float diff / tolerance {worst:.3f} "
                  f"(training moved the exported model by {moved:.2e})")
            ok = ok and codes_equal and worst <= 1.0 and moved > 1e-3 and set(got) <= set(ref)
    import json

    mp.spawn(_baq_worker, args=(d,), nprocs=WORLD, join=True)
    single = _baq(_model(False))
    single.fit(_batches(), **BAQ_FIT)
    ref = {f"theta/{k}": p.theta.detach().clone() for k, p in single.params.items()}
    ref_bits = {k: list(v) for k, v in single.bits(project=False).items()}
    ref |= single.export().state_dict()
    moved = sum(b != 5 for v in ref_bits.values() for b in v)
    for r in range(WORLD):
        got = load_file(f"{d}/baq{r}.safetensors")
        with open(f"{d}/baq_bits{r}.json") as f:
            bits_equal = json.load(f) == ref_bits
        worst, codes_equal = 0.0, True
        for k, v in got.items():
            if v.dtype.is_floating_point:
                worst = max(worst, float(((v - ref[k]).abs() / (1e-5 + 1e-4 * ref[k].abs())).max()))
            else:
                codes_equal = codes_equal and torch.equal(v, ref[k])
        print(f"BAQ rank {r}: bits equal {bits_equal} ({moved} channels left 5 bits), codes equal {codes_equal}, "
              f"worst float diff / tolerance {worst:.3f}")
        ok = ok and moved > 0 and bits_equal and codes_equal and worst <= 1.0 and set(got) == set(ref)
    print("OK" if ok else "MISMATCH")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
