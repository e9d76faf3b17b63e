"""CNN channel importance (:mod:`medquant.prune.cnn`) against plain-torch references on the tiny CNN."""
from __future__ import annotations

import pytest
import torch

from medquant.prune import StructuredPruner
from medquant.prune.cnn import _scores, channel_groups
from medquant.testing.zoo import tiny_cnn


def _x(seed: int = 0) -> torch.Tensor:
    return torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(seed))


def _taylor_reference(model, batches) -> dict[str, torch.Tensor]:
    """``mean_batches |sum g*theta|`` over each filter of the two convs and its BN's gamma_c, beta_c, with the
    gradient of ``0.5 * mean(y^2)`` (float32 loss) from ``torch.autograd.grad``; products and sums in float32."""
    convs = {"features.0": (model.features[0], model.features[1]), "features.3": (model.features[3], model.features[4])}
    params = [p for c, bn in convs.values() for p in (c.weight, bn.weight, bn.bias)]
    acc = {k: torch.zeros(c.out_channels) for k, (c, _) in convs.items()}
    with torch.enable_grad():
        for x in batches:
            loss = 0.5 * model(x.to(params[0].dtype)).float().pow(2).mean()
            grads = iter(torch.autograd.grad(loss, params))
            for k, (c, bn) in convs.items():
                gw, gg, gb = next(grads), next(grads), next(grads)
                s = (gw.float() * c.weight.detach().float()).flatten(1).sum(1)
                s = s + gg.float() * bn.weight.detach().float() + gb.float() * bn.bias.detach().float()
                acc[k] += s.abs()
    return {k: v / len(batches) for k, v in acc.items()}


def _groups(model):
    return channel_groups(model, _x().to(model.features[0].weight.dtype))[0]


def test_taylor_inside_no_grad():
    """Taylor scores are the same inside the caller's ``torch.no_grad()`` as outside, and match the reference."""
    model = tiny_cnn()
    batches = [_x(0), _x(1)]
    ref = _taylor_reference(model, batches)
    out = _scores(model, _groups(model), "taylor", batches, None, False)
    with torch.no_grad():
        inside = _scores(model, _groups(model), "taylor", batches, None, False)
        plan = StructuredPruner(channel_ratio=0.3, importance="taylor", progress=False).plan(model, calib=batches)
    plan_out = StructuredPruner(channel_ratio=0.3, importance="taylor", progress=False).plan(model, calib=batches)
    for k in ref:
        torch.testing.assert_close(out[k], ref[k], rtol=1e-5, atol=1e-9)
        torch.testing.assert_close(inside[k], out[k], rtol=0, atol=0)
    assert plan.channels == plan_out.channels
    assert all(p.grad is None and p.requires_grad for p in model.parameters())


def test_taylor_bfloat16_in_float32():
    """A bfloat16 model's Taylor scores: ``g * theta`` and the per-filter sum in float32 (the float32 reference
    from the same bfloat16 gradients), not rounded to bfloat16."""
    model = tiny_cnn().to(torch.bfloat16)
    with torch.no_grad():  # larger BN gammas, so the bfloat16 products are not all tiny
        for bn in (model.features[1], model.features[4]):
            bn.weight.uniform_(0.5, 2.0)
    batches = [_x(0).bfloat16()]
    ref = _taylor_reference(model, batches)
    got = _scores(model, _groups(model), "taylor", batches, None, False)
    for k in ref:
        assert got[k].dtype == torch.float32
        torch.testing.assert_close(got[k], ref[k], rtol=1e-5, atol=1e-6 * float(ref[k].abs().max()))


def _nan_model(layer: str):
    model = tiny_cnn()
    with torch.no_grad():
        model.get_submodule(layer).weight[1, 0, 0, 0] = float("nan")
    return model


@pytest.mark.parametrize(("method", "layer"), [("magnitude", "features.0"), ("magnitude", "features.3"),
                                               ("activation", "features.0"), ("activation", "features.3"),
                                               ("taylor", "features.0")])
def test_non_finite_scores_raise_naming_the_conv(method, layer):
    """A NaN weight makes the conv's scores NaN, which cannot be ranked: ValueError naming the conv."""
    model = _nan_model(layer)
    pruner = StructuredPruner(channel_ratio=0.3, importance=method, progress=False)
    with pytest.raises(ValueError, match=rf"{method} importance of conv {layer}: \d+ of \d+ scores are not finite"):
        pruner.plan(model, calib=[_x()], example_input=_x())
