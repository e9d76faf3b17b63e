"""Review (s0710b): nf4_dequantize_ refuses a dtype that is not a floating-point torch.dtype, naming the accepted ones.

``torch.int8`` / ``torch.bool`` failed inside ``nn.Linear`` with "Only Tensors of floating point and complex dtype
can require gradients", and the string ``"float16"`` with "Invalid device string" - neither names the ``dtype``
argument. As :meth:`QLoRAAdapter.merge` does, a ``TypeError`` now says what was passed and what is accepted,
before any layer is replaced; a floating-point dtype still gives bitsandbytes' own dequantization.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

from medquant.qlora import nf4_dequantize_, nf4_modules, nf4_quantize_


def _nf4() -> nn.Module:
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 64))
    nf4_quantize_(m, ["0", "2"])
    return m


@pytest.mark.parametrize("dtype", [torch.int8, torch.bool, "float16", None])
def test_non_float_dtype_is_refused_before_any_change(dtype):
    m = _nf4()
    with pytest.raises(TypeError, match="floating-point torch.dtype"):
        nf4_dequantize_(m, dtype)
    assert nf4_modules(m) == ["0", "2"]


def test_float16_dequantizes_as_bitsandbytes():
    from bitsandbytes.functional import dequantize_4bit

    m = _nf4()
    ref = {n: dequantize_4bit(m.get_submodule(n).weight.data, m.get_submodule(n).weight.quant_state).to(torch.float16)
           for n in ("0", "2")}
    assert nf4_dequantize_(m, torch.float16) == ["0", "2"]
    for n, w in ref.items():
        assert torch.equal(m.get_submodule(n).weight, w)
