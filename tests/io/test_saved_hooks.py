"""A checkpoint stores tensors, not the forward hooks that run around a model's modules: a save that would lose a
hook changing what the model computes refuses (an AdaptiveQuantizer's sites on a model saved without its quantizer,
torch's legacy ``prune`` / ``weight_norm`` reparametrisations) or warns (a user's hook), and saving the
AdaptiveQuantizer itself keeps its bits. References: the hooked model's own outputs, plain torch."""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.utils.prune as torch_prune
from torch import nn

import medquant
from medquant import AdaptiveQuantizer
from medquant.quant.hooks import forward_hooks


def _mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))


def _x() -> torch.Tensor:
    return torch.randn(3, 8, generator=torch.Generator().manual_seed(1))


def test_a_model_hooked_by_an_adaptive_quantizer_is_refused_and_the_quantizer_itself_saves(tmp_path):
    model = _mlp()
    aq = AdaptiveQuantizer(model, bit_map={0: 2, 1: 8}, sites=["2"])
    levels = torch.tensor([0, 1, 0])
    with pytest.raises(ValueError, match=r"AdaptiveQuantizer.*'2'.*medquant.save\(aq"):
        medquant.save(model, tmp_path / "inner")
    assert not (tmp_path / "inner").exists()
    # the quantizer itself: its bit map and sites are in its state; rebuilt in code, it computes the same
    medquant.save(aq, tmp_path / "aq")
    again = AdaptiveQuantizer(_mlp(seed=5), bit_map={0: 2, 1: 8}, sites=["2"])
    medquant.load(tmp_path / "aq", model=again)
    torch.testing.assert_close(again(_x(), levels=levels), aq(_x(), levels=levels), rtol=0, atol=0)
    # after remove(), the model (weights quantized, activations float) saves and loads as it computes
    plain = aq.remove()
    medquant.save(plain, tmp_path / "plain")
    torch.testing.assert_close(medquant.load(tmp_path / "plain", model=_mlp(seed=5))(_x()), plain(_x()))


@pytest.mark.parametrize("reparam", ["prune", "weight_norm"])
def test_a_torch_reparametrisation_is_refused_and_saves_once_made_permanent(tmp_path, reparam):
    """Saved as it was, the folder held ``weight_orig`` / ``weight_mask`` (``weight_g`` / ``weight_v``) and no
    ``weight``: it did not load into the model it came from."""
    model = _mlp()
    if reparam == "prune":
        torch_prune.l1_unstructured(model[0], "weight", amount=0.5)
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            torch.nn.utils.weight_norm(model[0])
    with pytest.raises(ValueError, match=r"reparametrisation \(0: forward pre-hook"):
        medquant.save(model, tmp_path / "m")
    (h,) = forward_hooks(model)
    h.remove()
    ref = model(_x())
    medquant.save(model, tmp_path / "m")
    torch.testing.assert_close(medquant.load(tmp_path / "m", model=_mlp(seed=5))(_x()), ref)


def test_a_user_hook_is_saved_without_and_warned_about(tmp_path):
    model = _mlp()
    model[1].register_forward_hook(lambda m, i, o: o * 2)
    with pytest.warns(UserWarning, match=r"not saved \(1: forward hook <lambda>"):
        medquant.save(model, tmp_path / "m")
    loaded = medquant.load(tmp_path / "m", model=_mlp(seed=5))
    torch.testing.assert_close(loaded[2](loaded[0](_x()).relu()), loaded(_x()))  # no hook on the loaded one


def test_input_quantizers_and_harmless_hooks_save_silently(tmp_path):
    from medquant.calibrate import InputQuantizer

    model = _mlp()
    InputQuantizer(8, False, 0.05, 128).attach(model[2])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        medquant.save(model, tmp_path / "m")
    loaded = medquant.load(tmp_path / "m", model=_mlp(seed=5))
    torch.testing.assert_close(loaded(_x()), model(_x()), rtol=0, atol=0)


def test_hf_save_pretrained_refuses_an_adaptive_quantizers_sites_and_warns_about_user_hooks(tmp_path):
    from transformers import AutoModelForCausalLM

    from medquant.hf import save_pretrained
    from medquant.testing.zoo import ZOO_BY_NAME

    model = ZOO_BY_NAME["llama"].build()
    handle = model.model.norm.register_forward_hook(lambda m, i, o: o * 0.5)
    aq = AdaptiveQuantizer(model, bit_map={0: 4, 1: 8}, sites=["lm_head"])  # quantizes the weights too
    with pytest.raises(ValueError, match=r"AdaptiveQuantizer.*lm_head"):
        save_pretrained(model, tmp_path / "m")
    assert not (tmp_path / "m").exists()
    aq.remove()
    ids = torch.randint(4, 200, (1, 6), generator=torch.Generator().manual_seed(0))
    with pytest.warns(UserWarning, match=r"not saved \(model.norm: forward hook <lambda>"):
        save_pretrained(model, tmp_path / "m")
    handle.remove()
    with torch.no_grad():
        ref = model(input_ids=ids).logits
        got = AutoModelForCausalLM.from_pretrained(tmp_path / "m")(input_ids=ids).logits
    torch.testing.assert_close(got, ref)  # saved without the hook: the unhooked model
