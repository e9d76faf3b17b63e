"""A compressed-tensors export of a model whose class comes from its folder's own code (``config.json``
``auto_map``: CheXagent, RadFM, MiniCPM-V...): the export carries the code files and the ``auto_map``, as
transformers' ``save_pretrained`` does, so ``from_pretrained(export, trust_remote_code=True)`` - with the source
folder gone - rebuilds it with the logits medquant computes. (It wrote only the configuration code: transformers
could not find the model class.) Re-exporting over the folder with ``overwrite=True`` still recognises it."""
from __future__ import annotations

import json
import shutil
import warnings

import pytest
import torch

import medquant as mq
from medquant.deploy import export
from medquant.kernels import force_backend
from tests.cli.test_cli_remote_code import CODE_FILES, tinymed_folder

pytest.importorskip("compressed_tensors")
IDS = torch.tensor([[101, 2053, 11325, 1997, 2023, 102]])


def test_the_export_carries_the_code_and_reloads_without_the_source(tmp_path):
    from transformers import AutoModelForCausalLM

    src = tinymed_folder(tmp_path / "src")
    model = AutoModelForCausalLM.from_pretrained(src, trust_remote_code=True).eval()
    mq.quantize_(model, mq.QuantConfig(4, symmetric=True, group_size=32), skip=["@head"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        export(model, tmp_path / "ct", format="compressed-tensors")
    out = tmp_path / "ct"
    assert all((out / f).is_file() for f in CODE_FILES)
    auto_map = json.loads((out / "config.json").read_text())["auto_map"]
    assert auto_map["AutoModelForCausalLM"].endswith("modeling_tinymed.TinyMedForCausalLM")
    shutil.rmtree(src)
    loaded = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    assert type(loaded).__name__ == "TinyMedForCausalLM"
    with torch.no_grad(), force_backend("torch"):
        torch.testing.assert_close(loaded(input_ids=IDS).logits, model(input_ids=IDS).logits, rtol=1e-5,
                                   atol=1e-5)
    with warnings.catch_warnings():  # the folder, code files included, is recognised as an earlier export
        warnings.simplefilter("ignore")
        export(model, out, format="compressed-tensors", overwrite=True)
    assert all((out / f).is_file() for f in CODE_FILES)
