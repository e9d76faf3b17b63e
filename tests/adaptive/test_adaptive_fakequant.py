"""Per-sample dynamic fake quantization against an independent per-sample computation.

Formula (asymmetric, per sample ``i`` with ``b_i`` bits): ``lo = min(min x, 0)``, ``hi = max(max x, 0)``,
``s = max((hi - lo) / (2^b - 1), eps)``, ``z = clamp(round(-lo / s), 0, 2^b - 1)``,
``out = (clamp(round(x / s) + z, 0, 2^b - 1) - z) * s``; ``b >= 16`` passes through.
"""
from __future__ import annotations

import re

import pytest
import torch

from medquant.adaptive import fake_quantize_per_sample


def independent_fq(v: torch.Tensor, b: int) -> torch.Tensor:
    """One sample, written from the formula with scalar arithmetic in float32 (no shared code)."""
    if b >= 16:
        return v.clone()
    flat = v.reshape(-1).float()
    lo = min(float(flat.min()), 0.0)
    hi = max(float(flat.max()), 0.0)
    levels = torch.tensor(2.0**b - 1.0, dtype=torch.float32)
    s = torch.tensor(hi, dtype=torch.float32) - torch.tensor(lo, dtype=torch.float32)
    s = torch.maximum(s / levels, torch.tensor(torch.finfo(torch.float32).tiny))
    z = torch.round(-torch.tensor(lo, dtype=torch.float32) / s).clamp(0, float(levels))
    out = []
    for val in flat.tolist():
        q = torch.round(torch.tensor(val, dtype=torch.float32) / s) + z
        q = q.clamp(0, float(levels))
        out.append(float((q - z) * s))
    return torch.tensor(out, dtype=torch.float32).reshape(v.shape).to(v.dtype)


def test_mixed_bits_equal_single_sample_and_independent():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(7, 3, 5, generator=g) * torch.tensor([0.1, 1, 10, 3, 0.5, 2, 7]).view(7, 1, 1)
    x[4] = x[4].abs()  # all-positive sample: range widened to include 0
    x[5] = 0.0  # all-zero sample stays exactly zero
    bits = torch.tensor([1, 2, 3, 4, 8, 2, 32])
    out = fake_quantize_per_sample(x, bits)
    assert out.shape == x.shape and out.dtype == x.dtype
    for i in range(len(x)):
        single = fake_quantize_per_sample(x[i:i + 1], bits[i:i + 1])
        assert torch.equal(out[i:i + 1], single), i
        assert torch.equal(out[i], independent_fq(x[i], int(bits[i]))), i
    assert torch.equal(out[6], x[6])  # 32 bits: passthrough
    assert torch.equal(out[5], torch.zeros_like(x[5]))
    for i, b in enumerate(bits.tolist()):
        if b < 16:
            assert out[i].unique().numel() <= 2**b
    # quantization actually changes the low-bit samples (the test could fail)
    assert not torch.equal(out[1], x[1])


def test_nan_poisons_only_its_own_sample():
    """As documented: a NaN makes its sample's range NaN, so that whole sample is NaN; the others are quantized
    as if alone (a 16+-bit sample holding a NaN passes through unchanged)."""
    x = torch.randn(3, 6, generator=torch.Generator().manual_seed(3))
    x[0, 2] = float("nan")
    x[2, 4] = float("nan")
    out = fake_quantize_per_sample(x, [4, 4, 16])
    assert torch.isnan(out[0]).all()
    assert torch.equal(out[1], independent_fq(x[1], 4))
    assert torch.equal(out[2].nan_to_num(7.0), x[2].nan_to_num(7.0)) and torch.isnan(out[2]).sum() == 1


def test_matches_the_kernel_reference_when_present():
    kernels = pytest.importorskip("medquant.kernels")
    x = torch.randn(16, 40, generator=torch.Generator().manual_seed(1))
    bits = torch.tensor([2, 4, 8, 32] * 4)
    ref = kernels.fake_quantize_rows_reference(x, bits.to(torch.int32), False)
    assert torch.equal(fake_quantize_per_sample(x, bits), ref)


def test_half_precision_and_bfloat16_keep_dtype():
    x = torch.randn(4, 16, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)
    bits = torch.tensor([2, 4, 8, 16])
    out = fake_quantize_per_sample(x, bits)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out[3], x[3])
    for i in range(3):
        assert torch.equal(out[i], independent_fq(x[i], int(bits[i])))


def test_straight_through_gradient():
    x = torch.randn(3, 8, generator=torch.Generator().manual_seed(3), requires_grad=True)
    w = torch.randn(3, 8, generator=torch.Generator().manual_seed(4))
    y = fake_quantize_per_sample(x, torch.tensor([2, 4, 32]))
    (y * w).sum().backward()
    assert torch.equal(x.grad, w)  # d out / d x = identity for every sample
    assert not torch.equal(y[0].detach(), x[0].detach())


@pytest.mark.parametrize("bits, err", [
    ([0, 4], ValueError), ([9, 4], ValueError), ([12, 4], ValueError), ([4], ValueError),
    (torch.tensor([2.0, 4.0]), TypeError),
])
def test_bad_bits(bits, err):
    with pytest.raises(err):
        fake_quantize_per_sample(torch.randn(2, 4), torch.as_tensor(bits))


def test_bad_input():
    with pytest.raises(TypeError, match="floating"):
        fake_quantize_per_sample(torch.ones(2, 3, dtype=torch.int32), [2, 2])
    with pytest.raises(TypeError, match=r"one bit-width per sample .*2 integers\), got int 2"):
        fake_quantize_per_sample(torch.randn(2, 4), 2)
    empty = torch.zeros(0, 3)
    assert fake_quantize_per_sample(empty, []) is empty  # an empty batch takes an empty list
    with pytest.raises(ValueError, match="batch"):
        fake_quantize_per_sample(torch.tensor(1.0), [2])


def _count_row_checks(monkeypatch) -> list[int]:
    """Count calls of the kernels' per-row bit check, through every binding the fake-quant path can reach."""
    import medquant.adaptive.fakequant as afq
    import medquant.kernels.fakequant as kfq
    import medquant.kernels.reference as ref

    calls = [0]
    original = ref.check_row_bits

    def counting(*args, **kwargs):
        calls[0] += 1
        return original(*args, **kwargs)

    for module in (ref, kfq, afq):
        monkeypatch.setattr(module, "check_row_bits", counting)
    return calls


@pytest.mark.parametrize("x, bits", [
    (torch.randn(3, 5), [2, 4, 8]),          # the kernel op runs and checks
    (torch.randn(3, 5), [16, 32, 16]),       # every sample passes through: the op is skipped, checked here
    (torch.randn(3, 0), [2, 4, 8]),          # empty samples: the op is skipped, checked here
])
def test_bits_are_checked_exactly_once(monkeypatch, x, bits):
    calls = _count_row_checks(monkeypatch)
    fake_quantize_per_sample(x, bits, backend="torch")
    assert calls[0] == 1


@pytest.mark.parametrize("bits", [[0, 4, 4], [9, 4, 4], [4, 4], torch.tensor([2.0, 4.0, 4.0]),
                                  torch.tensor([16.0, 16.0, 16.0]), torch.tensor([True, True, True]),
                                  torch.tensor([[4, 4, 4]]), torch.tensor([4, 4, 4], dtype=torch.complex64)])
@pytest.mark.parametrize("width", [5, 0])
def test_errors_are_those_of_check_bits(bits, width):
    """Whichever place runs the one check (the op, or check_bits when the op is skipped), the error is the one
    check_bits gives for the same bits."""
    from medquant.adaptive.fakequant import check_bits

    with pytest.raises((TypeError, ValueError)) as expected:
        check_bits(torch.as_tensor(bits), 3)
    with pytest.raises(expected.type, match=re.escape(str(expected.value))):
        fake_quantize_per_sample(torch.randn(3, width), bits)
