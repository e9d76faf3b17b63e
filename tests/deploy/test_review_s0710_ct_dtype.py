"""format="compressed-tensors": the ``dtype`` the written ``config.json`` records is the model's own, as
``save_pretrained`` records it (``config.dtype = model.dtype``), not a value left over in ``model.config``.

transformers (``dtype="auto"``, its default) and vLLM load the folder in that dtype, and the export's note on
scales rounded on load is about it: a stale or missing config dtype made the report claim exact weights while
transformers loaded rounded ones (or the reverse)."""
from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch

import medquant as mq
from medquant.deploy import export
from medquant.quant.api import quantized_modules
from medquant.testing.zoo import ZOO_BY_NAME

pytest.importorskip("compressed_tensors")

FMT = "compressed-tensors"


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def _save_pretrained_dtype(model, folder) -> str:
    """The dtype transformers' own ``save_pretrained`` records for the float ``model`` (the reference)."""
    copy.deepcopy(model).save_pretrained(str(folder))
    return json.loads((folder / "config.json").read_text())["dtype"]


def _loaded(folder):
    from transformers import LlamaForCausalLM

    loaded = LlamaForCausalLM.from_pretrained(str(folder)).eval()  # dtype "auto"
    with torch.no_grad():  # a symmetric export is decompressed at the first forward
        loaded(input_ids=torch.tensor([[2, 5, 9]]))
    return loaded


# model dtype, the stale dtype its config holds (None: none, as a model built from a config), scale dtype
CASES = [
    (torch.bfloat16, None, "float16"),  # model.to(bfloat16) of a model built from a config
    (torch.bfloat16, torch.float32, "float16"),  # from_pretrained in float32, then .to(bfloat16)
    (torch.float32, torch.bfloat16, "float16"),  # from_pretrained in bfloat16, then .float()
]


@pytest.mark.parametrize("dtype,stale,scale_dtype", CASES, ids=["bf16-no-config-dtype", "bf16-stale-fp32",
                                                                "fp32-stale-bf16"])
def test_config_dtype_is_the_models_and_the_rounding_note_matches_the_load(tmp_path, dtype, stale, scale_dtype):
    model = ZOO_BY_NAME["llama"].build().to(dtype)
    model.config.dtype = stale
    expected = _save_pretrained_dtype(model, tmp_path / "ref")
    assert expected == str(dtype).removeprefix("torch.")
    mq.quantize_(model, mq.QuantConfig(4, symmetric=True, group_size=32, scale_dtype=scale_dtype),
                 skip=["lm_head"])
    report = export(model, tmp_path / "ct", format=FMT)
    assert json.loads((tmp_path / "ct" / "config.json").read_text()).get("dtype") == expected
    loaded = _loaded(tmp_path / "ct")
    assert loaded.dtype == dtype
    sd = loaded.state_dict()
    exact = all(torch.equal(sd[f"{n}.weight"], layer.dequantized_weight(dtype))
                for n, layer in quantized_modules(model).items())
    noted = any("rounded" in n for n in report.notes)
    # float16 scales are not all bfloat16 values: rounded on a bfloat16 load (noted), exact in float32 (no note)
    assert noted is (dtype == torch.bfloat16)
    assert exact is not noted
