"""Resident memory of this process, and peak-memory / wall-time accounting of full fine-tuning vs LoRA vs QLoRA.

:func:`rss_mb`, :func:`peak_rss_mb`, :func:`reset_peak_rss` and :func:`malloc_trim` are the one RSS reader of
every benchmark.

Each variant runs in its own Python process (:func:`run_variant_subprocess`), so one variant's freed memory
and allocator state cannot hide in another's numbers. Inside the process:

1. ``rss_start``: resident set size after imports, before the model exists;
2. the model is loaded and every weight read once (memory-mapped safetensors pages count in RSS only when
   touched) (``rss_loaded``), then prepared for the variant (LoRA adapters, NF4 quantization)
   (``rss_prepared``);
3. the peak counters are reset - on CPU by writing ``5`` to ``/proc/self/clear_refs`` (resets ``VmHWM`` to
   the current RSS, Linux >= 4.0), on GPU by ``torch.cuda.reset_peak_memory_stats`` - so loading spikes
   (e.g. GGUF de-quantization) are not counted;
4. the training steps run; ``peak_train`` is ``VmHWM`` (CPU) or ``torch.cuda.max_memory_allocated``
   (GPU) afterwards.

Reported: ``train_peak_mb = peak_train - rss_start`` (CPU; on GPU the max allocated bytes, which start
from zero): the memory training needs *including the model as it is held for training* (float weights for
full/LoRA, NF4 for QLoRA), gradients, optimizer state and activations; and
``train_overhead_mb = peak_train - rss_loaded``: the peak above the float model just after loading (the
literal "peak RSS minus RSS after load"; on GPU the max allocated bytes minus the bytes allocated once the
model is loaded; it can be below zero for QLoRA, whose NF4 base is smaller than the float model it was made from). ``MALLOC_MMAP_THRESHOLD_=65536`` is set for the child so that freed
tensors go back to the OS instead of staying in glibc's heap and inflating RSS.
"""
from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

__all__ = [
    "VARIANTS",
    "MemoryReport",
    "enable_gradient_checkpointing",
    "malloc_trim",
    "measure_training",
    "peak_rss_mb",
    "prepare_variant",
    "reset_peak_rss",
    "rss_mb",
    "run_variant_subprocess",
]

VARIANTS = ("full", "lora", "qlora")
REPO = Path(__file__).resolve().parents[2]


def _status_kb(key: str) -> int | None:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def rss_mb() -> float:
    """Current resident set size in MiB (``VmRSS``; psutil where /proc is missing)."""
    kb = _status_kb("VmRSS")
    if kb is None:
        import psutil

        return psutil.Process().memory_info().rss / 2**20
    return kb / 1024


def peak_rss_mb() -> float:
    """Peak resident set size since the last :func:`reset_peak_rss` (``VmHWM``), MiB."""
    kb = _status_kb("VmHWM")
    if kb is None:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return kb / 1024


def reset_peak_rss() -> bool:
    """Reset ``VmHWM`` to the current RSS (write ``5`` to ``/proc/self/clear_refs``); False if not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def malloc_trim() -> None:
    """Give glibc's free heap pages back to the OS (``malloc_trim(0)``), so that memory a later step allocates
    shows up in RSS instead of silently reusing pages freed earlier; a no-op where glibc is missing."""
    import ctypes
    import ctypes.util

    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


@dataclass
class MemoryReport:
    """One variant's accounting (MiB and seconds); see the module doc for the definitions."""

    variant: str
    device: str
    rss_start_mb: float
    rss_loaded_mb: float
    rss_prepared_mb: float
    peak_train_mb: float
    train_peak_mb: float
    train_overhead_mb: float
    prepare_s: float
    train_s: float
    steps: int
    trainable_params: int
    hwm_reset: bool
    losses: list

    def as_dict(self) -> dict:
        return asdict(self)


def prepare_variant(model: nn.Module, variant: str, **lora_kwargs):
    """Make ``model`` ready for ``variant``: ``"full"`` (every parameter trainable; returns the model),
    ``"lora"`` (float base + PEFT LoRA) or ``"qlora"`` (NF4 base + LoRA); the latter two return the
    :class:`~medquant.qlora.QLoRAAdapter`'s PEFT model."""
    from medquant.qlora import QLoRAAdapter

    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    if variant == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        if hasattr(model, "config"):
            model.config.use_cache = False
        return model
    return QLoRAAdapter(model, quantize=(variant == "qlora"), **lora_kwargs).model


def enable_gradient_checkpointing(model: nn.Module) -> nn.Module:
    """Turn on activation checkpointing of the transformers model inside ``model`` (a PEFT wrapper or the model
    itself); raises ``TypeError`` for a model without transformers' ``gradient_checkpointing_enable``."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    if not hasattr(inner, "gradient_checkpointing_enable"):
        raise TypeError(f"{type(inner).__name__} has no gradient_checkpointing_enable(); gradient checkpointing "
                        "is supported for transformers models")
    if hasattr(inner, "activation_checkpointing_enable"):  # transformers >= 5.2x name; the old one warns
        inner.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        inner.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if hasattr(inner, "config"):
        inner.config.use_cache = False
    return model


def measure_training(load_model: Callable[[], nn.Module], variant: str, batches: Iterable[dict],
                     steps: int, lr: float, device: str = "cpu", progress: bool = True,
                     lora_kwargs: dict | None = None,
                     gradient_checkpointing: bool = False) -> tuple[MemoryReport, nn.Module]:
    """Load, prepare and train one variant in *this* process, recording memory and time (module doc).

    ``gradient_checkpointing=True`` recomputes each decoder layer's activations in the backward pass
    (transformers' ``gradient_checkpointing_enable`` with ``use_reentrant=False``, the QLoRA paper's setting);
    compare variants only under the same setting."""
    from medquant.qlora import train_loop

    cuda = device.startswith("cuda")
    gc.collect()
    rss_start = rss_mb()
    model = load_model().to(device)
    with torch.no_grad():  # touch every weight: memory-mapped checkpoints count in RSS only once read
        for t in list(model.parameters()) + list(model.buffers()):
            t.float().sum() if t.is_floating_point() else t.sum()
    gc.collect()
    rss_loaded = rss_mb()
    if cuda:  # the model as loaded on the GPU: what train_overhead_mb is measured above
        torch.cuda.synchronize()
        loaded = torch.cuda.memory_allocated() / 2**20
    else:
        loaded = rss_loaded
    t0 = time.perf_counter()
    model = prepare_variant(model, variant, **(lora_kwargs or {}))
    if gradient_checkpointing:
        enable_gradient_checkpointing(model)
    prep_s = time.perf_counter() - t0
    gc.collect()
    rss_prep = rss_mb()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    ok = reset_peak_rss()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    t0 = time.perf_counter()
    losses = train_loop(model, batches, steps=steps, lr=lr, progress=progress, desc=variant)
    if cuda:
        torch.cuda.synchronize()
    train_s = time.perf_counter() - t0
    if cuda:
        peak = torch.cuda.max_memory_allocated() / 2**20
        start = 0.0
    else:
        peak = peak_rss_mb()
        start = rss_start
    rep = MemoryReport(variant, device, rss_start, rss_loaded, rss_prep, peak, peak - start,
                       peak - loaded, prep_s, train_s, len(losses), trainable, ok, losses)
    return rep, model


def run_variant_subprocess(args: list[str], timeout: float | None = None) -> dict:
    """Run ``python <args>`` (e.g. ``["-m", "benchmarks.qlora_radiology", "--worker", "qlora", ...]``) in a fresh
    process started in the repository root (``MALLOC_MMAP_THRESHOLD_=65536``) and parse the JSON object it prints
    on its last stdout line. Raises ``RuntimeError`` with the child's stderr tail on failure."""
    env = dict(os.environ)
    env.setdefault("MALLOC_MMAP_THRESHOLD_", "65536")
    env.setdefault("HF_HUB_OFFLINE", "1")
    proc = subprocess.run([sys.executable, *args], check=False, capture_output=True, text=True, env=env,
                          timeout=timeout, cwd=REPO)
    if proc.returncode != 0:
        raise RuntimeError(f"variant process {args} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    lines = [ln for ln in proc.stdout.strip().splitlines() if ln.startswith("{")]
    if not lines:
        raise RuntimeError(f"variant process {args} printed no JSON result:\n{proc.stdout[-2000:]}")
    return json.loads(lines[-1])
