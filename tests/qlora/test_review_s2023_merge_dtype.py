"""Review (s2023): QLoRAAdapter.merge refuses a dtype that is not a float dtype before it merges anything."""
from __future__ import annotations

import pytest
import torch

from medquant.qlora import QLoRAAdapter
from medquant.testing.zoo import ZOO_BY_NAME


@pytest.mark.parametrize("quantize", [True, False])
@pytest.mark.parametrize("dtype", [torch.int8, "float16"])
def test_merge_to_a_non_float_dtype_is_refused_and_leaves_the_adapter_as_it_was(quantize, dtype):
    e = ZOO_BY_NAME["llama"]
    model = e.build()
    ad = QLoRAAdapter(model, quantize=quantize)
    ad.model.eval()
    inp = e.inputs(model)
    with torch.no_grad():
        before = ad.model(**inp).logits
    lora = [n for n, _ in ad.model.named_modules() if n.endswith("lora_A")]
    with pytest.raises(TypeError, match="floating-point torch.dtype"):
        ad.merge(dtype)
    assert [n for n, _ in ad.model.named_modules() if n.endswith("lora_A")] == lora
    with torch.no_grad():
        assert torch.equal(ad.model(**inp).logits, before)
    merged = ad.merge(torch.float32)  # the adapter can still be merged, as the reference would be
    with torch.no_grad():
        torch.testing.assert_close(merged(**inp).logits, before, rtol=0, atol=1e-4 * float(before.abs().max()))
