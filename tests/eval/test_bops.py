"""MACs / BOPs with real token counts and output positions, hand-counted; average bits and stored bytes."""
import pytest
import torch
from torch import nn

import medquant
from medquant import QuantConfig, quantize_
from medquant.eval import average_bits, bops, count_macs, proxy_bops, stored_bytes
from medquant.testing.zoo import ZOO_BY_NAME

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny tensors: one intra-op thread (tests/conftest.py)


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=4)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        h = self.dw(self.conv(x))  # (B, 8, 8, 8)
        tokens = h.flatten(2).transpose(1, 2)  # (B, 64 tokens, 8)
        return self.fc(tokens)


def test_macs_hand_counted_float_and_mixed():
    torch.manual_seed(0)
    net = _Net()
    x = torch.randn(1, 3, 16, 16)
    rows = {r.name: r for r in count_macs(net, x)}
    assert rows["conv"].macs == 64 * 8 * 3 * 3 * 3  # 8x8 output positions
    assert rows["dw"].macs == 64 * 8 * (8 // 4) * 3 * 3
    assert rows["fc"].macs == 64 * 8 * 4  # 64 tokens
    total_macs = 64 * 8 * 27 + 64 * 8 * 18 + 64 * 32
    assert bops(net, x) == total_macs * 32 * 32
    assert bops(net, torch.randn(2, 3, 16, 16), act_bits=8) == 2 * total_macs * 32 * 8
    quantize_(net, {"conv": QuantConfig(8, scope="channel", symmetric=True, channel_bits=(2,) * 4 + (8,) * 4),
                    "fc": QuantConfig(4, scope="channel")})
    want = 64 * 8 * 27 * 5.0 * 32 + 64 * 8 * 18 * 32 * 32 + 64 * 32 * 4 * 32
    assert bops(net, x) == pytest.approx(want)
    # the authors' proxy counts one MAC per weight, ignoring the 64 positions / tokens
    assert proxy_bops(net) == pytest.approx(8 * 27 * 5.0 * 32 + 8 * 18 * 32 * 32 + 32 * 4 * 32)
    assert average_bits(net) == pytest.approx((8 * 27 * 5 + 8 * 18 * 32 + 32 * 4) / (8 * 27 + 8 * 18 + 32))
    assert stored_bytes(net) == medquant.model_size(net).total_bytes


def test_vit_counts_patch_tokens():
    entry = ZOO_BY_NAME["vit"]
    model = entry.build()
    x = entry.inputs(model)["pixel_values"][:1]  # one 32x32 image, patch 8 -> 16 patches + CLS
    rows = {r.name: r for r in count_macs(model, pixel_values=x)}
    cfg = model.config
    assert rows["vit.embeddings.patch_embeddings.projection"].macs == 16 * cfg.hidden_size * 3 * 8 * 8
    q = "vit.layers.0.attention.q_proj"
    assert rows[q].macs == 17 * cfg.hidden_size * cfg.hidden_size
    assert rows["classifier"].macs == cfg.hidden_size * 4  # the CLS token only
    # versus the proxy: the query projection is 17 times larger with real token counts
    assert rows[q].macs == 17 * rows[q].params


class _AttnNet(nn.Module):
    """Self-attention (fused in_proj_weight) followed by a Linear; cross-attention with kdim / vdim != embed_dim."""

    def __init__(self, d=16, kdim=None, vdim=None, batch_first=True):
        super().__init__()
        self.attn = nn.MultiheadAttention(d, 2, kdim=kdim, vdim=vdim, batch_first=batch_first)
        self.fc = nn.Linear(d, d)

    def forward(self, q, k, v):
        return self.fc(self.attn(q, k, v, need_weights=False)[0])


def test_multihead_attention_projections_are_counted_by_hand():
    d, t = 16, 5
    net = _AttnNet(d).eval()
    x = torch.randn(1, t, d)
    rows = {r.name: r for r in count_macs(net, x, x, x)}
    # the functional path never calls out_proj as a module and uses the raw in_proj_weight (3d x d)
    assert rows["attn.in_proj"].macs == t * 3 * d * d and rows["attn.in_proj"].params == 3 * d * d
    assert rows["attn.out_proj"].macs == t * d * d and rows["attn.out_proj"].params == d * d
    assert rows["fc"].macs == t * d * d
    assert sum(r.macs for r in rows.values()) == t * 5 * d * d
    assert bops(net, x, x, x) == t * 5 * d * d * 32 * 32
    assert bops(net, x, x, x, act_bits=8) == t * 5 * d * d * 32 * 8
    # the proxy: one MAC per weight, in-projection included
    assert proxy_bops(net) == (3 * d * d + d * d + d * d) * 32 * 32
    # sequence-first layout, batch 2: twice the tokens
    seq_first = _AttnNet(d, batch_first=False).eval()
    x2 = torch.randn(t, 2, d)
    assert sum(r.macs for r in count_macs(seq_first, x2, x2, x2)) == 2 * t * 5 * d * d


def test_multihead_attention_with_other_key_and_value_widths():
    d, kd, vd, tq, tk = 16, 6, 10, 3, 7
    net = _AttnNet(d, kdim=kd, vdim=vd).eval()
    q, k, v = torch.randn(1, tq, d), torch.randn(1, tk, kd), torch.randn(1, tk, vd)
    rows = {r.name: r for r in count_macs(net, q, k, v)}
    assert rows["attn.in_proj"].macs == tq * d * d + tk * kd * d + tk * vd * d
    assert rows["attn.in_proj"].params == d * d + d * kd + d * vd
    assert rows["attn.out_proj"].macs == tq * d * d
    assert bops(net, q, k, v) == (tq * d * d + tk * kd * d + tk * vd * d + 2 * tq * d * d) * 32 * 32
    assert proxy_bops(net, act_bits=1) == (d * d + d * kd + d * vd + 2 * d * d) * 32


def test_transformer_encoder_layer_counts_attention_and_feed_forward():
    d, t, ff = 16, 5, 32
    enc = nn.TransformerEncoderLayer(d, 2, dim_feedforward=ff, batch_first=True).eval()
    x = torch.randn(1, t, d)
    assert sum(r.macs for r in count_macs(enc, x)) == t * 3 * d * d + t * d * d + t * d * ff + t * ff * d
    assert proxy_bops(enc, act_bits=1) == (4 * d * d + 2 * d * ff) * 32
