"""Pruned models save and reload with identical outputs: uniform through save_pretrained / from_pretrained,
per-layer (and configs that cannot express the result) through medquant's own loader."""
from __future__ import annotations

import pytest
import torch

from medquant import QuantConfig, quantize_
from medquant.prune import StructuredPruner, load_pruned, save_pruned
from medquant.testing.zoo import ZOO_BY_NAME, tiny_cnn
from tests.prune._reference import plain_transformer, removed_from_plan, zeroed_copy


def _out(entry, model, inputs):
    with torch.no_grad():
        return entry.output(model, inputs)


@pytest.mark.parametrize("name", ["llama", "qwen2", "gemma3_vlm"])
def test_uniform_from_pretrained(tmp_path, name):
    e = ZOO_BY_NAME[name]
    model = e.build()
    inputs = e.inputs(model)
    # 2 of 4 heads: LLaMA's config validation wants hidden_size % num_attention_heads == 0 (3 heads would not load)
    plan = StructuredPruner(0.5, 0.3, progress=False).prune(model)
    assert plan.hf_config_exact is True
    out = _out(e, model, inputs)
    model.save_pretrained(tmp_path)
    again = type(model).from_pretrained(tmp_path).eval()
    assert type(again) is type(model)
    assert torch.equal(_out(e, again, inputs), out)
    cfg = again.config.get_text_config() if hasattr(again.config, "get_text_config") else again.config
    assert cfg.intermediate_size == 256 - 77 and cfg.head_dim == 32


@pytest.mark.parametrize("name,scope", [("qwen2", None), ("siglip_vision", None), ("llava", "all")])
def test_per_layer_own_loader(tmp_path, name, scope):
    e = ZOO_BY_NAME[name]
    model = e.build()
    inputs = e.inputs(model)
    n = 4 if name == "llava" else 2
    heads = [0.6, 0.0, 0.3, 0.3][:n]
    ffn = [0.1, 0.5, 0.2, 0.0][:n]
    plan = StructuredPruner(heads, ffn, scope=scope, progress=False).prune(model)
    assert plan.hf_config_exact is False
    out = _out(e, model, inputs)
    save_pruned(model, tmp_path, plan=plan)
    again = load_pruned(tmp_path)
    assert torch.equal(_out(e, again, inputs), out)
    # plain from_pretrained cannot rebuild per-layer shapes: it must not silently load them
    with pytest.raises(RuntimeError, match="mismatch"):
        model.save_pretrained(tmp_path / "hf")
        type(model).from_pretrained(tmp_path / "hf")


def test_uniform_but_not_expressible_uses_own_loader(tmp_path):
    e = ZOO_BY_NAME["llama"]
    model = e.build()
    inputs = e.inputs(model)
    plan = StructuredPruner(0.3, 0.3, progress=False).prune(model)  # 3 heads of 32 in a 128-wide model
    assert plan.hf_config_exact is False
    assert model.config.num_attention_heads == 4  # left as it was, not half-updated
    out = _out(e, model, inputs)
    save_pruned(model, tmp_path)
    assert torch.equal(_out(e, load_pruned(tmp_path), inputs), out)


def test_pruned_then_quantized_round_trip(tmp_path):
    e = ZOO_BY_NAME["qwen2"]
    model = e.build()
    inputs = e.inputs(model)
    StructuredPruner({"model.layers.0": 0.5}, [0.3, 0.1], progress=False).prune(model)
    quantize_(model, QuantConfig(4, group_size=32), skip=["@head"])
    out = _out(e, model, inputs)
    save_pruned(model, tmp_path)
    assert torch.equal(_out(e, load_pruned(tmp_path), inputs), out)


def test_cnn_round_trip(tmp_path):
    model = tiny_cnn()
    x = torch.randn(2, 3, 16, 16)
    StructuredPruner(channel_ratio=0.4, progress=False).prune(model, calib=[x])
    out = model(x)
    save_pruned(model, tmp_path)
    again = load_pruned(tmp_path, model=tiny_cnn(seed=1))
    assert torch.equal(again(x), out)
    with pytest.raises(Exception, match="plain nn.Module"):
        load_pruned(tmp_path)


_HEAD_ATTRS = ("num_heads", "num_attention_heads", "num_key_value_heads", "num_key_value_groups", "all_head_size")


@pytest.mark.parametrize("name", ["gemma3_vlm", "bert"])
def test_per_layer_pruned_then_quantized_reload_keeps_head_counts(tmp_path, name):
    # per-layer FFN counts: the config cannot express them; after quantize_ the layers are QuantLinear, and the
    # shape table must still record the blocks so that load_pruned sets the attention modules' head counts
    e = ZOO_BY_NAME[name]
    model = e.build()
    inputs = e.inputs(model)
    plan = StructuredPruner(0.5, [0.1, 0.0], progress=False).prune(model)
    assert plan.hf_config_exact is False
    quantize_(model, QuantConfig(4, group_size=32), skip=["@head"])
    out = _out(e, model, inputs)
    save_pruned(model, tmp_path, plan=plan)
    again = load_pruned(tmp_path)
    attrs = {(n, a): getattr(m, a) for n, m in model.named_modules() for a in _HEAD_ATTRS
             if isinstance(getattr(m, a, None), int)}
    assert attrs
    assert {k: getattr(again.get_submodule(k[0]), k[1]) for k in attrs} == attrs
    # hand count: 4 query heads, half removed (gemma3_vlm: 2 key/value heads, one query head left per group)
    key = {"gemma3_vlm": ("model.language_model.layers.0.self_attn", "num_key_value_groups"),
           "bert": ("encoder.layer.0.attention.self", "all_head_size")}[name]
    assert attrs[key] == {"num_key_value_groups": 1, "all_head_size": 2 * 32}[key[1]]
    assert torch.equal(_out(e, again, inputs), out)


def test_plain_transformer_round_trip_restores_head_counts(tmp_path):
    model = plain_transformer()
    x = torch.randn(2, 5, 64)
    plan = StructuredPruner(0.25, 0.25, progress=False).prune(model)
    with torch.no_grad():
        out = model(x)
    save_pruned(model, tmp_path, plan=plan)
    again = load_pruned(tmp_path, model=plain_transformer(seed=1))
    assert [blk.self_attn.num_heads for blk in again.layers] == [3, 3]  # hand count: 4 - floor(0.25*4 + 0.5)
    assert [blk.mlp.fc1.out_features for blk in again.layers] == [96, 96]
    with torch.no_grad():
        assert torch.equal(again(x), out)


@pytest.mark.parametrize("kv_heads,gqa,want", [(2, "query", (4, 2)), (2, "group", (4, 1)), (None, "query", (4, 4))])
def test_block_shared_across_layers_round_trip_prunes_it_once(tmp_path, kv_heads, gqa, want):
    # one block object listed as layers.0 and layers.1: the shape table records it under both names, and the
    # reload must shrink it once (replaying the removal a second time would index the already pruned weights)
    def build(seed):
        return plain_transformer(seed=seed, heads=8, kv_heads=kv_heads, shared=True)

    model = build(0)
    x = torch.randn(2, 5, 64, generator=torch.Generator().manual_seed(0))
    pruner = StructuredPruner(0.5, 0.25, gqa=gqa, progress=False)
    plan = pruner.plan(model)
    removed = removed_from_plan(plan)
    assert removed["layers.0"] == removed["layers.1"]
    with torch.no_grad():  # independent reference: the removed heads / neurons zeroed once in the shared block
        ref = zeroed_copy(model, {"layers.0": removed["layers.0"]}, 8)(x)
    pruner.apply(model, plan)
    blk = model.layers[0]
    # hand count: 8 heads; query mode removes round(0.5 * 4) = 2 of each group of 4, group mode 1 of 2 groups,
    # and without grouped-query attention 4 of the 8 (key/value) heads
    assert (blk.self_attn.num_heads, blk.self_attn.num_key_value_heads) == want
    assert blk.mlp.fc1.out_features == 128 - 32
    with torch.no_grad():
        out = model(x)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    save_pruned(model, tmp_path, plan=plan)
    again = load_pruned(tmp_path, model=build(1))
    assert again.layers[0] is again.layers[1]
    a = again.layers[0].self_attn
    assert (a.num_heads, a.num_key_value_heads) == want
    assert (a.q_proj.out_features, a.k_proj.out_features) == (want[0] * 8, want[1] * 8)
    assert again.layers[0].mlp.fc1.out_features == 128 - 32
    with torch.no_grad():
        assert torch.equal(again(x), out)


def test_shared_block_with_two_shapes_in_an_edited_table_is_refused(tmp_path):
    import json
    import shutil
    import warnings

    from medquant.io import MANIFEST_NAME, META_NAME, CheckpointError, CheckpointWarning, atomic

    model = plain_transformer(heads=8, kv_heads=2, shared=True)
    StructuredPruner(0.5, 0.0, progress=False).prune(model)  # 4 query heads (2 per group), 2 key/value heads
    save_pruned(model, tmp_path / "a")
    shutil.copytree(atomic.resolve(tmp_path / "a"), tmp_path / "b")
    (tmp_path / "b" / MANIFEST_NAME).unlink()  # an older save, without a manifest, so the edit is not a checksum error
    meta = json.loads((tmp_path / "b" / META_NAME).read_text())
    meta["extras"]["prune"]["blocks"]["layers.1"]["attention"]["n_heads"] = 6  # 3 per group: fits the unpruned layer
    (tmp_path / "b" / META_NAME).write_text(json.dumps(meta))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CheckpointWarning)
        with pytest.raises(CheckpointError, match=r"layers.1: its attention is the module of layers.0 .*shared"):
            load_pruned(tmp_path / "b", model=plain_transformer(seed=1, heads=8, kv_heads=2, shared=True))
