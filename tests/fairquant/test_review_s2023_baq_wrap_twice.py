"""BAQWrapper review: a second BAQWrapper on layers that already carry BAQ bits is refused."""
import pytest
import torch
from torch import nn

from medquant.fairquant.baq import BAQWrapper


def _mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))


def test_a_second_wrapper_on_already_wrapped_layers_is_refused_and_changes_nothing():
    model = _mlp()
    first = BAQWrapper(model, init_bits={"0": 4, "2": 6})
    x = torch.randn(5, 4)
    y = model(x)
    with pytest.raises(ValueError, match="already"):
        BAQWrapper(model)  # used to stack a second BAQWeight: the weights quantized twice, two sets of theta
    assert all(len(model[i].parametrizations.weight) == 1 for i in (0, 2))
    assert torch.equal(model(x), y)
    assert first.bits() == {"0": (4, 4, 4), "2": (6, 6)}
