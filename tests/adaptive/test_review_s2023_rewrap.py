"""AdaptiveQuantizer review: wrapping again after ``remove()`` (the documented way to change the sites) with the
default ``weight_config`` meets weights the first wrapper already quantized; the error must say what to pass to
AdaptiveQuantizer (``weight_config=None``), and that call must compute what the first wrapper computed."""
import pytest
import torch
from torch import nn

from medquant.adaptive import AdaptiveQuantizer


def test_wrapping_again_after_remove_says_to_keep_the_quantized_weights_with_weight_config_none():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    aq = AdaptiveQuantizer(model, sites=["2"])
    x = torch.randn(3, 4)
    y = aq(x, bits=[2, 4, 8])
    model = aq.remove()
    packed = {k: v.clone() for k, v in model.state_dict().items()}
    # the message was quantize_'s "pass requantize=True", an argument AdaptiveQuantizer does not take
    with pytest.raises(ValueError, match=r"weight_config=None"):
        AdaptiveQuantizer(model, sites=["2"])
    after = model.state_dict()
    assert after.keys() == packed.keys() and all(torch.equal(after[k], packed[k]) for k in packed)
    assert not model[2]._forward_pre_hooks  # no hook left by the refused wrapper
    again = AdaptiveQuantizer(model, sites=["2"], weight_config=None)
    assert torch.equal(again(x, bits=[2, 4, 8]), y)  # the first wrapper's weights and activation bits
