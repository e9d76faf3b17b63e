"""T5 (and BLIP-2 Flan-T5's language model): FFN neurons are pruned physically in both stacks, for both FFN
spellings (T5 v1.0 ``wi -> wo``, gated T5 v1.1 / Flan-T5 ``wi_0, wi_1 -> wo``); heads are refused, because T5
computes its relative position bias once in block 0 of a stack and passes it to every later block."""
from __future__ import annotations

import copy

import pytest
import torch
from transformers import T5Config, T5ForConditionalGeneration

from medquant.models import transformer_blocks
from medquant.prune import PrunePlan, StructuredPruner, apply_plan, drop_blocks, load_pruned, save_pruned
from medquant.prune.pruner import checked_block

pytestmark = pytest.mark.usefixtures("one_torch_thread")

BLOCKS = ["encoder.block.0", "encoder.block.1", "decoder.block.0", "decoder.block.1"]
SPELLINGS = {"relu": ("wi",), "gated-gelu": ("wi_0", "wi_1")}


def _t5(proj: str = "relu", seed: int = 0) -> T5ForConditionalGeneration:
    torch.manual_seed(seed)
    cfg = T5Config(vocab_size=128, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=4,
                   feed_forward_proj=proj, decoder_start_token_id=0)
    return T5ForConditionalGeneration(cfg).eval()


def _inputs() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return {"input_ids": torch.randint(1, 128, (2, 9), generator=g),
            "decoder_input_ids": torch.randint(1, 128, (2, 6), generator=g)}


def _logits(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits


def _ffn(model, block: str):
    return model.get_submodule(f"{block}.layer.{2 if block.startswith('decoder') else 1}.DenseReluDense")


@torch.no_grad()
def _zeroed(model, removed: dict[str, list[int]]):
    """The unpruned model with the removed neurons' rows of wi (wi_0, wi_1) and columns of wo set to zero."""
    ref = copy.deepcopy(model)
    for block, neurons in removed.items():
        ffn, idx = _ffn(ref, block), torch.tensor(neurons, dtype=torch.long)
        for name in ("wi", "wi_0", "wi_1"):
            if hasattr(ffn, name):
                getattr(ffn, name).weight[idx] = 0
        ffn.wo.weight[:, idx] = 0
    return ref


@pytest.mark.parametrize("proj", list(SPELLINGS))
@pytest.mark.parametrize("importance", ["magnitude", "activation"])
def test_uniform_ffn_pruning_equals_zeroing_and_updates_d_ff(tmp_path, proj, importance):
    model, inputs = _t5(proj), _inputs()
    pruner = StructuredPruner(ffn_ratio=0.25, importance=importance, progress=False)
    plan = pruner.plan(model, calib=[inputs])
    assert sorted(plan.neurons) == sorted(BLOCKS) and all(len(plan.neurons[b]) == 48 for b in BLOCKS)
    removed = {b: plan.removed_neurons(b) for b in BLOCKS}
    ref = _logits(_zeroed(model, removed), inputs)
    assert not torch.allclose(ref, _logits(model, inputs), atol=1e-4)  # the removed neurons mattered
    pruner.apply(model, plan)
    out = _logits(model, inputs)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    for b in BLOCKS:
        ffn = _ffn(model, b)
        assert [tuple(getattr(ffn, n).weight.shape) for n in SPELLINGS[proj]] == [(48, 32)] * len(SPELLINGS[proj])
        assert tuple(ffn.wo.weight.shape) == (32, 48)
    # d_ff follows in the saved config and in the stacks' own copies of it
    assert plan.hf_config_exact is True, plan.config_notes
    assert model.config.d_ff == model.encoder.config.d_ff == model.decoder.config.d_ff == 48
    assert "head_dim" not in model.config.to_dict()
    model.save_pretrained(tmp_path / "hf")
    again = T5ForConditionalGeneration.from_pretrained(tmp_path / "hf").eval()
    assert torch.equal(_logits(again, inputs), out)
    save_pruned(model, tmp_path / "mq", plan=plan)
    assert torch.equal(_logits(load_pruned(tmp_path / "mq").eval(), inputs), out)


@pytest.mark.parametrize("proj", list(SPELLINGS))
def test_per_layer_ffn_pruning_reloads_with_load_pruned(tmp_path, proj):
    model, inputs = _t5(proj, seed=3), _inputs()
    ratios = {"encoder.block.0": 0.5, "encoder.block.1": 0.0, "decoder.block.0": 0.25, "decoder.block.1": 0.75}
    plan = StructuredPruner(ffn_ratio=ratios, progress=False).plan(model)
    removed = {b: plan.removed_neurons(b) for b in BLOCKS}
    assert [len(removed[b]) for b in BLOCKS] == [32, 0, 16, 48]
    ref = _logits(_zeroed(model, removed), inputs)
    apply_plan(model, plan)
    out = _logits(model, inputs)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert plan.hf_config_exact is False and model.config.d_ff == 64  # one d_ff cannot express per-layer sizes
    save_pruned(model, tmp_path, plan=plan)
    again = load_pruned(tmp_path).eval()
    assert [_ffn(again, b).wo.in_features for b in BLOCKS] == [32, 64, 48, 16]
    assert torch.equal(_logits(again, inputs), out)


def test_encoder_and_decoder_pruned_differently_keep_the_config():
    # one d_ff sizes both stacks: uniform within each stack but different between them is not expressible
    model, inputs = _t5("gated-gelu"), _inputs()
    ratios = [0.25, 0.25, 0.5, 0.5]
    plan = StructuredPruner(ffn_ratio=ratios, progress=False).prune(model)
    assert plan.hf_config_exact is False
    assert model.config.d_ff == model.encoder.config.d_ff == model.decoder.config.d_ff == 64
    assert _logits(model, inputs).shape == (2, 6, 128)


@pytest.mark.parametrize("head_ratio", [0.25, [0.25, 0.0, 0.0, 0.0]])
def test_head_pruning_is_refused_with_the_reason(head_ratio):
    model = _t5("gated-gelu")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="relative_attention_bias"):
        StructuredPruner(head_ratio=head_ratio, ffn_ratio=0.25, progress=False).prune(model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_a_plan_removing_t5_heads_is_refused_before_any_change():
    model = _t5()
    plan = StructuredPruner(ffn_ratio=0.25, progress=False).plan(model)
    assert not plan.heads  # no head entry for T5 blocks
    bad = PrunePlan.from_dict(plan.to_dict())
    bad.heads["encoder.block.1"] = [0, 1]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"plan.heads\['encoder.block.1'\].*relative_attention_bias"):
        apply_plan(model, bad)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_checked_blocks_keep_the_ffn_and_drop_the_attention_with_the_reason():
    model = _t5("gated-gelu")
    for raw in transformer_blocks(model):
        b = checked_block(model, raw)
        assert b.attention is None and b.ffn == raw.ffn  # the whole FFN stays prunable (no "stage" of twins)
        assert "relative_attention_bias" in b.unsupported["heads"] and "ffn" not in b.unsupported
        assert ("decoder.block.0.layer.1.EncDecAttention" in b.unsupported["heads"]) == (b.name == "decoder.block.0")
    with pytest.raises(ValueError, match=r"head_ratio asks to prune heads of 4 block\(s\).*encoder.block.0: .*"
                                         r"relative_attention_bias"):
        StructuredPruner(head_ratio=0.5, progress=False).plan(model)


def test_blip2_flan_t5_language_model_ffn_pruning_syncs_text_config(tmp_path):
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.Blip2Config(
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 4,
                       "image_size": 16, "patch_size": 8},
        qformer_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                        "num_attention_heads": 4, "encoder_hidden_size": 32},
        text_config={"model_type": "t5", "vocab_size": 128, "d_model": 32, "d_kv": 8, "d_ff": 64, "num_layers": 2,
                     "num_decoder_layers": 2, "num_heads": 4, "feed_forward_proj": "gated-gelu",
                     "decoder_start_token_id": 0}, num_query_tokens=4)
    model = tf.Blip2ForConditionalGeneration(cfg).eval()
    lm = model.language_model
    names = [b.name for b in transformer_blocks(model)]
    assert names == [f"language_model.{b}" for b in BLOCKS]
    plan = StructuredPruner(ffn_ratio=0.25, progress=False).prune(model)
    assert plan.hf_config_exact is True, plan.config_notes
    assert model.config.text_config.d_ff == lm.config.d_ff == lm.encoder.config.d_ff == 48
    assert lm.decoder.block[1].layer[2].DenseReluDense.wo.in_features == 48


def test_dropping_the_block_holding_the_position_bias_is_refused():
    model = _t5()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="decoder.block.0.layer.0.SelfAttention.relative_attention_bias"):
        drop_blocks(model, ["encoder.block.1", "decoder.block.0"])
    with pytest.raises(ValueError, match="cannot drop encoder.block.0: .*relative_attention_bias"):
        StructuredPruner(ffn_ratio=0.25, drop_blocks=["encoder.block.0"], progress=False).plan(model)
    plan = StructuredPruner(ffn_ratio=0.25, progress=False).plan(model)
    plan.drop_blocks = ["encoder.block.0"]
    with pytest.raises(ValueError, match="cannot drop encoder.block.0"):
        apply_plan(model, plan)  # refused before the neurons are removed
    assert len(model.encoder.block) == len(model.decoder.block) == 2
    assert {k: v.shape for k, v in model.state_dict().items()} == {k: v.shape for k, v in before.items()}
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("stack,depths", [("encoder", (1, 2)), ("decoder", (2, 1))])
def test_dropping_a_later_block_updates_its_stack_depth_in_the_config(tmp_path, stack, depths):
    model, inputs = _t5("gated-gelu"), _inputs()
    skip = getattr(model, stack).block[1].register_forward_hook(  # the reference: the block passes its input on
        lambda m, a, kw, out: ((a[0] if a else kw["hidden_states"]),) + tuple(out[1:]), with_kwargs=True)
    ref = _logits(model, inputs)
    skip.remove()
    plan = StructuredPruner(drop_blocks=[f"{stack}.block.1"], progress=False).prune(model)
    out = _logits(model, inputs)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert (model.config.num_layers, model.config.num_decoder_layers) == depths
    assert getattr(model, stack).config.num_layers == 1
    assert plan.hf_config_exact is True
    model.save_pretrained(tmp_path)
    again = T5ForConditionalGeneration.from_pretrained(tmp_path).eval()
    assert (len(again.encoder.block), len(again.decoder.block)) == depths
    assert torch.equal(_logits(again, inputs), out)
