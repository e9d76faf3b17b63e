"""Review s0710: InputQuantizer.calibrate refuses bad bit-widths with the constructor's ValueError."""
import pytest
import torch

from medquant.quant.activations import InputQuantizer


@pytest.mark.parametrize("bits", [0, 1, True, 17, 2.0])
@pytest.mark.parametrize("symmetric", [False, True])
def test_calibrate_refuses_bad_bits_with_a_value_error(bits, symmetric):
    """bits=1 (or 0, True) symmetric divided by 2^(b-1) - 1 = 0: ZeroDivisionError instead of the refusal."""
    with pytest.raises(ValueError, match="activation bits must be an integer in 2..16"):
        InputQuantizer.calibrate([torch.tensor([-1.0, 2.0])], bits, symmetric)
