"""FairQuant on real architectures: mixed-precision export, save/reload, stored bytes, FQ-QAT, zoo models."""
import pytest
import torch
import torch.nn.functional as F

import medquant
from medquant import QuantConv2d, QuantLinear, quantize_
from medquant.fairquant import (
    FairQuantAllocator,
    attach_fake_quant,
    detach_fake_quant,
    fairness_penalty,
    fq_qat,
)
from medquant.kernels.layout import container_bits
from medquant.quant.api import quantized_modules
from medquant.testing.zoo import ZOO_BY_NAME, tiny_cnn
from tests.fairquant.fq_helpers import grouped_batches, tiny_mlp


def _cnn_batches(n=3, batch=8, seed=0):
    return grouped_batches(n_batches=n, batch=batch, n_classes=4, seed=seed, image=(3, 16, 16))


def _hand_bytes(m):
    """Hand count for symmetric per-channel rows with float16 scales: per bit-width b, rows_b words of
    ceil(k * container(b) / 32) int32 + one fp16 scale per row; an int8 bit map when widths mix; the bias."""
    rb = m.row_bits().tolist()
    total = 0
    for b in set(rb):
        rows = rb.count(b)
        total += rows * (-(-m.k * container_bits(b) // 32)) * 4 + rows * 2
    if len(set(rb)) > 1:
        total += len(rb)
    if m.bias is not None:
        total += m.bias.numel() * 4
    return total


def test_cnn_mixed_precision_save_reload_bytes(tmp_path):
    model = tiny_cnn()
    alloc = FairQuantAllocator(bits=(2, 4, 8), proportions=(0.3, 0.4, 0.3), progress=False).fit(model,
                                                                                               _cnn_batches())
    bit_map = alloc.bit_map()
    x = _cnn_batches()[0][0]
    alloc.apply(model)
    q = quantized_modules(model)
    assert set(q) == set(bit_map)
    for name, m in q.items():
        assert tuple(m.row_bits().tolist()) == bit_map[name]
        assert m.config.symmetric is True and m.config.scope == "channel"
        assert m.stored_bytes() == _hand_bytes(m)
    # stored bytes follow the per-channel bits: lowering bits of the most-8-bit layer shrinks it accordingly
    mixed = [n for n, m in q.items() if m.mixed]
    assert mixed
    rep = medquant.model_size(model)
    assert rep.effective_bits == pytest.approx(alloc.average_bits_)
    y = model(x)
    medquant.save(model, tmp_path / "fq", extras={"fairquant": alloc.state()})
    back = medquant.load(tmp_path / "fq", model=tiny_cnn(seed=5))
    sd1, sd2 = model.state_dict(), back.state_dict()
    assert sd1.keys() == sd2.keys()
    for k in sd1:
        assert torch.equal(sd1[k], sd2[k]), k
    assert torch.equal(back(x), y)
    st = medquant.load_extras(tmp_path / "fq")["fairquant"]
    again = FairQuantAllocator.from_state(st)
    assert again.bit_map() == bit_map
    assert again.average_bits_ == pytest.approx(alloc.average_bits_)


def test_stored_bytes_change_with_bits():
    """Same layer, the hand count and the module agree as rows move from 8 to 2 bits, and bytes fall."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(40, 6)
    sizes = []
    for n2 in range(0, 7, 2):
        cb = (2,) * n2 + (8,) * (6 - n2)
        m = QuantLinear.from_float(lin, medquant.QuantConfig(8, scope="channel", symmetric=True, channel_bits=cb))
        assert m.stored_bytes() == _hand_bytes(m)
        sizes.append(m.stored_bytes() - (6 if 0 < n2 < 6 else 0))
    assert sizes == sorted(sizes, reverse=True) and len(set(sizes)) == len(sizes)


def test_fake_quant_equals_exported_weights():
    model = tiny_cnn()
    alloc = FairQuantAllocator(progress=False).fit(model, _cnn_batches())
    qmap = alloc.to_quant_map()
    x = _cnn_batches()[1][0]
    attach_fake_quant(model, qmap)
    fq_w = {n: model.get_submodule(n).weight.detach().clone() for n in qmap}
    y_fake = model(x).detach()
    # STE: the float weights get a gradient through the fake-quantized ones
    model(x).sum().backward()
    for n in qmap:
        assert model.get_submodule(n).parametrizations.weight.original.grad.abs().sum() > 0
    detach_fake_quant(model)
    model.zero_grad()
    quantize_(model, qmap)
    for n, w in fq_w.items():
        m = model.get_submodule(n)
        assert isinstance(m, (QuantLinear, QuantConv2d))
        assert torch.equal(m.weight, w)
    torch.testing.assert_close(model(x), y_fake, rtol=1e-5, atol=1e-5)


def test_fq_qat_trains_and_exports():
    torch.manual_seed(0)
    model = tiny_mlp()
    data = grouped_batches(n_batches=6, batch=24, seed=3)
    # learnable labels: a fixed linear teacher
    teacher = torch.nn.Linear(6, 3)
    data = [(x, teacher(x).argmax(1), g) for x, _, g in data]
    alloc = FairQuantAllocator(bits=(4, 8), proportions=(0.5, 0.5), progress=False).fit(model, data)

    def mean_loss(m):
        with torch.no_grad():
            return sum(float(F.cross_entropy(m(x), y)) for x, y, _ in data) / len(data)

    res = fq_qat(model, alloc.to_quant_map(), data, epochs=15, lr=3e-3, lambda_fair=0.5, progress=False)
    h = res.history
    assert len(h) == 15 * 6
    for r in h:
        assert r["loss"] == pytest.approx(r["task"] + 0.5 * r["fair"], rel=1e-5)
    assert sum(r["task"] for r in h[-6:]) < 0.8 * sum(r["task"] for r in h[:6])
    q = quantized_modules(res.model)
    assert set(q) == {"fc1", "fc2"}
    assert {n: tuple(m.row_bits().tolist()) for n, m in q.items()} == alloc.bit_map()
    assert mean_loss(res.model) < 0.8 * mean_loss(tiny_mlp())
    assert not any(hasattr(m, "parametrizations") for m in res.model.modules())


def test_fairness_penalty_hand_computed():
    losses = torch.tensor([1.0, 3.0, 2.0, 6.0, 0.5])
    groups = torch.tensor([0, 0, 1, 1, 2])
    # L_0 = 2, L_1 = 4, L_2 = 0.5 -> 4 - 0.5
    assert float(fairness_penalty(losses, groups)) == pytest.approx(3.5)
    assert float(fairness_penalty(losses, torch.zeros(5, dtype=torch.long))) == 0.0


# ------------------------------------------------------------------------------------------ zoo
def test_zoo_vit_allocation_budget():
    entry = ZOO_BY_NAME["vit"]
    model = entry.build()
    inputs = entry.inputs(model)
    g = torch.Generator().manual_seed(0)
    batches = [dict(inputs, labels=torch.randint(0, 4, (2,), generator=g), groups=torch.tensor([0, 1]))
               for _ in range(2)]
    alloc = FairQuantAllocator(target_bits=4.0, progress=False).fit(model, batches)
    assert abs(alloc.average_bits_ - 4.0) <= 0.1
    ref = entry.output(model, inputs)
    alloc.apply(model)
    assert medquant.model_size(model).effective_bits == pytest.approx(alloc.average_bits_)
    out = entry.output(model, inputs)
    assert out.shape == ref.shape and torch.isfinite(out).all()
    assert "vit.embeddings.patch_embeddings.projection" in quantized_modules(model)  # the patch conv too


@pytest.mark.parametrize("name", ["llava"])
def test_zoo_vlm_allocation(name):
    entry = ZOO_BY_NAME[name]
    model = entry.build()
    inputs = entry.inputs(model)
    g = torch.Generator().manual_seed(0)

    def loss_fn(m, batch):  # user-supplied LM loss: per-sample mean CE against fixed target tokens
        logits = entry.output(m, batch["inputs"])
        tgt = batch["targets"]
        return F.cross_entropy(logits.flatten(0, 1), tgt.flatten(), reduction="none").view(tgt.shape).mean(1)

    ref = entry.output(model, inputs)
    batches = [{"inputs": inputs, "targets": torch.randint(0, ref.shape[-1], ref.shape[:2], generator=g),
                "groups": torch.tensor([0, 1])} for _ in range(2)]
    alloc = FairQuantAllocator(progress=False, skip=["@head"]).fit(model, batches, loss_fn=loss_fn)
    roles = medquant.models.model_roles(model)
    names = set(alloc.bit_map())
    assert any(n.startswith(tuple(roles["vision"])) for n in names)
    assert any(n.startswith(tuple(roles["language"])) for n in names)
    alloc.apply(model)
    out = entry.output(model, inputs)
    assert out.shape == ref.shape and torch.isfinite(out).all()
    assert medquant.model_size(model).effective_bits < 32


def test_fake_quant_rounds_16_bit_rows_to_the_exported_float16():
    """A mixed layer keeps its 16-bit rows as float16 after export: the fake-quantized training weight is that
    float16 value (straight-through gradient); 32-bit rows stay float32."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 4))
    w0 = model[0].weight.detach().clone()
    qmap = {"0": medquant.QuantConfig(4, scope="channel", channel_bits=(2, 16, 32, 8))}
    attach_fake_quant(model, qmap)
    w_train = model[0].weight.detach().clone()
    assert torch.equal(w_train[1], w0[1].half().float())  # plain torch float16 rounding
    assert not torch.equal(w_train[1], w0[1])
    assert torch.equal(w_train[2], w0[2])
    x = torch.randn(3, 5)
    upstream = torch.randn(3, 4)
    (model(x) * upstream).sum().backward()
    # d(x @ W^T)/dW = upstream^T @ x for every row (straight-through for every bit-width)
    torch.testing.assert_close(model[0].parametrizations.weight.original.grad, upstream.T @ x)
    detach_fake_quant(model)
    quantize_(model, qmap)
    assert torch.equal(model[0].dequantized_weight(), w_train)


def test_fq_qat_export_false_keeps_the_fake_quant_parametrizations():
    from torch.nn.utils import parametrize

    data = grouped_batches(n_batches=2, batch=8, seed=1)
    qmap = {"fc1": 2, "fc2": 3}
    res = fq_qat(tiny_mlp(), qmap, data, export=False, lr=1e-2, progress=False)
    assert all(parametrize.is_parametrized(res.model.get_submodule(n), "weight") for n in qmap)
    # the returned model computes what the exported model computes (same trained weights, exported separately)
    exported = tiny_mlp()
    state = {k.replace("parametrizations.weight.original", "weight"): v for k, v in res.model.state_dict().items()}
    exported.load_state_dict(state)
    assert not torch.equal(exported.fc1.weight, tiny_mlp().fc1.weight)  # trained
    quantize_(exported, qmap)
    x = data[0][0]
    with torch.no_grad():
        torch.testing.assert_close(res.model(x), exported(x), rtol=1e-5, atol=1e-6)
    # export=True removes them; an error while training leaves the model as it was given
    assert not any(hasattr(m, "parametrizations") for m in fq_qat(tiny_mlp(), qmap, data, progress=False)
                   .model.modules())
    model = tiny_mlp()

    def bad_loss(m, batch):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        fq_qat(model, qmap, data, loss_fn=bad_loss, progress=False)
    assert not any(hasattr(m, "parametrizations") for m in model.modules())
