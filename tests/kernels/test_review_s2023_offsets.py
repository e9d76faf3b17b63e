"""The packed-matmul kernels address activations and outputs past 2^31 elements without wrapping.

``offs_m * stride_xm`` (and ``offs_m * stride_ym``, ``offs_k * stride_xk``) were int32 products: an input whose
rows (or columns) lie more than 2^31 elements apart, or an output of more than 2^31 elements (an LM head of 128k
rows over a prefill of 17k tokens), wrapped to an address before the tensor: a crash, or garbage read / written on
a GPU. The Triton interpreter does the same int32 arithmetic, so a strided view over a large (untouched, hence
not resident) buffer shows it on CPU. Each case runs in a subprocess, since the wrapped read is a segfault there.
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
    from medquant.kernels import PackedWeight, packed_linear
    from medquant.kernels.layout import pack

    m, axis = int(sys.argv[1]), sys.argv[2]
    k, n = 64, 8
    torch.manual_seed(0)
    if axis == "rows":  # rows (m - 1) * stride >= 2^31 elements apart
        stride = -(-2**31 // (m - 1)) + 7
        store = torch.empty((m - 1) * stride + k, dtype=torch.float16)
        x = store.as_strided((m, k), (stride, 1))
    else:  # columns (k - 1) * stride >= 2^31 elements apart
        stride = -(-2**31 // (k - 1)) + 7
        store = torch.empty((k - 1) * stride + m, dtype=torch.float16)
        x = store.as_strided((m, k), (1, stride))
    x.copy_(torch.randn(m, k).half())
    codes = torch.randint(0, 16, (n, k))
    scales = torch.rand(n, 1, dtype=torch.float16) * 0.1 + 0.01
    weight = PackedWeight(pack(codes, 4), scales, None, 4, True, "channel", k, k)
    # plain torch: w = (u - 8) * s, y = x @ w^T in float32
    want = x.float() @ ((codes.float() - 8) * scales.float()).t()
    got = packed_linear(x, weight, backend="triton").float()
    err = (got - want).abs().max().item()
    print(f"ERR {err} {want.abs().max().item()}")
""")


@pytest.mark.parametrize(("m", "axis"), [(3, "rows"), (70, "rows"), (1, "cols"), (3, "cols")])
def test_packed_linear_triton_with_offsets_past_int32(kernel_device, m, axis):
    if kernel_device != "cpu":
        pytest.skip("runs the interpreter on a strided view of a 4 GiB CPU buffer")
    skip_unless_reservable(2**32 + 2**20)
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, "-c", _SCRIPT, str(m), axis], capture_output=True, text=True, env=env,
                          timeout=600, check=False)
    assert proc.returncode == 0, (f"packed_linear (triton) on a view with {axis} 2^31 elements apart died "
                                  f"(rc {proc.returncode}): {proc.stderr[-2000:]}")
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("ERR ")][-1]
    err, scale = map(float, line.split()[1:])
    assert err <= 2e-3 * max(scale, 1.0), (err, scale)
