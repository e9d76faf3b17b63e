"""Review s0710: InputQuantizer takes ``symmetric`` as a bool only, as its records do; ``bool(value)`` turned the
string "false" into a symmetric quantizer and None into an asymmetric one, silently."""
import pytest
import torch

from medquant.quant.activations import InputQuantizer


@pytest.mark.parametrize("value", ["false", "true", None, 1, 0.0])
def test_a_symmetric_that_is_not_a_bool_is_refused(value):
    with pytest.raises(TypeError, match="symmetric"):
        InputQuantizer(8, value, 0.1, 0)
    with pytest.raises(TypeError, match="symmetric"):
        InputQuantizer.calibrate([torch.tensor([-1.0, 2.0])], 8, value)


@pytest.mark.parametrize("value", [False, True])
def test_bools_are_taken(value):
    q = InputQuantizer.calibrate([torch.tensor([-1.0, 2.0])], 8, value)
    assert q.symmetric is value
    assert q.scale == pytest.approx(2.0 / 127 if value else 3.0 / 255, rel=1e-12)
