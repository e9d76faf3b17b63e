"""Review s0710: InputQuantizer on half-precision inputs against plain torch written from the formulas of
:mod:`medquant.quant.activations`."""
import pytest
import torch

from medquant.quant.activations import InputQuantizer


def _reference(x: torch.Tensor, bits: int, symmetric: bool, s: float, z: int) -> torch.Tensor:
    """The module docstring's formulas on the values of ``x`` in float32 (float64 for a float64 ``x``), the
    precision the class documents, cast back to ``x``'s dtype."""
    xd = x.double() if x.dtype == torch.float64 else x.float()
    if symmetric:
        q = 2 ** (bits - 1) - 1
        out = torch.clamp(torch.round(xd / s), -q, q) * s
    else:
        out = (torch.clamp(torch.round(xd / s) + z, 0, 2**bits - 1) - z) * s
    return out.to(x.dtype)


def _exact_codes(x: torch.Tensor, bits: int, symmetric: bool, s: float, z: int) -> torch.Tensor:
    """The codes of ``x`` from float64 arithmetic (differs from float32 only at ties of x / s)."""
    r = torch.round(x.double() / s)
    return torch.clamp(r, -(2 ** (bits - 1) - 1), 2 ** (bits - 1) - 1) if symmetric else torch.clamp(r + z, 0,
                                                                                                      2**bits - 1)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("symmetric", [False, True])
def test_half_precision_inputs_get_the_codes_of_the_formula(dtype, symmetric):
    """x / s was computed in the input's half dtype: its rounding moved x / s across a rounding boundary, so many
    values took a neighbouring code (more than one step off after the cast)."""
    q = InputQuantizer.calibrate([torch.tensor([-1.0, 3.0])], 8, symmetric)
    x = torch.linspace(-2, 4, 5000).to(dtype)
    got = q(x)
    assert got.dtype == dtype
    want = _reference(x, q.bits, q.symmetric, q.scale, q.zero)
    assert torch.equal(got, want), int((got != want).sum())
    # and at most one step (plus the cast's rounding) from the codes float64 gives: x / s in the half dtype was
    # up to 1.5 steps off
    codes = _exact_codes(x, q.bits, q.symmetric, q.scale, q.zero) - (0 if q.symmetric else q.zero)
    err = (got.double() - codes * q.scale).abs()
    assert float(err.max()) <= q.scale + float(got.double().abs().max()) * torch.finfo(dtype).eps


def test_float32_and_float64_inputs_match_the_formula():
    q = InputQuantizer(6, False, 0.037, 20)
    x = torch.randn(4000, dtype=torch.float64) * 2
    assert torch.equal(q(x), _reference(x, 6, False, 0.037, 20))
    xf = x.float()
    assert torch.equal(q(xf), _reference(xf, 6, False, 0.037, 20))
