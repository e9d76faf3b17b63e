"""BAQWrapper: the task loss reaches the bit logits (theta.grad != 0 with lambda_bit = 0, its sign agreeing with
the finite difference L(b+1) - L(b)), lambda_bit lowers bits, export is exact."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import medquant
from medquant.fairquant import FairQuantAllocator
from medquant.fairquant.baq import BAQWeight, BAQWrapper, finite_difference_bits
from medquant.quant.api import ConfigMap, quantized_modules
from medquant.testing.zoo import tiny_cnn
from tests.fairquant.fq_helpers import grouped_batches, tiny_mlp


def _regression(seed):
    torch.manual_seed(seed)
    lin = nn.Linear(32, 8, bias=False)
    x = torch.randn(256, 32)
    with torch.no_grad():
        y = lin(x) + 0.01 * torch.randn(256, 8)
    b0 = tuple(int(v) for v in torch.randint(3, 7, (8,)))
    return lin, x, y, b0


def test_task_gradient_reaches_every_logit_and_agrees_with_finite_difference():
    agree = total = 0
    for seed in range(8):
        lin, x, y, b0 = _regression(seed)
        w = BAQWrapper(lin, init_bits={"": b0}, lambda_bit=0.0, lambda_fair=0.0)
        p = w.params[""]
        assert tuple(torch.round(p.continuous_bits()).long().tolist()) == b0  # warm start reproduces b0

        def loss_at(lin=lin, x=x, y=y):
            return F.mse_loss(lin(x), y)

        loss_at().backward()
        g = p.theta.grad.clone()
        assert (g != 0).all(), f"seed {seed}: some logits got no gradient from the task loss"
        for s in range(8):
            fd = finite_difference_bits(p, loss_at, s)
            agree += int((g[s] > 0) == (fd > 0))
            total += 1
    assert agree / total >= 0.8, f"gradient sign agrees with L(b+1) - L(b) in only {agree}/{total} scopes"


def test_authors_detached_construction_gives_no_logit_gradient():
    """Negative control: with (wq - w).detach() + w the logits get no gradient from the task loss."""
    lin, x, y, _ = _regression(0)
    p = BAQWeight(torch.full((8,), 0.5), 2, 8, True)
    w = lin.weight
    wq = p(w)
    w_hat = (wq - w).detach() + w
    loss = F.mse_loss(x @ w_hat.t(), y)
    grads = torch.autograd.grad(loss, p.theta, allow_unused=True)[0]
    assert grads is None or torch.count_nonzero(grads) == 0
    # ours, same weights and loss: non-zero
    g2 = torch.autograd.grad(F.mse_loss(x @ p(w).t(), y), p.theta)[0]
    assert torch.count_nonzero(g2) == 8


def _train(lambda_bit, seed=0, steps=24):
    torch.manual_seed(seed)
    model = tiny_mlp(seed)
    data = grouped_batches(n_batches=4, batch=32, seed=seed)
    teacher = nn.Linear(6, 3)
    data = [(x, teacher(x).argmax(1), g) for x, _, g in data]
    w = BAQWrapper(model, init_bits={"fc1": (5,) * 8, "fc2": (5,) * 3}, lambda_bit=lambda_bit)
    hist = w.fit(data, epochs=steps // 4, logit_lr=3e-2, weight_lr=1e-3, progress=False)
    return w, hist, data


def test_larger_lambda_bit_gives_lower_average_bits():
    cont, disc = [], []
    # (0.3 and 3.0 both end at the 2-bit floor with the exact bit gradient: 0.003 sits between)
    for lb in (0.0, 0.003, 3.0):
        w, hist, _ = _train(lb)
        cont.append(float(w.bit_rate().detach()))
        disc.append(w.average_bits())
        for h in hist:
            assert h["loss"] >= h["task"] - 1e-6
    assert cont[0] > cont[1] > cont[2], cont
    assert disc[0] >= disc[1] >= disc[2] and disc[0] > disc[2], disc


def test_export_bits_equal_discretised_logits_and_weights(tmp_path):
    model = tiny_cnn()
    batches = grouped_batches(n_batches=3, batch=8, n_classes=4, image=(3, 16, 16))
    alloc = FairQuantAllocator(target_bits=4.0, progress=False).fit(model, batches)
    w = BAQWrapper(model, init_bits=alloc, lambda_bit=1.0, target_bits=4.0)
    assert w.bit_map() == alloc.bit_map()  # warm start reproduces the static allocation
    w.fit(batches, epochs=2, logit_lr=5e-2, weight_lr=1e-3, progress=False)
    raw = {n: tuple(int(b) for b in torch.round(p.continuous_bits()).tolist()) for n, p in w.params.items()}
    bits = w.bits(project=False)
    assert bits == raw
    x = batches[0][0]
    model.eval()
    with torch.no_grad():
        w_baq = {n: model.get_submodule(n).weight.clone() for n in w.params}
        y_baq = model(x)
    w.export(project=False)
    assert isinstance(w.params_exported, ConfigMap) and set(w.params_exported) == set(raw)
    q = quantized_modules(model)
    assert {n: tuple(m.row_bits().tolist()) for n, m in q.items()} == raw
    for n, m in q.items():
        assert torch.equal(m.weight, w_baq[n]), n  # the exported layer computes exactly the BAQ weight
    torch.testing.assert_close(model(x), y_baq, rtol=1e-5, atol=1e-5)
    medquant.save(model, tmp_path / "baq")
    back = medquant.load(tmp_path / "baq", model=tiny_cnn(seed=3))
    assert torch.equal(back(x), model(x))


def test_budget_projection_and_errors():
    model = tiny_mlp()
    w = BAQWrapper(model, lambda_bit=0.0, target_bits=3.0)  # theta = 6 -> 8 bits everywhere
    assert w.average_bits(project=False) == 8.0
    assert w.average_bits() <= 3.1
    with pytest.raises(ValueError, match="impossible"):
        BAQWrapper(tiny_mlp(), target_bits=9)
    with pytest.raises(ValueError, match="bit_range"):
        BAQWrapper(tiny_mlp(), bit_range=(4, 2))
    with pytest.raises(ValueError, match="b_min must be >= 2"):
        BAQWrapper(tiny_mlp(), bit_range=(1, 8))
    with pytest.raises(ValueError, match="not quantizable"):
        BAQWrapper(tiny_mlp(), init_bits={"nope": (4,)})
    with pytest.raises(ValueError, match="no quantizable layers"):
        BAQWrapper(nn.Sequential(nn.ReLU()))


def test_init_bits_must_be_integers_and_continuous_bits_are_detached():
    """init_bits of 4.5 started silently at 4 (round half to even); continuous_bits() (documented detached)
    returned tensors still attached to the logits' graph."""
    with pytest.raises(ValueError, match=r"non-integer bits \[4.5\]"):
        BAQWrapper(tiny_mlp(), init_bits={"fc2": (4.5, 4, 4)})
    with pytest.raises(ValueError, match="non-integer"):
        BAQWrapper(tiny_mlp(), scope="tensor", init_bits={"fc2": (3.25,)})
    w = BAQWrapper(tiny_mlp(), init_bits={"fc2": (3, 4, 8)})
    cont = w.continuous_bits()
    assert not any(v.requires_grad for v in cont.values())
    theta = w.params["fc2"].theta.detach()
    torch.testing.assert_close(cont["fc2"], 2 + 6 * torch.tanh(theta.abs()), rtol=0, atol=1e-6)  # by the formula
    assert [round(float(b)) for b in cont["fc2"]] == [3, 4, 8]


def test_second_export_and_fit_after_export_are_refused_and_bit_map_still_reads():
    """A second export() raised torch's "does not have a parametrization on weight"; bit_map() after export an
    AttributeError."""
    model = tiny_mlp()
    w = BAQWrapper(model, scope="tensor", lambda_bit=0.0)  # theta = 6: 8 bits everywhere
    q = w.export()
    assert q is model
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(RuntimeError, match=r"export\(\): this wrapper was already exported"):
        w.export()
    with pytest.raises(RuntimeError, match=r"fit\(\): this wrapper was already exported"):
        w.fit(grouped_batches(), progress=False)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())  # untouched by the refused calls
    assert w.bit_map() == {"fc1": (8,) * 8, "fc2": (8,) * 3}  # per-tensor bits expanded to the rows


def test_loss_of_an_empty_batch_raises_instead_of_nan():
    w = BAQWrapper(tiny_mlp(), lambda_bit=0.1, lambda_fair=0.5)
    with pytest.raises(ValueError, match=r"empty batch: losses has shape \(0,\), 0 samples"):
        w.loss(torch.zeros(0), torch.zeros(0, dtype=torch.long))
    theta = [t.detach().clone() for t in w.logits()]
    empty = (torch.zeros(0, 6), torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long))
    with pytest.raises(ValueError, match="empty batch"):
        w.fit([empty], progress=False)
    assert all(torch.equal(a, b) for a, b in zip(theta, w.logits()))
    # one sample is fine: task + lambda_fair * 0 (one group) + lambda_bit * rate, by hand
    total, parts = w.loss(torch.tensor([1.5]), torch.tensor([0]))
    assert float(total) == pytest.approx(1.5 + 0.1 * parts["avg_bits_cont"], rel=1e-6)
    assert parts["fair"] == 0.0


def test_one_int_of_init_bits_is_every_scope_of_the_layer():
    """``init_bits={"fc2": 4}`` (one width for the layer) was torch's "'int' object is not iterable"; it starts
    every scope of the layer at that width, as the per-scope sequence of it does."""
    one = BAQWrapper(tiny_mlp(), scope="tensor", init_bits={"fc2": 4})
    seq = BAQWrapper(tiny_mlp(), scope="tensor", init_bits={"fc2": (4,)})
    assert torch.equal(one.params["fc2"].theta, seq.params["fc2"].theta)
    rows = tiny_mlp().fc2.weight.shape[0]
    one = BAQWrapper(tiny_mlp(), init_bits={"fc2": 5})
    assert [round(float(b)) for b in one.continuous_bits()["fc2"]] == [5] * rows
    with pytest.raises(ValueError, match="non-integer"):
        BAQWrapper(tiny_mlp(), init_bits={"fc2": 4.5})
    with pytest.raises(ValueError, match="integer"):
        BAQWrapper(tiny_mlp(), init_bits={"fc2": True})


def test_a_half_precision_cast_keeps_the_bit_logits_in_float32():
    """``model.half()`` after wrapping cast theta to float16, whose spacing near the default theta = 6 (~0.004 per
    ulp at 4..8, coarser than Adam's steps of lr ~1e-3) froze the bits; theta now stays float32 through casts (and
    follows device moves), while the weights are cast and the fake-quantized weight has the weight's dtype."""
    model = tiny_mlp()
    w = BAQWrapper(model)
    model.half()
    for p in w.logits():
        assert p.dtype == torch.float32 and p.requires_grad
    assert model.fc2.parametrizations.weight.original.dtype == torch.float16
    assert model.fc2.weight.dtype == torch.float16
    # the fake-quantized half weight equals the float32 formula on the same half weight, cast once at the end
    p = w.params["fc2"]
    ref = BAQWeight(p.theta.detach().clone(), p.b_min, p.b_max, p.per_channel)
    raw = model.fc2.parametrizations.weight.original.detach()
    assert torch.equal(model.fc2.weight, ref(raw.float()).half())
    # a small step on theta is kept (float16 rounding would drop it), and gradients reach it
    before = p.theta.detach().clone()
    with torch.no_grad():
        p.theta.add_(1e-4)
    assert not torch.equal(p.theta, before)
    model.fc2.weight.float().sum().backward()
    model.float()
    assert p.theta.dtype == torch.float32
