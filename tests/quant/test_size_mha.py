"""model_size / layer_table count ``nn.MultiheadAttention``'s in-projection weights (raw parameters, not layer
modules) as float weights, as medquant.eval's count_macs / proxy_bops do: hand counts from the torch shapes."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import medquant as mq
from medquant.eval import proxy_bops


def _model(kdim=None, vdim=None) -> nn.ModuleDict:
    torch.manual_seed(0)
    return nn.ModuleDict({
        "attn": nn.MultiheadAttention(16, 2, kdim=kdim, vdim=vdim),
        "q": mq.quantize_(nn.Sequential(nn.Linear(64, 32, bias=False)), mq.QuantConfig(4, group_size=32)),
    })


def test_fused_in_proj_weight_counts_as_a_float_weight():
    model = _model()
    rep = mq.model_size(model)
    in_proj = 3 * 16 * 16
    params = in_proj + 16 * 16 + 64 * 32  # in-projection, out_proj (a Linear), the 4-bit layer
    assert rep.linear_params == params
    assert rep.effective_bits == pytest.approx((in_proj * 32 + 16 * 16 * 32 + 64 * 32 * 4) / params, abs=1e-12)
    assert rep.effective_bits == pytest.approx(proxy_bops(model, act_bits=1) / params, rel=1e-12)
    rows = {r["name"]: r for r in mq.quant.layer_table(model)}
    row = rows["attn.in_proj_weight"]
    assert row["shape"] == [48, 16] and row["bits"] == "32" and row["effective_bits"] == 32.0
    assert row["bytes"] == in_proj * 4
    assert row["type"] == "MultiheadAttention"
    assert list(rows).index("attn.in_proj_weight") < list(rows).index("attn.out_proj")


def test_separate_q_k_v_weights_count_with_their_own_shapes_and_dtype():
    model = _model(kdim=8, vdim=12).half()
    rep = mq.model_size(model)
    qkv = 16 * 16 + 16 * 8 + 16 * 12
    assert rep.linear_params == qkv + 16 * 16 + 64 * 32
    assert rep.linear_weight_bytes >= (qkv + 16 * 16) * 2
    assert rep.effective_bits == pytest.approx(proxy_bops(model, act_bits=1) / rep.linear_params, rel=1e-12)
    rows = {r["name"]: r for r in mq.quant.layer_table(model)}
    assert {k: rows[f"attn.{k}"]["shape"] for k in ("q_proj_weight", "k_proj_weight", "v_proj_weight")} == {
        "q_proj_weight": [16, 16], "k_proj_weight": [16, 8], "v_proj_weight": [16, 12]}
    assert rows["attn.k_proj_weight"]["bits"] == "16" and rows["attn.k_proj_weight"]["bytes"] == 16 * 8 * 2
