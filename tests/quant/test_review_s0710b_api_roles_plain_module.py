"""Role patterns on a model with no known roles (a plain nn.Module, e.g. a torchvision-style CNN) raise even when
they only leave modules out: the docstrings said a role the model lacks is left out with a warning, which here
would quantize the classifier head the recipe meant to keep float. The docs now say so; this pins it.

Reference: the model's own classifier (``fc``, read by hand), which must not be quantized silently.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

import medquant as mq
from medquant.models import model_roles


def test_skip_by_role_on_a_plain_model_raises_and_naming_the_head_works():
    torch.manual_seed(0)
    m = nn.Sequential()
    m.add_module("conv", nn.Conv2d(3, 8, 3))
    m.add_module("pool", nn.AdaptiveAvgPool2d(1))
    m.add_module("flat", nn.Flatten())
    m.add_module("fc", nn.Linear(8, 2))
    assert model_roles(m) == {}
    with pytest.raises(ValueError, match=r"'@head'.*no head part.*no known roles"):
        mq.quantize_(m, mq.QuantConfig(4, group_size=8), skip=["@head"])
    assert type(m.fc) is nn.Linear and type(m.conv) is nn.Conv2d  # nothing changed
    mq.quantize_(m, mq.QuantConfig(4, group_size=8), skip=["fc"])
    assert type(m.fc) is nn.Linear and isinstance(m.conv, mq.QuantConv2d)
