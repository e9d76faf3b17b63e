"""Review (s0710b): QLoRAAdapter.load of a folder whose PEFT files are missing names the missing file.

``save`` writes ``medquant_qlora.json`` next to PEFT's ``adapter_config.json`` and ``adapter_model.safetensors``.
With one of PEFT's files gone, PEFT took the folder path for a Hugging Face Hub repo id and raised
``HFValidationError: Repo id must be in the form 'repo_name' ...`` (or tried the network), which says nothing of
the missing file. The load now raises ``FileNotFoundError`` naming it, before the model is changed.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

from medquant.qlora import QLoRAAdapter
from medquant.testing.zoo import ZOO_BY_NAME


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("adapter")
    QLoRAAdapter(ZOO_BY_NAME["llama"].build(), r=4).save(d)
    return d


@pytest.mark.parametrize("gone", ["adapter_model.safetensors", "adapter_config.json"])
def test_load_names_the_missing_peft_file(saved, tmp_path, gone):
    import shutil

    d = tmp_path / "copy"
    shutil.copytree(saved, d)
    (d / gone).unlink()
    torch.manual_seed(0)
    model = ZOO_BY_NAME["llama"].build()
    before = {n: type(m) for n, m in model.named_modules()}
    with pytest.raises(FileNotFoundError, match=gone.replace(".", r"\.")):
        QLoRAAdapter.load(model, d)
    assert {n: type(m) for n, m in model.named_modules()} == before  # nothing quantized or wrapped
    assert all(isinstance(m, nn.Linear) for n, m in model.named_modules() if n.endswith("q_proj"))
