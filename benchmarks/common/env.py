"""Where and with what a benchmark ran: package versions and the machine (one definition for every benchmark).

* :func:`versions` - python, torch, numpy, transformers and medquant versions, plus any extra installed packages
  named by the caller (``versions("peft", "bitsandbytes")``); a package that is not installed maps to ``None``.
* :func:`hardware` - machine, processor, CPU model and the matrix-instruction flags from ``/proc/cpuinfo``
  (AVX2, AVX512F, AVX512-BF16, AVX512-VNNI / AVX-VNNI, AMX-BF16 / AMX-INT8 / AMX-TILE), CPU count, torch threads,
  load average and CUDA device (if any), plus caller-supplied fields.
* :func:`utc_now` - a record's date; :func:`run_record` / :func:`save_results` - the record of a run and its files.
"""
from __future__ import annotations

import importlib
import os
import platform

__all__ = ["CPU_FLAGS", "cpu_info", "hardware", "utc_now", "versions"]

# /proc/cpuinfo flag -> the name recorded (the instructions that decide which CPU kernels are fast)
CPU_FLAGS = {
    "avx2": "avx2",
    "avx512f": "avx512f",
    "avx512_bf16": "avx512_bf16",
    "avx512_vnni": "avx512_vnni",
    "avx_vnni": "avx_vnni",
    "amx_bf16": "amx_bf16",
    "amx_int8": "amx_int8",
    "amx_tile": "amx_tile",
}


def cpu_info(path: str = "/proc/cpuinfo") -> dict:
    """``{"model": str | None, "flags": {name: bool}}`` from ``/proc/cpuinfo`` (first processor); flags all
    ``None`` where the file cannot be read (not Linux)."""
    try:
        with open(path) as fh:
            text = fh.read()
    except OSError:
        return {"model": None, "flags": {v: None for v in CPU_FLAGS.values()}}
    model, flags = None, set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and model is None:
            model = value.strip()
        elif key == "flags" and not flags:
            flags = set(value.split())
        if model is not None and flags:
            break
    return {"model": model, "flags": {v: k in flags for k, v in CPU_FLAGS.items()}}


def _version(name: str) -> str | None:
    try:
        return getattr(importlib.import_module(name), "__version__", None)
    except ImportError:
        return None


def versions(*extra: str) -> dict:
    """Versions of python, torch, numpy, transformers, medquant and of the packages named in ``extra`` (import
    names, e.g. ``"sklearn"``)."""
    out = {"python": platform.python_version()}
    for name in ("torch", "numpy", "transformers", "medquant", *extra):
        out[name] = _version(name)
    return out


def hardware(**fields) -> dict:
    """The machine a benchmark ran on; keyword arguments are added as they are (e.g. ``note=...``)."""
    import torch

    cpu = cpu_info()
    out = {"machine": platform.machine(), "processor": platform.processor() or platform.machine(),
           "cpu_model": cpu["model"], "cpu_flags": cpu["flags"], "cpus": os.cpu_count(),
           "torch_threads": torch.get_num_threads(), "loadavg": list(os.getloadavg()) if hasattr(os, "getloadavg")
           else None, "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
    out.update(fields)
    return out


def native_record() -> dict:
    """What medquant's native library has on this machine: :func:`medquant.kernels.native.native_status`'s
    kernel fields (``gemv4``, ``gemv4_bf16``, ``gemv_stream``, ``gemv_avx2``, ``gemm``), its compiler ``flags``,
    and ``form``: ``"AVX512"``, ``"AVX2 + FMA (float32, int16 x, int8 x)"`` or ``"none"`` (no weight-only matmul)."""
    from medquant.kernels.native import native_status

    st = native_status()
    out = {key: st[key] for key in ("gemv4", "gemv4_bf16", "gemv_stream", "gemv_avx2", "gemm", "flags")}
    out["form"] = "none" if not st["gemv4"] else "AVX2 + FMA (float32, int16 x, int8 x)" if st["gemv_avx2"] else "AVX512"
    return out


def utc_now() -> str:
    """The UTC date and time now, to the second, ISO 8601 (``2026-12-04T23:28:48+00:00``): a record's ``date``."""
    from datetime import datetime, timezone

    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def run_record(benchmark: str, seed: int, loadavg_before: list, rows: list, **fields) -> dict:
    """The JSON record of one benchmark run: its name, the UTC date now, ``seed``, torch's thread count, then
    ``fields`` as given, the load averages before the run and now, :func:`hardware`, :func:`versions` and
    ``rows`` last."""
    import torch

    return {"benchmark": benchmark, "date": utc_now(), "seed": seed,
            "threads": torch.get_num_threads(), **fields, "loadavg_before": loadavg_before,
            "loadavg_after": list(os.getloadavg()), "hardware": hardware(), "versions": versions(), "rows": rows}


def save_results(results_dir, stem: str, result: dict, markdown: str) -> None:
    """Write ``<stem>.json`` (the result, indented) and ``<stem>.md`` (the table) into ``results_dir``, created if
    missing, and print the table."""
    import json
    from pathlib import Path

    out = Path(results_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / f"{stem}.md").write_text(markdown)
    print(markdown)
