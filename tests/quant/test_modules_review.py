"""Review of ``medquant.quant.modules`` against independent references.

The reference weight is computed here in float64 from the stored codes (``w = (u - z) * s``, ``unpack`` of the
packed words, the scales / zero points of each element's group), and the layers are compared with plain
``F.linear`` / ``F.conv2d`` / ``F.embedding`` on it.
"""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from medquant.kernels.layout import symmetric_params, unpack
from medquant.quant.config import QuantConfig
from medquant.quant.modules import QuantConv2d, QuantEmbedding, QuantLinear


def ref_weight(q) -> torch.Tensor:
    """The layer's ``(out_rows, k)`` weight in float64, by hand from its stored tensors."""
    c = q.config
    rb = c.row_bits(q.out_rows)
    w = torch.zeros(q.out_rows, q.k, dtype=torch.float64)
    for b in q.bit_groups:
        rows = torch.nonzero(rb == b).flatten()
        if 1 <= b <= 8:
            u = unpack(getattr(q, f"qweight_{b}"), b, dense=q.dense).double()
            s = getattr(q, f"scales_{b}").double()
            if c.scope == "group":
                s = s.repeat_interleave(c.group_size, 1)
            s = s.expand(u.shape)
            if c.is_symmetric(b):
                a, z = symmetric_params(b)
                wb = (u - z) * (a * s)
            else:
                zr = getattr(q, f"zeros_{b}").double()
                if c.scope == "group":
                    zr = zr.repeat_interleave(c.group_size, 1)
                wb = (u - zr.expand(u.shape)) * s
            w[rows] = wb[:, : q.k]
        elif b in (16, 32):
            w[rows] = getattr(q, f"fweight_{b}").double()
    return w


LINEAR_CONFIGS = {
    "group4": QuantConfig(bits=4, scope="group", group_size=8),
    "channel8": QuantConfig(bits=8, scope="channel"),
    "tensor3": QuantConfig(bits=3, scope="tensor"),
    "mixed": QuantConfig(bits=4, scope="channel", channel_bits=(0, 4, 16, 3, 32, 8)),
}


# ---------------------------------------------------------------------------------------------- float64 input
@pytest.mark.parametrize("name", list(LINEAR_CONFIGS))
@pytest.mark.parametrize("how", ["float64_module", "double_after", "float32_layer"])
def test_linear_float64_input_on_a_fresh_layer(name, how):
    """``nn.Linear`` takes float64; so must a quantized one, on its first call (it used to raise TypeError until a
    float32 call had prepared the kernel, and always for mixed layers)."""
    torch.manual_seed(0)
    lin = nn.Linear(24, 6, dtype=torch.float64 if how == "float64_module" else torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q = QuantLinear.from_float(lin, LINEAR_CONFIGS[name])
        if how == "double_after":
            q = q.double()
        x = torch.randn(2, 3, 24, dtype=torch.float64)
        y = q(x)
    ref = F.linear(x, ref_weight(q), lin.bias.detach().double())
    assert y.dtype == torch.float64 and y.shape == (2, 3, 6)
    torch.testing.assert_close(y, ref, rtol=1e-12, atol=1e-12)


def test_linear_float64_input_gradient():
    torch.manual_seed(1)
    lin = nn.Linear(16, 4)
    q = QuantLinear.from_float(lin, QuantConfig(bits=4, scope="channel"))
    x = torch.randn(3, 16, dtype=torch.float64, requires_grad=True)
    gy = torch.randn(3, 4, dtype=torch.float64)
    q(x).backward(gy)
    torch.testing.assert_close(x.grad, gy @ ref_weight(q), rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------------------------------------- state dicts
def test_load_state_dict_refuses_rows_of_other_bit_widths():
    """Same keys and shapes, rows at other bit-widths: loading used to succeed and compute permuted rows."""
    torch.manual_seed(2)
    src = QuantLinear.from_float(nn.Linear(32, 4), QuantConfig(bits=4, scope="channel", channel_bits=(4, 8, 4, 8)))
    dst = QuantLinear(32, 4, True, QuantConfig(bits=4, scope="channel", channel_bits=(8, 4, 8, 4)), layout=2)
    for strict in (True, False):
        with pytest.raises(RuntimeError, match="bit_map"):
            dst.load_state_dict(src.state_dict(), strict=strict)
    # the same recipe loads, and computes the source's weight
    same = QuantLinear(32, 4, True, src.config, layout=2)
    same.load_state_dict(src.state_dict())
    x = torch.randn(3, 32, dtype=torch.float64)
    torch.testing.assert_close(same(x), F.linear(x, ref_weight(src), src.bias.double()), rtol=1e-12, atol=1e-12)


def test_state_dict_round_trip_through_torch_save_weights_only(tmp_path):
    torch.manual_seed(3)
    cfg = LINEAR_CONFIGS["mixed"]
    src = QuantLinear.from_float(nn.Linear(24, 6), cfg)
    torch.save(src.state_dict(), tmp_path / "sd.pt")
    dst = QuantLinear(24, 6, True, cfg, layout=src.layout_version)
    dst.load_state_dict(torch.load(tmp_path / "sd.pt", weights_only=True))
    torch.testing.assert_close(ref_weight(dst), ref_weight(src), rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------- conv geometry
@pytest.mark.parametrize("kw", [
    {"groups": 2}, {"groups": 4, "bias": False}, {"dilation": (1, 2), "padding": (0, 2)}, {"padding": "same"},
    {"stride": (2, 1), "kernel_size": (3, 2), "padding": (1, 0)},
])
def test_conv_matches_f_conv2d_on_the_reference_weight(kw):
    torch.manual_seed(4)
    args = {"in_channels": 4, "out_channels": 8, "kernel_size": 3}
    args.update(kw)
    conv = nn.Conv2d(**args)
    q = QuantConv2d.from_float(conv, QuantConfig(bits=4, scope="group", group_size=8))
    w = ref_weight(q).reshape(conv.weight.shape)
    bias = None if conv.bias is None else conv.bias.detach().double()
    x = torch.randn(2, 4, 9, 7, dtype=torch.float64)
    ref = F.conv2d(x, w, bias, conv.stride, conv.padding, conv.dilation, conv.groups)
    torch.testing.assert_close(q(x), ref, rtol=1e-12, atol=1e-12)
    xf = x.float().to(memory_format=torch.channels_last)
    torch.testing.assert_close(q(xf).double(), ref, rtol=1e-5, atol=1e-5)
    back = q.to_float()
    assert (back.stride, back.padding, back.dilation, back.groups, back.padding_mode) == \
        (conv.stride, conv.padding, conv.dilation, conv.groups, conv.padding_mode)
    torch.testing.assert_close(back.weight.double(), w, rtol=0, atol=0)


def test_conv_extra_repr_shows_dilation_bias_and_group_size():
    conv = nn.Conv2d(4, 8, 3, dilation=(1, 2), bias=False)
    q = QuantConv2d.from_float(conv, QuantConfig(bits=4, scope="group", group_size=8))
    r = repr(q)
    assert "dilation=(1, 2)" in repr(conv) and "dilation=(1, 2)" in r
    assert "bias=False" in r
    assert "scope=group(8)" in r
    plain = QuantConv2d.from_float(nn.Conv2d(4, 8, 3), QuantConfig(bits=4, scope="channel"))
    assert "dilation" not in repr(plain) and "bias" not in repr(plain)  # as nn.Conv2d: defaults left out


# ---------------------------------------------------------------------------------------------- bias training
def test_bias_only_training_gets_the_float_gradient():
    torch.manual_seed(5)
    lin = nn.Linear(64, 32)
    q = QuantLinear.from_float(lin, QuantConfig(bits=4, scope="channel"))
    q.bias.requires_grad_(True)
    with torch.no_grad():
        q(torch.randn(1, 64))  # warm the eager lane
    gy = torch.randn(1, 32)
    q(torch.randn(1, 64)).backward(gy)
    torch.testing.assert_close(q.bias.grad, gy[0])


# ---------------------------------------------------------------------------------------------- embedding
def test_embedding_matches_f_embedding_on_the_reference_table():
    torch.manual_seed(6)
    emb = nn.Embedding(20, 16, padding_idx=3)
    q = QuantEmbedding.from_float(emb, QuantConfig(bits=3, scope="group", group_size=8))
    ids = torch.tensor([[0, 3, 19], [5, 5, 1]])
    ref = F.embedding(ids, ref_weight(q))
    torch.testing.assert_close(q(ids).double(), ref, rtol=0, atol=0)
    torch.testing.assert_close(q.double()(ids.t()), ref.transpose(0, 1), rtol=0, atol=0)
