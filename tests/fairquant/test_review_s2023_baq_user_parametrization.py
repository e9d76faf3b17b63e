"""FQ-QAT and BAQ review: removing the fake-quant / BAQ parametrizations (``fake_quantized``,
``detach_fake_quant``, a failed ``fq_qat``, ``BAQWrapper.export``) keeps a parametrization of the user's own on
the same weight."""
import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

from medquant.fairquant.baq import BAQWeight, BAQWrapper
from medquant.fairquant.qat import attach_fake_quant, detach_fake_quant, fake_quantized, fq_qat


class _Double(nn.Module):
    """A user's own weight parametrization: ``w -> 2 w``."""

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return 2 * w


def _model() -> tuple[nn.Sequential, torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    parametrize.register_parametrization(model[0], "weight", _Double())
    return model, model[0].parametrizations.weight.original.detach().clone()


def _assert_users_parametrization_kept(model: nn.Sequential, raw: torch.Tensor) -> None:
    assert parametrize.is_parametrized(model[0], "weight")
    assert [type(p) for p in model[0].parametrizations.weight] == [_Double]
    assert torch.equal(model[0].weight, 2 * raw)  # plain torch: the user's w -> 2 w of the untouched original


def test_fake_quantized_block_keeps_the_users_parametrization():
    model, raw = _model()
    with fake_quantized(model, 8):
        assert not torch.equal(model[0].weight, 2 * raw)  # fake-quantized inside the block
    _assert_users_parametrization_kept(model, raw)  # the block used to strip it: weight back to raw, not 2 raw


def test_detach_fake_quant_removes_only_the_fake_quant_parametrization():
    model, raw = _model()
    attach_fake_quant(model, 4)
    detach_fake_quant(model)
    _assert_users_parametrization_kept(model, raw)
    assert not parametrize.is_parametrized(model[2])


def test_a_failed_fq_qat_gives_the_model_back_with_the_users_parametrization():
    model, raw = _model()

    def boom(model, batch):
        raise RuntimeError("loss failed")

    with pytest.raises(RuntimeError, match="loss failed"):
        fq_qat(model, 8, [object()], loss_fn=boom, progress=False)
    _assert_users_parametrization_kept(model, raw)


def test_export_keeps_the_users_own_parametrization_and_quantizes_its_value():
    model, raw = _model()
    exported = BAQWrapper(model, init_bits={"0": 5, "2": 6}).export()
    # reference: the same BAQ export of a plain model whose weight is the parametrized value 2 * raw
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    with torch.no_grad():
        plain[0].weight.copy_(2 * raw)
    ref = BAQWrapper(plain, init_bits={"0": 5, "2": 6}).export()
    x = torch.randn(7, 4)
    # export removed every parametrization of the layer, the user's too: it quantized raw, not 2 * raw
    assert torch.equal(exported(x), ref(x))
    assert not any(isinstance(m, BAQWeight) for m in exported.modules())
