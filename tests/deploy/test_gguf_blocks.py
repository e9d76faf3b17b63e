"""GGUF block re-expression of medquant codes, checked against the ``gguf`` package's own dequantiser.

The reference is ``gguf.quants.dequantize`` of the bytes the exporter writes: it must equal medquant's
dequantized weight bit for bit wherever the report says exact.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

pytest.importorskip("gguf")

from gguf.quants import dequantize

from medquant.deploy.gguf import _quant_tensor
from medquant.deploy.gguf_blocks import BLOCK_BYTES, gguf_type
from medquant.quant.config import QuantConfig
from medquant.quant.modules import QuantLinear


def _layer(k: int, config: QuantConfig, rows: int = 24) -> QuantLinear:
    gen = torch.Generator().manual_seed(k + rows)
    lin = nn.Linear(k, rows, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(rows, k, generator=gen) * 0.05 + 0.02)  # off-centre: zero points vary
        lin.weight[1] = lin.weight[1].abs()  # an all-positive row: z = 0
        lin.weight[2] = -lin.weight[2].abs()  # an all-negative row: z = 2^b - 1
    return QuantLinear.from_float(lin, config)


def _decoded(data, target: str, shape) -> torch.Tensor:
    return torch.from_numpy(dequantize(data, gguf_type(target)).astype("float32")).reshape(shape)


@pytest.mark.parametrize("bits", [1, 2, 3])
@pytest.mark.parametrize("scope, group_size", [("group", 32), ("group", 64), ("channel", 32), ("tensor", 32)])
@pytest.mark.parametrize("k", [96, 160])
def test_asymmetric_codes_up_to_3_bits_are_exact_q4_0(bits, scope, group_size, k):
    """``(u - z) * s`` with ``u, z`` in ``0..2^b-1`` (b <= 3): ``q = u - z + 8`` lies in 1..15, so Q4_0 carries it
    with ``d = s``, bit-equal (and smaller than Q4_1, whose float16 offset ``m = -z * s`` rounds)."""
    cfg = QuantConfig(bits=bits, symmetric=False, scope=scope, group_size=group_size)
    layer = _layer(k, cfg)
    zeros = layer.packed_weight(bits).zeros
    assert zeros is not None and (scope == "tensor" or zeros.unique().numel() > 1)  # several zero points
    data, row = _quant_tensor(layer, "x", None, "Q8_0")
    assert row.target == "Q4_0" and data.shape == (layer.out_rows, k // 32 * BLOCK_BYTES["Q4_0"])
    ref = layer.dequantized_weight(torch.float32)
    assert torch.equal(_decoded(data, "Q4_0", ref.shape), ref)
    assert (row.how, row.max_abs_error) == ("exact re-expression", 0.0)


def test_mixed_asymmetric_3_bit_and_symmetric_4_bit_rows_are_one_exact_q4_0_tensor():
    rows = 24
    cfg = QuantConfig(bits=4, symmetric=None, group_size=32, channel_bits=tuple(3 if i % 2 else 4 for i in range(rows)))
    layer = _layer(128, cfg, rows)
    assert not cfg.is_symmetric(3) and cfg.is_symmetric(4)
    data, row = _quant_tensor(layer, "x", None, "Q8_0")
    ref = layer.dequantized_weight(torch.float32)
    assert row.target == "Q4_0" and torch.equal(_decoded(data, "Q4_0", ref.shape), ref)
    assert row.how == "exact re-expression"


def test_asymmetric_4_bit_codes_stay_q4_1_with_their_measured_error():
    """``u - z`` of 4-bit codes spans -15..15, beyond Q4_0's -8..7: Q4_1, near-exact, the error measured."""
    layer = _layer(128, QuantConfig(bits=4, symmetric=False, group_size=32))
    data, row = _quant_tensor(layer, "x", None, "Q8_0")
    ref = layer.dequantized_weight(torch.float32)
    err = float((_decoded(data, "Q4_1", ref.shape) - ref).abs().max())
    assert row.target == "Q4_1" and row.how == "near-exact" and row.max_abs_error == err > 0
