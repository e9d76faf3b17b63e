"""format="compressed-tensors" of a model inside a wrapper that holds it as its single child: ``torch.compile``'s
``OptimizedModule`` (``_orig_mod``) and ``nn.DataParallel`` / ``DistributedDataParallel`` (``module``).

transformers' ``save_pretrained`` unwraps such a model (``unwrap_model``) and writes the model's own names; the
export wrote every tensor, ``ignore`` entry and target under the wrapper's prefix (``_orig_mod.model.layers...``)
and ``architectures: ["OptimizedModule"]``, a folder from which transformers loads a randomly initialised model.
It now writes the wrapped model, the same folder as the plain model's export."""
from __future__ import annotations

import json
import warnings

import pytest
import torch
from safetensors.torch import load_file

import medquant as mq
from medquant.deploy import export
from medquant.kernels import force_backend
from medquant.testing.zoo import ZOO_BY_NAME

pytest.importorskip("compressed_tensors")

FMT = "compressed-tensors"


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def _model():
    model = ZOO_BY_NAME["llama"].build()
    return mq.quantize_(model, mq.QuantConfig(4, symmetric=True, group_size=32), skip=["lm_head"])


@pytest.mark.parametrize("wrap", [torch.compile, torch.nn.DataParallel], ids=["torch.compile", "DataParallel"])
def test_a_wrapped_model_is_written_as_the_model_itself(tmp_path, wrap):
    from transformers import AutoModelForCausalLM

    model = _model()
    export(model, tmp_path / "plain", format=FMT)
    export(wrap(model), tmp_path / "wrapped", format=FMT)
    plain, wrapped = (load_file(str(tmp_path / d / "model.safetensors")) for d in ("plain", "wrapped"))
    assert sorted(wrapped) == sorted(plain)
    assert all(torch.equal(wrapped[k], plain[k]) for k in plain)
    cfg_plain, cfg_wrapped = (json.loads((tmp_path / d / "config.json").read_text()) for d in ("plain", "wrapped"))
    assert cfg_wrapped == cfg_plain and cfg_wrapped["architectures"] == ["LlamaForCausalLM"]
    loaded = AutoModelForCausalLM.from_pretrained(str(tmp_path / "wrapped")).eval()  # transformers' own loader
    ids = torch.tensor([[2, 5, 9, 11]])
    with torch.no_grad(), force_backend("torch"):
        torch.testing.assert_close(loaded(input_ids=ids).logits, model(input_ids=ids).logits, rtol=1e-5, atol=1e-5)
