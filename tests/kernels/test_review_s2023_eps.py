"""``fake_quantize_rows`` refuses an ``eps`` that is not a positive finite float32 number, on every backend.

``eps`` is the lower bound of a row's scale. A NaN made the torch reference return NaN for every row while the
Triton kernel (whose ``max`` drops a NaN operand) ignored it, so the backends disagreed; 0, a negative number or
inf gave NaN rows silently (an all-zero row divides 0 / 0, or every row divides by inf); a value past float32's
range failed inside torch with ``value cannot be converted to type float without overflow``.
"""
from __future__ import annotations

import pytest
import torch

from medquant.kernels import fake_quantize_rows, fake_quantize_rows_reference

BAD_EPS = [float("nan"), 0.0, -1e-8, float("inf"), 1e39]


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("eps", BAD_EPS, ids=repr)
@pytest.mark.parametrize("symmetric", [False, True])
def test_bad_eps_is_refused_with_a_clear_message(kernel_device, backend, eps, symmetric):
    x = torch.tensor([[0.0, 0.0, 0.0], [1.0, -2.0, 0.5]], device=kernel_device)
    with pytest.raises(ValueError, match=r"eps must be a positive finite"):
        fake_quantize_rows(x, 4, symmetric, eps=eps, backend=backend)


@pytest.mark.parametrize("eps", BAD_EPS, ids=repr)
def test_reference_refuses_bad_eps(eps):
    with pytest.raises(ValueError, match=r"eps must be a positive finite"):
        fake_quantize_rows_reference(torch.ones(2, 3), [4, 4], False, eps=eps)


@pytest.mark.parametrize("eps", [True, "1e-8", None, torch.tensor([1e-8]), torch.tensor(True)])
def test_non_number_eps_is_a_type_error(eps):
    with pytest.raises(TypeError, match=r"eps must be"):
        fake_quantize_rows(torch.ones(2, 3), 4, False, eps=eps)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_valid_eps_values_still_work_and_agree(kernel_device, backend):
    x = torch.tensor([[0.0, 0.0], [1.0, 2.0]], device=kernel_device)
    for eps in (1e-38, 1e-3, 1, torch.finfo(torch.float32).max, torch.tensor(1e-3), torch.tensor(1e-3).double()):
        out = fake_quantize_rows(x, 4, False, eps=eps, backend=backend)
        # plain torch: s = max((hi - lo) / 15, eps), z = clamp(round(-lo / s), 0, 15)
        xf = x.float()
        lo = xf.amin(1, keepdim=True).clamp_max(0)
        hi = xf.amax(1, keepdim=True).clamp_min(0)
        s = torch.maximum((hi - lo) / 15, torch.tensor(float(eps)))
        z = torch.round(-lo / s).clamp(0, 15)
        want = (torch.round(xf / s).add(z).clamp(0, 15) - z) * s
        assert torch.equal(out, want), (eps, out, want)
