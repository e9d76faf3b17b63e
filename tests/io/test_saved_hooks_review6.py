"""torch's current reparametrisations (``torch.nn.utils.parametrize``: ``parametrizations.weight_norm``,
``spectral_norm``, ``orthogonal``, a user's ``register_parametrization``) store ``parametrizations.weight.original*``
and no ``weight``, as the legacy hook-based ones that a save refuses store ``weight_g`` / ``weight_v``. They are no
forward hooks, so the save accepted them: ``medquant.save`` and ``medquant.hf.save_pretrained`` wrote a folder
that ``from_pretrained`` loaded with a freshly initialised ``lm_head`` (only transformers' "MISSING" notice) and
that ``medquant.load`` into a fresh model refused. A save now refuses them, naming the module and how to make them
permanent, and writes nothing. References: the parametrized model's own logits; plain torch's
``remove_parametrizations``; transformers' own ``from_pretrained``."""
from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize
from transformers import AutoModelForCausalLM

import medquant
import medquant.hf
from medquant import QuantConfig
from medquant.testing.zoo import ZOO_BY_NAME


def _quantized_llama_with_a_weight_norm_head() -> tuple[nn.Module, dict]:
    entry = ZOO_BY_NAME["llama"]
    model = entry.build().eval()
    medquant.quantize_(model, QuantConfig(4, group_size=32), skip=["@head"])
    nn.utils.parametrizations.weight_norm(model.lm_head)
    return model, entry.inputs(model)


def _logits(model: nn.Module, batch: dict) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch).logits


@pytest.mark.parametrize("writer", ["medquant.save", "medquant.hf.save_pretrained"])
def test_a_parametrized_layer_is_refused_and_saves_once_made_permanent(tmp_path, writer):
    model, batch = _quantized_llama_with_a_weight_norm_head()
    save = medquant.save if writer == "medquant.save" else medquant.hf.save_pretrained
    with pytest.raises(ValueError, match=r"lm_head: weight.*remove_parametrizations"):
        save(model, tmp_path / "q")
    assert not (tmp_path / "q").exists()
    ref = _logits(model, batch)
    parametrize.remove_parametrizations(model.lm_head, "weight")  # keeps the weight it computed
    torch.testing.assert_close(_logits(model, batch), ref)
    save(model, tmp_path / "q")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "q").eval()
    torch.testing.assert_close(_logits(loaded, batch), ref)


def test_a_plain_module_with_a_registered_parametrization_is_refused(tmp_path):
    class Symmetric(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x.triu() + x.triu(1).transpose(-1, -2)

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    parametrize.register_parametrization(model[0], "weight", Symmetric())
    with pytest.raises(ValueError, match=r"1 module\(s\).*0: weight"):
        medquant.save(model, tmp_path / "m")
    assert not (tmp_path / "m").exists()


def test_the_bound_model_save_pretrained_checks_as_the_module_function_does(tmp_path):
    """``model.save_pretrained`` - the method medquant binds on every model it quantizes or loads - refused nothing:
    a torch ``prune`` reparametrisation of ``lm_head`` was written and ``from_pretrained`` re-initialised the head.
    It now refuses as :func:`medquant.hf.save_pretrained` does, writing nothing; made permanent, the folder reloads
    to the model's logits."""
    entry = ZOO_BY_NAME["llama"]
    model = entry.build().eval()
    medquant.quantize_(model, QuantConfig(4, group_size=32), skip=["@head"])
    batch = entry.inputs(model)
    torch.nn.utils.prune.l1_unstructured(model.lm_head, "weight", 0.5)
    with pytest.raises(ValueError, match="lm_head"):
        model.save_pretrained(tmp_path / "refused")
    assert not (tmp_path / "refused").exists()
    torch.nn.utils.prune.remove(model.lm_head, "weight")
    model.save_pretrained(tmp_path / "saved")
    assert torch.equal(_logits(AutoModelForCausalLM.from_pretrained(tmp_path / "saved").eval(), batch),
                       _logits(model, batch))
