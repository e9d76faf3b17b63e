"""Review s0710: QuantLinear / QuantConv2d.from_float refuse a subclass with its own forward (as
QuantEmbedding.from_float does): the quantized layer computes F.linear / F.conv2d and silently dropped what the
subclass's forward adds. Subclasses that compute as their parent are still taken."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from medquant.quant import QuantConfig
from medquant.quant.modules import QuantConv2d, QuantLinear


class DoubledLinear(nn.Linear):
    def forward(self, x):
        return super().forward(x) * 2


class StandardizedConv(nn.Conv2d):  # a weight-standardized convolution (BiT / timm StdConv2d)
    def _conv_forward(self, x, weight, bias):
        w = (weight - weight.mean(dim=(1, 2, 3), keepdim=True)) / (weight.std(dim=(1, 2, 3), keepdim=True) + 1e-5)
        return super()._conv_forward(x, w, bias)


class ScaledConv(nn.Conv2d):
    def forward(self, x):
        return super().forward(x) + 1


class PlainLinear(nn.Linear):  # computes as nn.Linear
    pass


@pytest.mark.parametrize("make", [lambda: (QuantLinear, DoubledLinear(8, 4)),
                                  lambda: (QuantConv2d, StandardizedConv(2, 4, 3)),
                                  lambda: (QuantConv2d, ScaledConv(2, 4, 3))])
def test_a_subclass_with_its_own_forward_is_refused(make):
    cls, module = make()
    x = torch.randn(1, 2, 6, 6) if cls is QuantConv2d else torch.randn(3, 8)
    with torch.no_grad():  # the float module does not compute as the plain layer would
        base = F.conv2d(x, module.weight, module.bias) if cls is QuantConv2d else F.linear(x, module.weight,
                                                                                            module.bias)
        assert not torch.allclose(module(x), base)
    with pytest.raises(TypeError, match="its own (forward|_conv_forward)"):
        cls.from_float(module, QuantConfig(bits=8))


def test_a_subclass_computing_as_nn_linear_is_taken():
    module = PlainLinear(8, 4)
    q = QuantLinear.from_float(module, QuantConfig(bits=8))
    x = torch.randn(3, 8)
    with torch.no_grad():
        assert torch.allclose(q(x), F.linear(x, q.dequantized_weight(), module.bias), atol=1e-2)
    assert type(q.to_float()) is PlainLinear
