"""Review of learned rounding against hand references: the rectified sigmoid, the regulariser, the initial ``V``
(soft weight = ``w``), the final codes ``floor(w/s) + [h >= 0.5]`` on asymmetric / ragged-group / float16 layers;
and the layers it swaps in: the model's train mode kept, a shared module quantized under all its names, a Conv2d
padding mode the quantized layer cannot run refused before the model changes."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from medquant import QuantConfig, QuantLinear
from medquant.calibrate.adaround import _GAMMA, _ZETA, _Rounding, adaround_quantize_
from medquant.quant.core import compute_qparams


def _hand_grid(w, cfg):
    """Per-element scale / zero point of ``w`` (N, K) from compute_qparams, expanded by hand (ragged last group)."""
    k = w.shape[1]
    s, z, _ = compute_qparams(w, cfg.bits, cfg.is_symmetric(cfg.bits), cfg.scope, cfg.group_size,
                              cfg.torch_scale_dtype)
    g = cfg.group_size
    idx = torch.arange(k) // g
    se = s.float()[:, idx]
    ze = z.float()[:, idx] if z is not None else None
    return se, ze


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_rounding_matches_hand_formulas_asymmetric_ragged_groups(dtype):
    torch.manual_seed(0)
    lin = nn.Linear(40, 6).to(dtype)  # K = 40 is not a multiple of the group size 16
    cfg = QuantConfig(bits=3, symmetric=False, scope="group", group_size=16)
    r = _Rounding(lin, cfg, "lin")
    w = lin.weight.detach().float()
    s, z = _hand_grid(w, cfg)
    h = torch.clamp(torch.sigmoid(r.v.detach()) * (_ZETA - _GAMMA) + _GAMMA, 0, 1)
    torch.testing.assert_close(r.h().detach(), h)
    rest = w / s - torch.floor(w / s)
    torch.testing.assert_close(h, rest, atol=2e-4, rtol=0)  # initial V: h(V) = frac(w/s), soft weight = w
    inside = (w / s + z >= 0) & (w / s + z <= 7)  # the grid's range (z is rounded: the extremes may be clipped)
    assert inside.float().mean() > 0.8
    torch.testing.assert_close(r.weight().detach().float()[inside], w[inside], atol=float(s.max()) * 2e-4 + 1e-3,
                               rtol=0)
    beta = 7.0
    torch.testing.assert_close(r.regulariser(beta).detach(), (1 - (2 * h - 1).abs() ** beta).sum())
    with torch.no_grad():
        r.v.normal_(generator=torch.Generator().manual_seed(3))
    h = r.h().detach()
    codes = torch.clamp(torch.floor(w / s) + (h >= 0.5).float() + z, 0, 7)
    ref = ((codes - z) * s).to(dtype)
    torch.testing.assert_close(r.weight(hard=True).detach(), ref)
    q = r.quantized_module()
    x = torch.randn(5, 40).to(dtype)
    torch.testing.assert_close(q(x).float(), F.linear(x.float(), ref.float(), lin.bias.detach().float()),
                               atol=2e-2, rtol=2e-2)


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Dropout(0.1), nn.Linear(16, 4))


def test_train_mode_of_the_model_is_kept_on_the_swapped_layers():
    model = _mlp().train()
    calib = [torch.randn(4, 8) for _ in range(2)]
    adaround_quantize_(model, QuantConfig(bits=4), calib, iters=3, progress=False)
    assert isinstance(model[0], QuantLinear) and isinstance(model[3], QuantLinear)
    assert all(m.training for m in model.modules())  # as before the call
    model = _mlp().eval()
    adaround_quantize_(model, QuantConfig(bits=4), calib, iters=3, progress=False)
    assert not any(m.training for m in model.modules())


class _Shared(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(8, 8)
        self.b = self.a  # one module under two names, called twice

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


def test_shared_module_is_quantized_under_every_name():
    torch.manual_seed(0)
    model = _Shared()
    calib = [torch.randn(4, 8) for _ in range(2)]
    adaround_quantize_(model, QuantConfig(bits=4), calib, iters=3, progress=False)
    assert isinstance(model.a, QuantLinear)
    assert model.b is model.a  # stays one (quantized) module, as quantize_ keeps it
    x = torch.randn(3, 8)
    wq = model.a.dequantized_weight()
    ref = F.linear(torch.relu(F.linear(x, wq, model.a.bias)), wq, model.a.bias)  # both calls quantized
    torch.testing.assert_close(model(x), ref, atol=1e-4, rtol=1e-4)


def test_conv_with_reflect_padding_is_refused_before_the_model_changes():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect"), nn.BatchNorm2d(4), nn.ReLU())
    model.eval()
    snap = copy.deepcopy(model.state_dict())
    calib = [torch.randn(2, 3, 6, 6)]
    with pytest.raises(ValueError, match="padding_mode"):
        adaround_quantize_(model, QuantConfig(bits=4), calib, iters=2, progress=False)
    assert type(model[0]) is nn.Conv2d and isinstance(model[1], nn.BatchNorm2d)  # not folded, not swapped
    for k, v in model.state_dict().items():
        assert torch.equal(v, snap[k])


def test_user_forward_hook_runs_on_the_quantized_layer():
    model = _mlp().eval()
    seen = []
    handle = model[3].register_forward_hook(lambda mod, args, out: seen.append(out.detach().clone()))
    calib = [torch.randn(4, 8) for _ in range(2)]
    adaround_quantize_(model, QuantConfig(bits=4), calib, iters=3, progress=False)
    assert isinstance(model[3], QuantLinear)
    seen.clear()
    x = torch.randn(3, 8)
    out = model(x)
    assert len(seen) == 1 and torch.equal(seen[0], out)  # quantize_ carries hooks; so must learned rounding
    handle.remove()
    model(x)
    assert len(seen) == 1


class _Unused(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.head = nn.Linear(4, 2)
        self.spare = nn.Linear(4, 2)  # never called by forward

    def forward(self, x):
        return self.head(self.bn(self.conv(x)).mean((2, 3)))


def test_layer_never_reached_is_refused_before_the_model_changes():
    torch.manual_seed(0)
    model = _Unused().eval()
    snap = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match="spare"):
        adaround_quantize_(model, QuantConfig(bits=4), [torch.randn(2, 3, 6, 6)], iters=2, progress=False)
    assert type(model.conv) is nn.Conv2d and type(model.head) is nn.Linear and isinstance(model.bn, nn.BatchNorm2d)
    for k, v in model.state_dict().items():
        assert torch.equal(v, snap[k])
