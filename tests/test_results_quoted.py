"""The benchmark numbers quoted in README.md and docs/results/*.md match the committed JSON they quote.

``TABLES`` maps each covered Markdown table (its page, the start of its header line, and a text that comes
before it on the page, to tell apart tables with the same header) to a function that, given one body row's
cells and a loader of ``benchmarks/results/*.json``, returns for every cell the JSON numbers that cell
shows, in its units and order (``None``: the cell is not checked). ``QUOTES`` does the same for headline
phrases of README.md's prose. A shown number ``q`` with ``d`` decimals matches a JSON value ``v`` when
``|v - q| <= 0.5 * 10**-d`` (``v`` rounded as shown, ties either way; a table may declare a coarser unit for a
column). Formatting around the numbers ("**3.83**", "3.29x", "96.6%", "1,316", "(0.64x)") is ignored.

Not covered: the prose-like "| target | this run |" summaries (ranges over many rows), and the tables of
docs/results/cpu_inference.md, docs/results/llamacpp.md and docs/results/ptq.md that combine several files or
derived timings row by row without a stable key (listed in ``_tables``' docstring).
"""

from __future__ import annotations

import json
import math
import re
import statistics
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
NUMBER = re.compile(r"(?<![\w.])[-+]?\d[\d,]*(?:\.\d+)?")

Expected = list[list[float] | None]


@dataclass(frozen=True)
class Table:
    """One quoted table: where it is and what each row's cells should show."""

    doc: str
    header: str
    after: str
    expected: Callable[[list[str], Callable[[str], Any]], Expected]
    carry: tuple[
        int, ...
    ] = ()  # columns whose empty or "same" cell repeats the row above (rows are keyed by it)
    units: tuple[tuple[int, float], ...] = ()  # columns rounded coarser than their last digit: (column, unit)


@cache
def _json(name: str) -> Any:
    return json.loads((RESULTS / name).read_text(encoding="utf-8"))


def find_table(text: str, header: str, after: str) -> list[list[str]]:
    """Body rows (cells stripped) of the first table after ``after`` whose header starts with ``header``."""
    start = text.index(after)
    lines = text[start:].split("\n")
    for i, line in enumerate(lines):
        if line.startswith(header):
            rows = []
            for body in lines[i + 2 :]:
                if not body.startswith("|"):
                    break
                rows.append([c.strip() for c in body.strip().strip("|").split("|")])
            return rows
    raise LookupError(f"no table {header!r} after {after!r}")


def numbers(cell: str) -> list[tuple[float, int]]:
    """The numbers a cell shows, with their decimals.

    "**3.29x** (1,316; 96.6%)" -> [(3.29, 2), (1316, 0), (96.6, 1)]; digits inside words ("W4", "Q4_0")
    are not numbers."""
    out = []
    for m in NUMBER.finditer(cell.replace("**", "")):
        s = m.group(0).replace(",", "")
        out.append((float(s), len(s.split(".")[1]) if "." in s else 0))
    return out


def check_table(text: str, table: Table, load: Callable[[str], Any] = _json) -> list[str]:
    """Mismatches between ``table`` as written in ``text`` and its JSON, one line each (empty: all match)."""
    bad = []
    rows = find_table(text, table.header, table.after)
    assert rows, f"{table.doc}: table {table.header!r} has no rows"
    previous: list[str] = []
    for cells in rows:
        keyed = [
            previous[i] if i in table.carry and c in ("", "same") and previous else c
            for i, c in enumerate(cells)
        ]
        previous = keyed
        expected = table.expected(keyed, load)
        assert len(expected) == len(cells), (table.doc, cells)
        for i, (cell, want) in enumerate(zip(cells, expected, strict=True)):
            if want is None or (i in table.carry and cell in ("", "same")):
                continue
            shown = numbers(cell)
            if len(shown) != len(want):
                bad.append(
                    f"{table.doc} row {cells[:3]}: cell {cell!r} shows {len(shown)} numbers, "
                    f"JSON gives {want}"
                )
                continue
            for (q, d), v in zip(shown, want, strict=True):
                unit = dict(table.units).get(i, 10.0**-d)
                if abs(v - q) > 0.5 * unit + 1e-9:
                    bad.append(f"{table.doc} row {cells[:3]}: {cell!r} quotes {q:g}, JSON has {v!r}")
    return bad


# ---------------------------------------------------------------- how each table's rows map to the JSON

MODEL = {"SmolLM2": "smollm2", "smollm2": "smollm2", "1.1B": "llama1b", "llama1b": "llama1b"}


def _int8_per_layer(cells: list[str], load: Callable[[str], Any]) -> Expected:
    data = load("native_gemv_int8_avx2.json")
    n, k = (int(x) for x in cells[0].split("x"))
    m = int(cells[1])
    row = next(r for r in data["rows"] if (r["n"], r["k"]) == (n, k))
    i8, i16 = row[f"int8_m{m}_us"], row[f"int16_m{m}_us"]
    limit = row["codes_bytes"] / (data["bandwidth_gbs"] * 1e9) * 1e6
    return [None, None, [i8], [i16], [i8 / i16], [limit]]


def _decode_ab_variant(file: str, model: str, key: str, load: Callable[[str], Any]) -> dict[str, Any]:
    result = next(r for r in load(file)["results"] if r["model"] == model)
    return {"rounds": result["rounds"], **result["variants"][key]}


def _ab_cols(v: dict[str, Any]) -> list[list[float]]:
    return [
        [v["vs_float32"]["ratio_median"]],
        [v["vs_bfloat16"]["ratio_median"]],
        [statistics.median(v["tok_s"]["variant"])],
        [v["rounds"]],
    ]


def _int8_decode(cells: list[str], load: Callable[[str], Any]) -> Expected:
    model = MODEL[cells[0]]
    key = cells[1].split(" ")[0]
    file = f"cpu_inference_decode_ab_{model}_avx2_int8form.json"
    v = _decode_ab_variant(file, model, key, load)
    return [None, None, *_ab_cols(v)]


def _decode_lane(cells: list[str], load: Callable[[str], Any]) -> Expected:
    model = MODEL[cells[0]]
    variant = cells[1].replace("**", "")
    key = {
        "W4 g128": "W4g128+head",
        "W4 g32": "W4g32+head",
        "W8": "W8+head",
        "W3": "W3+head",
        "W2": "W2+head",
        "W4 g128 + embeddings": "W4g128+emb+head",
    }.get(variant, "W4g128+head")
    v = _decode_ab_variant(cells[6].split("`")[1] + ".json", model, key, load)
    return [None, None, *_ab_cols(v), None]


def _row(rows: list[dict[str, Any]], model: str, variant: str, head: bool) -> dict[str, Any]:
    return next(r for r in rows if (r["model"], r["variant"], r["head"]) == (model, variant, head))


def _dec3_rows(cells: list[str], load: Callable[[str], Any]) -> Expected:
    rows = load("cpu_inference_dec3.json")["rows"]
    model, variant = MODEL[cells[0]], cells[1]
    r = _row(rows, model, variant, cells[2] == "quantized")
    f32 = _row(rows, model, "float32", False)
    bf16 = _row(rows, model, "bfloat16", False)
    b1 = r["decode_b1_tok_s"]
    out: Expected = [
        None,
        None,
        None,
        [b1],
        [b1 / f32["decode_b1_tok_s"]],
        [b1 / bf16["decode_b1_tok_s"]],
        [r["decode_b8_agg_tok_s"]],
        [r["weights_rss_mb"] / f32["weights_rss_mb"]],
    ]
    acc = r.get("accuracy")
    if acc is None:
        return [*out, None, None]
    return [
        *out,
        [100 * acc["next_token_agreement"], 100 * acc["ppl_rel_diff"]],
        [100 * acc["decode_path_next_token_agreement"], 100 * acc["decode_path_ppl_rel_diff"]],
    ]


def _prefill_ab(cells: list[str], load: Callable[[str], Any]) -> Expected:
    model = MODEL[cells[0]]
    head = "+head" if cells[1] == "quantized" else ""
    result = next(r for r in load("cpu_inference_prefill_ab.json")["results"] if r["model"] == model)
    out: Expected = [None, None]
    for variant in ("W8", "W4g128", "W4g32", "W3", "W2"):
        v = result["variants"][variant + head]
        out.append([v["all"]["ratio_median"], v["gen"]["ratio_median"]])
    return out


def _b8_split(cells: list[str], load: Callable[[str], Any]) -> Expected:
    model = MODEL[cells[0].split(",")[0]]
    file = "cpu_inference_dec3.json" if "before" in cells[0] else "cpu_inference_b8_split_gemm.json"
    rows = load(file)["rows"]
    bf16 = _row(rows, model, "bfloat16", False)["decode_b8_agg_tok_s"]
    w4 = _row(rows, model, "W4g128", True)["decode_b8_agg_tok_s"]
    w8 = _row(rows, model, "W8", True)["decode_b8_agg_tok_s"]
    return [None, [bf16], [w4, w4 / bf16], [w8, w8 / bf16]]


def _memory(cells: list[str], load: Callable[[str], Any]) -> Expected:
    r = next(r for r in load("memory_cpu.json")["rows"] if r["variant"] == cells[0])
    return [None, [r["peak_mb"]], [r["above_baseline_mb"]], [r["peak_ratio_vs_whole"]], [r["seconds"]], None]


def _complexity(cells: list[str], load: Callable[[str], Any]) -> Expected:
    cpu = load("complexity_speed_cpu.json")["cpu"]
    key = {
        "scikit-image loop, 1 process": "skimage_1proc",
        "scikit-image loop, 2 processes": "skimage_2proc",
        "medquant torch CPU, 1 thread": "torch_1threads",
        "medquant torch CPU, 2 threads": "torch_2threads",
    }
    if cells[0] not in key:  # the GPU row: not measured
        return [None] * len(cells)
    k = key[cells[0]]
    rate = cpu["images_per_s"][k]
    ms = cpu["cpu_ms_per_image"].get(k)
    return [None, [rate], [rate / cpu["images_per_s"]["skimage_1proc"]], None if ms is None else [ms]]


PRUNE_SPEED = {
    "MiniLM base": ("minilm", "base"),
    "MiniLM 30%": ("minilm", "pruned_query"),
    "SmolLM2 base": ("smollm2", "base"),
    'SmolLM2 `gqa="query"`': ("smollm2", "pruned_query"),
    'SmolLM2 `gqa="group"`': ("smollm2", "pruned_group"),
    "SmolLM2 layer-selected": ("smollm2", "layer_selected"),
}


def _prune_speed(cells: list[str], load: Callable[[str], Any]) -> Expected:
    model, variant = next(v for k, v in PRUNE_SPEED.items() if cells[0].startswith(k))
    v = next(r for r in load("prune_speed.json")["results"] if r["model"] == model)["variants"][variant]
    base = variant == "base"
    decode, ppl = v["decode_tok_s_median"], v["perplexity_iu_test32"]
    return [
        None,
        [v["params"] / 1e6],
        [v["non_embedding_params"] / 1e6],
        None if base else [-100 * v["non_embedding_reduction"]],
        [v["bytes"] / 2**20],
        [v["prefill_ms_median"], v["prefill_ms_min"], v["prefill_ms_max"]],
        None if base else [-100 * v["prefill_latency_reduction"]],
        None if decode is None else [decode],
        None if ppl is None else [ppl],
    ]


PRUNE_DISTILL = {
    "base": "base",
    "base_ft": "base_ft",
    "pruned 30%": "pruned",
    "pruned + fine-tuned": "pruned_ft",
    "pruned + distilled (": "pruned_kd",
    "pruned + distilled + 3-bit RTN": "pruned_kd_rtn3",
    "pruned + distilled + 3-bit activation": "pruned_kd_awq3",
    "layer-selected (Khan et al.) + distilled + 3-bit": "layersel_kd_awq3",
    "layer-selected (Khan et al.) + distilled": "layersel_kd",
}


def _prune_distill(cells: list[str], load: Callable[[str], Any]) -> Expected:
    data = load("prune_distill.json")
    key = PRUNE_DISTILL[max((k for k in PRUNE_DISTILL if cells[0].startswith(k)), key=len)]
    v = data["variants"][key]
    seeds = data["seed_summary"].get(key)
    three = [seeds["mean"], seeds["std"]] if seeds and seeds["n"] == 3 else None
    return [
        None,
        [v["non_embedding_params"] / 1e6],
        [v["stored_bytes"] / 2**20],
        [v["resident_mb"]],
        [v["prefill_peak_mb"]],
        [v["perplexity"]],
        three,
        [v["prefill_ms_median"]],
        [v["decode_tok_s_median"]],
    ]


def _qlora(cells: list[str], load: Callable[[str], Any]) -> Expected:
    variant = next(
        v
        for k, v in {
            "base": "base",
            "full": "full",
            "LoRA": "lora",
            "QLoRA": "qlora",
            "pruned": "pruned",
        }.items()
        if cells[0].startswith(k)
    )
    data = load("qlora_radiology.json")["rows"]
    r = data[variant]
    # lora and qlora: times from the re-run of those two alone (the table marks them with a dagger)
    timed = (
        load("qlora_radiology_lora_qlora_alone.json")["rows"][variant] if variant in ("lora", "qlora") else r
    )
    m = r["metrics"]
    quality = [[m["bleu4"]], [m["rouge_l"]], [m["meteor"]], [m["bertscore_f1"]], [r["clinical_f1"]]]
    gen = [timed["generate_s"] / m["n"]]
    if r["memory"] is None:
        return [None, *quality, None, None, None, gen]
    peak = r["memory"]["train_peak_mb"]
    return [
        None,
        *quality,
        [peak],
        [peak / data["full"]["memory"]["train_peak_mb"]],
        [timed["memory"]["train_s"]],
        gen,
    ]


def _labeler(cells: list[str], load: Callable[[str], Any]) -> Expected:
    f = load("report_labeler.json")["scores"]["test"]["uncertain_negative"]["per_finding"][cells[0]]
    return [None, [f["precision"]], [f["recall"]], [f["f1"]], [f["support"]]]


def _adaptive_agg(dataset: str, sites: str, method: str, load: Callable[[str], Any]) -> dict[str, Any]:
    rows = load("complexity_adaptive.json")["aggregate"]
    site = "blocks" if sites == "-" else sites
    return next(r for r in rows if (r["dataset"], r["sites"], r["method"]) == (dataset, site, method))


def _adaptive_kermany(cells: list[str], load: Callable[[str], Any]) -> Expected:
    method = cells[1].replace("**", "").split(" ")[0].replace(",", "")
    r = _adaptive_agg("kermany", cells[0], method, load)
    return [None, None, *([r[k], r[k + "_std"]] for k in ("accuracy", "mae", "auc")), [r["avg_bits"]]]


def _adaptive_nih(cells: list[str], load: Callable[[str], Any]) -> Expected:
    rows = [_adaptive_agg("nih", cells[0], m, load) for m in cells[1].split(" / ")]
    bits = [r["avg_bits"] for r in rows]
    shown_bits = len(numbers(cells[4]))
    return [
        None,
        None,
        [r["mae"] for r in rows],
        [x for r in rows for x in (r["auc"], r["auc_std"])],
        bits[:shown_bits] if shown_bits == 1 and len(set(bits)) == 1 else bits,
    ]


def _adaptive_medmnist(cells: list[str], load: Callable[[str], Any]) -> Expected:
    p = next(
        p
        for p in load("complexity_adaptive_medmnist.json")["paired"]
        if (p["dataset"], p["sites"], p["a"], p["b"]) == (cells[0].lower(), cells[1], "adaptive", "random")
    )
    return [None, None, *([p[k + "_mean"], p[k + "_std"]] for k in ("accuracy", "auc", "mae"))]


def _fq(file: str, dataset: str, arch: str, method: str, load: Callable[[str], Any]) -> dict[str, Any]:
    return next(
        r for r in load(file)["summary"] if (r["dataset"], r["arch"], r["method"]) == (dataset, arch, method)
    )


FQ_METHOD = {
    "FP32": "FP32",
    "U8": "U8",
    "U4": "U4",
    "U4 (PTQ)": "U4",
    "U4 PTQ": "U4",
    "Random-4": "Random-4",
    "Random-4 (control)": "Random-4",
    "FairQuant": "FairQuant",
    "FairQuant (PTQ)": "FairQuant",
    "FairQuant PTQ": "FairQuant",
    "FairQuant (no training)": "FairQuant",
    "U4-QAT": "U4-QAT",
    "U4-QAT (control)": "U4-QAT",
    "FQ-QAT": "FQ-QAT",
    "FQ-BAQ": "FQ-BAQ",
}


def _fq_quick(cells: list[str], load: Callable[[str], Any]) -> Expected:
    r = _fq("fairquant_quick.json", cells[0].lower(), "cnn", cells[1], load)
    groups = [x for g in sorted(r["acc_by_group"]) for x in (r["acc_by_group"][g], r["n_by_group"][g])]
    return [
        None,
        None,
        *(
            [r[k]]
            for k in ("avg_bits", "gbops", "avg_acc", "worst_acc", "gap", "eopp0", "eodd", "balanced_acc")
        ),
        groups,
    ]


def _fq_3seeds(cells: list[str], load: Callable[[str], Any]) -> Expected:
    r = _fq("fairquant_quick_ham10000_3seeds.json", "ham10000", "cnn", FQ_METHOD[cells[0]], load)
    return [
        None,
        [r["avg_bits"]],
        *([r[k], r[k + "_std"]] for k in ("avg_acc", "worst_acc", "eodd", "balanced_acc")),
    ]


FQ_CELLS = [("ham10000", "cnn"), ("nih", "cnn"), ("ham10000", "vit"), ("nih", "vit")]


def _fq_grid(cells: list[str], load: Callable[[str], Any]) -> Expected:
    if cells[0].startswith("float model check"):
        return [None] * len(cells)  # mean balanced accuracy of the float checks and chance levels: prose
    out: Expected = [None]
    for dataset, arch in FQ_CELLS:
        r = _fq("fairquant.json", dataset, arch, FQ_METHOD[cells[0]], load)
        out.append([r["worst_acc"], r["worst_acc_std"]])
    return out


def _fq_index(cells: list[str], load: Callable[[str], Any]) -> Expected:
    dataset = cells[0].split(" ")[0].lower()
    out: Expected = [None]
    for method, cell in zip(
        ("FP32", "U4", "Random-4", "FairQuant", "U4-QAT", "FQ-QAT", "FQ-BAQ"), cells[1:], strict=True
    ):
        r = _fq("fairquant.json", dataset, "cnn", method, load)
        out.append([r["worst_acc"], r["worst_acc_std"]][: len(numbers(cell))])
    return out


ADAPTIVE_INDEX = {
    "float activations": ("blocks", "w8"),
    "uniform 4-bit": ("blocks", "uniform-4"),
    "complexity-adaptive": ("blocks", "adaptive"),
    "same bits at random": ("blocks", "random"),
    "learned policy": ("blocks", "policy"),
}


def _adaptive_index(cells: list[str], load: Callable[[str], Any]) -> Expected:
    sites, method = next(v for k, v in ADAPTIVE_INDEX.items() if cells[0].startswith(k))
    r = _adaptive_agg("kermany", sites, method, load)
    return [
        None,
        [r["accuracy"], r["accuracy_std"]][: len(numbers(cells[1]))],
        [r["auc"], r["auc_std"]][: len(numbers(cells[2]))],
        [r["avg_bits"]],
    ]


def _qlora_index(cells: list[str], load: Callable[[str], Any]) -> Expected:
    full = _qlora([cells[0], *["0"] * 9], load)
    return [None, full[2], full[4], full[6], full[7], full[9]]


def _ptq_lm(cells: list[str], load: Callable[[str], Any]) -> Expected:
    data = load("ptq_methods_lm.json")
    pf = data["float"]["ppl"]
    method = cells[1].replace("**", "").split(" ")[0]
    if method == "float":
        return [None, None, [pf], [1.0], None, None, None]
    config = data["configs"][cells[0]]
    r = config[method]
    gap = 1 - math.log(r["ppl"] / pf) / math.log(config["RTN"]["ppl"] / pf)
    return [
        None,
        None,
        [r["ppl"]],
        [r["ppl"] / pf],
        [100 * gap],
        [r["quantize"].get("seconds_with_awq_search", r["quantize"]["seconds"])],  # AWQ rows: with the search
        [r["quantize"]["peak_above_start_mb"]],
    ]


PTQ_METHOD = {
    "RTN": "RTN",
    "GPTQ": "GPTQ",
    "group-balanced GPTQ": "GB-GPTQ",
    "learned rounding": "learned rounding",
}


def _ptq_diffs(r: dict[str, Any]) -> list[list[float]]:
    return [[100 * r[k]["diff"], *(100 * c for c in r[k]["ci95"])] for k in ("acc", "auc", "worst_acc")]


def _ptq_ham(cells: list[str], load: Callable[[str], Any]) -> Expected:
    model = {"CNN": "ham10000/cnn", "ViT": "ham10000/vit"}[cells[0].split(" ")[0]]
    m = load("ptq_methods_cnn_ham10000-cnn_ham10000-vit.json")["models"][model]
    f = m["results"]["W4"]["float"]
    float_cell = [100 * f[k]["mean"] for k in ("acc", "auc", "worst_acc")] if "float" in cells[0] else None
    method = PTQ_METHOD[cells[2].replace("**", "")]
    r = m["results"][cells[1]][method]
    seconds = statistics.fmean(t["seconds"] for t in m["timing"][f"{cells[1]} {method}"])
    return [float_cell, None, None, *_ptq_diffs(r), [100 * r["agree_with_float"]["mean"]], [seconds]]


def _ptq_kermany(cells: list[str], load: Callable[[str], Any]) -> Expected:
    m = load("ptq_methods_cnn_kermany-resnet18.json")["models"]["kermany/resnet18"]
    if cells[1] == "float":
        f = m["results"]["W4"]["float"]
        return [None, None, *([100 * f[k]["mean"]] for k in ("acc", "auc", "worst_acc")), None, None, None]
    method = PTQ_METHOD[cells[1].replace("**", "")]
    r = m["results"][cells[0]][method]
    timing = m["timing"][f"{cells[0]} {method}"]
    return [
        None,
        None,
        *_ptq_diffs(r),
        [100 * r["agree_with_float"]["mean"]],
        [statistics.fmean(t["seconds"] for t in timing)],
        [statistics.fmean(t["peak_above_start_mb"] for t in timing)],
    ]


def _tables() -> list[Table]:
    """The tables checked.

    Not covered (checked by hand or not at all when this test was written): every "| target | this run |"
    summary; in docs/results/cpu_inference.md the tables of per-call timings, source A/Bs, emulations
    (``bf16_rounding_attribution*``), compiled decoders (``aoti_decode*``), dense crossovers and the earlier
    runs of 2-3 December; docs/results/llamacpp.md (rows from several files and sections of
    ``llamacpp_quick.json``); docs/results/ptq.md's per-layer and reduced-run tables; the tolerance table of
    docs/results/complexity.md (test tolerances, not benchmark output)."""
    cpu = "docs/results/cpu_inference.md"
    return [
        Table(cpu, "| layer | M | int8 us |", "AVX2 opt-in 8-bit activations", _int8_per_layer),
        Table(
            cpu, "| model | variant | vs float32 (median of paired ratios)", "AVX2 opt-in 8-bit", _int8_decode
        ),
        Table(
            cpu,
            "| model | variant | vs float32 | vs bfloat16 | variant tok/s (median)",
            "the decode lane, and",
            _decode_lane,
            carry=(6,),
        ),
        Table(
            cpu,
            "| model | variant | head | decode b1 tok/s | vs float32",
            "3 December 2026, evening: one run",
            _dec3_rows,
        ),
        Table(
            cpu,
            "| model | head | W8 | W4 g128 | W4 g32 | W3 | W2 |",
            "Paired prefill against bfloat16 (median",
            _prefill_ab,
        ),
        Table(
            cpu,
            "| model | bfloat16 | W4 g128 + head | W8 + head |",
            "3 December 2026, evening: one run",
            _b8_split,
        ),
        Table(
            "docs/results/adaptive.md",
            "| sites | method | accuracy | MAE |",
            "Kermany (binary",
            _adaptive_kermany,
        ),
        Table(
            "docs/results/adaptive.md",
            "| sites | method | MAE | AUC |",
            "NIH sample (14 labels",
            _adaptive_nih,
        ),
        Table(
            "docs/results/adaptive.md",
            "| data set | sites | adaptive - random",
            "medmnist.json",
            _adaptive_medmnist,
        ),
        Table(
            "docs/results/fairquant.md", "| dataset | method | AvgBits |", "fairquant_quick.json", _fq_quick
        ),
        Table("docs/results/fairquant.md", "| HAM10000, SmallCNN |", "_ham10000_3seeds.json", _fq_3seeds),
        Table("docs/results/fairquant.md", "| method | HAM10000 CNN |", "### Default grid", _fq_grid),
        Table("docs/results/index.md", "| SmallCNN, worst-group acc. |", "Fairness-aware", _fq_index),
        Table(
            "docs/results/index.md", "| Kermany 64 px, compact CNN", "Complexity-adaptive", _adaptive_index
        ),
        Table("docs/results/index.md", "| model | ROUGE-L |", "QLoRA", _qlora_index),
        Table(
            "docs/results/ptq.md",
            "| config | method | perplexity |",
            "ptq_methods_lm.json",
            _ptq_lm,
            carry=(0,),
        ),
        Table(
            "docs/results/ptq.md",
            "| model | bits | method | accuracy |",
            "### HAM10000 at 64 px",
            _ptq_ham,
            carry=(0, 1),
        ),
        Table(
            "docs/results/ptq.md",
            "| bits | method | accuracy |",
            "### Kermany pediatric",
            _ptq_kermany,
            carry=(0,),
            units=((7, 10.0),),
        ),  # peak MB shown to the nearest 10
        Table("docs/results/memory.md", "| variant | peak RSS MB |", "memory_cpu.json", _memory),
        Table("docs/results/complexity.md", "| pipeline (224x224", "complexity_speed_cpu.json", _complexity),
        Table("docs/results/pruning.md", "| model / variant | params |", "prune_speed.json", _prune_speed),
        Table(
            "docs/results/prune_distill.md",
            "| variant | non-emb params |",
            "prune_distill.json",
            _prune_distill,
        ),
        Table("docs/results/qlora.md", "| model | BLEU-4 |", "qlora_radiology.json", _qlora),
        Table("docs/results/qlora.md", "| finding | P | R | F1 | n |", "report_labeler.json", _labeler),
    ]


TABLES = _tables()


# ---------------------------------------------------------------- headline figures in README.md's prose


@dataclass(frozen=True)
class Quote:
    """A phrase of a page (whitespace-insensitive) and the JSON numbers it shows, in order."""

    doc: str
    phrase: str
    expected: Callable[[Callable[[str], Any]], list[float]]


def check_quote(text: str, quote: Quote, load: Callable[[str], Any] = _json) -> list[str]:
    """Mismatches between ``quote.phrase``'s numbers and the JSON (the phrase must still be on the page)."""
    flat, phrase = " ".join(text.split()), " ".join(quote.phrase.split())
    if phrase not in flat:
        return [f"{quote.doc}: phrase no longer found (update the mapping): {phrase!r}"]
    shown, want = numbers(phrase), quote.expected(load)
    if len(shown) != len(want):
        return [f"{quote.doc}: {phrase!r} shows {len(shown)} numbers, JSON gives {want}"]
    return [
        f"{quote.doc}: {phrase!r} quotes {q:g}, JSON has {v!r}"
        for (q, d), v in zip(shown, want, strict=True)
        if abs(v - q) > 0.5 * 10.0**-d + 1e-9
    ]


def _ab(file: str, model: str, key: str, load: Callable[[str], Any]) -> dict[str, Any]:
    return _decode_ab_variant(file, model, key, load)


def _compiled(file: str, load: Callable[[str], Any]) -> dict[str, Any]:
    return load(file)["results"][0]["variants"]["W4g128+head"]["compiled"]


def _demo(load: Callable[[str], Any]) -> list[float]:
    rows = {r["weights"].split(" ")[0]: r for r in load("demo.json")["rows"]}
    f = rows["float32"]
    return [
        f["test_acc"],
        f["ci_low"],
        f["ci_high"],
        load("demo.json")["majority_acc"],
        rows["int8"]["smaller"],
        rows["int4"]["smaller"],
        rows["int3"]["smaller"],
        -rows["int2"]["diff"],
    ]


def _aoti(load: Callable[[str], Any]) -> list[float]:
    r = load("aoti_decode.json")["rows"][0]
    return [
        r["aot_vs_llamacpp_q4_0"]["decode"],
        r["aot_vs_compiled"]["decode"],
        load("aoti_decode.json")["rounds"],
        statistics.median(r["aot_decode_tok_s"]),
        statistics.median(r["llamacpp_q4_0_decode_tok_s"]),
        r["aot_vs_llamacpp_q4_0"]["prefill"],
    ]


def _ptq_readme(load: Callable[[str], Any]) -> list[float]:
    data = load("ptq_methods_lm.json")
    pf, c = data["float"]["ppl"], data["configs"]["W4 g128 sym"]
    gap = 1 - math.log(c["GPTQ"]["ppl"] / pf) / math.log(c["RTN"]["ppl"] / pf)
    return [pf, *(c[m]["ppl"] / pf for m in ("RTN", "AWQ", "GPTQ")), 100 * gap]


def _int4_ratio(model: str, load: Callable[[str], Any]) -> float:
    return next(r for r in load("int4_kernel_decode_ab_int16.json")["rows"] if r["model"] == model)[
        "median_ratio"
    ]


SMOL_AB, LLAMA_AB = "cpu_inference_decode_ab_smollm2.json", "cpu_inference_decode_ab_llama1b.json"
README = "README.md"
QUOTES = [
    Quote(
        README,
        'fair baseline (0.864 test accuracy [0.838, 0.888]; always answering "pneumonia" scores 0.625)',
        lambda load: _demo(load)[:4],
    ),
    Quote(
        README,
        "int8 (3.9x smaller), int4 (6.8x) and int3 (7.6x) lose nothing measurable; int2 loses 0.49",
        lambda load: _demo(load)[4:],
    ),
    Quote(
        README,
        "**decode 3.83x float32 / 2.36x bfloat16**",
        lambda load: [
            (v := _ab(SMOL_AB, "smollm2", "W4g128+head", load))["vs_float32"]["ratio_median"],
            v["vs_bfloat16"]["ratio_median"],
        ],
    ),
    Quote(
        README,
        "with 16-bit integer activations, 5 December: 3.29x / 2.49x, 61.5 tok/s",
        lambda load: [
            16,
            5,
            (v := _ab("cpu_inference_decode_ab_int16.json", "smollm2", "W4g128+head", load))["vs_float32"][
                "ratio_median"
            ],
            v["vs_bfloat16"]["ratio_median"],
            statistics.median(v["tok_s"]["variant"]),
        ],
    ),
    Quote(
        README,
        "**decode 6.19x float32 / 4.17x bfloat16**",
        lambda load: [
            (v := _ab(LLAMA_AB, "llama1b", "W4g128+head", load))["vs_float32"]["ratio_median"],
            v["vs_bfloat16"]["ratio_median"],
        ],
    ),
    Quote(
        README,
        "**7.53x / 4.53x**, 34.2 tok/s; paired against split activations 1.22x, SmolLM2 1.04x",
        lambda load: [
            (v := _ab("cpu_inference_decode_ab_int16.json", "llama1b", "W4g128+head", load))["vs_float32"][
                "ratio_median"
            ],
            v["vs_bfloat16"]["ratio_median"],
            statistics.median(v["tok_s"]["variant"]),
            _int4_ratio("llama1b", load),
            _int4_ratio("smollm2", load),
        ],
    ),
    Quote(
        README,
        "SmolLM2 W4 g128: **4.53x float32 / 3.37x bfloat16, 1.55x its own eager decoding**, 2.94x the "
        "bfloat16 model compiled the same way; the 1.1B model: 6.59x / 4.76x, 1.11x eager",
        lambda load: [
            (c := _compiled("cpu_inference_compile_ab_smollm2.json", load))["vs_float32"]["ratio_median"],
            c["vs_bfloat16"]["ratio_median"],
            c["vs_eager"]["ratio_median"],
            c["vs_bfloat16_compiled"]["ratio_median"],
            1.1,  # "1.1B", the model's name
            (c2 := _compiled("cpu_inference_compile_ab_llama1b.json", load))["vs_float32"]["ratio_median"],
            c2["vs_bfloat16"]["ratio_median"],
            c2["vs_eager"]["ratio_median"],
        ],
    ),
    Quote(
        README,
        "**4.97x float32 / 3.50x bfloat16, 66.6 tok/s**",
        lambda load: [
            (c := _compiled("cpu_inference_compile_ab_smollm2_quad.json", load))["vs_float32"][
                "ratio_median"
            ],
            c["vs_bfloat16"]["ratio_median"],
            statistics.median(
                load("cpu_inference_compile_ab_smollm2_quad.json")["results"][0]["variants"]["W4g128+head"][
                    "tok_s"
                ]["compiled"]
            ),
        ],
    ),
    Quote(
        README,
        "**0.69x llama.cpp's Q4_0 and 1.68x `static_decode_`** in the same 7 rounds (185.1 tok/s against "
        "llama.cpp's 272.8), prefill 0.99x",
        _aoti,
    ),
    Quote(
        README,
        "float perplexity 79.6, one run: W4 g128 symmetric RTN 2.20x, AWQ 1.54x, GPTQ 1.186x (78% of RTN's",
        _ptq_readme,
    ),
    Quote(
        README,
        "batched torch metrics at 430 images/s, 6.5x a per-image scikit-image loop",
        lambda load: [
            load("complexity_speed_cpu.json")["cpu"]["images_per_s"]["torch_2threads"],
            load("complexity_speed_cpu.json")["cpu"]["speedup_vs_skimage_1proc"],
        ],
    ),
    Quote(
        README,
        "identical weights at 0.26x the peak memory",
        lambda load: [load("memory_cpu.json")["acceptance"]["sequential_peak_ratio"]],
    ),
    Quote(
        README,
        "**QLoRA** trains at 0.35x full fine-tuning's peak memory",
        lambda load: [load("qlora_radiology.json")["qlora_over_full_peak"]],
    ),
    Quote(
        README,
        "keeps worst-group accuracy at 0.702 without training where uniform 4-bit falls to 0.450",
        lambda load: [
            _fq("fairquant.json", "ham10000", "cnn", "FairQuant", load)["worst_acc"],
            4,
            _fq("fairquant.json", "ham10000", "cnn", "U4", load)["worst_acc"],
        ],
    ),
]


@pytest.mark.parametrize("quote", QUOTES, ids=[q.phrase[:40] for q in QUOTES])
def test_quoted_phrase_matches_json(quote: Quote) -> None:
    assert check_quote((REPO / quote.doc).read_text(encoding="utf-8"), quote) == []


@pytest.mark.parametrize("table", TABLES, ids=[f"{t.doc}:{t.header[:40]}" for t in TABLES])
def test_quoted_table_matches_json(table: Table) -> None:
    text = (REPO / table.doc).read_text(encoding="utf-8")
    assert check_table(text, table) == []


def test_checker_catches_a_changed_number() -> None:
    """The check on a copy of the page with one quoted number changed by one unit of its last digit fails,
    naming the number; the page as committed passes. Same for a README phrase, and a phrase that is no longer
    on the page is reported, not skipped."""
    table = TABLES[2]
    text = (REPO / table.doc).read_text(encoding="utf-8")
    assert check_table(text, table) == []
    bad = check_table(
        text.replace("| **3.83** | **2.36** | 54.9 |", "| **3.84** | **2.36** | 54.9 |", 1), table
    )
    assert len(bad) == 1 and "3.84" in bad[0]
    prefill = TABLES[4]
    bad = check_table(text.replace("| 0.90 / 0.96 |", "| 0.90 / 0.97 |", 1), prefill)
    assert len(bad) == 1 and "0.97" in bad[0]
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    quote = QUOTES[2]
    assert check_quote(readme, quote) == []
    changed = Quote(quote.doc, quote.phrase.replace("3.83x", "3.93x"), quote.expected)
    bad = check_quote(readme.replace("**decode 3.83x float32", "**decode 3.93x float32", 1), changed)
    assert len(bad) == 1 and "quotes 3.93" in bad[0]
    assert (
        "no longer found"
        in check_quote(readme.replace("**decode 3.83x float32", "**decode 3.83x", 1), quote)[0]
    )


def test_numbers_parse_formatting() -> None:
    assert numbers("**3.29x** (1,316; 96.6%)") == [(3.29, 2), (1316.0, 0), (96.6, 1)]
    assert numbers("-") == []
