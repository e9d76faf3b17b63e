"""Review of GPTQ's argument checks: what is refused, and how."""
from __future__ import annotations

import pytest
import torch

from medquant import QuantConfig
from medquant.calibrate.gptq import gptq_quantize_, gptq_quantize_sequential


@pytest.mark.parametrize("fn", [gptq_quantize_, gptq_quantize_sequential])
def test_a_model_that_is_not_a_module_is_refused_with_a_type_error(fn):
    batch = {"input_ids": torch.zeros(1, 4, dtype=torch.long)}
    with pytest.raises(TypeError, match=rf"{fn.__name__} expects an nn.Module, got str"):
        fn("model", QuantConfig(4), [batch])


def test_gptq_quantize_weight_refuses_per_row_bits_it_would_ignore():
    """A config with ``channel_bits`` and no ``bits=``: every row used to be quantized at ``config.bits`` (4), the
    2-bit rows with 16 levels instead of 4, without a word."""
    from medquant.calibrate.gptq import gptq_quantize_layer, gptq_quantize_weight
    from medquant.quant.core import dequantize

    g = torch.Generator().manual_seed(0)
    w = torch.randn(4, 16, generator=g)
    x = torch.randn(64, 16, generator=g).double()
    h = 2 * x.T @ x / 64
    cfg = QuantConfig(4, scope="channel", channel_bits=(2, 2, 8, 8))
    with pytest.raises(ValueError, match=r"per-row bit-widths \(channel_bits\).*pass bits=.*gptq_quantize_layer"):
        gptq_quantize_weight(w, h, cfg)
    # rows of one width with bits= given; the layer at the widths the config asks for
    layer = torch.nn.Linear(16, 4, bias=False)
    with torch.no_grad():
        layer.weight.copy_(w)
    got = gptq_quantize_layer(layer, h, cfg).dequantized_weight()
    for rows, b in ((slice(0, 2), 2), (slice(2, 4), 8)):
        ref, _ = gptq_quantize_weight(w[rows], h, cfg, bits=b)
        assert torch.equal(got[rows], dequantize(ref))
        assert len(torch.unique(got[0])) <= 2**2  # 2-bit rows: at most 4 levels
