"""AWQ searches scales for the blocks in its ``scope`` (default: the language model of a VLM); every other Linear
is quantized by plain round-to-nearest. On a VLM that left the vision tower rounded without scales, silently: a
``UserWarning`` now names the blocks quantized without a search and the two ways out (``scope="all"`` with batches
that run them, or ``skip``). A text-only model, ``scope="all"`` and a skipped tower get no such warning."""
from __future__ import annotations

import copy
import warnings

import pytest
import torch

from medquant import QuantConfig
from medquant.calibrate.awq import awq_quantize_, awq_quantize_sequential
from medquant.models import transformer_blocks
from medquant.quant.api import quantized_modules
from medquant.testing.zoo import ZOO_BY_NAME

CFG = QuantConfig(4, group_size=32)


def _llava():
    entry = ZOO_BY_NAME["llava"]
    model = entry.build().float().eval()
    return model, [entry.inputs(model)]


def _messages(record) -> list[str]:
    return [str(w.message) for w in record if "without a scale search" in str(w.message)]


@pytest.mark.parametrize("fn", [awq_quantize_, awq_quantize_sequential], ids=["whole", "sequential"])
def test_a_vlm_quantized_with_the_default_scope_names_the_unsearched_tower(fn):
    model, batches = _llava()
    tower = [b.name for b in transformer_blocks(model, "vision")]
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        fn(model, CFG, batches, progress=False)
    msgs = _messages(record)
    assert len(msgs) == 1, msgs
    assert tower[0] in msgs[0] and f"{len(tower)} block(s)" in msgs[0]
    assert "scope='all'" in msgs[0] and "skip" in msgs[0]
    # what the warning says is true: the tower's linears are quantized
    assert any(n.startswith(tower[0] + ".") for n in quantized_modules(model))


@pytest.mark.parametrize("kwargs", [{"scope": "all"}, {"skip": ["@head", "@vision"]}], ids=["all", "skipped"])
def test_no_warning_when_every_quantized_block_was_searched_or_the_tower_is_skipped(kwargs):
    model, batches = _llava()
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        awq_quantize_(model, CFG, batches, progress=False, **kwargs)
    assert _messages(record) == []


def test_a_text_only_model_gets_no_warning():
    entry = ZOO_BY_NAME["llama"]
    model = entry.build().float().eval()
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        awq_quantize_(copy.deepcopy(model), CFG, [entry.inputs(model)], progress=False)
    assert _messages(record) == []
    assert torch.isfinite(entry.output(model, entry.inputs(model))).all()
