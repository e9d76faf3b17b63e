"""Review of GPTQ's argument checks: what is refused, and how."""
from __future__ import annotations

import pytest
import torch

from medquant import QuantConfig
from medquant.calibrate.gptq import gptq_quantize_, gptq_quantize_sequential


@pytest.mark.parametrize("fn", [gptq_quantize_, gptq_quantize_sequential])
def test_a_model_that_is_not_a_module_is_refused_with_a_type_error(fn):
    batch = {"input_ids": torch.zeros(1, 4, dtype=torch.long)}
    with pytest.raises(TypeError, match=rf"{fn.__name__} expects an nn.Module, got str"):
        fn("model", QuantConfig(4), [batch])
