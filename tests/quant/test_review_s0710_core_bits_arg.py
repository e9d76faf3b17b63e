"""Review s0710: the ``bits`` argument of quantize / fake_quantize is checked as QuantConfig checks ``bits``, and a
pruned (0-bit) fake quantization is zeros whatever the weights hold."""
import pytest
import torch

from medquant.quant import QuantConfig, dequantize, fake_quantize, quantize


@pytest.mark.parametrize("fn", [quantize, fake_quantize])
def test_bits_true_is_refused_not_one_bit(fn):
    """True passed 1 <= True <= 8 and quantized at 1 bit, where QuantConfig(bits=True) is refused."""
    with pytest.raises(TypeError) as config_error:
        QuantConfig(bits=True)
    with pytest.raises(TypeError, match="integer") as got:
        fn(torch.randn(4, 32), QuantConfig(), True)
    assert "True" in str(got.value) and "True" in str(config_error.value)


@pytest.mark.parametrize("fn", [quantize, fake_quantize])
@pytest.mark.parametrize("bits", ["4", 4.5, None.__class__])
def test_non_integer_bits_get_an_error_naming_bits(fn, bits):
    with pytest.raises((TypeError, ValueError), match="bits"):
        fn(torch.randn(4, 32), QuantConfig(), bits)


def test_numpy_and_integral_float_bits_equal_their_int():
    np = pytest.importorskip("numpy")
    w = torch.randn(4, 40)
    ref = dequantize(quantize(w, QuantConfig(), 3))
    assert torch.equal(dequantize(quantize(w, QuantConfig(), np.int64(3))), ref)
    assert torch.equal(fake_quantize(w, QuantConfig(), np.int64(3)), ref)


def test_pruned_fake_quantization_is_zeros_for_non_finite_weights():
    """bits=0 returned w * 0: NaN where w held inf or NaN, though a pruned row is zero."""
    w = torch.tensor([[1.0, float("inf"), -float("inf"), float("nan"), -2.0]], requires_grad=True)
    out = fake_quantize(w, QuantConfig(), 0)
    assert torch.equal(out, torch.zeros_like(w))
    out.sum().backward()
    assert torch.equal(w.grad, torch.zeros_like(w))
