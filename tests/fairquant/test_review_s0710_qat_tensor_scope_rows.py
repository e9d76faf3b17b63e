"""FQ-QAT's fake quantization of a layer with mixed per-row bits computes each bit group's scale from that group's
rows, as the exported QuantLinear stores them: with tensor scope the scale of a bit group is that of its rows, not
of the whole matrix (the exported model then computed something else than the model trained)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from medquant.fairquant.qat import attach_fake_quant, detach_fake_quant
from medquant.quant import QuantConfig, quantize_


@pytest.mark.parametrize("scope", ["tensor", "channel", "group"])
@pytest.mark.parametrize("symmetric", [True, False])
def test_fake_quantized_weight_is_the_exported_layers_weight(scope, symmetric):
    g = torch.Generator().manual_seed(0)
    lin = nn.Sequential(nn.Linear(64, 8))
    with torch.no_grad():
        lin[0].weight.copy_(torch.randn(8, 64, generator=g) * torch.linspace(0.1, 3.0, 8)[:, None])
    cfg = QuantConfig(bits=8, scope=scope, **({"group_size": 32} if scope == "group" else {}), symmetric=symmetric,
                      channel_bits=(2, 4, 8, 4, 2, 8, 3, 4))
    attach_fake_quant(lin, {"0": cfg})
    with torch.no_grad():
        trained = lin[0].weight.detach().clone()  # what the forward uses while training
    detach_fake_quant(lin)
    quantize_(lin, {"0": cfg})
    exported = lin[0].dequantized_weight(torch.float32)
    torch.testing.assert_close(trained, exported, rtol=0, atol=1e-6)
