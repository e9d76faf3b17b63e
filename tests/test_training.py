"""medquant.training.train_steps: step cap over epochs, gradient accumulation, clipping, records."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from medquant.distributed import any_rank, is_distributed
from medquant.training import train_steps


def _setup(seed: int = 0):
    torch.manual_seed(seed)
    model = nn.Linear(3, 1)
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(4, 3, generator=g), torch.randn(4, 1, generator=g)) for _ in range(5)]

    def loss_fn(batch):
        x, y = batch
        loss = (model(x) - y).pow(2).mean()
        return loss, float(loss.detach())

    params = list(model.parameters())
    return model, batches, loss_fn, params, torch.optim.SGD(params, lr=0.1)


def _manual(model, batches, params, opt, grad_clip=None):
    out = []
    for x, y in batches:
        loss = (model(x) - y).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(params, grad_clip)
        opt.step()
        out.append(float(loss.detach()))
    return out


def test_equals_a_hand_written_loop_with_clipping():
    _model, batches, loss_fn, params, opt = _setup()
    got = train_steps(loss_fn, batches, opt, params, epochs=2, grad_clip=0.05, progress=False)
    m2, b2, _, p2, o2 = _setup()
    want = _manual(m2, b2 + b2, p2, o2, grad_clip=0.05)
    assert got == want
    assert all(torch.equal(a, b) for a, b in zip(params, p2))


def test_max_steps_caps_over_epochs_and_reads_no_extra_batch():
    _model, batches, loss_fn, params, opt = _setup()
    seen = []

    def counting(batch):
        seen.append(batch)
        return loss_fn(batch)

    out = train_steps(counting, batches, opt, params, epochs=3, max_steps=7, progress=False)
    assert len(out) == 7 and len(seen) == 7
    out = train_steps(loss_fn, batches, opt, params, epochs=None, max_steps=12, progress=False)
    assert len(out) == 12
    assert train_steps(loss_fn, [], opt, params, epochs=None, max_steps=3, progress=False) == []
    with pytest.raises(ValueError, match="max_steps"):
        train_steps(loss_fn, batches, opt, params, epochs=None, progress=False)


def test_grad_accum_averages_the_batch_gradients_and_records():
    _model, batches, loss_fn, params, opt = _setup()
    out = train_steps(loss_fn, batches, opt, params, grad_accum=2, progress=False)
    assert len(out) == 3  # 2 + 2 + 1 batches
    _m2, b2, loss2, p2, o2 = _setup()
    want = []
    for i in range(0, 5, 2):
        o2.zero_grad(set_to_none=True)
        vals = []
        for b in b2[i:i + 2]:  # the last step has one batch: the gradient of its mean is its own
            loss, v = loss2(b)
            (loss / len(b2[i:i + 2])).backward()
            vals.append(v)
        o2.step()
        want.append(sum(vals) / len(vals))
    assert out == want
    assert all(torch.equal(a, b) for a, b in zip(params, p2))


def test_a_last_incomplete_step_takes_the_mean_gradient_of_its_batches():
    # 5 batches, grad_accum=3: steps of 3 and 2 batches; the second step's gradient is the mean of its 2 batches'
    # gradients (as the first's is of its 3), not their sum divided by 3
    _model, batches, loss_fn, params, opt = _setup()
    train_steps(loss_fn, batches, opt, params, grad_accum=3, progress=False)
    _m2, b2, loss2, p2, o2 = _setup()
    for chunk in (b2[:3], b2[3:]):
        o2.zero_grad(set_to_none=True)
        torch.stack([loss2(b)[0] for b in chunk]).mean().backward()
        o2.step()
    for a, b in zip(params, p2):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_model_mode_and_single_process_collectives():
    model, batches, loss_fn, params, opt = _setup()
    model.train()
    train_steps(loss_fn, batches, opt, params, model=model, stop_together=True, progress=False)
    assert not model.training
    assert not is_distributed()
    assert any_rank(True) and not any_rank(False)


def test_grad_accum_averages_dict_records_key_by_key():
    model, batches, _loss_fn, params, opt = _setup()

    def dict_loss(batch):
        x, y = batch
        loss = (model(x) - y).pow(2).mean()
        return loss, {"loss": float(loss.detach()), "abs": float((model(x) - y).abs().mean().detach())}

    out = train_steps(dict_loss, batches, opt, params, grad_accum=2, progress=False)
    # reference: the same steps by hand (plain torch), records averaged per key
    _m2, b2, _l2, p2, o2 = _setup()
    want = []
    for i in range(0, 5, 2):
        o2.zero_grad(set_to_none=True)
        vals = []
        for x, y in b2[i:i + 2]:  # the last step's one batch: its own gradient
            loss = (_m2(x) - y).pow(2).mean()
            (loss / len(b2[i:i + 2])).backward()
            vals.append((float(loss.detach()), float((_m2(x) - y).abs().mean().detach())))
        o2.step()
        want.append({"loss": sum(v[0] for v in vals) / len(vals), "abs": sum(v[1] for v in vals) / len(vals)})
    assert out == want
    assert all(torch.equal(a, b) for a, b in zip(params, p2))


def test_grad_accum_with_records_that_cannot_be_averaged_raises_before_the_step():
    model, batches, _loss_fn, params, opt = _setup()
    before = [p.detach().clone() for p in params]

    def str_loss(batch):
        x, y = batch
        return (model(x) - y).pow(2).mean(), "not a number"

    with pytest.raises(TypeError, match="numbers or dicts of numbers"):
        train_steps(str_loss, batches, opt, params, grad_accum=2, progress=False)
    assert all(torch.equal(a, b) for a, b in zip(params, before))  # optimizer.step() never ran
    keys = iter([{"loss": 1.0}, {"other": 2.0}])

    def mixed_keys(batch):
        x, y = batch
        return (model(x) - y).pow(2).mean(), next(keys)

    with pytest.raises(TypeError, match="different keys"):
        train_steps(mixed_keys, batches, opt, params, grad_accum=2, progress=False)
    assert all(torch.equal(a, b) for a, b in zip(params, before))


def test_a_non_finite_loss_stops_before_the_step_and_keeps_the_last_finite_parameters():
    # a learning rate far too high makes this regression diverge to inf / NaN within a few steps
    _model, batches, loss_fn, params, _opt = _setup()
    opt = torch.optim.SGD(params, lr=1e3)
    seen: list[float] = []

    def tracking(batch):
        loss, v = loss_fn(batch)
        seen.append(v)
        return loss, v

    snapshots = []
    orig_step = opt.step

    def step(*a, **k):
        out = orig_step(*a, **k)
        snapshots.append([p.detach().clone() for p in params])
        return out

    opt.step = step
    with pytest.raises(FloatingPointError, match=r"training step (\d+): the loss is (nan|inf).*learning rate 1000"):
        train_steps(tracking, batches * 20, opt, params, progress=False)
    bad = next(i for i, v in enumerate(seen) if not torch.isfinite(torch.tensor(v)))
    assert bad == len(seen) - 1 and bad >= 1  # stopped at the first non-finite loss, after some finite steps
    assert len(snapshots) == bad  # optimizer.step() ran for the finite steps only
    assert all(torch.equal(a, b) for a, b in zip(params, snapshots[-1]))
    assert all(bool(torch.isfinite(p).all()) for p in params)


def test_a_nan_batch_inside_gradient_accumulation_stops_that_step():
    _model, batches, loss_fn, params, opt = _setup()
    x, y = batches[3]
    batches[3] = (torch.full_like(x, float("nan")), y)  # the second batch of the second step
    with pytest.raises(FloatingPointError, match=r"training step 2: the loss is nan.*parameters are as after step 1"):
        train_steps(loss_fn, batches, opt, params, grad_accum=2, progress=False)
    # reference: the first step alone (plain torch) gives the parameters the loop stopped with
    _m2, b2, loss2, p2, o2 = _setup()
    o2.zero_grad(set_to_none=True)
    for b in b2[:2]:
        (loss2(b)[0] / 2).backward()
    o2.step()
    assert all(torch.equal(a, b) for a, b in zip(params, p2))
