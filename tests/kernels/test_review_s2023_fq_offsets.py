"""The fake-quant kernels address rows past 2^31 elements without wrapping.

``row * stride_xr`` (rows kernel) and ``offs_n * stride_xn`` / ``offs_n * stride_yn`` (static kernel) were int32
products: once ``R * C`` passes 2^31 elements (per-sample fake quant of a large activation batch, a large
embedding table) the offset wrapped to an address before the tensor. The host wrappers pass contiguous tensors,
where that takes more than 2^31 real elements; the kernels are launched here on a strided view with 3 rows 2^30
elements apart over an untouched (not resident) buffer, which exercises the same products. The Triton interpreter
does int32 arithmetic like a GPU; each case runs in a subprocess, since the wrapped read is a segfault there.
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from tests.kernels.kernel_helpers import skip_unless_reservable

_SCRIPT = textwrap.dedent(r"""
    import os, sys
    os.environ["TRITON_INTERPRET"] = "1"
    import torch
    from medquant.kernels import fake_quantize_rows_reference, fake_quantize_static_reference
    from medquant.kernels._fakequant_triton import _fq_rows_kernel, _fq_static_kernel

    which = sys.argv[1]
    r, c = 3, 40
    stride = 2**30 + 3
    store = torch.empty((r - 1) * stride + c, dtype=torch.float32)
    x = store.as_strided((r, c), (stride, 1))
    torch.manual_seed(0)
    x.copy_(torch.randn(r, c))
    y = torch.empty(r, c)
    mask = torch.empty(r, c, dtype=torch.int8)
    if which == "rows":
        bits = torch.tensor([3, 4, 5], dtype=torch.int32)
        _fq_rows_kernel[(r,)](x, bits, y, mask, c, x.stride(0), y.stride(0), 1e-30, SYMMETRIC=False,
                              WRITE_MASK=True, PASS_BITS=16, BLOCK_C=64)
        want = fake_quantize_rows_reference(x.contiguous(), bits, False, eps=1e-30)
    else:
        s = torch.rand(r, 1) * 0.1 + 0.05
        _fq_static_kernel[(1, 1)](x, s, s, y, mask, r, c, x.stride(0), x.stride(1), s.stride(0), s.stride(1),
                                  s.stride(0), s.stride(1), y.stride(0), BITS=4, SYMMETRIC=True, GROUP=0,
                                  WRITE_MASK=True, BLOCK_N=4, BLOCK_K=64)
        want = fake_quantize_static_reference(x.contiguous(), s, None, 4, True)
    print("EQUAL", bool(torch.equal(y, want)))
""")


@pytest.mark.parametrize("which", ["rows", "static"])
def test_fake_quant_kernels_with_row_offsets_past_int32(kernel_device, which):
    if kernel_device != "cpu":
        pytest.skip("runs the interpreter on a strided view of a 8 GiB CPU buffer")
    skip_unless_reservable(2**33)
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, "-c", _SCRIPT, which], capture_output=True, text=True, env=env,
                          timeout=600, check=False)
    assert proc.returncode == 0, (f"the {which} fake-quant kernel on rows 2^30 elements apart died "
                                  f"(rc {proc.returncode}): {proc.stderr[-2000:]}")
    assert "EQUAL True" in proc.stdout, proc.stdout[-2000:]
