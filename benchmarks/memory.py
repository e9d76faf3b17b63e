"""Peak host memory of sequential (block-by-block) vs whole-model quantization of a ~1.1B-parameter LLaMA.

The model is a ``LlamaForCausalLM`` built from a config (hidden 2048, MLP 5632, 22 layers, 32 query / 4 key-value
heads, vocabulary 32000: the TinyLlama-1.1B shapes) with seeded random float weights, written once as a sharded
safetensors checkpoint (one file per decoder layer, plus ``config.json``). Every variant then starts from that
checkpoint in a fresh subprocess (1 torch thread each) and quantizes every Linear layer, ``lm_head`` included, to
``QuantConfig(4)`` (4-bit, group 128, symmetric):

* ``whole`` (baseline): meta skeleton, every float tensor read into it, then ``medquant.quantize_``;
* ``sequential``: meta skeleton, ``medquant.calibrate.sequential.quantize_sequential(..., checkpoint=dir)`` - one float block
  in memory at a time;
* ``shard x1`` / ``shard x2``: ``medquant.calibrate.quantize_shard`` with 1 process, and with 2 processes running
  at the same time (each quantizes half of the blocks; rank 0 also the embeddings / norms / lm_head); the shards are
  then put together by ``assemble_shards`` in another process to check the weights;
* ``hf on-load`` (optional, ``--hf``): ``LlamaForCausalLM.from_pretrained(dir, quantization_config=MedQuantConfig(...))``;
  transformers reads the checkpoint through a memory map, whose touched pages count in the resident set.

Peak memory = the subprocess's peak resident set size (``VmHWM``), which includes the interpreter, torch and
transformers (``baseline``, the resident set after the imports, is reported too). Every variant's quantized state
dict is hashed (SHA-256 over names, dtypes and bytes) and must equal the ``whole`` one. Checkpoint tensors are
read with plain file reads (:class:`medquant.calibrate.sequential.CheckpointSource`) in ``whole``, ``sequential`` and
``shard`` alike. The machine may be shared: wall times are noisy; memory is not.

    python -m benchmarks.memory                 # ~1.1B params, float32 (4.4 GB checkpoint in a temp dir)
    python -m benchmarks.memory --dtype bfloat16 --hf
    python -m benchmarks.memory --small         # 4 layers x 512 hidden, for a quick check

Writes ``benchmarks/results/memory_cpu.json`` (``--out``) and prints a table.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common.env import hardware, versions
from benchmarks.common.memory import peak_rss_mb, rss_mb

REPO = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).resolve().parent / "results"
FULL = {"hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 22, "num_attention_heads": 32,
        "num_key_value_heads": 4, "vocab_size": 32000}
SMALL = {"hidden_size": 512, "intermediate_size": 1408, "num_hidden_layers": 4, "num_attention_heads": 8,
         "num_key_value_heads": 2, "vocab_size": 4096}


# ---------------------------------------------------------------------------------------------- child code
def _fingerprint(model) -> str:
    import hashlib

    h = hashlib.sha256()
    for k, t in sorted(model.state_dict().items()):
        h.update(k.encode())
        h.update(str(t.dtype).encode())
        h.update(t.detach().contiguous().cpu().view(-1).view(__import__("torch").uint8).numpy().tobytes())
    return h.hexdigest()


def _skeleton(ckpt: Path):
    from accelerate import init_empty_weights
    from transformers import AutoConfig, LlamaForCausalLM

    config = AutoConfig.from_pretrained(str(ckpt))
    with init_empty_weights():
        return LlamaForCausalLM(config)


def child(args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(1)
    import accelerate  # noqa: F401  (every import is counted in the baseline of every variant)
    from transformers import AutoConfig, LlamaForCausalLM  # noqa: F401

    import medquant
    import medquant.calibrate.sequential
    import medquant.distributed
    import medquant.hf.integration
    from medquant import QuantConfig
    from medquant.calibrate.sequential import CheckpointSource

    baseline = rss_mb()
    ckpt = Path(args.ckpt)
    cfg = QuantConfig(4)
    t0 = time.perf_counter()
    out: dict = {"variant": args.variant}
    if args.variant == "make":
        out["params"] = _make_checkpoint(ckpt, json.loads(args.config), args.dtype)
    elif args.variant == "whole":
        model = _skeleton(ckpt)
        src = CheckpointSource(ckpt)
        state = {k: src.get(k) for k in model.state_dict()}
        model.load_state_dict(state, assign=True)
        del state
        out["loaded_mb"] = rss_mb()
        medquant.quantize_(model, cfg)
    elif args.variant == "sequential":
        from medquant.calibrate.sequential import quantize_sequential

        model = _skeleton(ckpt)
        quantize_sequential(model, cfg, device="cpu", checkpoint=ckpt)
    elif args.variant == "shard":
        from medquant.calibrate.shards import quantize_shard

        model = _skeleton(ckpt)
        quantize_shard(model, cfg, ckpt, args.shards, rank=args.rank, world_size=args.world, device="cpu")
    elif args.variant == "assemble":
        from medquant.calibrate.shards import assemble_shards

        model = _skeleton(ckpt)
        assemble_shards(model, args.shards)
    elif args.variant == "hf":
        import transformers
        from transformers import LlamaForCausalLM

        from medquant.hf import MedQuantConfig

        transformers.logging.disable_progress_bar()
        model = LlamaForCausalLM.from_pretrained(str(ckpt), quantization_config=MedQuantConfig(cfg))
    else:
        raise ValueError(args.variant)
    out["seconds"] = time.perf_counter() - t0
    out["peak_mb"] = peak_rss_mb()
    out["baseline_mb"] = baseline
    if args.variant in ("whole", "sequential", "assemble", "hf"):
        out["n_quantized"] = len(medquant.quant.quantized_modules(model))
        out["sha256"] = _fingerprint(model)
    print("RESULT " + json.dumps(out), flush=True)


def _make_checkpoint(ckpt: Path, config: dict, dtype: str) -> int:
    import torch
    from accelerate import init_empty_weights
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(**config, max_position_embeddings=2048, tie_word_embeddings=False, dtype=dtype)
    with init_empty_weights():
        model = LlamaForCausalLM(cfg)
    ckpt.mkdir(parents=True, exist_ok=True)
    cfg.save_pretrained(str(ckpt))
    tdtype = getattr(torch, dtype)
    shards: dict[str, dict[str, torch.Tensor]] = {}
    for i, (k, t) in enumerate(model.state_dict().items()):
        parts = k.split(".")
        shard = f"layer-{int(parts[2]):03d}" if k.startswith("model.layers.") else "rest"
        shards.setdefault(shard, {})[k] = (t.shape, i)
    weight_map = {}
    for shard, entries in shards.items():
        tensors = {}
        for k, (shape, i) in entries.items():
            g = torch.Generator().manual_seed(1000 + i)
            tensors[k] = torch.ones(shape, dtype=tdtype) if k.endswith("norm.weight") \
                else (torch.randn(shape, generator=g) * 0.02).to(tdtype)
            weight_map[k] = f"{shard}.safetensors"
        save_file(tensors, str(ckpt / f"{shard}.safetensors"), metadata={"format": "pt"})
        del tensors
    total = sum(t.numel() for t in model.state_dict().values())
    (ckpt / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_parameters": total}, "weight_map": weight_map}))
    return total


# ---------------------------------------------------------------------------------------------- parent
def _run(argv: list[str], env=None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "benchmarks.memory", "--child", *argv], stdout=subprocess.PIPE,
                            text=True, cwd=REPO, env=env)


def _result(p: subprocess.Popen) -> dict:
    out, _ = p.communicate()
    if p.returncode != 0:
        raise RuntimeError(f"child failed with exit code {p.returncode}: {out[-2000:]}")
    line = [ln for ln in out.splitlines() if ln.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT "):])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--variant", help=argparse.SUPPRESS)
    ap.add_argument("--ckpt", help=argparse.SUPPRESS)
    ap.add_argument("--shards", help=argparse.SUPPRESS)
    ap.add_argument("--rank", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--world", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--config", help=argparse.SUPPRESS)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--small", action="store_true", help="4 layers x 512 hidden instead of ~1.1B parameters")
    ap.add_argument("--hf", action="store_true", help="also measure transformers quantize-on-load")
    ap.add_argument("--workdir", default=None, help="where the float checkpoint goes (default: a temp dir)")
    ap.add_argument("--reuse", action="store_true", help="reuse the float checkpoint already in --workdir")
    ap.add_argument("--out", default=str(RESULTS / "memory_cpu.json"))
    args = ap.parse_args(argv)
    if args.child:
        child(args)
        return 0

    config = SMALL if args.small else FULL
    work = Path(args.workdir or tempfile.mkdtemp(prefix="medquant-memory-"))
    ckpt, shards1, shards2 = work / "float", work / "shards1", work / "shards2"
    common = ["--ckpt", str(ckpt), "--dtype", args.dtype]
    try:
        index = ckpt / "model.safetensors.index.json"
        if args.reuse and index.is_file():
            make = {"params": json.loads(index.read_text())["metadata"]["total_parameters"], "peak_mb": None}
            print(f"reusing the float checkpoint in {ckpt}", flush=True)
        else:
            t = time.perf_counter()
            make = _result(_run(["--variant", "make", "--config", json.dumps(config), *common]))
            print(f"float checkpoint written in {time.perf_counter() - t:.0f} s (peak {make['peak_mb']:.0f} MB)",
                  flush=True)
        rows = []
        for d in (shards1, shards2):
            shutil.rmtree(d, ignore_errors=True)
        for variant in ["whole", "sequential"]:
            r = _result(_run(["--variant", variant, *common]))
            rows.append(r)
            print(f"{variant}: peak {r['peak_mb']:.0f} MB, {r['seconds']:.0f} s", flush=True)
        r = _result(_run(["--variant", "shard", "--shards", str(shards1), "--rank", "0", "--world", "1", *common]))
        r["variant"] = "shard x1"
        rows.append(r)
        t = time.perf_counter()
        procs = [_run(["--variant", "shard", "--shards", str(shards2), "--rank", str(k), "--world", "2", *common])
                 for k in range(2)]
        res2 = [_result(p) for p in procs]
        wall2 = time.perf_counter() - t
        for k, r in enumerate(res2):
            r["variant"] = f"shard x2 rank {k}"
            rows.append(r)
        for name, d in (("assemble x1", shards1), ("assemble x2", shards2)):
            r = _result(_run(["--variant", "assemble", "--shards", str(d), *common]))
            r["variant"] = name
            rows.append(r)
        if args.hf:
            r = _result(_run(["--variant", "hf", *common]))
            r["variant"] = "hf on-load"
            rows.append(r)
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)

    by = {r["variant"]: r for r in rows}
    whole = by["whole"]
    for r in rows:
        r["peak_ratio_vs_whole"] = r["peak_mb"] / whole["peak_mb"]
        r["above_baseline_mb"] = r["peak_mb"] - r["baseline_mb"]
        if "sha256" in r:
            r["same_weights_as_whole"] = r["sha256"] == whole["sha256"]
    result = {
        "benchmark": "memory",
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "hardware": hardware(torch_threads_per_process=1, note="shared machine"),
        "versions": versions("accelerate", "safetensors"),
        "model": {"class": "LlamaForCausalLM", **config, "dtype": args.dtype, "params": make["params"]},
        "quant_config": {"bits": 4, "scope": "group", "group_size": 128, "symmetric": "auto (True at 4 bits)"},
        "seeds": "tensor i of the state dict: torch.Generator().manual_seed(1000 + i), N(0, 0.02); norms = 1",
        "baseline": "whole",
        "checkpoint_peak_mb": make["peak_mb"],
        "two_process_wall_seconds": wall2,
        "rows": rows,
        "acceptance": {
            "sequential_same_weights": by["sequential"].get("same_weights_as_whole"),
            "sequential_peak_ratio": by["sequential"]["peak_ratio_vs_whole"],
            "sequential_peak_at_most_a_third": by["sequential"]["peak_ratio_vs_whole"] <= 1 / 3,
            "shards_x2_same_weights": by["assemble x2"].get("same_weights_as_whole"),
        },
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(format_table(result))
    print(f"wrote {out}")
    return 0


def format_table(result: dict) -> str:
    head = (f"{'variant':<20} {'peak MB':>9} {'baseline':>9} {'above':>9} {'vs whole':>9} {'seconds':>8} "
            f"{'same weights':>12}")
    lines = [head]
    for r in result["rows"]:
        same = {True: "yes", False: "NO"}.get(r.get("same_weights_as_whole"), "-")
        lines.append(f"{r['variant']:<20} {r['peak_mb']:>9.0f} {r['baseline_mb']:>9.0f} "
                     f"{r['above_baseline_mb']:>9.0f} {r['peak_ratio_vs_whole']:>9.3f} {r['seconds']:>8.1f} "
                     f"{same:>12}")
    a = result["acceptance"]
    lines.append(f"sequential / whole peak = {a['sequential_peak_ratio']:.3f} "
                 f"({'<=' if a['sequential_peak_at_most_a_third'] else '>'} 1/3); same weights: "
                 f"{a['sequential_same_weights']}; 2 processes wall {result['two_process_wall_seconds']:.0f} s")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
