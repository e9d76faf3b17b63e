"""Review (s0710): fold_batchnorm_ folds a BatchNorm2d into the Conv2d before it only where the fold keeps the
eval-mode outputs. A conv module also called at another place of the forward (its other output not followed by
the BatchNorm), or a BatchNorm module also applied to another tensor, was folded all the same: the other call then
used the folded weights (or the Identity that replaced the BatchNorm) and the model's outputs changed. The
reference is the model's own eval-mode output before the call (plain torch)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from medquant.calibrate.adaround import fold_batchnorm_


class ConvTwice(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 4, 1)
        self.bn2 = nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn(self.conv(x)) + self.conv(x) + self.bn2(self.conv2(x))


class BnTwice(ConvTwice):
    def forward(self, x):
        return self.bn(self.conv(x)) + self.bn(x) + self.bn2(self.conv2(x))


class Untraceable(nn.Module):
    """Data-dependent control flow (torch.fx cannot trace it): the Sequential fallback; ``self.conv`` is also
    ``self.body[0]``."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4))
        self.conv = self.body[0]
        self.tail = nn.Sequential(nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4))

    def forward(self, x):
        y = self.tail(self.body(x))
        return y + self.conv(x) if float(x.sum()) > -1e9 else y


def _statistics(model):
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g))
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.weight.copy_(torch.randn(m.num_features, generator=g))
                m.bias.copy_(torch.randn(m.num_features, generator=g))
    return model.eval()


@pytest.mark.parametrize("cls, kept", [(ConvTwice, ("conv2", "bn2")), (BnTwice, ("conv2", "bn2")),
                                       (Untraceable, ("tail.0", "tail.1"))])
def test_a_conv_or_batchnorm_used_elsewhere_is_not_folded(cls, kept):
    torch.manual_seed(0)
    model = _statistics(cls())
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(x)
    pairs = fold_batchnorm_(model)
    with torch.no_grad():
        out = model(x)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert pairs == [kept]  # the fold still happens where the conv and the BatchNorm have no other use
