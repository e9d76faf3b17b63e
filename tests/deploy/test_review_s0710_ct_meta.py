"""format="compressed-tensors" of a model some of whose tensors hold no data (on the ``meta`` device: a skeleton built
with ``init_empty_weights`` / ``torch.device("meta")``, or weights offloaded by a ``device_map``). The export
crashed with torch's ``NotImplementedError: Cannot copy out of meta tensor`` from inside its tensor collection; it
now refuses with an ``ExportError`` naming the tensors and what to do, before anything is written."""
from __future__ import annotations

import warnings

import pytest
import torch

import medquant as mq
from medquant.deploy import ExportError, export
from medquant.testing.zoo import ZOO_BY_NAME

pytest.importorskip("compressed_tensors")


@pytest.mark.parametrize("where", ["model.norm.weight", "model.layers.0.mlp.up_proj"],
                         ids=["float-parameter", "quantized-layer"])
def test_tensors_without_data_are_refused_naming_them(tmp_path, where):
    model = ZOO_BY_NAME["llama"].build()
    mq.quantize_(model, mq.QuantConfig(4, symmetric=True, group_size=32), skip=["lm_head"])
    if where.endswith(".weight"):  # a float parameter without data
        norm = model.get_submodule(where.rpartition(".")[0])
        norm.weight = torch.nn.Parameter(torch.empty(norm.weight.shape, device="meta"))
    else:  # a quantized layer's storage without data
        model.get_submodule(where).to("meta")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ExportError, match=rf"meta.*{where.replace('.', chr(92) + '.')}"):
            export(model, tmp_path / "ct", format="compressed-tensors")
    assert not list(tmp_path.iterdir())
