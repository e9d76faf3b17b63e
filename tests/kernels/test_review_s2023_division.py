"""The fake-quant kernels divide with IEEE round-to-nearest on a GPU, as torch does.

Triton's ``/`` on float32 lowers to PTX ``div.full.f32`` on NVIDIA GPUs (at most 2 ulp off, not correctly
rounded); the interpreter divides with NumPy (correctly rounded), so the CPU tests could not see it. A quotient
``x / s`` one ulp off moves a value at a rounding tie (``x / s`` exactly ``k + 0.5``) to the other code, and a scale
``absmax / q_max`` one ulp off changes every value of the row: the kernels would not match the torch reference
(and :func:`medquant.quant.core.fake_quantize`) bit for bit, as documented. The test compiles the kernels for an
sm_90 target (no GPU needed: Triton ships the compiler and ``ptxas``) in a subprocess without ``TRITON_INTERPRET``
and reads the PTX: every float32 division must be ``div.rn.f32``.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

_SCRIPT = textwrap.dedent(r"""
    import json, re, sys
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from medquant.kernels import _fakequant_triton as F

    target = GPUTarget("cuda", 90, 32)
    found = {}
    for sym in (False, True):
        sig = {"x_ptr": "*fp32", "bits_ptr": "*i32", "y_ptr": "*fp32", "mask_ptr": "*i8", "C": "i32",
               "stride_xr": "i32", "stride_yr": "i32", "eps": "fp32", "SYMMETRIC": "constexpr",
               "WRITE_MASK": "constexpr", "PASS_BITS": "constexpr", "BLOCK_C": "constexpr"}
        src = ASTSource(fn=F._fq_rows_kernel, signature=sig,
                        constexprs={"SYMMETRIC": sym, "WRITE_MASK": True, "PASS_BITS": 16, "BLOCK_C": 256})
        found[f"rows sym={sym}"] = sorted(set(re.findall(r"\bdiv\.[a-z0-9.]+", triton.compile(src, target=target).asm["ptx"])))
        sig = {"x_ptr": "*fp32", "s_ptr": "*fp32", "z_ptr": "*fp32", "y_ptr": "*fp32", "mask_ptr": "*i8",
               "N": "i32", "K": "i32", "stride_xn": "i32", "stride_xk": "i32", "stride_sn": "i32",
               "stride_sg": "i32", "stride_zn": "i32", "stride_zg": "i32", "stride_yn": "i32",
               "BITS": "constexpr", "SYMMETRIC": "constexpr", "GROUP": "constexpr", "WRITE_MASK": "constexpr",
               "BLOCK_N": "constexpr", "BLOCK_K": "constexpr"}
        src = ASTSource(fn=F._fq_static_kernel, signature=sig,
                        constexprs={"BITS": 4, "SYMMETRIC": sym, "GROUP": 32, "WRITE_MASK": True,
                                    "BLOCK_N": 16, "BLOCK_K": 64})
        found[f"static sym={sym}"] = sorted(set(re.findall(r"\bdiv\.[a-z0-9.]+", triton.compile(src, target=target).asm["ptx"])))
    print(json.dumps(found))
""")


def _ptx_divisions() -> dict[str, list[str]]:
    pytest.importorskip("triton")
    try:
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.compiler import ASTSource  # noqa: F401
    except ImportError:
        pytest.skip("this Triton has no ASTSource / GPUTarget to compile for a GPU target")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    proc = subprocess.run([sys.executable, "-c", _SCRIPT], capture_output=True, text=True, env=env,
                          timeout=600, check=False)
    if proc.returncode != 0:
        if "nvidia" in proc.stderr.lower() and "backend" in proc.stderr.lower():
            pytest.skip("Triton's NVIDIA backend is not installed")
        pytest.fail(f"compiling the fake-quant kernels for sm_90 failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_fake_quant_kernels_divide_with_ieee_rounding_on_a_gpu():
    found = _ptx_divisions()
    assert found, "no kernel was compiled"
    for name, instrs in found.items():
        assert instrs, f"{name}: no division in the PTX (the kernel divides x / s)"
        floats = [i for i in instrs if i.endswith((".f32", ".f64"))]  # integer divisions (div.s32) do not round
        assert floats, f"{name}: no float division in the PTX (the kernel divides x / s): {instrs}"
        bad = [i for i in floats if not i.startswith("div.rn.")]
        assert not bad, f"{name}: float32 division compiled to {bad}, not correctly rounded (div.rn.f32)"
