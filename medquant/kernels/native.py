"""Small native kernels for the CPU backend: packed codes -> dense weights in one pass (the dense path), and a
weight-only matmul on the packed codes (the ``native4`` / ``native8`` / ``native<b>`` paths, :func:`native_gemv4`).

The dense path of :mod:`medquant.kernels.cpu` (large ``M``, prefill) dequantizes a row group to the compute
dtype ``T`` and runs ``F.linear``. :func:`dequantize_native` does the dequantization in one C pass over the
packed codes (``csrc/dequant.c``) instead of several eager torch passes: for column ``j`` of row ``r``, with
``g = j // group_elems`` (one group per row for channel / tensor scope),

    w[r, j] = round_T((u[r, j] - z[r, g]) * s[r, g])

with the subtraction and the product in float32 (``s``, ``z`` the float32 scales and zero points) and one
rounding to nearest even at the end: exactly the float32 dequantization of the reference path
(:meth:`PackedWeight.dequantize`) cast to ``T``, so ``w`` is the reference's weight to the precision of ``T``
and bit-identical to the eager code. ``T`` is bfloat16, float32 or float16 (the
last only where the C compiler has ``_Float16``). Every layout is read: 1/2/4/8-bit containers (3-bit codes in
4-bit containers, 5..7-bit in 8-bit ones) and the dense 3/5/6/7-bit bit stream.

**Build on first use.** The library is compiled at the first call with the system C compiler (``$CC``, else
``cc`` / ``gcc`` / ``clang`` on ``PATH``; flags ``-O3 -march=native -fopenmp``, retried without ``-march=native``, then
without OpenMP, when the compiler refuses them) into a cache folder, ``$MEDQUANT_CACHE_DIR/native`` if set,
else ``$XDG_CACHE_HOME/medquant/native`` (default ``~/.cache/medquant/native``), falling back to the system
temporary folder when that is not writable. A build lives in a folder named by a hash of the source, the
compiler's version, the flags (options given in ``$CC`` included) and the CPU (model and instruction flags:
``-march=native`` code must not run on another CPU sharing the cache), written under a temporary name and
renamed into place, so concurrent processes never see a half-written library. Next to it is the library's
SHA-256; a library whose hash does not match is never loaded (it is rebuilt once), and a loaded library must
report the build key it was compiled with (else it is declined for this process and removed).

**Fallback.** Without a compiler, on a failed build, on a big-endian machine, under ``torch.compile`` tracing,
or when ``$MEDQUANT_NATIVE=0``, :func:`dequantize_native` returns ``None`` and the caller runs the eager torch
code (same result, slower). A failure is reported once (``RuntimeWarning``); :func:`native_status` says whether
the kernel is active and why not. Nothing here raises into an import or a forward pass.

:func:`native_dequantizer` binds one row group's arguments once (the CPU backend's prepared call keeps it), so
a call costs the C function alone; :meth:`NativeDequantizer.into` fills a range of rows into a caller's buffer.

**Weight-only matmul.** :func:`native_gemv4` binds a row group whose codes sit in 4-bit containers, 8-bit
containers, or a stream of ``b``-bit codes (the dense 3/5/6/7-bit layout, 1- and 2-bit containers, read at their
stored width; the library needs AVX512-VBMI for these), all through the C function ``mq_call`` (the weight's
arguments bound once in an array); calling it computes

    y[i, r] = sum_g s[r, g] * (sum_{j in g} u[r, j] x~[i, j] - z[r, g] * sum_{j in g} x~[i, j])

(``x~``: the input itself, rounded to bfloat16, or split into two bfloat16 halves: :class:`NativeGemv4`) with
exact products and float32 sums, reading the codes in place. It is compiled with AVX512F + AVX512BW (``-march=native`` on such a CPU; it multiplies
bfloat16 pairs with ``vdpbf16ps`` where AVX512-BF16 is present, else widens to float32), or, on a CPU with
AVX2 + FMA but no AVX512 (``gemv_avx2``), in two forms for every width and group layout: float32, blocks of 32
codes widened to float32 and multiplied by FMA, ``x~`` the input itself (or rounded to bfloat16 where asked; split
``x`` is exact there, as without AVX512-BF16), and int16 (``xmode`` 3, a bfloat16 compute dtype's float32 input),
``x`` as 16-bit integers per 32 columns multiplied with the codes by ``vpmaddwd``, as with AVX512-VNNI (and, opt-in,
int8, :data:`INT8_XMODE`: ``x`` as 8-bit integers per 128 columns against the code bytes of 4-bit containers by
``vpmaddubsw``);
a row of ``x`` holding a NaN or an infinity (found by its group sums ``sum_{j in g} x~[i, j]``, which every form
computes: not finite) is computed again after the kernel as ``F.linear(x, W)`` does, ``y[i, r] = sum_j x[i, j]
W[r, j]`` with ``W = (u - z) * s`` in float32 and float32 products and sums, so that its outputs are NaN, ``+inf``
and ``-inf`` where torch's are (the factored sum would give NaN throughout: ``inf - inf``, ``0 * inf``); the other
rows are not touched.
:func:`native_status` reports ``gemv4`` / ``gemv4_bf16`` / ``gemv_stream`` / ``gemv_avx2``. Two operators wrap it for
``torch.compile``: ``medquant::gemv4`` (the weight's tensors as arguments) and ``medquant::gemv4_bound`` (a bound
matmul named by its handle, an integer: what a compiled decode step calls, holding no weight tensors).

**Blocked matmul for many rows.** :meth:`NativeGemv4.gemm` (``mq_call``'s blocked form, compiled with AVX512-VNNI;
:func:`native_status` reports ``gemm``) computes the same product for the CPU backend's prefill calls with ``x``
as 16-bit integers per block of columns (``x~ = t * round(x / t)``, ``t`` the block's largest magnitude / 32767):
integer products and sums within a block, float32 across blocks, a float32 output. A panel of 32 weight rows is
unpacked and widened to 16-bit pairs once per call and reused by every row of ``x``.

**Threads.** Rows are split over ``torch.get_num_threads()`` threads with OpenMP. Loaded into a process that
already runs torch, the library binds to the OpenMP runtime torch loaded (same ``libgomp.so.1``), so it shares
torch's thread pool rather than starting a second one.
"""
from __future__ import annotations

import ctypes
import dataclasses
import hashlib
import itertools
import logging
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import warnings
import weakref
from dataclasses import dataclass
from pathlib import Path

import torch

from medquant.digest import sha256_file

from ._caller import user_stacklevel
from .bundle import PackedWeight
from .layout import container_bits, storage_bits, symmetric_params

#: environment variable: ``0`` / ``false`` / ``off`` / ``no`` disables the native kernel (eager code runs); unset,
#: empty, ``1`` / ``true`` / ``on`` / ``yes`` leave it enabled; any other value leaves it enabled with one warning
ENV_NATIVE = "MEDQUANT_NATIVE"
#: environment variable: root of medquant's cache folders (the library is built under ``<root>/native``)
ENV_CACHE_DIR = "MEDQUANT_CACHE_DIR"
#: the C source, shipped inside the package
SOURCE = Path(__file__).resolve().parent / "csrc" / "dequant.c"
#: version of the C functions' arguments; the library reports it (``mq_abi``)
ABI = 8
#: file name of the built library inside its build folder
LIB_NAME = "libmqdequant.so"
#: flag sets tried in order until one compiles (common flags first)
_COMMON = ["-O3", "-fPIC", "-shared", "-ffp-contract=off", "-fno-math-errno", "-fvisibility=default"]
FLAG_SETS = (
    _COMMON + ["-march=native", "-fopenmp"],
    _COMMON + ["-fopenmp"],
    _COMMON + ["-march=native"],
    _COMMON,
)
#: the C function's output dtype codes
_DTYPE_CODE = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
_OFF = {"0", "false", "off", "no"}
_ON = {"", "1", "true", "on", "yes"}
_BUILD_TIMEOUT_S = 180

log = logging.getLogger(__name__)


@dataclass
class _State:
    tried: bool = False
    lib: ctypes.CDLL | None = None
    reason: str = ""
    path: str | None = None
    openmp: bool = False
    float16: bool = False
    gemv: int = 0  # mq_gemv4_caps(): bit 0 the matmul, 1 AVX512-BF16, 2 other widths, 3 gemm, 4 AVX2, 5 int8 x
    flags: tuple[str, ...] = ()


_state = _State()
_lock = threading.Lock()
_reported: set[str] = set()


def _report_once(key: str, msg: str) -> None:
    if key not in _reported:
        _reported.add(key)
        warnings.warn(msg, RuntimeWarning, stacklevel=user_stacklevel())


def _disabled() -> bool:
    """Whether ``$MEDQUANT_NATIVE`` disables the native kernels (any case; an unrecognised value enables them, with
    one warning naming it)."""
    value = os.environ.get(ENV_NATIVE, "").strip().lower()
    if value in _OFF:
        return True
    if value not in _ON:
        _report_once(f"env:{value}", f"${ENV_NATIVE}={value!r} is neither 0 / false / off / no (disable) nor "
                                     "1 / true / on / yes (enable): ignored, the native kernels stay enabled")
    return False


def cache_dir() -> Path:
    """The folder the native library is built in: ``$MEDQUANT_CACHE_DIR/native``, else
    ``$XDG_CACHE_HOME/medquant/native``, else ``~/.cache/medquant/native``."""
    root = os.environ.get(ENV_CACHE_DIR, "").strip()
    if root:
        return Path(root).expanduser() / "native"
    xdg = os.environ.get("XDG_CACHE_HOME", "").strip()
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "medquant" / "native"


def _compiler(env: str = "CC", names: tuple[str, ...] = ("cc", "gcc", "clang")) -> list[str] | None:
    """The compiler command: ``$env`` split as a shell would, else the first of ``names`` on ``PATH``."""
    cc = os.environ.get(env, "").strip()
    if cc:
        return shlex.split(cc)
    for name in names:
        found = shutil.which(name)
        if found:
            return [found]
    return None


def _cpu_id() -> str:
    """Model name and instruction flags of the CPU (what ``-march=native`` compiles for)."""
    model = flags = ""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                key = line.split(":", 1)[0].strip()
                if key in ("model name", "Hardware", "CPU part") and not model:
                    model = line.split(":", 1)[1].strip()
                elif key in ("flags", "Features") and not flags:
                    flags = " ".join(sorted(line.split(":", 1)[1].split()))
    except OSError:
        pass
    return f"{platform.machine()}|{model}|{flags or platform.processor()}"


def _run(cmd: list[str], timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)


def _compiler_version(cc: list[str]) -> str:
    """The compiler's ``--version`` banner (raises OSError / subprocess errors when it cannot run)."""
    res = _run([*cc, "--version"], timeout=60)
    if res.returncode != 0:
        raise OSError(f"`{' '.join(cc)} --version` failed: {(res.stderr or res.stdout).strip()[:200]}")
    return res.stdout.strip()


def _hash_parts(*parts: bytes) -> str:
    """A build key: the first 24 hex digits of the SHA-256 of ``parts``, each followed by a zero byte."""
    h = hashlib.sha256()
    for part in parts:
        h.update(part)
        h.update(b"\0")
    return h.hexdigest()[:24]


def _build_key(source: bytes, version: str, flags: list[str]) -> str:
    return _hash_parts(source, version.encode(), " ".join(flags).encode(), _cpu_id().encode(), str(ABI).encode())


class _Foreign(Exception):
    """A library at our path loaded but is not the one we built (the process keeps it mapped: not reloaded)."""


def _load(path: Path, key: str) -> ctypes.CDLL:
    """Load a built library after checking its SHA-256 against the file written beside it at build time and,
    once loaded, the build key and ABI it reports (ValueError / OSError when anything is off)."""
    digest = path.with_name(path.name + ".sha256")
    if not digest.is_file() or digest.read_text().strip() != sha256_file(path):
        raise ValueError(f"{path} does not match its recorded SHA-256 (corrupted or replaced)")
    lib = ctypes.CDLL(str(path))
    for name in ("mq_build_key", "mq_abi", "mq_has_f16", "mq_openmp", "mq_dequant", "mq_gemv4_caps", "mq_call"):
        if not hasattr(lib, name):
            raise _Foreign(f"{path} lacks the symbol {name}: not medquant's library")
    lib.mq_build_key.restype = ctypes.c_char_p
    lib.mq_build_key.argtypes = []
    for name in ("mq_abi", "mq_has_f16", "mq_openmp", "mq_gemv4_caps"):
        getattr(lib, name).restype = ctypes.c_int
        getattr(lib, name).argtypes = []
    got = (lib.mq_build_key() or b"").decode(errors="replace")
    if got != key or lib.mq_abi() != ABI:
        raise _Foreign(f"{path} reports build key {got!r} / ABI {lib.mq_abi()}, expected {key!r} / {ABI}")
    i64, vp = ctypes.c_int64, ctypes.c_void_p
    lib.mq_dequant.restype = ctypes.c_int
    lib.mq_dequant.argtypes = [vp, i64, i64, ctypes.c_int, ctypes.c_int, i64, i64, i64, i64, vp, vp, ctypes.c_int,
                               ctypes.c_int, vp, i64, ctypes.c_int]
    lib.mq_call.restype = ctypes.c_int
    lib.mq_call.argtypes = [vp, vp, i64, i64, vp, i64, ctypes.c_int, ctypes.c_int]
    return lib


def _compile(cc: list[str], flags: list[str], key: str, out_dir: Path, source: Path | None = None,
             lib_name: str = LIB_NAME, key_macro: str = "MQ_BUILD_KEY", link: tuple[str, ...] = ()) -> None:
    """Compile ``source`` (None: the native library's C source, :data:`SOURCE` as it is at the call, so that the
    build key read from it and the code compiled agree) into ``lib_name`` in a fresh temporary folder
    beside ``out_dir`` and rename it into place (atomic: another process either sees the finished folder or none;
    when it won the race, its folder is kept). ``key`` is compiled in as the macro ``key_macro``; ``link``: flags
    after the source (libraries)."""
    source = SOURCE if source is None else source
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        lib = tmp / lib_name
        cmd = [*cc, *flags, f'-D{key_macro}="{key}"', "-o", str(lib), str(source), *link]
        log.debug("medquant native: %s", " ".join(cmd))
        res = _run(cmd, timeout=_BUILD_TIMEOUT_S)
        if res.returncode != 0 or not lib.is_file():
            raise OSError(f"compiling failed ({' '.join(flags)}): {(res.stderr or res.stdout).strip()[-400:]}")
        lib.with_name(lib_name + ".sha256").write_text(sha256_file(lib) + "\n")
        try:
            os.rename(tmp, out_dir)
        except OSError:
            if not (out_dir / lib_name).is_file():  # not a lost race: a stale entry in the way
                shutil.rmtree(out_dir, ignore_errors=True)
                os.rename(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _writable_roots() -> list[Path]:
    roots = [cache_dir()]
    uid = os.getuid() if hasattr(os, "getuid") else "user"
    roots.append(Path(tempfile.gettempdir()) / f"medquant-{uid}" / "native")
    return roots


def _try_build() -> None:
    """Find (or build) and load the library; fills ``_state`` (``lib`` or ``reason``). Never raises."""
    if sys.byteorder != "little":
        _state.reason = "big-endian machine (the kernel reads the int32 words as little-endian bytes)"
        return
    if not SOURCE.is_file():
        _state.reason = f"the C source {SOURCE} is missing from the installation"
        return
    cc = _compiler()
    if cc is None:
        _state.reason = "no C compiler found ($CC unset and no cc / gcc / clang on PATH)"
        return
    try:
        version = _compiler_version(cc)
    except (OSError, subprocess.SubprocessError) as exc:
        _state.reason = f"the C compiler {' '.join(cc)!r} cannot run: {exc}"
        return
    source = SOURCE.read_bytes()
    errors: list[str] = []
    for flags in FLAG_SETS:
        # options given with $CC ("gcc -mno-avx512bf16") change the code as flags do: part of the key
        key = _build_key(source, version, [*cc[1:], *flags])
        for root in _writable_roots():
            out_dir = root / f"dequant-{key}"
            path = out_dir / LIB_NAME
            for attempt in range(2):  # a cached library that fails its checks is rebuilt once
                try:
                    if not path.is_file():
                        _compile(cc, list(flags), key, out_dir)
                    lib = _load(path, key)
                except _Foreign as exc:  # loaded, but not ours: decline now, rebuilt by the next process
                    shutil.rmtree(out_dir, ignore_errors=True)
                    _state.reason = f"declined a foreign library (removed; rebuilt at the next start): {exc}"
                    return
                except ValueError as exc:  # corrupted / replaced (checked before loading): remove, rebuild
                    errors.append(str(exc))
                    shutil.rmtree(out_dir, ignore_errors=True)
                    continue
                except (OSError, subprocess.SubprocessError) as exc:
                    errors.append(str(exc))
                    if path.is_file() and attempt == 0:
                        shutil.rmtree(out_dir, ignore_errors=True)  # e.g. an unloadable file
                        continue
                    break
                _state.lib, _state.path, _state.flags = lib, str(path), tuple(flags)
                _state.openmp, _state.float16 = bool(lib.mq_openmp()), bool(lib.mq_has_f16())
                _state.gemv = int(lib.mq_gemv4_caps())
                _state.reason = ""
                log.debug("medquant native: loaded %s", path)
                return
            if errors and "compiling failed" in errors[-1]:
                break  # these flags do not compile: another cache folder will not help
    _state.reason = "building the native kernel failed: " + " | ".join(errors[-3:])


def _library() -> ctypes.CDLL | None:
    if not _state.tried:
        with _lock:
            if not _state.tried:
                try:
                    _try_build()
                except Exception as exc:  # noqa: BLE001  (never break a forward pass)
                    _state.lib, _state.reason = None, f"unexpected error while building: {exc!r}"
                _state.tried = True
                if _state.lib is None:
                    _report_once("build", "medquant native dequantization kernel unavailable, the CPU dense path "
                                          f"runs the eager torch code (same result, slower): {_state.reason}")
    return _state.lib


def reset_native() -> None:
    """Forget the loaded library and the reported failures: the next call looks for (or builds) it again,
    e.g. after changing ``$CC`` or ``$MEDQUANT_CACHE_DIR`` (a library already loaded stays mapped)."""
    global _state
    with _lock:
        _state = _State()
        _reported.clear()


def native_status(build: bool = True) -> dict[str, object]:
    """Whether the native dequantization kernel is active, and why not.

    Args:
        build: find or build the library now if that was not tried yet (else report what is known).

    Returns:
        ``{"active": bool, "reason": str ("" when active), "library": path or None, "openmp": bool,
        "float16": bool, "gemv4": bool (the 4- and 8-bit weight-only matmuls are compiled in: AVX512F + BW, or
        AVX2 + FMA), "gemv4_bf16": bool (it multiplies bfloat16 pairs with AVX512-BF16), "gemv_stream": bool (it
        also reads the dense 3/5/6/7-bit layout and 1- and 2-bit containers: AVX512-VBMI + VL, or AVX2 + FMA),
        "gemv_avx2": bool (the matmul is the AVX2 + FMA form of a CPU without AVX512: float32 products, or 16-bit
        integer x with ``vpmaddwd``), "gemm": bool (the blocked matmul
        for many rows, :meth:`NativeGemv4.gemm`, is compiled in: AVX512-VNNI), "flags": [compiler flags],
        "cache_dir": str}``.
    """
    if _disabled():
        active, reason = False, f"disabled by ${ENV_NATIVE}={os.environ.get(ENV_NATIVE)}"
    else:
        if build:
            _library()
        active = _state.lib is not None
        reason = "" if active else (_state.reason or "not built yet")
    return {"active": active, "reason": reason, "library": _state.path, "openmp": _state.openmp,
            "float16": _state.float16, "gemv4": bool(active and _state.gemv & 1),
            "gemv4_bf16": bool(active and _state.gemv & 2), "gemv_stream": bool(active and _state.gemv & 4),
            "gemv_avx2": bool(active and _state.gemv & 16), "gemm": bool(active and _state.gemv & 8), "flags": list(_state.flags),
            "cache_dir": str(cache_dir())}


def _in_place(t: torch.Tensor, n: int, ng: int) -> torch.Tensor:
    """``t`` itself where the kernels can read it as stored (float32 or float16, ``(n, ng)``, contiguous), else a
    float32 ``(n, ng)`` copy."""
    if t.dtype in (torch.float32, torch.float16) and tuple(t.shape) == (n, ng) and t.is_contiguous():
        return t
    return t.float().expand(n, ng).contiguous()


def _check_pair(scale: torch.Tensor | None, zero: torch.Tensor | None) -> None:
    """ValueError unless ``scale`` and ``zero`` are given together or not at all."""
    if (scale is None) != (zero is None):
        raise ValueError("pass scale and zero together (w = (u - zero) * scale), or neither (the layer's own)")


def kernel_params(weight: PackedWeight, ng: int, scale: torch.Tensor | None = None,
                  zero: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The scales and zero points the native kernels read for a row group, with ``w = (u - z) * s``.

    Without ``scale`` / ``zero``: the layer's own tensors in place where they are float32 or float16 ``(n, ng)``
    (group and channel scope; the matmul widens float16 values exactly per call, 16 weight rows at a time, into a
    per-thread buffer, and the dequantizer as it reads them), else float32 copies; the
    zero point of symmetric rows is one float32 value ``2^(b-1)`` (1-bit symmetric rows: ``s`` doubled, a float32
    copy, and ``z = 1/2``), so a symmetric row group holds no per-group copy at all. With them: float32 ``(n, ng)``
    copies of the given values.

    Args:
        weight: the packed row group.
        ng: scales per row (``k_pad / group_elems``; 1 for channel / tensor scope).
        scale: float32 ``s`` of ``weight.scales``' shape, or None.
        zero: float32 ``z`` of the same shape, or None.

    Returns:
        ``(s, z)``: ``s`` ``(n, ng)`` float32 or float16; ``z`` ``(n, ng)`` float32 or float16, or one value.

    Raises:
        ValueError: only one of ``scale`` and ``zero`` given (the other would be taken from the layer: a
            mismatched pair).
    """
    n = weight.n
    _check_pair(scale, zero)
    if scale is not None and zero is not None:
        return scale.float().expand(n, ng).contiguous(), zero.float().expand(n, ng).contiguous()
    if weight.symmetric:
        a, zs = symmetric_params(weight.bits)
        s = _in_place(weight.scales, n, ng) if a == 1.0 else (a * weight.scales.float()).expand(n, ng).contiguous()
        return s, torch.full((1,), zs)
    assert weight.zeros is not None  # asymmetric rows carry zero points (checked by PackedWeight)
    s = _in_place(weight.scales, n, ng)
    z = _in_place(weight.zeros, n, ng)
    return s, z


def param_flags(s: torch.Tensor, z: torch.Tensor) -> int:
    """The C kernels' ``sz`` argument for scales ``s`` and zero points ``z``: bit 0, ``s`` is float16; bit 1, ``z``
    is float16; bit 2, ``z`` is one value for every row and group."""
    return int(s.dtype == torch.float16) | int(z.dtype == torch.float16) << 1 | int(z.numel() == 1) << 2


class NativeDequantizer:
    """One row group's native dequantization, its arguments bound once (:func:`native_dequantizer`).

    Calling it returns the dense weights ``(n, k)`` in ``dtype`` (a new tensor), or None when the C function
    declines or ``$MEDQUANT_NATIVE=0`` is set (eager torch then runs). :meth:`into` writes a range of rows into
    a buffer the caller owns, for a dense path that dequantizes a large weight a slice at a time.
    """

    def __init__(self, fn, weight: PackedWeight, dtype: torch.dtype, qw: torch.Tensor, s: torch.Tensor,
                 z: torch.Tensor, bits: int, dense: bool, ge: int, ng: int) -> None:
        self._fn, self._weight, self.dtype = fn, weight, dtype
        self._qw, self._s, self._z = qw, s, z  # the pointers passed to C stay valid while this object lives
        self._sz = param_flags(s, z)
        self.n, self.k = weight.n, weight.k
        self._row_bytes = qw.shape[1] * 4
        self._args = (bits, int(dense), weight.k, weight.k_pad, ge, ng)
        self._code = _DTYPE_CODE[dtype]

    def into(self, r0: int, r1: int, out: torch.Tensor) -> bool:
        """Write rows ``r0 .. r1 - 1`` of the dense weights into ``out`` (``(r1 - r0, k)`` rows, contiguous
        inner dimension, ``self.dtype``, CPU).

        Returns:
            True when written; False when the C function declined (reported once) or ``$MEDQUANT_NATIVE=0``
            is set: ``out`` is then not valid and the caller runs eager torch.

        Raises:
            ValueError: a row range outside ``0 .. n`` or an ``out`` of the wrong shape, dtype or layout.
        """
        if not 0 <= r0 <= r1 <= self.n:
            raise ValueError(f"row range {r0}..{r1} outside 0..{self.n}")
        if out.dtype != self.dtype or out.device.type != "cpu" or out.dim() != 2 or \
                tuple(out.shape) != (r1 - r0, self.k) or (r1 > r0 and self.k and out.stride(1) != 1):
            raise ValueError(f"out must be a CPU {self.dtype} tensor of shape {(r1 - r0, self.k)} with unit "
                             f"column stride, got {tuple(out.shape)} {out.dtype} strides {out.stride()}")
        if r1 == r0 or self.k == 0:
            return True
        if _disabled():
            return False
        bits, dense, k, kp, ge, ng = self._args
        s, z, sz = self._s, self._z, self._sz
        rc = self._fn(self._qw.data_ptr() + r0 * self._row_bytes, r1 - r0, self._row_bytes, bits, dense, k, kp,
                      ge, ng, s.data_ptr() + r0 * ng * s.element_size(),
                      z.data_ptr() + (0 if sz & 4 else r0 * ng * z.element_size()), sz, self._code,
                      out.data_ptr(), out.stride(0), max(1, torch.get_num_threads()))
        if rc != 0:
            _report_once(f"rc{rc}:{bits}:{bool(dense)}",
                         f"medquant native dequantization kernel declined a row group (bits={self._weight.bits}, "
                         f"dense={bool(dense)}, code {rc}): eager torch runs it")
            return False
        return True

    def __call__(self) -> torch.Tensor | None:
        out = torch.empty(self.n, self.k, dtype=self.dtype)
        return out if self.into(0, self.n, out) else None


def native_dequantizer(weight: PackedWeight, dtype: torch.dtype, scale: torch.Tensor | None = None,
                       zero: torch.Tensor | None = None) -> NativeDequantizer | None:
    """The native dequantization of one row group with everything that depends only on the weight (scales and
    zero points, the layout's arguments) prepared once; None when the native kernel cannot take this row group.

    Calling the result returns the dense weights ``(n, k)`` in ``dtype`` (:func:`dequantize_native`), or None
    (eager torch then runs) when ``$MEDQUANT_NATIVE=0`` is set or the C function declines the call;
    :meth:`NativeDequantizer.into` writes a range of rows into a buffer. It holds the weight's tensors as they
    are now: build a new one after changing them.

    Args:
        weight: the packed row group (CPU tensors).
        dtype: bfloat16, float32 or float16.
        scale: float32 scales ``s`` of ``weight.scales``' shape such that ``w = (u - z) * s``, or None (the
            default): the layer's own scales and zero points are read in place (:func:`kernel_params`).
        zero: float32 zero points ``z`` of the same shape (symmetric rows: ``2^(b-1)``); None with ``scale``.

    Returns:
        The :class:`NativeDequantizer`, or None.

    Raises:
        ValueError: one of ``scale`` and ``zero`` given without the other.
    """
    _check_pair(scale, zero)
    if _disabled() or dtype not in _DTYPE_CODE or torch.compiler.is_compiling():
        return None
    if weight.device.type != "cpu" or any(t is not None and t.device.type != "cpu" for t in (scale, zero)):
        return None
    lib = _library()
    if lib is None:
        return None
    if dtype == torch.float16 and not _state.float16:
        _report_once("f16", "medquant native dequantization kernel: the C compiler has no _Float16, float16 "
                            "compute runs the eager torch code")
        return None
    kp = weight.k_pad
    ge = weight.group_elems if weight.scope == "group" else kp
    ng = kp // ge
    dense = weight.is_dense
    bits = weight.bits if dense else container_bits(weight.bits)
    qw = weight.qweight.contiguous()
    s, z = kernel_params(weight, ng, scale, zero)
    return NativeDequantizer(lib.mq_dequant, weight, dtype, qw, s, z, bits, dense, ge, ng)


def dequantize_native(weight: PackedWeight, dtype: torch.dtype, scale: torch.Tensor | None = None,
                      zero: torch.Tensor | None = None) -> torch.Tensor | None:
    """The dense weights ``(n, k)`` in ``dtype``: ``w = round((u - zero) * scale)`` (module docstring),
    or None when the native kernel is unavailable or does not take this call (the caller then runs eager torch).

    Args:
        weight: the packed row group (CPU tensors).
        dtype: bfloat16, float32 or float16.
        scale: float32 scales ``s`` of ``weight.scales``' shape such that ``w = (u - z) * s``.
        zero: float32 zero points ``z`` of the same shape (symmetric rows: ``2^(b-1)``).

    Returns:
        A new contiguous ``(n, k)`` tensor bit-identical to the eager evaluation in ``dtype``, or None.
    """
    fn = native_dequantizer(weight, dtype, scale, zero)
    return None if fn is None else fn()


# ------------------------------------------------------------------------------ 4-bit weight-only matmul
_HEAD = ctypes.c_int64 * 11
_X_BF16, _Y_BF16, _GEMM = 1, 2, 16  # mq_call's flags; xmode in bits 2-3


def _matmul_head(qweight: torch.Tensor, s: torch.Tensor, z: torch.Tensor, k: int, kp: int, ge: int, bits: int):
    """``mq_call``'s weight arguments (one int64 array: codes, sizes, groups, scales, zero points, stored width)."""
    return _HEAD(qweight.data_ptr(), qweight.shape[0], qweight.shape[1] * 4, k, kp, ge, s.shape[1], s.data_ptr(),
                 z.data_ptr(), param_flags(s, z), bits)


def _matmul_into(call, head, x: torch.Tensor, y: torch.Tensor, flags: int, rows: tuple | None = None) -> int:
    """Run ``mq_call`` (``flags``: xmode << 2, or the blocked form) for ``x (M, k)`` into ``y`` (float32 or
    bfloat16, ``(M, n)``); its return code. ``rows``: ``(M, x's row stride, y's row stride)`` for tensors of
    another shape holding ``M`` rows (default: from ``x`` and ``y`` as 2-D)."""
    if x.dtype == torch.bfloat16:
        flags |= _X_BF16
    if y.dtype == torch.bfloat16:
        flags |= _Y_BF16
    m, xs, ys = rows if rows is not None else (x.shape[0], x.stride(0), y.stride(0))
    return call(head, x.data_ptr(), m, xs, y.data_ptr(), ys, flags, torch.get_num_threads())


def _gemv_takes(bits: int) -> bool:
    """Whether the loaded library's native matmul reads codes stored in ``bits`` bits: 4- and 8-bit containers
    always, the other widths 1..7 where it was built with the stream kernel (AVX512-VBMI)."""
    return bits in (4, 8) or (bool(_state.gemv & 4) and 1 <= bits <= 7)


# ``medquant::gemv4`` is registered with the low-level ``torch.library.Library`` API (a CPU kernel and a fake one)
# rather than ``torch.library.custom_op``: a compiled decode step calls it once per layer and token, and the
# dispatcher reaches a Library-registered Python kernel in about 3 us against about 15 us through custom_op's
# wrappers (measured on this project's 2-core CPU; 211 calls per SmolLM2 token). It never needs a gradient (the
# CPU backend traces it for inference only).
_OPS = torch.library.Library("medquant", "FRAGMENT")  # kept alive: deleting it would deregister the operator
_OPS.define("gemv4(Tensor x, Tensor qweight, Tensor s, Tensor z, int k, int kp, int ge, int xmode, int bits) "
            "-> Tensor")


def _gemv4_cpu(x: torch.Tensor, qweight: torch.Tensor, s: torch.Tensor, z: torch.Tensor, k: int, kp: int, ge: int,
               xmode: int, bits: int) -> torch.Tensor:
    """``y (M, n) float32 = x~ @ ((u - z) * s)^T`` by the native kernel: the CPU kernel of the operator
    ``medquant::gemv4`` (what ``torch.compile`` traces; eager calls go to :class:`NativeGemv4` directly). ``x``:
    ``(M, k)`` float32 or bfloat16 with unit column stride; ``qweight``: the row group's int32 words (``bits`` the
    stored width: 4- or 8-bit containers, or a stream width); ``s``: float32 or float16 ``(n, ng)``; ``z``: the
    same, or one value for every row and group (:func:`kernel_params`); ``xmode``: what ``x~`` is
    (:class:`NativeGemv4`). Raises RuntimeError for an ``x`` of another dtype, shape or layout and when the kernel
    declines (it never returns a wrong result)."""
    if x.dtype not in (torch.float32, torch.bfloat16) or x.device.type != "cpu" or x.dim() != 2 or \
            x.shape[1] != k or (k > 1 and x.stride(1) != 1):  # the kernel reads float32 / bfloat16 (M, k) rows
        raise RuntimeError(f"medquant::gemv4: x must be a CPU float32 or bfloat16 tensor (M, {k}) with unit column "
                           f"stride, got {tuple(x.shape)} {x.dtype} strides {x.stride()} on {x.device}")
    y = torch.empty(x.shape[0], qweight.shape[0], dtype=torch.float32)
    lib = _state.lib
    rc = -3 if lib is None or not _gemv_takes(bits) else \
        _matmul_into(lib.mq_call, _matmul_head(qweight, s, z, k, kp, ge, bits), x, y, xmode << 2)
    if rc != 0:
        raise RuntimeError(f"medquant native {bits}-bit matmul declined the call (code {rc})")
    return y


_OPS.impl("gemv4", _gemv4_cpu, "CPU")


@torch.library.register_fake("medquant::gemv4", lib=_OPS)
def _gemv4_fake(x, qweight, s, z, k, kp, ge, xmode, bits):
    return x.new_empty(x.shape[0], qweight.shape[0], dtype=torch.float32)


gemv4_op = torch.ops.medquant.gemv4.default

# ``medquant::gemv4_bound`` calls a matmul bound once (:class:`NativeGemv4`) by its handle, an integer: a compiled
# decode step then holds no weight tensors. Each tensor a graph takes costs a guard at every call (shape, stride,
# dtype) and a size assertion in the generated code; SmolLM2's 211 layers x (codes, scales, zero points) made
# about a fifth of a compiled step's time. The handle is never an address: an unknown one raises. xmode
# GEMM_XMODE runs the blocked matmul (NativeGemv4.gemm), so a compiled prefill computes what an eager one does.
_OPS.define("gemv4_bound(Tensor x, int handle, int n, int xmode) -> Tensor")
#: the ``xmode`` of ``medquant::gemv4_bound`` that runs the bound matmul's blocked form (:meth:`NativeGemv4.gemm`;
#: ``mq_call``'s flag 16 is ``4 << 2``) instead of the weight-only kernel (xmodes 0, 1, 2, 3)
GEMM_XMODE = 4
#: the ``xmode`` that takes ``x`` as 8-bit integers per activation block (mq_call's flag 32 is ``8 << 2``): the AVX2
#: form's int8 form on 4-bit containers (:attr:`NativeGemv4.int8_form`); elsewhere it runs as 3 (int16)
INT8_XMODE = 8
#: the weight-only kernel's xmodes (:class:`NativeGemv4`)
GEMV_XMODES = (0, 1, 2, 3, INT8_XMODE)
#: the bound matmuls by handle, held weakly: a matmul its layer no longer holds goes away, and a graph still
#: calling it gets an error, not another layer's weights
_BOUND: weakref.WeakValueDictionary = weakref.WeakValueDictionary()
_HANDLES = itertools.count(1)


def _gemv4_bound_cpu(x: torch.Tensor, handle: int, n: int, xmode: int) -> torch.Tensor:
    """``y (M, n) float32`` of the bound matmul ``handle`` (:attr:`NativeGemv4.handle`) for ``x (M, k)``, float32 or
    bfloat16 with unit column stride: the CPU kernel of ``medquant::gemv4_bound``. ``xmode`` 0 / 1 / 2 / 3: the
    weight-only kernel (:class:`NativeGemv4`); :data:`GEMM_XMODE`: the blocked matmul (:meth:`NativeGemv4.gemm`;
    an ``x`` it declines, one with a value that is not finite, is multiplied in float32 with the dequantized
    weight, as the reference path does). Raises RuntimeError for an unknown handle, a wrong ``n`` or ``x``, the
    blocked form on a build without it, or a call the kernel declines (never a wrong result)."""
    gemv = _BOUND.get(handle)
    if x.dtype not in (torch.float32, torch.bfloat16) or x.device.type != "cpu":  # read as float32 / bfloat16
        raise RuntimeError(f"medquant::gemv4_bound: x must be a CPU float32 or bfloat16 tensor, got {x.dtype} on "
                           f"{x.device}")
    if gemv is None or gemv.n != n or x.dim() != 2 or x.shape[1] != gemv.k or (gemv.k > 1 and x.stride(1) != 1):
        raise RuntimeError(f"medquant::gemv4_bound: no bound matmul {handle} of {n} rows taking x "
                           f"{tuple(x.shape)} strides {x.stride()} (its layer was re-bound, reloaded or freed since this graph was "
                           "compiled); call torch._dynamo.reset() and compile again")
    if xmode not in (*GEMV_XMODES, GEMM_XMODE):
        raise RuntimeError(f"medquant::gemv4_bound: xmode must be one of {GEMV_XMODES} or {GEMM_XMODE} (GEMM_XMODE), "
                           f"got {xmode}")
    if xmode == GEMM_XMODE and not gemv.has_gemm:
        raise RuntimeError("medquant::gemv4_bound: this build has no blocked matmul (AVX512-VNNI)")
    y = torch.empty(x.shape[0], n, dtype=torch.float32)
    rc = _matmul_into(gemv._call, gemv._haddr, x, y, xmode << 2)
    if rc == -5 and xmode == GEMM_XMODE:  # x not finite (or a block below 2^-100): torch's float32 product
        from .reference import packed_linear_reference

        return packed_linear_reference(x.float(), gemv._weight)
    if rc != 0:
        raise RuntimeError(f"medquant native {gemv.bits}-bit matmul declined the call (code {rc})")
    return y


_OPS.impl("gemv4_bound", _gemv4_bound_cpu, "CPU")


@torch.library.register_fake("medquant::gemv4_bound", lib=_OPS)
def _gemv4_bound_fake(x, handle, n, xmode):
    return x.new_empty(x.shape[0], n, dtype=torch.float32)


gemv4_bound_op = torch.ops.medquant.gemv4_bound.default

# ``medquant::gemv4_bound_by`` is the same call with the handle held in a one-element int64 tensor: a program
# compiled ahead of time (medquant.quant.aot) reads it from a tensor it is handed at load, so the program is not
# tied to the handles of the process that compiled it.
_OPS.define("gemv4_bound_by(Tensor x, Tensor handle, int n, int xmode) -> Tensor")


def handle_value(handle: torch.Tensor) -> int:
    """The handle held by ``handle``, a one-element int64 CPU tensor (``medquant::gemv4_bound_by``).

    Raises:
        RuntimeError: ``handle`` is not a one-element int64 CPU tensor.
    """
    if handle.device.type != "cpu" or handle.dtype != torch.int64 or handle.numel() != 1:
        raise RuntimeError("medquant::gemv4_bound_by: the handle must be a one-element int64 CPU tensor, got "
                           f"{handle.dtype} {tuple(handle.shape)} on {handle.device}")
    return int(handle.reshape(()))


def _gemv4_bound_by_cpu(x: torch.Tensor, handle: torch.Tensor, n: int, xmode: int) -> torch.Tensor:
    """:func:`_gemv4_bound_cpu` with the handle read from a one-element int64 tensor."""
    return _gemv4_bound_cpu(x, handle_value(handle), n, xmode)


_OPS.impl("gemv4_bound_by", _gemv4_bound_by_cpu, "CPU")


@torch.library.register_fake("medquant::gemv4_bound_by", lib=_OPS)
def _gemv4_bound_by_fake(x, handle, n, xmode):
    return x.new_empty(x.shape[0], n, dtype=torch.float32)


gemv4_bound_by_op = torch.ops.medquant.gemv4_bound_by.default


class NativeGemv4:
    """One row group's native weight-only matmul, its arguments bound once (:func:`native_gemv4`): codes in 4-bit
    containers (``native4``), in 8-bit containers (``native8``), or a stream of ``b``-bit codes (``native<b>``:
    the dense 3/5/6/7-bit layout, 1- and 2-bit containers). ``bits`` is the width the codes take in storage.

    ``gemv(x, xmode)`` returns ``y (M, n)`` with

        y[i, r] = sum_g s[r, g] * (sum_{j in g} u[r, j] x~[i, j] - z[r, g] * sum_{j in g} x~[i, j])

    which is ``x~ @ ((u - z) * s)^T`` with exact products and float32 sums. ``x~`` by ``xmode``: 0, ``x`` itself
    (codes widened to float32, FMA); 1, ``x`` rounded to bfloat16 (``vdpbf16ps`` with AVX512-BF16); 2 (split),
    ``hi + lo`` with ``hi = bf16(x)``, ``lo = bf16(x - hi)``, two ``vdpbf16ps`` products per code, ``x`` to a
    relative ``2^-17`` (without AVX512-BF16, modes 1 and 2 run the float32 FMA form, mode 2 then with ``x~ =
    x``); 3 (int16, where :attr:`int16_form`; else as 2), per 32 columns ``c``
    ``t[i, c] = max_{j in c} |x[i, j]| / 32767`` and ``x~ = t * round_half_even(x / t)``, the integer products
    summed exactly (``vpdpwssd``; per 128-column unit of the quad form or block of 64 columns after the units, per
    block of 32 columns on 8-bit and stream rows; in the AVX2 form, ``vpmaddwd`` per block of 32 columns of every
    layout), each 32 columns' sum scaled by ``t s`` (an ``x`` with a value
    that is not finite, or 32 columns whose largest magnitude is below ``2^-100``, runs as 2); 8
    (:data:`INT8_XMODE`, int8, where :attr:`int8_form` and the codes sit in 4-bit containers; else as 3), per
    activation block ``a`` of 128 columns (or the largest of 64 and 32 dividing the group)
    ``t[i, a] = max_{j in a} |x[i, j]| / 127`` and ``x~ = t * round_half_even(x / t)``, the codes times the 8-bit
    integers summed exactly (``vpmaddubsw``, ``vpmaddwd``), each block's sum scaled by ``t s``. In every mode a row of
    ``x`` with a NaN or an infinity (its group sums not finite) is then computed again as ``F.linear(x, W)`` does:
    ``y[i, r] = sum_j x[i, j] W[r, j]``, ``W = (u - z) * s`` the float32 dequantized weight, ``x`` itself, float32
    products and sums (NaN where a NaN enters, an infinity meets a zero weight or infinities of both signs meet;
    ``+inf`` / ``-inf`` with the sign of ``x[i, j] W[r, j]`` elsewhere; the factored sum would give NaN throughout);
    the other rows are not touched. ``y`` is float32, or bfloat16 (the float32 sum rounded once)
    for a bfloat16 ``x``. None when the C function declines (reported once): the caller then runs another path.
    ``$MEDQUANT_NATIVE`` is read when it is built (:func:`native_gemv4`), not at each call. It reads medquant's
    packed codes in place (no copy of the weight), and the scales and zero points too where they are float16 or
    float32 (:func:`kernel_params`; bfloat16 ones are copied to float32, 4 bytes per value).
    """

    def __init__(self, call, weight: PackedWeight, qw: torch.Tensor, s: torch.Tensor, z: torch.Tensor,
                 ge: int, gemm: bool = False, int16: bool = False, int8: bool = False) -> None:
        # the codes are held through an alias (same storage, another tensor object): the CPU backend caches this
        # object under the layer's own codes tensor as a weak key, and a strong reference back to that tensor
        # would keep the cache entry, the codes and this object alive after the layer is freed
        alias = weight.qweight.detach()
        if qw is weight.qweight:
            qw = alias
        weight = dataclasses.replace(weight, qweight=alias)
        self._call, self._gemm, self._weight = call, gemm, weight
        self._int16 = int16  # xmode 3 as 16-bit integers (int16_form)
        self._int8 = int8  # xmode 8 as 8-bit integers on 4-bit containers (int8_form)
        self.bits = storage_bits(weight.bits, weight.dense)
        self.code_bits = weight.bits  # the codes' width (bits is what holds them: 4 for 3-bit codes in layout 1)
        self.qweight, self.s, self.z = qw, s, z  # the pointers passed to C stay valid while this object lives
        self.n, self.k, self.kp, self.ge = weight.n, weight.k, weight.k_pad, ge
        # bound once (a decode step calls this per layer): the weight's arguments of mq_call, held here with
        # their address passed as an integer (ctypes converts no array per call)
        self._head = _matmul_head(qw, s, z, self.k, self.kp, ge, self.bits)
        self._haddr = ctypes.addressof(self._head)
        # what a compiled graph calls it by (medquant::gemv4_bound): unique in this process, never reused
        self.handle = next(_HANDLES)
        _BOUND[self.handle] = self

    def extra_bytes(self) -> int:
        """Bytes this object holds beyond the layer's own tensors (its scale and zero copies).

        Returns:
            The byte count.
        """
        own = {t.untyped_storage().data_ptr() for t in (self._weight.scales, self._weight.zeros) if t is not None}
        return sum(t.numel() * t.element_size() for t in (self.s, self.z)
                   if t.untyped_storage().data_ptr() not in own)

    def __call__(self, x: torch.Tensor, xmode: int) -> torch.Tensor | None:
        """``y`` for ``x`` (class docstring), after checking ``x``.

        Args:
            x: ``(M, k)`` CPU float32 or bfloat16 tensor with unit column stride.
            xmode: 0, 1, 2, 3 or 8 (class docstring; a bool: 1 for True).

        Returns:
            ``y (M, n)``, or None when the C function declined.

        Raises:
            ValueError: ``x`` of another shape, dtype, device or layout.
        """
        if x.dim() != 2 or x.shape[1] != self.k or x.dtype not in (torch.float32, torch.bfloat16) or \
                x.device.type != "cpu" or (self.k > 1 and x.stride(1) != 1):
            raise ValueError(f"x must be a CPU float32 / bfloat16 tensor (M, {self.k}) with unit column stride, "
                             f"got {tuple(x.shape)} {x.dtype} strides {x.stride()}")
        if xmode not in GEMV_XMODES:
            raise ValueError(f"xmode must be 0 (x as it is), 1 (rounded to bfloat16), 2 (split), 3 (int16) or "
                             f"{INT8_XMODE} (int8), got {xmode!r}")
        return self.run(x, xmode)

    def run(self, x: torch.Tensor, xmode: int, out_dtype: torch.dtype | None = None) -> torch.Tensor | None:
        """:meth:`__call__` without the checks, for a caller that has made them (the CPU backend's runner).
        ``out_dtype``: float32 for a float32 output whatever ``x``'s dtype (None: ``x``'s dtype, as traced calls
        give float32)."""
        if torch.compiler.is_compiling():
            return gemv4_op(x, self.qweight, self.s, self.z, self.k, self.kp, self.ge, int(xmode), self.bits)
        y = torch.empty(x.shape[0], self.n, dtype=x.dtype if out_dtype is None else out_dtype)
        rc = _matmul_into(self._call, self._haddr, x, y, xmode << 2)
        if rc != 0:
            _report_once(f"gemv{rc}", f"medquant native {self.bits}-bit matmul declined a call ({self._weight.describe()}, "
                                      f"code {rc}): the dense path runs it")
            return None
        return y

    def into(self, x: torch.Tensor, m: int, y: torch.Tensor, xmode: int) -> bool:
        """:meth:`run` for a contiguous ``x`` of any shape holding ``m`` rows of ``k`` values, into a contiguous
        ``y`` of the same dtype holding ``m`` rows of ``n`` (the caller has checked both): a decode step's call,
        without reshapes. False when the C function declined (``y`` is then not written)."""
        return _matmul_into(self._call, self._haddr, x, y, xmode << 2, (m, self.k, self.n)) == 0

    @property
    def int16_form(self) -> bool:
        """Whether ``xmode`` 3 runs as such here (else as 2, split): a library with ``vpdpwssd`` (AVX512-VNNI, as
        :attr:`has_gemm`), or the AVX2 + FMA form of a CPU without AVX512 (``vpmaddwd``, per block of 32 columns
        of every layout). Every width and group layout then has it: 8-bit containers and the stream widths per
        block of 32 columns (one ``t`` each); 4-bit containers per 128-column unit of the quad form (each quarter
        scaled by its own ``t`` and group scale, so any group of a multiple of 32 columns) and per block of 64
        columns after the units (a last block of fewer columns holds zero codes and zero ``x`` beyond ``k_pad``)
        with AVX512, per block of 32 columns with AVX2."""
        return self._int16

    @property
    def int8_form(self) -> bool:
        """Whether ``xmode`` :data:`INT8_XMODE` runs as 8-bit integers here (else as 3): the AVX2 + FMA form of a
        CPU without AVX512, on codes in 4-bit containers (4-bit rows, and 1- to 3-bit rows of layout version 1)."""
        return self._int8 and self.bits == 4

    @property
    def has_gemm(self) -> bool:
        """Whether :meth:`gemm` can run here (the library has the blocked matmul: AVX512-VNNI)."""
        return self._gemm

    def gemm(self, x: torch.Tensor) -> torch.Tensor | None:
        """``y (M, n)`` for many rows of ``x`` (prefill) by the blocked integer kernel (``mq_call``'s blocked form):

            x~[i, j] = t[i, c] * round_half_even(x[i, j] / t[i, c]),  t[i, c] = max_{j in c} |x[i, j]| / 32767

        per block ``c`` of columns (the weight's group, or 128 / 64 / 32 columns of it; 128 for channel / tensor
        scope), i.e. ``x`` to ``2^-16`` of its block's largest magnitude as 16-bit integers, and

            y[i, r] = sum_c t[i, c] s[r, g(c)] * sum_{j in c} v[i, j] u[r, j]  -  sum_g s[r, g] z[r, g] X[i, g]

        (``X[i, g] = sum_{j in g} x~[i, j]``): ``x~ @ ((u - z) * s)^T`` with exact integer products and sums within a
        block (``vpdpwssd``), float32 across blocks. Where every zero point of a panel of 32 weight rows is an
        integer in 0..255 (symmetric rows, medquant's asymmetric rows) the panel holds ``u - z`` and the ``X`` term
        drops out. Neither the weights nor the output are rounded to bfloat16,
        unlike the dense path's bfloat16 GEMM on dequantized weights. ``y`` is float32, or bfloat16 for a bfloat16
        ``x`` (the float32 sum rounded once). The checks of :meth:`__call__` are the caller's (the CPU backend's
        runner makes them).

        Args:
            x: ``(M, k)`` CPU float32 or bfloat16 tensor with unit column stride.

        Returns:
            ``y``, or None where the kernel declines: no blocked matmul in this build, or an ``x`` with a value that is
            not finite or a block whose largest magnitude is below ``2^-100`` (the caller's dense path then runs
            it and propagates such values as torch does).
        """
        if not self._gemm or torch.compiler.is_compiling():  # traced: the dense path (module docstring)
            return None
        y = torch.empty(x.shape[0], self.n, dtype=x.dtype)
        rc = _matmul_into(self._call, self._haddr, x, y, _GEMM)
        if rc != 0:
            if rc != -5:  # -5: x not finite (or tiny): the dense path, silently, as torch would compute it
                _report_once(f"gemm{rc}", f"medquant native {self.bits}-bit blocked matmul declined a call "
                                          f"({self._weight.describe()}, code {rc}): the dense path runs it")
            return None
        return y


def gemv4_decline(weight: PackedWeight) -> str | None:
    """Why the native weight-only matmul cannot take this row group (None: it can, once the library is built
    with the kernel compiled in: :func:`native_gemv4`; a library already loaded without the stream widths, i.e.
    built without AVX512-VBMI, declines every layout but 4- and 8-bit containers)."""
    width = storage_bits(weight.bits, weight.dense)
    if width not in (4, 8) and _state.lib is not None and not _state.gemv & 4:
        return (f"{weight.bits}-bit rows stored in {width} bits per code need the library's stream kernel "
                "(AVX512-VBMI, or AVX2 + FMA without AVX512), which this build lacks; it reads 4- and 8-bit containers")
    if weight.device.type != "cpu":
        return f"the native kernel runs CPU tensors only, not {weight.device}"
    if weight.scope == "group" and weight.group_elems % 32:
        return f"the native kernel takes groups of a multiple of 32 columns, not {weight.group_elems}"
    return None


def native_gemv4(weight: PackedWeight, scale: torch.Tensor | None = None,
                 zero: torch.Tensor | None = None) -> NativeGemv4 | None:
    """The native weight-only matmul of one row group, or None when it cannot run here: ``$MEDQUANT_NATIVE=0``, no
    library, a library built without AVX512F + BW or AVX2 + FMA, a layout it does not read (:func:`gemv4_decline`).

    It reads every layout: 4-bit containers (4-bit rows, 3-bit rows of the version-1 layout), 8-bit containers
    (8-bit rows, 5..7-bit rows of the version-1 layout) and, where the library has AVX512-VBMI, the dense
    3/5/6/7-bit bit stream of the version-2 layout and 1- and 2-bit containers, each in place at its stored width.

    Args:
        weight: the packed row group.
        scale: float32 ``s`` of ``weight.scales``' shape with ``w = (u - z) * s``, or None (the default): the
            layer's own scales and zero points are read in place (:func:`kernel_params`).
        zero: float32 ``z`` of the same shape; None with ``scale``.

    Returns:
        The bound :class:`NativeGemv4`, or None.

    Raises:
        ValueError: one of ``scale`` and ``zero`` given without the other.
    """
    _check_pair(scale, zero)
    if _disabled() or gemv4_decline(weight) is not None:
        return None
    lib = _library()
    if lib is None or not _state.gemv & 1:
        return None
    if not _gemv_takes(storage_bits(weight.bits, weight.dense)):
        return None
    kp = weight.k_pad
    ge = weight.group_elems if weight.scope == "group" else kp
    s, z = kernel_params(weight, kp // ge, scale, zero)
    # the blocked matmul is compiled in with AVX512-VNNI (gemv bit 3); int16 x with it, or in the AVX2 form (bit 4)
    # and int8 x (bit 5) in the AVX2 form
    return NativeGemv4(lib.mq_call, weight, weight.qweight.contiguous(), s, z, ge, gemm=bool(_state.gemv & 8),
                       int16=bool(_state.gemv & 24), int8=bool(_state.gemv & 32))
