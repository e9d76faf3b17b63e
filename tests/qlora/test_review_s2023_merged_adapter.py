"""Review (s2023): a merged QLoRAAdapter (merge() folds and removes the LoRA weights) refuses to be saved, trained or
merged again instead of writing an empty adapter / doing nothing silently."""
from __future__ import annotations

import os

import pytest
import torch
from safetensors.torch import load_file

from medquant.qlora import QLoRAAdapter
from medquant.testing.zoo import ZOO_BY_NAME


def _trained():
    e = ZOO_BY_NAME["llama"]
    torch.manual_seed(0)
    model = e.build()
    ad = QLoRAAdapter(model)
    inp = e.inputs(model)
    batch = {**inp, "labels": inp["input_ids"]}
    ad.train([batch] * 2, lr=5e-2, progress=False)
    return ad, batch


def test_a_saved_adapter_holds_its_lora_weights(tmp_path):
    ad, _ = _trained()
    ad.save(tmp_path)
    saved = load_file(os.path.join(tmp_path, "adapter_model.safetensors"))
    want = {n for n, p in ad.model.named_parameters() if "lora_" in n}
    assert len(saved) == len(want) > 0  # the reference: one tensor per LoRA matrix


def test_a_merged_adapter_is_not_saved_empty(tmp_path):
    ad, _ = _trained()
    ad.merge()
    with pytest.raises(RuntimeError, match="merged"):
        ad.save(tmp_path / "after")
    assert not (tmp_path / "after" / "adapter_model.safetensors").exists()


def test_a_merged_adapter_refuses_training_and_a_second_merge(tmp_path):
    ad, batch = _trained()
    ad.merge()
    for call in (lambda: ad.train([batch], progress=False), lambda: ad.merge(), lambda: ad.requantize(4),
                 lambda: ad.trainer([batch], tmp_path)):
        with pytest.raises(RuntimeError, match="merged"):
            call()
