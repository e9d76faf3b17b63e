"""BOPs / MACs of the weight layers other than Linear / Conv2d, hand-counted from plain torch shapes: Conv1d,
Conv3d, transposed convolutions and transformers' ``Conv1D`` (GPT-2). They stay in floating point under
``quantize_``, but they run in the forward pass and used to be left out of ``count_macs`` / ``bops`` silently (a
GPT-2 reported only its ``lm_head``)."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from medquant.eval import bops, count_macs, proxy_bops

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny tensors: one intra-op thread (tests/conftest.py)


class _Convs(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv1d(4, 6, 3, stride=2, padding=1, dilation=2, groups=2)
        self.c3 = nn.Conv3d(2, 4, (2, 3, 1), stride=(1, 2, 1), padding=(0, 1, 0))
        self.t2 = nn.ConvTranspose2d(4, 6, (3, 2), stride=2, padding=1, output_padding=1, groups=2)
        self.fc = nn.Linear(5, 3)

    def forward(self, a, b, c):
        return self.c1(a).sum() + self.c3(b).sum() + self.t2(c).sum() + self.fc(c[..., :5]).sum()


def test_conv1d_conv3d_and_transposed_conv_are_counted_by_hand():
    torch.manual_seed(0)
    net = _Convs()
    a, b, c = torch.randn(2, 4, 11), torch.randn(1, 2, 5, 6, 3), torch.randn(1, 4, 5, 7)
    with torch.no_grad():
        ya, yb = net.c1(a), net.c3(b)
    # regular convolution: output positions (batch x spatial) * out_ch * (in_ch / groups) * prod(kernel)
    want_c1 = ya.shape[0] * ya.shape[2] * 6 * (4 // 2) * 3
    want_c3 = yb.shape[0] * math.prod(yb.shape[2:]) * 4 * 2 * (2 * 3 * 1)
    # transposed: every input position (batch x spatial) of every input channel meets (out_ch / groups) * prod(kernel)
    want_t2 = c.shape[0] * math.prod(c.shape[2:]) * 4 * (6 // 2) * (3 * 2)
    want_fc = 4 * 5 * 5 * 3  # 4 channels x 5 rows of 5 features -> 3
    rows = {r.name: r for r in count_macs(net, a, b, c)}
    assert {n: r.macs for n, r in rows.items()} == {"c1": want_c1, "c3": want_c3, "t2": want_t2, "fc": want_fc}
    assert {n: r.params for n, r in rows.items()} == {n: getattr(net, n).weight.numel() for n in rows}
    assert rows["t2"].kind == "ConvTranspose2d" and rows["c1"].weight_bits == 32.0
    assert bops(net, a, b, c, act_bits=8) == (want_c1 + want_c3 + want_t2 + want_fc) * 32 * 8
    assert proxy_bops(net, act_bits=8) == sum(getattr(net, n).weight.numel() for n in rows) * 32 * 8


def test_transposed_conv_macs_equal_the_direct_convolution_it_transposes():
    # a transposed convolution costs as many MACs as the convolution whose gradient it is (same weights, positions
    # swapped): conv (6 -> 4) on t2's output has the input positions of t2 as its output positions
    t2 = nn.ConvTranspose2d(4, 6, 3, stride=2, padding=1, groups=2)
    conv = nn.Conv2d(6, 4, 3, stride=2, padding=1, groups=2)
    x = torch.randn(1, 4, 5, 7)
    with torch.no_grad():
        y = t2(x)
    assert conv(y).shape == x.shape
    assert count_macs(nn.Sequential(t2), x)[0].macs == count_macs(nn.Sequential(conv), y)[0].macs


def test_tiny_gpt2_with_transformers_conv1d_counts_every_projection_by_hand():
    transformers = pytest.importorskip("transformers")
    d, t, v, layers = 16, 5, 50, 2
    cfg = transformers.GPT2Config(n_layer=layers, n_embd=d, n_head=2, vocab_size=v, n_positions=32,
                                  bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    ids = torch.randint(0, v, (1, t))
    rows = {r.name: r for r in count_macs(model, ids)}
    # per block: c_attn (d -> 3d), attn.c_proj (d -> d), mlp.c_fc (d -> 4d), mlp.c_proj (4d -> d); then lm_head
    per_block = t * (d * 3 * d + d * d + d * 4 * d + 4 * d * d)
    assert rows["transformer.h.0.attn.c_attn"].macs == t * d * 3 * d
    assert rows["transformer.h.1.mlp.c_proj"].params == 4 * d * d
    assert sum(r.macs for r in rows.values()) == layers * per_block + t * d * v
    assert bops(model, ids) == (layers * per_block + t * d * v) * 32 * 32
    # the proxy: one MAC per weight (the lm_head shares the embedding's d x v weights)
    assert proxy_bops(model, act_bits=1) == (layers * 12 * d * d + d * v) * 32


def test_qlora_nf4_layers_count_4_bits_per_weight_not_their_uint8_storage():
    """medquant's QLoRA base layers are bitsandbytes ``Linear4bit`` (an ``nn.Linear``) whose weight is two 4-bit
    codes per uint8: its dtype width (8) was taken as the bits per weight, doubling the layer's BOPs."""
    pytest.importorskip("bitsandbytes")
    from medquant.qlora.nf4 import nf4_quantize_

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 64), _Cast(nn.Linear(64, 8).half()))
    nf4_quantize_(net, ["0"])
    assert type(net[0]).__name__ == "Linear4bit"
    x = torch.randn(3, 64)
    rows = {r.name: r for r in count_macs(net, x)}
    assert {n: r.weight_bits for n, r in rows.items()} == {"0": 4.0, "2": 32.0, "3.lin": 16.0}
    assert {n: r.params for n, r in rows.items()} == {"0": 64 * 32, "2": 32 * 64, "3.lin": 64 * 8}
    macs = {"0": 3 * 64 * 32, "2": 3 * 32 * 64, "3.lin": 3 * 64 * 8}
    assert {n: r.macs for n, r in rows.items()} == macs
    assert bops(net, x, act_bits=8) == (macs["0"] * 4 + macs["2"] * 32 + macs["3.lin"] * 16) * 8
    assert proxy_bops(net, act_bits=1) == 64 * 32 * 4 + 32 * 64 * 32 + 64 * 8 * 16


class _Cast(nn.Module):
    """Runs an fp16 Linear on a float32 input."""

    def __init__(self, lin):
        super().__init__()
        self.lin = lin

    def forward(self, x):
        return self.lin(x.half()).float()
