"""Data-driven importance of a VLM's vision tower from text-only batches: text never runs the tower. Taylor
importance over ``scope="vision"`` called ``backward`` on a loss with no path to any scored layer and failed with
torch's raw "element 0 of tensors does not require grad"; it now names the layers and the way out, as it does over
``scope="all"``, and leaves the model's ``requires_grad`` flags as they were."""
from __future__ import annotations

import pytest
import torch

from medquant.prune import StructuredPruner
from medquant.testing.zoo import ZOO_BY_NAME


@pytest.mark.parametrize("scope", ["vision", "all"])
def test_taylor_on_text_names_the_vision_layers_and_the_way_out(scope):
    model = ZOO_BY_NAME["llava"].build().float()
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    ids = torch.randint(0, 200, (2, 10), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    with pytest.raises(ValueError, match=r"vision_tower.*gets no gradient.*--calib-images"):
        StructuredPruner(0.5, 0.5, importance="taylor", scope=scope, progress=False).prune(model, calib=[batch])
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert all(p.grad is None for p in model.parameters())
