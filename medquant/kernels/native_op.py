"""The bound native matmul as a C++ operator: ``medquant::gemv4_bound_native``, what compiled graphs call.

A decode step compiled by ``torch.compile`` or ahead of time by AOTInductor calls each bound quantized layer as
one operator call by handle (:data:`~medquant.kernels.native.GEMM_XMODE` and the handle are described in
:mod:`medquant.kernels.native`). The operator ``medquant::gemv4_bound`` has a Python kernel: from an
AOTInductor program it is reached through the proxy executor and the interpreter, about 8 us per call against
about 3 us for the same product reached from C++ (measured on a chain of 211 bound 128 x 128 layers, 2 threads;
SmolLM2 makes 211 such calls per token). ``csrc/bound_op.cpp`` registers the same product as a C++ kernel,
``medquant::gemv4_bound_native(x, handle, n, xmode)``: it looks the handle up in its own table and calls the
native library's ``mq_call`` directly,

    y (M, n) float32 = mq_call(bound weight arguments, x (M, k), flags = xmode << 2 | [x is bfloat16])

bit for bit what the Python kernel computes (tested); ``medquant::gemv4_bound_by_native(x, handle, n, xmode)``
is the same with ``handle`` a one-element int64 tensor (its Python form ``medquant::gemv4_bound_by``): what
programs compiled ahead of time call, handed the handle tensors at load (:mod:`medquant.quant.aot`). Whatever it
does not handle itself (an unknown handle,
another shape, dtype or layout, a call the native library declines) it hands to ``medquant::gemv4_bound``, so
errors and fallbacks are the Python kernel's.

**Binding.** :func:`traced_bound_op` is asked for the operator when a graph is traced
(:func:`medquant.kernels.cpu._traced_lane`): it enters the handle's ``mq_call`` address and bound argument array
(owned by the :class:`~medquant.kernels.native.NativeGemv4` object) into the C++ table, and removes it when that
object is freed (``weakref.finalize``), so a handle outlives its weights in neither table. (A graph running in
another thread while its layer is freed is not supported.)

**Build on first use**, like the native library (:mod:`medquant.kernels.native`): with the C++ compiler
(``$CXX``, else ``c++`` / ``g++`` / ``clang++``) against the installed torch's headers and libraries, into the same
cache folder, in a folder named by a hash of the source, the compiler's version, the flags and torch's version,
written atomically with its SHA-256 beside it (checked before loading); the loaded library must report the key it
was built with. About 7 s on 2 cores. When anything fails (no compiler, no native library),
:func:`traced_bound_op` returns the Python operator (same result, slower) and :func:`native_op_status` says why;
reported once. ``$MEDQUANT_NATIVE_OP=0`` keeps layers bound while it is set on the Python kernel (read at each
binding: ``bind_cpu_kernels``, ``static_decode_``, ``compile_decoder``).
"""
from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
import threading
import warnings
import weakref
from pathlib import Path

import torch

from medquant.digest import sha256_file

from . import native

#: set to 0 / false / off / no to keep compiled graphs on the Python kernel
ENV_NATIVE_OP = "MEDQUANT_NATIVE_OP"
SOURCE = Path(__file__).resolve().parent / "csrc" / "bound_op.cpp"
LIB_NAME = "libmqboundop.so"
#: flag sets tried in order (the newest C++ standard the compiler and torch's headers accept first)
FLAG_SETS = (("-O2", "-fPIC", "-shared", "-std=c++20", "-w"), ("-O2", "-fPIC", "-shared", "-std=c++17", "-w"))

_lock = threading.Lock()
_state: dict = {"tried": False, "op": None, "reason": "", "path": None}
_bound: set[int] = set()
_fake_lib: torch.library.Library | None = None


def _disabled() -> bool:
    return os.environ.get(ENV_NATIVE_OP, "").strip().lower() in native._OFF


def _torch_flags() -> tuple[list[str], list[str]]:
    """Compile flags (torch's include folders, its C++ ABI) and link flags (its libraries)."""
    root = Path(torch.__file__).resolve().parent
    inc = [f"-I{root / 'include'}", f"-I{root / 'include' / 'torch' / 'csrc' / 'api' / 'include'}",
           f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}"]
    return inc, [f"-L{root / 'lib'}", "-lc10", "-ltorch_cpu"]


def _key(source: bytes, version: str, flags: list[str]) -> str:
    return native._hash_parts(source, version.encode(), " ".join(flags).encode(), torch.__version__.encode(),
                              str(torch.version.git_version).encode())


def _load(path: Path, key: str) -> None:
    digest = path.with_name(path.name + ".sha256")
    if not digest.is_file() or digest.read_text().strip() != sha256_file(path):
        raise ValueError(f"{path} does not match its recorded SHA-256 (corrupted or replaced)")
    torch.ops.load_library(str(path))
    got = torch.ops.medquant.native_op_key()
    if got != key:
        raise RuntimeError(f"{path} reports build key {got!r}, expected {key!r} (another medquant build is "
                           "loaded in this process)")


def _build() -> None:
    """Find (or build) and load the C++ operator; fills ``_state``. Never raises."""
    if not native.native_status().get("gemv4"):
        _state["reason"] = "no native weight-only kernel (nothing to bind)"
        return
    if hasattr(torch.ops.medquant, "gemv4_bound_native"):  # loaded by another copy of this module
        _state["reason"] = "an operator medquant::gemv4_bound_native is already registered by another library"
        return
    if not SOURCE.is_file():
        _state["reason"] = f"the C++ source {SOURCE} is missing from the installation"
        return
    cxx = native._compiler("CXX", ("c++", "g++", "clang++"))
    if cxx is None:
        _state["reason"] = "no C++ compiler found ($CXX unset and no c++ / g++ / clang++ on PATH)"
        return
    try:
        version = native._compiler_version(cxx)
    except (OSError, subprocess.SubprocessError) as exc:
        _state["reason"] = f"the C++ compiler {' '.join(cxx)!r} cannot run: {exc}"
        return
    inc, link = _torch_flags()
    source = SOURCE.read_bytes()
    errors: list[str] = []
    for flags in FLAG_SETS:
        key = _key(source, version, [*flags, *inc, *link])
        out_dir = native.cache_dir() / f"boundop-{key}"
        path = out_dir / LIB_NAME
        try:
            if not path.is_file():
                native._compile(cxx, [*flags, *inc], key, out_dir, source=SOURCE, lib_name=LIB_NAME,
                                key_macro="MQ_OP_KEY", link=tuple(link))
            _load(path, key)
        except ValueError as exc:  # corrupted: removed, rebuilt by the next process
            shutil.rmtree(out_dir, ignore_errors=True)
            errors.append(str(exc))
            break
        except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
            errors.append(str(exc))
            if hasattr(torch.ops.medquant, "native_op_key"):
                break  # loaded but declined: a second library would clash with it
            continue
        _register_fake()
        _state["op"], _state["path"], _state["reason"] = torch.ops.medquant.gemv4_bound_native.default, str(path), ""
        return
    _state["reason"] = "building the C++ operator failed: " + " | ".join(errors[-2:])


def _register_fake() -> None:
    global _fake_lib
    _fake_lib = torch.library.Library("medquant", "FRAGMENT")

    @torch.library.register_fake("medquant::gemv4_bound_native", lib=_fake_lib)
    def _fake(x, handle, n, xmode):
        return x.new_empty(x.shape[0], n, dtype=torch.float32)

    @torch.library.register_fake("medquant::gemv4_bound_by_native", lib=_fake_lib)
    def _fake_by(x, handle, n, xmode):
        return x.new_empty(x.shape[0], n, dtype=torch.float32)


def _operator():
    if not _state["tried"]:
        with _lock:
            if not _state["tried"]:
                try:
                    _build()
                except Exception as exc:  # noqa: BLE001  (never break tracing: the Python kernel remains)
                    _state["op"], _state["reason"] = None, f"unexpected error while building: {exc!r}"
                _state["tried"] = True
                if _state["op"] is None:
                    warnings.warn("medquant C++ bound operator unavailable, compiled graphs call the Python kernel "
                                  f"(same result, slower): {_state['reason']}", RuntimeWarning, stacklevel=3)
    return _state["op"]


def _unbind(handle: int) -> None:
    _bound.discard(handle)
    try:
        torch.ops.medquant.native_unbind(handle)
    except (AttributeError, RuntimeError):  # interpreter shutdown
        pass


def traced_bound_op(handle: int, *, by_tensor: bool = False):
    """The operator a traced graph calls for the bound matmul ``handle``: ``medquant::gemv4_bound_native`` with the
    handle entered in its table (built and loaded on first use), else ``medquant::gemv4_bound``.

    Args:
        handle: :attr:`medquant.kernels.native.NativeGemv4.handle` of a live bound matmul.
        by_tensor: the operator taking the handle in a one-element int64 tensor instead
            (``medquant::gemv4_bound_by_native``, else ``medquant::gemv4_bound_by``): what programs compiled ahead
            of time call, so they can be loaded by another process (:mod:`medquant.quant.aot`).

    Returns:
        The operator overload, called as ``op(x, handle, n, xmode)``.
    """
    python_op = native.gemv4_bound_by_op if by_tensor else native.gemv4_bound_op
    if _disabled():  # read at each binding: a layer bound while it is off keeps the Python kernel
        return python_op
    op = _operator()
    gemv = native._BOUND.get(handle)
    if op is None or gemv is None:
        return python_op
    if by_tensor:
        op = torch.ops.medquant.gemv4_bound_by_native.default
    if handle not in _bound:
        with _lock:
            if handle not in _bound:
                call = ctypes.cast(gemv._call, ctypes.c_void_p).value
                torch.ops.medquant.native_bind(handle, call, gemv._haddr, gemv.n, gemv.k)
                _bound.add(handle)
                weakref.finalize(gemv, _unbind, handle)
    return op


def native_op_status() -> dict[str, object]:
    """Whether compiled graphs call the C++ operator, and why not (builds it if that was not tried yet).

    Returns:
        ``{"active": bool, "reason": str ("" when active), "path": str | None, "bound": handles in its table}``;
        not active while ``$MEDQUANT_NATIVE_OP`` is off (nothing built then).
    """
    if _disabled():
        return {"active": False, "reason": f"${ENV_NATIVE_OP} is off", "path": _state["path"],
                "bound": int(torch.ops.medquant.native_bound_count()) if _state["op"] is not None else 0}
    op = _operator()
    bound = int(torch.ops.medquant.native_bound_count()) if op is not None else 0
    return {"active": op is not None, "reason": _state["reason"], "path": _state["path"], "bound": bound}
