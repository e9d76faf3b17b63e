"""A block bound under several names of a Hugging Face model (``model.model.layers[1] = model.model.layers[0]``)
reloads through load_pruned with the pruned model's outputs: the weights file holds the block once, under its first
name, and the model rebuilt from the saved config has a block of its own under each name, so the table records the
sharing (``shared_blocks``) and the load binds the names again (the load failed with missing tensors)."""
from __future__ import annotations

import json
import shutil
import warnings

import pytest
import torch

from medquant import QuantConfig, quantize_
from medquant.io import MANIFEST_NAME, META_NAME, CheckpointError, CheckpointWarning, atomic
from medquant.prune import StructuredPruner, load_pruned, save_pruned
from medquant.testing.zoo import text_kwargs
from tests.prune._reference import plain_transformer, removed_from_plan, zeroed_copy


def _qwen2(layers: int, seed: int = 0):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)  # 4 query heads in 2 key/value groups, head_dim 32, 256 FFN neurons
    return Qwen2ForCausalLM(Qwen2Config(**text_kwargs(num_key_value_heads=2, num_hidden_layers=layers))).eval()


def _ids(model):
    return torch.randint(0, model.config.vocab_size, (2, 7), generator=torch.Generator().manual_seed(0))


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("gqa,want", [("query", (2, 2)), ("group", (2, 1))])
def test_hf_block_shared_under_two_names_reloads_exactly(tmp_path, gqa, want):
    model = _qwen2(2)
    model.model.layers[1] = model.model.layers[0]
    ids = _ids(model)
    pruner = StructuredPruner(0.5, 0.25, gqa=gqa, progress=False)
    plan = pruner.plan(model)
    removed = removed_from_plan(plan)
    assert removed["model.layers.0"] == removed["model.layers.1"]
    ref = _logits(zeroed_copy(model, {"model.layers.0": removed["model.layers.0"]}, 32), ids)  # independent
    pruner.apply(model, plan)
    a = model.model.layers[0].self_attn
    # hand count: query mode removes 1 of each group of 2 query heads, group mode 1 of the 2 groups
    assert (a.q_proj.out_features // 32, a.k_proj.out_features // 32) == want
    out = _logits(model, ids)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    save_pruned(model, tmp_path, plan=plan)
    meta = json.loads((atomic.resolve(tmp_path) / META_NAME).read_text())
    assert meta["extras"]["prune"]["shared_blocks"] == {"model.layers.1": "model.layers.0"}
    again = load_pruned(tmp_path).eval()
    assert again.model.layers[1] is again.model.layers[0]
    assert torch.equal(_logits(again, ids), out)


@pytest.mark.parametrize("quantized", [False, True])
def test_hf_shared_block_beside_a_differently_pruned_one(tmp_path, quantized):
    # layers 0 and 2 are one block, layer 1 is pruned otherwise: the config cannot express it (own loader only)
    model = _qwen2(3)
    model.model.layers[2] = model.model.layers[0]
    ids = _ids(model)
    plan = StructuredPruner([0.5, 0.0, 0.5], [0.25, 0.5, 0.25], progress=False).prune(model)
    assert plan.hf_config_exact is False
    if quantized:
        quantize_(model, QuantConfig(bits=8))
    out = _logits(model, ids)
    save_pruned(model, tmp_path, plan=plan)
    again = load_pruned(tmp_path).eval()
    assert again.model.layers[2] is again.model.layers[0] and again.model.layers[1] is not again.model.layers[0]
    assert [blk.self_attn.q_proj.out_features for blk in again.model.layers] == [64, 128, 64]
    assert torch.equal(_logits(again, ids), out)


def test_plain_given_model_gets_the_saved_sharing(tmp_path):
    model = plain_transformer(heads=8, kv_heads=2, shared=True)
    x = torch.randn(2, 5, 64, generator=torch.Generator().manual_seed(0))
    StructuredPruner(0.5, 0.25, progress=False).prune(model)
    with torch.no_grad():
        out = model(x)
    save_pruned(model, tmp_path)
    again = load_pruned(tmp_path, model=plain_transformer(seed=1, heads=8, kv_heads=2, shared=False))
    assert again.layers[0] is again.layers[1]
    with torch.no_grad():
        assert torch.equal(again(x), out)


def _edited(tmp_path, edit):
    """A copy of the save at ``tmp_path / "a"`` with its shape table edited (no manifest: an older save)."""
    shutil.copytree(atomic.resolve(tmp_path / "a"), tmp_path / "b")
    (tmp_path / "b" / MANIFEST_NAME).unlink()
    meta = json.loads((tmp_path / "b" / META_NAME).read_text())
    edit(meta["extras"]["prune"])
    if "shared_blocks" not in meta["extras"]["prune"]:  # a save from before either record had neither
        meta.pop("shared_blocks", None)
    (tmp_path / "b" / META_NAME).write_text(json.dumps(meta))
    return tmp_path / "b"


@pytest.mark.parametrize("edit,match", [
    (lambda t: t.pop("shared_blocks"), "missing"),  # a table from before shared_blocks: today's error, unchanged
    (lambda t: t.update(shared_blocks={"model.layers.1": "model.layers.7"}), r"'model.layers.7' is not a block"),
    (lambda t: t.update(shared_blocks={"model.layers.1": 0}), "must be the first name of the block"),
    (lambda t: t.update(shared_blocks=["model.layers.1"]), r"shared_blocks must be an object"),
])
def test_edited_or_old_shared_blocks_entry(tmp_path, edit, match):
    model = _qwen2(2)
    model.model.layers[1] = model.model.layers[0]
    StructuredPruner(0.5, 0.0, progress=False).prune(model)
    save_pruned(model, tmp_path / "a")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CheckpointWarning)
        with pytest.raises(CheckpointError, match=match):
            load_pruned(_edited(tmp_path, edit))
