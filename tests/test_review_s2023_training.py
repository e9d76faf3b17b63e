"""Review (s2023) of medquant.training.train_steps: settings that would silently train wrongly are refused."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from medquant.training import train_steps
from tests.test_training import _setup as _five_batches


def _setup():
    """test_training's model, loss and optimizer over its first 3 batches."""
    model, batches, loss_fn, params, opt = _five_batches()
    return model, batches[:3], loss_fn, params, opt


@pytest.mark.parametrize("bad", [-1.0, 0.0, 0, math.nan, -math.inf])
def test_a_grad_clip_that_is_not_a_positive_number_is_refused_before_any_step(bad):
    _model, batches, loss_fn, params, opt = _setup()
    before = [p.detach().clone() for p in params]
    with pytest.raises(ValueError, match="grad_clip"):
        train_steps(loss_fn, batches, opt, params, grad_clip=bad, progress=False)
    assert all(torch.equal(a, b) for a, b in zip(params, before))


@pytest.mark.parametrize("bad", [True, "1.0"])
def test_a_bool_or_string_grad_clip_is_refused(bad):
    _model, batches, loss_fn, params, opt = _setup()
    with pytest.raises(TypeError, match="grad_clip"):
        train_steps(loss_fn, batches, opt, params, grad_clip=bad, progress=False)


def test_an_infinite_grad_clip_is_no_clipping():
    _model, batches, loss_fn, params, opt = _setup()
    got = train_steps(loss_fn, batches, opt, params, grad_clip=math.inf, progress=False)
    _m2, b2, l2, p2, o2 = _setup()
    want = train_steps(l2, b2, o2, p2, grad_clip=None, progress=False)
    assert got == want


def test_the_qlora_and_distiller_loops_refuse_a_negative_clip_before_training():
    from medquant.distill import Distiller
    from medquant.qlora import train_loop

    torch.manual_seed(0)
    student, teacher = nn.Linear(4, 3), nn.Linear(4, 3)
    before = [p.detach().clone() for p in student.parameters()]
    batches = [torch.randn(2, 4) for _ in range(2)]
    with pytest.raises(ValueError, match="grad_clip"):
        Distiller(teacher, student, alpha=1.0).fit(batches, grad_clip=-1.0, progress=False)
    assert all(torch.equal(a, b) for a, b in zip(student.parameters(), before))

    class WithLoss(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 1)

        def forward(self, x, labels):
            from types import SimpleNamespace
            return SimpleNamespace(loss=(self.lin(x) - labels).pow(2).mean())

    model = WithLoss()
    before = [p.detach().clone() for p in model.parameters()]
    data = [{"x": torch.randn(2, 4), "labels": torch.randn(2, 1)}]
    with pytest.raises(ValueError, match="grad_clip"):
        train_loop(model, data, max_grad_norm=-1.0, progress=False)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), before))


def _count_batches_read(**kw):
    _model, batches, loss_fn, params, opt = _setup()
    seen = []

    def counting(batch):
        seen.append(batch)
        return loss_fn(batch)

    train_steps(counting, batches, opt, params, progress=False, **kw)
    return len(seen)


def test_whole_numbers_of_epochs_read_that_many_passes():
    assert _count_batches_read(epochs=2) == 6  # the reference: 2 passes over 3 batches


@pytest.mark.parametrize("kw", [{"epochs": 1.5}, {"epochs": True}, {"max_steps": 2.5}, {"grad_accum": 2.0},
                                {"grad_accum": True}, {"epochs": None, "max_steps": 4.0}])
def test_a_float_or_bool_count_is_refused_before_any_batch_is_read(kw):
    name = next(k for k, v in kw.items() if v is not None)
    with pytest.raises(TypeError, match=name):
        _count_batches_read(**kw)
