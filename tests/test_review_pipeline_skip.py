"""QuantStage.skip given as any iterable of patterns (a generator too) leaves the same layers in float as a tuple."""
from __future__ import annotations

import pytest

from medquant import QuantConfig
from medquant.pipeline import QuantStage, compress
from medquant.quant.api import quantized_modules
from medquant.testing.zoo import ZOO_BY_NAME


@pytest.mark.parametrize("method", ["rtn", "awq"])
def test_skip_from_a_generator_skips_like_a_tuple(method):
    e = ZOO_BY_NAME["llama"]
    ref, gen = e.build(), e.build()
    inputs = e.inputs(ref)
    compress(ref, quantize=QuantStage(QuantConfig(4, group_size=32), method=method, skip=("@head",)),
             calib=[inputs], progress=False)
    compress(gen, quantize=QuantStage(QuantConfig(4, group_size=32), method=method, skip=(p for p in ["@head"])),
             calib=[inputs], progress=False)
    assert "lm_head" not in quantized_modules(ref)
    assert sorted(quantized_modules(gen)) == sorted(quantized_modules(ref))


def test_skip_holding_a_non_string_is_refused():
    with pytest.raises(TypeError, match="QuantStage.skip"):
        QuantStage(QuantConfig(4), skip=["@head", 3])
