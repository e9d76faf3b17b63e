"""Review round 3 of medquant.qlora: merge() against PEFT's own merge_and_unload as the reference."""
from __future__ import annotations

import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model

from medquant.qlora import QLoRAAdapter, nf4_dequantize_, nf4_quantize_
from medquant.testing.zoo import ZOO_BY_NAME


def _randomise_b(ad: QLoRAAdapter) -> None:
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in ad.model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


@pytest.mark.parametrize("quantize", [True, False])
def test_merge_to_bfloat16_rounds_w_plus_delta_once_as_peft_in_float32(quantize):
    """merge(bfloat16) must give bf16(W + s B A), the merged float32 weight rounded once, as PEFT's
    merge_and_unload on the float32 (dequantized) base followed by .to(bfloat16) gives it. It rounded W_deq to
    bfloat16 first and added the bfloat16-rounded delta, 1 bf16 ulp off in many weights."""
    entry = ZOO_BY_NAME["llama"]
    torch.manual_seed(0)
    model = entry.build()
    ref = copy.deepcopy(model)
    ad = QLoRAAdapter(model, r=4, lora_alpha=8.0, quantize=quantize)
    _randomise_b(ad)
    lora = {n: p.detach().clone() for n, p in ad.model.named_parameters() if "lora_" in n}
    if quantize:  # the reference base: the same NF4 weights, dequantized to float32
        nf4_quantize_(ref, ad.quantized)
        nf4_dequantize_(ref, torch.float32)
    pm = get_peft_model(ref, LoraConfig(r=4, lora_alpha=8.0, use_rslora=True, target_modules=ad.targets))
    assert not pm.load_state_dict(lora, strict=False).unexpected_keys
    want = pm.merge_and_unload().to(torch.bfloat16).state_dict()
    got = ad.merge(torch.bfloat16).state_dict()
    assert got.keys() == want.keys()
    off = [k for k in want if not torch.equal(got[k], want[k])]
    assert not off, f"{len(off)} tensors differ from PEFT's float32 merge rounded once, e.g. {off[:3]}"
    assert all(v.dtype == torch.bfloat16 for v in got.values() if v.is_floating_point())


def test_merge_to_float32_still_equals_peft_bit_for_bit():
    entry = ZOO_BY_NAME["qwen2"]
    torch.manual_seed(0)
    model = entry.build()
    ref = copy.deepcopy(model)
    ad = QLoRAAdapter(model, r=8, lora_alpha=4.0, use_rslora=False, target_modules=["q_proj", "down_proj"])
    _randomise_b(ad)
    lora = {n: p.detach().clone() for n, p in ad.model.named_parameters() if "lora_" in n}
    nf4_quantize_(ref, ad.quantized)
    nf4_dequantize_(ref, torch.float32)
    pm = get_peft_model(ref, LoraConfig(r=8, lora_alpha=4.0, target_modules=ad.targets))
    pm.load_state_dict(lora, strict=False)
    want = pm.merge_and_unload().state_dict()
    got = ad.merge().state_dict()
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
