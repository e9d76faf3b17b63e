"""Review s0710: set_input_quantizers leaves the model as it was when it refuses its arguments."""
import pytest
from torch import nn

from medquant.quant.activations import InputQuantizer, input_quantizers, set_input_quantizers


def test_set_input_quantizers_changes_nothing_when_a_name_is_unknown():
    """It removed the active quantizers and attached the first ones before failing on an unknown module name."""
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
    q = InputQuantizer(8, False, 0.1, 3)
    q.attach(model[0])
    before = dict(input_quantizers(model))
    with pytest.raises((ValueError, AttributeError), match="nope"):
        set_input_quantizers(model, {"1": q, "nope": q})
    assert input_quantizers(model) == before
    assert len(model[1]._forward_pre_hooks) == 0


def test_set_input_quantizers_refuses_a_value_that_is_not_an_input_quantizer_before_changing_anything():
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
    q = InputQuantizer(8, False, 0.1, 3)
    q.attach(model[0])
    with pytest.raises(TypeError, match="InputQuantizer"):
        set_input_quantizers(model, {"1": {"bits": 8}})  # type: ignore[dict-item]
    assert list(input_quantizers(model)) == ["0"]
