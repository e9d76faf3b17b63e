"""QuantLinear / QuantConv2d storage: per-row mixed bits and byte accounting against hand counts."""
import copy

import numpy as np
import pytest
import torch
from torch import nn

import medquant as mq
from tests.quant.np_reference import np_dequant_layer


def _stack(n_layers=3, dim=1024, dtype=torch.bfloat16):
    torch.manual_seed(0)
    return nn.Sequential(*[nn.Linear(dim, dim, bias=False) for _ in range(n_layers)]).to(dtype)


def _dir_bytes(path):
    return sum(p.stat().st_size for p in path.iterdir() if p.is_file())


@pytest.mark.parametrize("bits,min_ratio", [(4, 3.5), (3, 4.5), (2, 6.0)])  # 3 bits: dense (format version 2)
def test_group128_stack_is_smaller_than_bf16_in_memory_and_on_disk(tmp_path, bits, min_ratio):
    float_model = _stack()
    bf16_bytes = mq.model_size(float_model).total_bytes
    assert bf16_bytes == 3 * 1024 * 1024 * 2  # hand count: no metadata for a float model
    cfg = mq.QuantConfig(bits, symmetric=False, group_size=128, scale_dtype="float16")  # scales AND zeros
    q = mq.quantize_(copy.deepcopy(float_model), cfg)
    rep = mq.model_size(q)
    # hand count: codes + fp16 scale + fp16 zero per group of 128, per layer
    per_layer = 1024 * 1024 * bits // 8 + 1024 * (1024 // 128) * 2 * 2
    assert rep.tensor_bytes == 3 * per_layer
    assert rep.effective_bits == bits
    assert bf16_bytes / rep.total_bytes >= min_ratio, bf16_bytes / rep.total_bytes
    mq.save(float_model, tmp_path / "bf16")
    mq.save(q, tmp_path / "q")
    disk_ratio = _dir_bytes(tmp_path / "bf16") / _dir_bytes(tmp_path / "q")
    assert disk_ratio >= min_ratio, disk_ratio


def test_mixed_per_channel_bits_store_each_row_at_its_own_width():
    torch.manual_seed(0)
    lin = nn.Linear(200, 12)
    bits = (2, 4, 8, 3, 0, 16, 2, 4, 8, 5, 32, 1)
    cfg = mq.QuantConfig(4, group_size=64, channel_bits=bits)
    q = mq.QuantLinear.from_float(lin, cfg)
    expected_bytes = 12 * 4 + 12  # bias fp32 + int8 bit map
    for b in sorted(set(bits)):
        rows = [i for i, x in enumerate(bits) if x == b]
        if 1 <= b <= 8:
            width = {1: 1, 2: 2, 3: 3, 4: 4, 5: 5, 8: 8}[b]  # 3 and 5 bits dense (format version 2)
            kp = 256  # 200 padded to the group size 64 (and to 32 codes for the dense widths)
            qw = getattr(q, f"qweight_{b}")
            assert qw.shape == (len(rows), kp * width // 32)
            sc = getattr(q, f"scales_{b}")
            assert sc.shape == (len(rows), kp // 64) and sc.dtype == torch.float16
            has_zero = b <= 3
            assert hasattr(q, f"zeros_{b}") == has_zero
            expected_bytes += qw.numel() * 4 + sc.numel() * 2 * (2 if has_zero else 1)
        elif b in (16, 32):
            fw = getattr(q, f"fweight_{b}")
            assert fw.dtype == (torch.float16 if b == 16 else torch.float32) and fw.shape == (len(rows), 200)
            expected_bytes += fw.numel() * fw.element_size()
        else:
            assert not hasattr(q, "qweight_0")
    assert q.stored_bytes() == expected_bytes
    assert q.effective_bits == pytest.approx(sum(bits) / 12)
    # rows come back in the original order, each at its own precision
    w_ref = np_dequant_layer(q)
    x = torch.randn(5, 200)
    assert np.allclose(q(x).detach().numpy(), x.numpy() @ w_ref.T + lin.bias.detach().numpy(), atol=1e-4)
    err = np.abs(w_ref - lin.weight.detach().double().numpy()).max(axis=1)
    assert err[4] == pytest.approx(np.abs(lin.weight[4].detach().numpy()).max())  # pruned row is zero
    assert err[10] == 0 and err[5] < 1e-3  # fp32 row exact, fp16 row near-exact
    assert err[2] < err[1] < err[0]  # 8 < 4 < 2 bits


def test_mixed_bits_conv_and_float_round_trip():
    torch.manual_seed(0)
    conv = nn.Conv2d(16, 8, 3, padding=1)
    q = mq.QuantConv2d.from_float(conv, mq.QuantConfig(4, scope="channel", channel_bits=(8, 8, 4, 4, 2, 2, 8, 4)))
    x = torch.randn(2, 16, 10, 10)
    w = torch.from_numpy(np_dequant_layer(q)).float().reshape(conv.weight.shape)
    ref = torch.nn.functional.conv2d(x, w, conv.bias, padding=1)
    assert torch.allclose(q(x), ref, atol=1e-5)
    back = q.to_float()
    assert isinstance(back, nn.Conv2d) and torch.allclose(back(x), ref, atol=1e-5)


def test_channel_bits_length_must_match_rows():
    with pytest.raises(ValueError, match="channel_bits has 3 entries but the module has 12 output channels"):
        mq.QuantLinear.from_float(nn.Linear(64, 12), mq.QuantConfig(4, channel_bits=(4, 4, 4)))


def test_quant_linear_keeps_activation_dtype_and_grad_to_input():
    lin = nn.Linear(128, 64)
    q = mq.QuantLinear.from_float(lin, mq.QuantConfig(4))
    x = torch.randn(3, 7, 128, dtype=torch.bfloat16, requires_grad=True)
    y = q(x)
    assert y.dtype == torch.bfloat16 and y.shape == (3, 7, 64)
    y.float().sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad.float()).all()
    with pytest.raises(ValueError, match="input has 100 features, layer expects 128"):
        q(torch.randn(2, 100))
    with pytest.raises(AttributeError, match="cannot be assigned"):
        q.weight = nn.Parameter(torch.zeros(64, 128))


def test_pruned_layer_stores_nothing_but_bias():
    q = mq.QuantLinear.from_float(nn.Linear(64, 8), mq.QuantConfig(0))
    assert q.stored_bytes() == 8 * 4
    x = torch.randn(2, 64)
    assert torch.equal(q(x), q.bias.expand(2, 8))


def test_fully_pruned_layer_without_bias_has_a_zero_weight():
    q = mq.QuantLinear.from_float(nn.Linear(64, 8, bias=False), mq.QuantConfig(0))
    assert q.stored_bytes() == 0
    assert torch.equal(q.weight, torch.zeros(8, 64))
    assert torch.equal(q(torch.randn(3, 64)), torch.zeros(3, 8))


def test_large_linear_quantized_in_row_chunks_keeps_the_dense_3bit_layout():
    """quantize_ quantizes a Linear of more than 4096 rows (an LM head) in row chunks: the assembled layer has the
    chunks' dense layout (format version 2) and equals a one-shot from_float bit for bit."""
    torch.manual_seed(0)
    lin = nn.Linear(64, 4100, bias=False)
    cfg = mq.QuantConfig(3, group_size=32)
    ref = mq.QuantLinear.from_float(lin, cfg)
    model = mq.quantize_(nn.Sequential(lin), cfg)
    q = model[0]
    assert q.layout_version == 2 and q.get_buffer("qweight_3").shape == (4100, 64 * 3 // 32)
    for name, buf in ref.named_buffers():
        assert torch.equal(q.get_buffer(name), buf), name


@pytest.mark.parametrize("make", [
    lambda: mq.QuantLinear.from_float(nn.Linear(16, 0), mq.QuantConfig(4)),
    lambda: mq.QuantLinear(0, 8, True, mq.QuantConfig(4)),
    lambda: mq.QuantEmbedding.from_float(nn.Embedding(0, 16), mq.QuantConfig(4)),
    lambda: mq.QuantConv2d(4, 4, 3, groups=8, config=mq.QuantConfig(4)),  # 4 // 8 = 0 inputs per group
])
def test_empty_layers_are_refused_when_built(make):
    """A layer with no output row (or no input) used to be built with no row group at all and then failed with
    a bare IndexError in repr, forward or lookup; it is refused when built."""
    with pytest.raises(ValueError, match=r"needs a non-empty \(\d+ x \d+\) weight"):
        make()


def test_zero_dim_input_is_refused_with_the_expected_shape():
    q = mq.QuantLinear.from_float(nn.Linear(8, 4), mq.QuantConfig(4, group_size=8))
    with pytest.raises(ValueError, match=r"input has a 0-d tensor \(no feature dimension\), layer expects 8"):
        q(torch.tensor(1.0))
    x = torch.randn(8)  # 1-D still works, as in nn.Linear
    torch.testing.assert_close(q(x), q.dequantized_weight() @ x + q.bias, rtol=1e-2, atol=1e-2)


def test_model_size_counts_version1_layers_at_the_bytes_that_save_writes(tmp_path):
    """Layers holding 3/5/6/7-bit rows in 4/8-bit containers (layout 1: a version-1 file loaded, or a layer built
    with ``layout=1``) are re-packed densely by ``medquant.save``: the size report counts the bytes the file holds
    (read back with safetensors' own reader), not the containers."""
    from safetensors import safe_open

    torch.manual_seed(0)
    emb = mq.QuantEmbedding.from_float(nn.Embedding(40, 100), mq.QuantConfig(5, group_size=48), layout=1)
    head = mq.QuantLinear(100, 40, False, mq.QuantConfig(5, group_size=48), layout=1)
    mq.quant.modules.tie_quantized_head(head, emb)  # one table, stored once
    net = nn.Sequential()
    net.add_module("a", mq.QuantLinear.from_float(nn.Linear(100, 8), mq.QuantConfig(3, group_size=48), layout=1))
    net.add_module("b", mq.QuantLinear.from_float(
        nn.Linear(100, 8), mq.QuantConfig(6, scope="channel", symmetric=False), layout=1))
    net.add_module("c", mq.QuantLinear.from_float(
        nn.Linear(100, 8), mq.QuantConfig(4, group_size=48, channel_bits=(7,) * 4 + (2,) * 4), layout=1))
    net.add_module("d", mq.QuantConv2d.from_float(nn.Conv2d(4, 6, 3), mq.QuantConfig(3, group_size=16), layout=1))
    net.add_module("emb", emb)
    net.add_module("head", head)
    assert all(not m.stores_dense for m in net)  # containers now
    rep, table = mq.model_size(net), mq.layer_table(net)
    path = mq.save(net, tmp_path / "ckpt")  # re-packs densely (format version 2)
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        names = f.keys()
        stored = {k: f.get_tensor(k) for k in names}
    file_bytes = {k: t.numel() * t.element_size() for k, t in stored.items()}
    assert rep.tensor_bytes == sum(file_bytes.values())
    per_layer = {r["name"]: r["bytes"] for r in table}
    for name in ("a", "b", "c", "d", "emb"):
        assert per_layer[name] == sum(v for k, v in file_bytes.items() if k.startswith(name + ".")), name
    assert per_layer["head"] == per_layer["emb"]  # the shared bytes on both rows
    biases = sum(v for k, v in file_bytes.items() if k.endswith(".bias"))
    linear = sum(v for k, v in file_bytes.items() if not k.startswith("emb."))
    assert rep.linear_weight_bytes == linear - biases + per_layer["head"]
