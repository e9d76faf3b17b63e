"""BAQWrapper review: a refused ``bit_range`` is a ValueError that names it and states the accepted range (b_min
>= 2, as the check that follows enforces)."""
import pytest
import torch
from torch import nn

from medquant.fairquant.baq import BAQWrapper


def _mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))


@pytest.mark.parametrize("bad", [(0, 8), (2, 4, 8), (2,), 4, ("a", 8), (None, 8), (2, 8.5)])
def test_a_bad_bit_range_names_it_and_the_accepted_range(bad):
    model = _mlp()
    # (0, 8) said "1 <= b_min", then (1, 8) was refused for b_min < 2; (2, 4, 8) raised "too many values to
    # unpack", 4 and (None, 8) a TypeError of int()
    with pytest.raises(ValueError, match=r"bit_range must be two integers 2 <= b_min < b_max <= 8"):
        BAQWrapper(model, bit_range=bad)
    assert not any(hasattr(m, "parametrizations") for m in model.modules())
