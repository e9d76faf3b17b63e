"""Why the Triton backend cannot run on a device: the message names the devices it runs on.

With Triton installed, a forced ``"triton"`` backend on a device it does not run on (``meta``, ``mps``, ``xpu``;
or ``cuda`` where torch sees no CUDA device) said ``Triton kernels are not available for device meta (is triton
installed?)``: it pointed at the installation, which was fine, and did not say what is accepted.
"""
from __future__ import annotations

import pytest
import torch

from medquant.kernels import force_backend, select_kernel
from medquant.kernels.dispatch import need_triton


@pytest.mark.parametrize("device", ["meta", "mps", "xpu"])
def test_other_device_types_name_what_triton_runs_on(kernel_device, device):
    with pytest.raises(RuntimeError) as info:
        need_triton(device)
    msg = str(info.value)
    assert "is triton installed" not in msg
    assert "CUDA" in msg and "TRITON_INTERPRET=1" in msg and device in msg
    assert "torch" in msg  # the way out: the torch backend


def test_forced_triton_on_a_meta_tensor_names_what_is_accepted(kernel_device):
    x = torch.empty(2, 3, device="meta")
    with force_backend("triton"), pytest.raises(RuntimeError) as info:
        select_kernel("fake_quantize_rows", x, torch.full((2,), 4), False, 1e-38, False)
    assert "is triton installed" not in str(info.value) and "CUDA" in str(info.value)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a CUDA device")
def test_cuda_without_a_cuda_device_says_so(kernel_device):
    with pytest.raises(RuntimeError) as info:
        need_triton("cuda")
    msg = str(info.value)
    assert "is triton installed" not in msg and "no CUDA device" in msg
