"""Review s0710: InputQuantizer.calibrate skips empty tensors (an empty batch holds no values to widen the range)
and refuses inputs that are all empty with its own ValueError."""
import pytest
import torch

from medquant.quant.activations import InputQuantizer


@pytest.mark.parametrize("symmetric", [False, True])
def test_empty_tensors_do_not_change_the_range(symmetric):
    """torch.min of an empty tensor raised a RuntimeError about reduction dims."""
    xs = [torch.tensor([-1.0, 3.0]), torch.empty(0, 4), torch.tensor([[0.5, 2.0]])]
    got = InputQuantizer.calibrate(xs, 8, symmetric)
    want = InputQuantizer.calibrate([xs[0], xs[2]], 8, symmetric)
    assert got.as_dict() == want.as_dict()
    # the scale from the formula, in plain Python: lo = -1, hi = 3
    assert got.scale == pytest.approx(3.0 / 127 if symmetric else 4.0 / 255, rel=1e-12)


def test_only_empty_inputs_are_refused_like_no_inputs():
    with pytest.raises(ValueError, match="no calibration inputs"):
        InputQuantizer.calibrate([torch.empty(0), torch.empty(2, 0)], 8, name="blk")
