"""QLoRAAdapter.save records the dtype of the base weights it adapted / quantized, and load refuses another one.

bitsandbytes' NF4 codes of a float32 weight and of the same weight rounded to bfloat16 differ, and a bfloat16 base
dequantizes to bfloat16: an adapter trained on one base dtype and loaded onto a model of another ran a different
base than the one it was trained on, silently.
"""
from __future__ import annotations

import json

import bitsandbytes as bnb
import pytest
import torch

from medquant.qlora import QLoRAAdapter
from medquant.testing.zoo import ZOO_BY_NAME


def _saved(tmp_path, dtype, quantize=True):
    entry = ZOO_BY_NAME["llama"]
    model = entry.build().to(dtype)
    ad = QLoRAAdapter(model, quantize=quantize, compute_dtype=dtype if quantize else torch.float32)
    with torch.no_grad():
        for n, p in ad.model.named_parameters():
            if ".lora_B." in n:
                p.normal_(0, 0.05)  # a trained adapter: B away from zero
    ad.model.eval()
    inp = entry.inputs(ad.model)
    with torch.no_grad():
        ref = entry.output(ad.model, inp)
    ad.save(tmp_path)
    return entry, inp, ref


@pytest.mark.parametrize("saved, other", [(torch.bfloat16, torch.float32), (torch.float32, torch.bfloat16)])
@pytest.mark.parametrize("quantize", [True, False])
def test_load_onto_a_base_of_another_dtype_is_refused_before_the_model_changes(tmp_path, saved, other, quantize):
    entry, _, _ = _saved(tmp_path, saved, quantize)
    assert json.loads((tmp_path / "medquant_qlora.json").read_text())["base_dtypes"] == [str(saved).split(".")[-1]]
    fresh = entry.build().to(other)
    before = {n: type(m) for n, m in fresh.named_modules()}
    name = str(saved).split(".")[-1]
    with pytest.raises(ValueError, match=rf"trained on a base of {name}.*model's .* {str(other).split('.')[-1]}"
                                         rf".*torch_dtype=torch\.{name}"):
        QLoRAAdapter.load(fresh, tmp_path)
    assert {n: type(m) for n, m in fresh.named_modules()} == before
    assert not any(isinstance(m, bnb.nn.Linear4bit) for m in fresh.modules())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_load_onto_a_base_of_the_saved_dtype_reproduces_the_outputs(tmp_path, dtype):
    entry, inp, ref = _saved(tmp_path, dtype)
    loaded = QLoRAAdapter.load(entry.build().to(dtype), tmp_path)
    with torch.no_grad():
        assert torch.equal(entry.output(loaded.model, inp), ref)


def test_the_refused_case_really_differs(tmp_path):
    """The control: without the check, a float32-trained adapter on a bfloat16 base gives other outputs."""
    entry, inp, ref = _saved(tmp_path, torch.float32)
    meta = json.loads((tmp_path / "medquant_qlora.json").read_text())
    del meta["base_dtypes"]  # a file of an earlier medquant: no record, loaded as before
    (tmp_path / "medquant_qlora.json").write_text(json.dumps(meta))
    loaded = QLoRAAdapter.load(entry.build().to(torch.bfloat16), tmp_path)
    with torch.no_grad():
        out = entry.output(loaded.model, inp)
    assert not torch.allclose(out.float(), ref.float(), atol=1e-3)
