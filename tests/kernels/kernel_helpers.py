"""Shared helpers of the kernel tests: fp64 oracles, the tolerance rule, and child processes whose native
library is built with other compiler options."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

EPS = {torch.float32: torch.finfo(torch.float32).eps, torch.float16: torch.finfo(torch.float16).eps,
       torch.bfloat16: torch.finfo(torch.bfloat16).eps}


def dequant_fp64(codes, scales, zeros, bits, symmetric, scope, group_elems, k):
    """Weights from the *unpacked* codes, in float64, written independently of medquant's dequantizer."""
    n, kp = codes.shape
    u = codes.to(torch.float64)
    cols = torch.arange(kp)
    if scope == "group":
        gi = cols // group_elems
        s = scales.to(torch.float64)[:, gi]
        z = zeros.to(torch.float64)[:, gi] if zeros is not None else None
    else:
        s = scales.to(torch.float64).expand(n, 1)
        z = zeros.to(torch.float64).expand(n, 1) if zeros is not None else None
    if symmetric:
        w = (2 * u - 1) * s if bits == 1 else (u - 2 ** (bits - 1)) * s
    else:
        w = (u - z) * s
    return w[:, :k]


def matmul_tolerance(x: torch.Tensor, w64: torch.Tensor) -> float:
    """``K * eps(dtype) * max|x| * max|w|``: bounds rounding W to the activation dtype (K terms of at most
    ``eps/2 |x||w|``) plus rounding the output (``eps/2 * |y|``, ``|y| <= K max|x| max|w|``)."""
    k = x.shape[-1]
    scale = float(x.double().abs().max()) * float(w64.abs().max())
    return max(k, 1) * EPS[x.dtype] * scale + 1e-30


def assert_matches_oracle(y: torch.Tensor, x: torch.Tensor, w64: torch.Tensor, what: str = "") -> None:
    ref = x.double() @ w64.t()
    assert y.shape == ref.shape, f"{what}: shape {tuple(y.shape)} != {tuple(ref.shape)}"
    assert y.dtype == x.dtype, f"{what}: dtype {y.dtype} != {x.dtype}"
    tol = matmul_tolerance(x, w64)
    err = float((y.double() - ref).abs().max()) if ref.numel() else 0.0
    assert err <= tol, f"{what}: max |y - y_fp64| = {err:.4g} > tol {tol:.4g}"


def bit_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same shape, dtype and bits (so -0.0 != +0.0); via ``==`` on integer views."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    iv = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}[a.dtype]
    return bool((a.contiguous().view(iv) == b.contiguous().view(iv)).all())


def run_with_native_flags(script: str, cflags: str, cache_dir, **env: str) -> str:
    """Run ``script`` (Python source) in a child process whose native library is built with ``cflags`` added to
    the C compiler (``$CC``, else ``cc`` / ``gcc`` / ``clang``; skips without one) in its own cache folder
    ``cache_dir``, with the repository importable (on ``$PYTHONPATH``) and ``env`` added to the environment. The
    script must print the child's library path, then ``ok``, as its last two lines. Asserts that it did, and that
    the child's build is not this process's under another name (options given in ``$CC`` are part of the build
    key); returns its output."""
    from medquant.kernels.native import native_status

    cc = os.environ.get("CC") or next((c for c in ("cc", "gcc", "clang") if shutil.which(c)), None)
    if cc is None:
        pytest.skip("needs a C compiler")
    root = str(Path(__file__).resolve().parents[2])
    full = {**os.environ, "CC": f"{cc} {cflags}", "MEDQUANT_CACHE_DIR": str(cache_dir),
            "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]), **env}
    out = subprocess.run([sys.executable, "-c", script], env=full, capture_output=True, text=True, check=False,
                         timeout=900)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stdout[-2000:] + out.stderr[-4000:]
    child_lib = Path(out.stdout.strip().splitlines()[-2])
    assert child_lib.parent.name != Path(native_status()["library"]).parent.name
    return out.stdout


def native_int16() -> bool:
    """Whether the native library takes ``xmode`` 3 as 16-bit integers (``NativeGemv4.int16_form``): built with
    AVX512-VNNI (``vpdpwssd``, with the blocked matmul: ``gemm``) or in the AVX2 form (``vpmaddwd``)."""
    from medquant.kernels.native import native_status

    st = native_status()
    return bool(st["gemm"] or st["gemv_avx2"])


def skip_unless_reservable(nbytes: int) -> None:
    """Skip when this machine would refuse to reserve ``nbytes`` of address space that is never touched: Linux
    reserves an untouched allocation only under overcommit (``vm.overcommit_memory`` 0 or 1) and, in the default
    heuristic mode 0, only up to the memory plus swap (a smaller CI machine than this one refuses an 8 GiB
    ``torch.empty`` although it would use a few pages of it)."""
    try:
        mode = int(Path("/proc/sys/vm/overcommit_memory").read_text())
        info = {ln.split(":")[0]: int(ln.split()[1]) * 1024 for ln in Path("/proc/meminfo").read_text().splitlines()
                if ln.split(":")[0] in ("MemTotal", "SwapTotal")}
    except (OSError, ValueError, IndexError):
        pytest.skip("not Linux: the test relies on overcommitted, untouched memory")
    if mode == 2 or (mode == 0 and nbytes > info.get("MemTotal", 0) + info.get("SwapTotal", 0)):
        pytest.skip(f"this machine would refuse to reserve {nbytes / 2**30:.0f} GiB of untouched memory "
                    f"(vm.overcommit_memory={mode}, memory + swap {sum(info.values()) / 2**30:.1f} GiB)")
