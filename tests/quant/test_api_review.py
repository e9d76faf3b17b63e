"""Adversarial review of medquant.quant.api: hooks across the swap, layers the map covers but cannot quantize."""
import warnings

import pytest
import torch
from torch import nn

from medquant.quant import QuantConfig, QuantLinear, dequantize_, quantize_, resolve_configs


def _fake_quant(w: torch.Tensor, bits: int = 8) -> torch.Tensor:
    """Symmetric per-row (one group: K <= 128) fake quantization, float16 scales: ``round(w/s).clamp * s``."""
    qmax = 2 ** (bits - 1) - 1
    s = (w.detach().float().abs().amax(1, keepdim=True) / qmax).half().float()
    return (w.detach().float() / s).round().clamp(-qmax, qmax) * s


def _pair():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4))
    ref = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4))
    ref.load_state_dict(m.state_dict())
    with torch.no_grad():
        for i in (0, 2):
            ref[i].weight.copy_(_fake_quant(ref[i].weight))
    return m, ref


def test_forward_hooks_survive_quantize_and_dequantize():
    m, ref = _pair()
    seen: list[tuple[str, torch.Tensor]] = []
    m[0].register_forward_pre_hook(lambda mod, args: seen.append(("pre", args[0])))
    m[0].register_forward_hook(lambda mod, args, out: seen.append(("post", out)))
    m[2].register_forward_hook(lambda mod, args, out: out * 2)  # a hook that changes the output
    with torch.no_grad():
        ref[2].register_forward_hook(lambda mod, args, out: out * 2)
    x = torch.randn(3, 16)
    quantize_(m, QuantConfig(8))
    assert isinstance(m[0], QuantLinear) and isinstance(m[2], QuantLinear)
    with torch.no_grad():
        y, y_ref = m(x), ref(x)
    torch.testing.assert_close(y, y_ref, rtol=0, atol=1e-5)  # the scaling hook ran on the quantized layer
    assert [k for k, _ in seen] == ["pre", "post"]
    torch.testing.assert_close(seen[0][1], x)
    torch.testing.assert_close(seen[1][1], ref[0](x).detach(), rtol=0, atol=1e-5)
    seen.clear()
    dequantize_(m)
    assert type(m[0]) is nn.Linear
    with torch.no_grad():
        y = m(x)
    torch.testing.assert_close(y, y_ref, rtol=0, atol=1e-5)
    assert [k for k, _ in seen] == ["pre", "post"]


def test_a_carried_hook_is_removed_by_its_handle():
    m, _ = _pair()
    calls = []
    h = m[0].register_forward_hook(lambda mod, args, out: calls.append(type(mod).__name__))
    quantize_(m, QuantConfig(8))
    m(torch.randn(1, 16))
    assert calls == ["QuantLinear"]
    h.remove()  # the handle the user holds still removes it from the quantized layer
    m(torch.randn(1, 16))
    assert calls == ["QuantLinear"]


def test_a_weight_norm_reparametrisation_is_baked_in_not_carried():
    torch.manual_seed(0)
    m = nn.Sequential(nn.utils.weight_norm(nn.Linear(16, 8)))  # a forward pre-hook computing weight from g, v
    with torch.no_grad():
        w = m[0].weight.detach().clone()
        b = m[0].bias.detach().clone()
    quantize_(m, QuantConfig(8))
    x = torch.randn(2, 16)
    with torch.no_grad():
        torch.testing.assert_close(m(x), x @ _fake_quant(w).T + b, rtol=0, atol=1e-5)


@pytest.mark.parametrize("make", [lambda: nn.Conv1d(4, 4, 3), lambda: nn.Conv3d(4, 4, 1),
                                  lambda: nn.ConvTranspose2d(4, 4, 3)])
def test_weight_layers_the_map_covers_but_cannot_quantize_are_named(make):
    layer = make()
    m = nn.Sequential(layer, nn.Linear(4, 4))
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        quantize_(m, QuantConfig(4))
    assert isinstance(m[1], QuantLinear) and type(m[0]) is type(layer)
    msgs = [str(r.message) for r in rec]
    assert any(f"0 ({type(layer).__name__})" in s for s in msgs), msgs


def test_a_skipped_or_float_mapped_conv1d_is_not_reported():
    for kw in ({"config_or_map": QuantConfig(4), "skip": ["0"]}, {"config_or_map": {"0": None, "_default": 4}},
               {"config_or_map": {"1": 4}}):
        mm = nn.Sequential(nn.Conv1d(4, 4, 3), nn.Linear(4, 4))
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            quantize_(mm, **kw)
        assert isinstance(mm[1], QuantLinear)


def test_gpt2_conv1d_projections_left_in_float_are_named():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(vocab_size=32, n_positions=16, n_embd=16, n_layer=1, n_head=2)
    torch.manual_seed(0)
    m = transformers.GPT2LMHeadModel(cfg)
    conv1d = [n for n, mod in m.named_modules() if type(mod).__name__ == "Conv1D"]
    assert conv1d == ["transformer.h.0.attn.c_attn", "transformer.h.0.attn.c_proj", "transformer.h.0.mlp.c_fc",
                      "transformer.h.0.mlp.c_proj"]
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        quantize_(m, QuantConfig(4), skip=["lm_head"])
    msgs = [str(r.message) for r in rec if "weight layer(s)" in str(r.message)]
    assert len(msgs) == 1 and all(f"{n} (Conv1D)" in msgs[0] for n in conv1d), msgs


def test_full_backward_hooks_are_carried():
    m, ref = _pair()
    grads: list[torch.Tensor] = []
    m[0].register_full_backward_hook(lambda mod, gin, gout: grads.append(gin[0]))
    quantize_(m, QuantConfig(8))
    x = torch.randn(3, 16, requires_grad=True)
    m(x).sum().backward()
    xr = x.detach().clone().requires_grad_(True)
    ref(xr).sum().backward()
    assert len(grads) == 1
    torch.testing.assert_close(grads[0], xr.grad, rtol=0, atol=1e-5)  # dL/dx through the quantized first layer


def test_the_calibration_plan_names_covered_conv3d_too():
    m = nn.Sequential(nn.Conv3d(2, 2, 1), nn.Linear(2, 2), nn.Linear(2, 2))
    expected = [n for n, mod in m.named_modules() if isinstance(mod, nn.Linear)]  # by hand: the Linear layers
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        plan = resolve_configs(m, 4)
    assert list(plan) == expected == ["1", "2"]
    assert any("0 (Conv3d)" in str(r.message) for r in rec), [str(r.message) for r in rec]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert list(resolve_configs(m, {"re:[12]": 4})) == expected  # the Conv3d not covered: no word


def test_peft_lora_adapters_stay_float_and_trainable():
    peft = pytest.importorskip("peft")

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(16, 16)
            self.b = nn.Linear(16, 4)

        def forward(self, x):
            return self.b(torch.relu(self.a(x)))

    torch.manual_seed(0)
    pm = peft.get_peft_model(Net(), peft.LoraConfig(r=2, lora_alpha=4, target_modules=["a"],
                                                    init_lora_weights=False))
    lora = pm.base_model.model.a
    base_w, base_b = lora.base_layer.weight.detach().clone(), lora.base_layer.bias.detach().clone()
    wa, wb = lora.lora_A["default"].weight.detach().clone(), lora.lora_B["default"].weight.detach().clone()
    head_w, head_b = pm.base_model.model.b.weight.detach().clone(), pm.base_model.model.b.bias.detach().clone()
    # by hand from named_modules: the Linear layers outside PEFT's adapter dicts
    expected = [n for n, m in pm.named_modules() if isinstance(m, nn.Linear) and ".lora_" not in n]
    assert expected == ["base_model.model.a.base_layer", "base_model.model.b"]
    quantize_(pm, QuantConfig(8))
    assert [n for n, m in pm.named_modules() if isinstance(m, QuantLinear)] == expected
    assert type(lora.lora_A["default"]) is nn.Linear and lora.lora_A["default"].weight.requires_grad
    x = torch.randn(3, 16)
    h = x @ _fake_quant(base_w).T + base_b + (x @ wa.T @ wb.T) * 2.0  # scaling = lora_alpha / r
    ref = torch.relu(h) @ _fake_quant(head_w).T + head_b
    y = pm(x)
    torch.testing.assert_close(y.detach(), ref, rtol=0, atol=1e-4)
    y.sum().backward()
    assert lora.lora_A["default"].weight.grad is not None  # the adapters still train
