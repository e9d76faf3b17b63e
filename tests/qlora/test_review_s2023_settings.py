"""Review (s2023) of QLoRAAdapter's LoRA settings: a bool or a string is refused, NumPy numbers are the numbers."""
from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch

from medquant.qlora import QLoRAAdapter
from medquant.testing.zoo import ZOO_BY_NAME


@pytest.mark.parametrize("kw", [{"lora_alpha": True}, {"lora_alpha": "16"}, {"lora_dropout": "0.1"},
                                {"lora_dropout": False}])
def test_a_bool_or_string_lora_setting_is_refused_before_the_model_changes(kw):
    model = ZOO_BY_NAME["llama"].build()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(TypeError, match=next(iter(kw))):
        QLoRAAdapter(model, **kw)
    after = model.state_dict()
    assert list(after) == list(before) and all(torch.equal(after[k], before[k]) for k in before)


def test_numpy_settings_are_the_numbers_they_equal():
    entry = ZOO_BY_NAME["llama"]
    ad = QLoRAAdapter(entry.build(), r=np.int64(8), lora_alpha=np.float32(8.0), lora_dropout=np.float64(0.0))
    assert ad.settings["r"] == 8 and type(ad.settings["r"]) is int
    assert ad.scaling == pytest.approx(8.0 / math.sqrt(8))  # rsLoRA: alpha / sqrt(r), by hand
    lora = [m for m in ad.model.modules() if hasattr(m, "scaling") and isinstance(m.scaling, dict)]
    assert lora and all(m.scaling["default"] == pytest.approx(8.0 / math.sqrt(8)) for m in lora)
