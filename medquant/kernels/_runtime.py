"""Backend selection for the kernels: is Triton usable here, are we interpreting, which backend is forced.

Nothing in this module imports Triton at import time: ``TRITON_INTERPRET`` is read by Triton when it is first
imported (and when a kernel is decorated), so ``import medquant`` must leave the import to the first kernel call.
"""
from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
from collections.abc import Iterator

import torch

BACKENDS = ("auto", "triton", "torch")
_forced: str | None = None


def interpreting() -> bool:
    """True when Triton kernels run in the CPU interpreter (``TRITON_INTERPRET=1``)."""
    if importlib.util.find_spec("triton") is None:
        return False
    try:
        from triton import knobs

        return bool(knobs.runtime.interpret)
    except (ImportError, AttributeError):  # older Triton: the env var is the switch
        return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.cache
def _triton_importable() -> bool:
    if importlib.util.find_spec("triton") is None:
        return False
    try:
        import triton
        import triton.language  # noqa: F401
    except Exception:  # noqa: BLE001  (a broken install must not break medquant: fall back to torch)
        return False
    return True


def triton_available(device: torch.device | str | None = None) -> bool:
    """Whether the Triton kernels can run on ``device`` (default: CUDA if present, else the interpreter).

    CUDA tensors need Triton and a CUDA device; CPU tensors need Triton in interpreter mode
    (``TRITON_INTERPRET=1`` set before Triton was first imported).
    """
    if not _triton_importable():
        return False
    if device is None:
        return torch.cuda.is_available() or interpreting()
    dev = torch.device(device)
    if dev.type == "cuda":
        return torch.cuda.is_available()
    if dev.type == "cpu":
        return interpreting()
    return False


def check_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is not supported; accepted: {', '.join(BACKENDS)}")
    return backend


@contextlib.contextmanager
def force_backend(backend: str) -> Iterator[None]:
    """Force the body of every medquant custom op to use ``backend`` ("triton" or "torch") in this block.

    Meant for tests and benchmarks in eager mode (e.g. running the real kernels on CPU tensors under
    ``TRITON_INTERPRET=1``); ``"auto"`` restores the default choice (Triton on CUDA, torch elsewhere).
    """
    global _forced
    check_backend(backend)
    prev = _forced
    _forced = None if backend == "auto" else backend
    try:
        yield
    finally:
        _forced = prev


def resolve_backend(device: torch.device, backend: str = "auto") -> str:
    """The backend that runs now for tensors on ``device``: ``"triton"`` or ``"torch"``."""
    check_backend(backend)
    if backend == "auto" and _forced is not None:
        backend = _forced
    if backend == "auto":
        return "triton" if device.type == "cuda" and triton_available(device) else "torch"
    if backend == "triton" and not triton_available(device):
        if device.type == "cpu":
            raise RuntimeError(
                "the Triton kernels need a CUDA device; to run them on CPU tensors set TRITON_INTERPRET=1 "
                "before triton is first imported"
            )
        raise RuntimeError(f"Triton kernels are not available for device {device} (is triton installed?)")
    return backend
