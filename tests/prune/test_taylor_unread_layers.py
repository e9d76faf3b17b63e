"""Taylor importance of a scored linear that runs but gets no gradient.

LLaVA 1.5 takes its image features from ``hidden_states[vision_feature_layer = -2]``: the vision tower's last layer
runs, but nothing reads its output, so its gradient is None. Its first-order Taylor score is then exactly 0 (the
loss does not change whatever the layer computes); Taylor pruning over ``scope="all"`` used to refuse the model.
It now scores that layer 0 and warns, after checking that the loss really does not read it: a model that detaches
a layer's output (so the loss depends on it but no gradient arrives) is refused, since 0 would be wrong there.
"""
from __future__ import annotations

import copy
import re
import warnings

import pytest
import torch

from medquant.models import transformer_blocks
from medquant.prune import StructuredPruner
from medquant.prune.importance import block_scores
from medquant.testing.zoo import ZOO_BY_NAME
from tests.prune.test_zoo import _zeroed


def _llava_second_to_last():
    entry = ZOO_BY_NAME["llava"]
    model = entry.build().float().eval()
    model.config.vision_feature_layer = -2
    return model, [entry.inputs_fn(model, torch.Generator().manual_seed(s)) for s in range(2)]


def _vision_blocks(model):
    return transformer_blocks(model, "vision")


def test_the_unread_last_vision_layer_scores_zero_and_is_named_in_a_warning():
    model, batches = _llava_second_to_last()
    blocks = transformer_blocks(model, "all")
    last = _vision_blocks(model)[-1].name
    with pytest.warns(UserWarning, match=re.escape(last) + r"\..*does not read its output.*importance is 0"):
        scores = block_scores(model, blocks, "taylor", batches, progress=False)
    assert torch.count_nonzero(scores[last]["heads"]) == 0 and torch.count_nonzero(scores[last]["neurons"]) == 0
    for b in blocks:  # every other block is read by the loss: its Taylor scores are the gradient's, not 0
        if b.name != last:
            assert scores[b.name]["heads"].sum() > 0 and scores[b.name]["neurons"].sum() > 0, b.name


def test_taylor_pruning_of_the_whole_vlm_runs_and_matches_the_model_with_the_removals_zeroed():
    """Pruning by Taylor scores runs over the whole model; the unread layer loses heads / neurons, and the pruned
    model computes what the original does with the plan's structures zeroed. Independently of medquant's check,
    scrambling the unread layer's weights in the original leaves its logits bit-identical."""
    model, batches = _llava_second_to_last()
    last = _vision_blocks(model)[-1].name
    original = copy.deepcopy(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plan = StructuredPruner(0.5, 0.5, importance="taylor", scope="all", progress=False).prune(model, batches)
    assert plan.heads.get(last) and plan.neurons.get(last)
    with torch.no_grad():
        out = model(**batches[0]).logits
        ref = _zeroed(original, plan)(**batches[0]).logits
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5 * max(1.0, float(ref.abs().max())))
        scrambled = copy.deepcopy(original)
        for p in scrambled.get_submodule(last).parameters():
            torch.nn.init.normal_(p, std=3.0)
        assert torch.equal(scrambled(**batches[0]).logits, original(**batches[0]).logits)


def test_a_layer_the_model_detaches_is_refused_not_scored_zero():
    """The loss depends on block 0's output, but a forward hook detaches it: no gradient arrives although the loss
    reads it, so a 0 score would be wrong."""
    entry = ZOO_BY_NAME["llama"]
    model = entry.build().float().eval()

    def detach(_m, _args, out):
        return (out[0].detach(), *out[1:]) if isinstance(out, tuple) else out.detach()

    model.model.layers[0].register_forward_hook(detach)
    batches = [entry.inputs(model)]
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match=r"model\.layers\.0\..*depends on its output.*detaches it.*'activation'"):
        block_scores(model, transformer_blocks(model), "taylor", batches, progress=False)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert all(p.grad is None for p in model.parameters())
