"""BAQWrapper review: an ``init_bits`` entry refused for a later layer leaves no layer half-wrapped."""
import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

from medquant.fairquant.baq import BAQWrapper


def _mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))


@pytest.mark.parametrize("bad", [[4, 4, 4], [4, 9], [4, 4.5]])
def test_a_refused_init_bits_of_a_later_layer_leaves_no_layer_parametrized(bad):
    model = _mlp()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"init_bits\['2'\]"):
        BAQWrapper(model, init_bits={"0": 4, "2": bad})
    # layer "0" (valid init_bits, met first) used to keep its BAQ parametrization: a half-wrapped model
    assert not any(parametrize.is_parametrized(m) for m in model.modules())
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    w = BAQWrapper(model, init_bits={"0": 4, "2": [4, 4]})  # a corrected call wraps the same model once
    assert all(len(model[i].parametrizations.weight) == 1 for i in (0, 2)) and list(w.params) == ["0", "2"]
