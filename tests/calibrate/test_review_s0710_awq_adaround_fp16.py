"""Review (s0710): learned rounding of a float16 model whose block outputs are large. The reconstruction errors
are squared differences of float16 outputs; squared in float16, an error above 256 overflowed to inf, so a valid
float16 layer was refused as "learned rounding diverged". The records must hold the float64 errors of the float16
outputs (plain torch reference), and the loss the Adam steps minimise must be finite."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from medquant import QuantConfig, quantize_
from medquant.calibrate import adaround
from medquant.calibrate.adaround import adaround_quantize_


def _layer():
    torch.manual_seed(0)
    lin = nn.Linear(64, 32)
    with torch.no_grad():
        lin.weight.normal_(0, 1.0)
    x = 60 * torch.randn(48, 64, generator=torch.Generator().manual_seed(1))
    return nn.Sequential(lin).half(), x.half()


def test_float16_outputs_with_errors_above_256_give_the_float64_errors_of_the_float16_outputs():
    base, x = _layer()
    cfg = QuantConfig(bits=3, symmetric=True)
    y = base(x).double()
    w_rtn = quantize_(copy.deepcopy(base), cfg)[0].dequantized_weight().half()
    err_rtn = (F.linear(x, w_rtn, base[0].bias).double() - y)
    assert float(err_rtn.abs().max()) > 256  # its square is not a float16 number
    model = copy.deepcopy(base)
    rec = adaround_quantize_(model, cfg, [x], iters=50, progress=False)["0"]
    assert rec["mse_rtn"] == pytest.approx(float(err_rtn.pow(2).mean()), rel=1e-3)
    w_kept = model[0].dequantized_weight().half()
    err_kept = F.linear(x, w_kept, base[0].bias).double() - y
    assert rec["mse"] == pytest.approx(float(err_kept.pow(2).mean()), rel=1e-3)
    assert rec["mse"] <= rec["mse_rtn"]


def test_float16_reconstruction_loss_is_finite_and_equals_the_float32_loss():
    out = torch.full((4, 512), 20.0, dtype=torch.float16)  # per row 512 * 400 = 204800 > float16's max
    target = torch.zeros_like(out)
    loss = adaround._rec_loss(out, target)
    assert torch.isfinite(loss)
    assert float(loss) == pytest.approx(512 * 400.0)
