"""Fourth review of structured pruning: behaviour checked against independent references (exact decimal
arithmetic, a head_mask-style zeroed model)."""
from __future__ import annotations

import copy
import math
import warnings
from fractions import Fraction

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from medquant.prune import StructuredPruner
from medquant.prune.ratios import n_to_remove
from medquant.testing.zoo import text_kwargs


def _half_up(ratio: str, n: int) -> int:
    """The documented count, ``floor(r*n + 0.5)``, in exact decimal arithmetic on the ratio as written."""
    return math.floor(Fraction(ratio) * n + Fraction(1, 2))


@pytest.mark.parametrize(("ratio", "n"), [("0.29", 50), ("0.58", 25), ("0.7", 45), ("0.35", 90), ("0.145", 100),
                                          ("0.3", 10), ("0.25", 6), ("0.5", 3), ("0.1", 256)])
def test_ratio_count_rounds_half_up_as_written(ratio, n):
    # 0.29 * 50 is 14.5 in decimal, but the binary float product is 14.499999999999998: floor(. + 0.5) gave 14
    assert n_to_remove(float(ratio), n) == _half_up(ratio, n)


def test_ffn_ratio_removes_the_documented_count_and_stays_exact():
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**text_kwargs(intermediate_size=50))).eval()
    ids = torch.randint(3, 250, (2, 9), generator=torch.Generator().manual_seed(0))
    pruner = StructuredPruner(0.0, 0.29, progress=False)
    plan = pruner.plan(model)
    want = 50 - _half_up("0.29", 50)  # 35 kept
    assert {len(v) for v in plan.neurons.values()} == {want}
    ref = copy.deepcopy(model)  # head_mask-style reference: the removed neurons zeroed at down_proj's input
    for i, layer in enumerate(ref.model.layers):
        gone = plan.removed_neurons(f"model.layers.{i}")

        def pre(mod, args, gone=gone):
            x = args[0].clone()
            x[..., gone] = 0
            return (x,)
        layer.mlp.down_proj.register_forward_pre_hook(pre)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pruner.apply(model, plan)
    assert model.config.intermediate_size == want and plan.hf_config_exact
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, ref(input_ids=ids).logits, rtol=1e-4, atol=1e-5)


def test_plain_transformer_with_a_dropped_block_round_trips(tmp_path):
    from medquant.io import CheckpointError
    from medquant.prune import load_pruned, save_pruned
    from tests.prune._reference import plain_transformer

    model = plain_transformer(head_norm=(0,))  # block 0 differs from block 1 (a norm over all heads)
    x = torch.randn(2, 5, 64, generator=torch.Generator().manual_seed(0))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plan = StructuredPruner(0.5, 0.25, drop_blocks=["layers.0"], progress=False).prune(model)
    assert len(model.layers) == 1 and model.layers[0].self_attn.num_heads == 2
    with torch.no_grad():
        want = model(x)
    save_pruned(model, tmp_path / "p", plan=plan)
    loaded = load_pruned(tmp_path / "p", model=plain_transformer(seed=1, head_norm=(0,)))
    assert len(loaded.layers) == 1 and loaded.layers[0].self_attn.num_heads == 2
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), want, rtol=0, atol=0)
    save_pruned(model, tmp_path / "q")  # no plan: which blocks were dropped is not known
    with pytest.raises(CheckpointError, match=r"1 block\(s\) in layers, the given Net has 2.*drop_blocks"):
        load_pruned(tmp_path / "q", model=plain_transformer(seed=1, head_norm=(0,)))


def _run_skipped(model, names, fn):
    """The reference for dropping the blocks ``names``: ``fn(model)`` without gradients while each of them passes
    its input through (a forward hook returns the block's input as its output)."""
    def skip(mod, args, kwargs, out):
        x = args[0] if args else kwargs["hidden_states"]
        return x if isinstance(out, torch.Tensor) else (x, *out[1:])
    hooks = [model.get_submodule(n).register_forward_hook(skip, with_kwargs=True) for n in names]
    try:
        with torch.no_grad():
            return fn(model)
    finally:
        for h in hooks:
            h.remove()


def _output_with_block_skipped(model, entry, inputs, name):
    """The reference for dropping block ``name``: the model's output with that block passing its input through."""
    return _run_skipped(model, [name], lambda m: entry.output(m, inputs))


def _windowed_qwen2_5_vl():
    """The zoo's Qwen2.5-VL with windows of one merged patch (windowed != full attention), and its zoo entry."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    from medquant.testing.zoo import ZOO_BY_NAME

    entry = ZOO_BY_NAME["qwen2_5_vl"]
    cfg = copy.deepcopy(entry.build().config)
    cfg.vision_config.window_size = 16
    torch.manual_seed(0)
    return entry, Qwen2_5_VLForConditionalGeneration(cfg).float().eval()


@pytest.mark.parametrize(("feature_layer", "drop"), [(-2, 2), (-4, 1), ([-1, -3], 1), (-2, 0)])
def test_dropping_vision_blocks_keeps_the_hidden_state_llava_reads(tmp_path, feature_layer, drop):
    """LLaVA reads ``hidden_states[vision_feature_layer]`` of its vision tower; dropping a block must equal skipping
    it (its output replaced by its input), so the index must follow the blocks (LLaVA-1.5 reads -2: its last CLIP
    block is unused, and dropping it read the block before instead)."""
    from transformers import LlavaForConditionalGeneration

    from medquant.prune import load_pruned, save_pruned
    from medquant.testing.zoo import ZOO_BY_NAME

    entry = ZOO_BY_NAME["llava"]
    cfg = copy.deepcopy(entry.build().config)
    cfg.vision_feature_layer, cfg.vision_config.num_hidden_layers = feature_layer, 3
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(cfg).float().eval()
    inputs = entry.inputs(model)
    name = f"model.vision_tower.encoder.layers.{drop}"
    ref = _output_with_block_skipped(model, entry, inputs, name)
    StructuredPruner(drop_blocks=[name], scope="vision", progress=False).prune(model)
    with torch.no_grad():
        out = entry.output(model, inputs)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    save_pruned(model, tmp_path / "p")
    with torch.no_grad():
        torch.testing.assert_close(entry.output(load_pruned(tmp_path / "p"), inputs), out, rtol=0, atol=0)


def test_dropping_a_qwen2_5_vl_vision_block_keeps_the_full_attention_blocks():
    """Qwen2.5-VL's vision blocks use windowed attention except those in ``fullatt_block_indexes``; dropping block 0
    must equal skipping it, so block 1 (full attention) must stay full attention as block 0 of the shorter list."""
    entry, model = _windowed_qwen2_5_vl()
    inputs = entry.inputs(model)
    name = "model.visual.blocks.0"
    ref = _output_with_block_skipped(model, entry, inputs, name)
    StructuredPruner(drop_blocks=[name], scope="vision", progress=False).prune(model)
    with torch.no_grad():
        torch.testing.assert_close(entry.output(model, inputs), ref, rtol=1e-5, atol=1e-5)
    assert model.config.vision_config.fullatt_block_indexes == [0]
