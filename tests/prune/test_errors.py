"""Impossible pruning requests are refused with messages that say what is wrong."""
from __future__ import annotations

import pytest
import torch

from medquant import QuantConfig, quantize_
from medquant.models import transformer_blocks
from medquant.prune import StructuredPruner
from medquant.prune.surgery import prune_attention, prune_ffn
from medquant.testing.zoo import ZOO_BY_NAME, tiny_cnn
from tests.prune._reference import plain_transformer, removed_from_plan, zeroed_copy


@pytest.mark.parametrize("bad", [1.0, -0.1, float("nan"), "0.3"])
def test_bad_ratio(bad):
    with pytest.raises((ValueError, TypeError), match=r"head_ratio must be a number in \[0, 1\)"):
        StructuredPruner(bad, 0.0)


def test_ratio_leaving_nothing():
    model = ZOO_BY_NAME["llama"].build()
    with pytest.raises(ValueError, match="would remove all 4 attention heads"):
        StructuredPruner(0.9, 0.0, progress=False).plan(model)
    with pytest.raises(ValueError, match="would remove all 256 FFN neurons"):
        StructuredPruner(0.0, 0.999, progress=False).plan(model)
    gqa = ZOO_BY_NAME["qwen2"].build()
    with pytest.raises(ValueError, match="every key/value group"):
        StructuredPruner(0.8, 0.0, progress=False).plan(gqa)


def test_surgery_refuses_all_heads_and_inconsistent_groups():
    model = ZOO_BY_NAME["qwen2"].build()
    b = transformer_blocks(model)[0]
    with pytest.raises(ValueError, match="refusing to prune all 4 attention heads"):
        prune_attention(model, b.attention, [])
    with pytest.raises(ValueError, match="same number of query heads"):
        prune_attention(model, b.attention, [0, 1, 2])
    with pytest.raises(ValueError, match="refusing to prune all 256 FFN neurons"):
        prune_ffn(model, b.ffn, [])
    assert model.model.layers[0].self_attn.q_proj.out_features == 128  # nothing changed


def test_other_errors():
    model = ZOO_BY_NAME["llama"].build()
    with pytest.raises(ValueError, match="unknown block names"):
        StructuredPruner({"model.layers.7": 0.3}, progress=False).plan(model)
    with pytest.raises(ValueError, match="got 1 per-layer ratios for 2 blocks"):
        StructuredPruner([0.1], progress=False).plan(model)
    with pytest.raises(ValueError, match="needs calibration data"):
        StructuredPruner(0.3, importance="activation", progress=False).plan(model)
    with pytest.raises(ValueError, match="unknown importance"):
        StructuredPruner(0.3, importance="random")
    quantize_(model, QuantConfig(4, group_size=32), skip=["@head"])
    with pytest.raises(ValueError, match="prune the float model first"):
        StructuredPruner(0.3, progress=False).plan(model)


def test_fused_qkv_vision_heads_refused():
    model = ZOO_BY_NAME["qwen2_vl"].build()
    with pytest.raises(ValueError, match="fused qkv"):
        StructuredPruner(0.3, 0.0, scope="vision", progress=False).plan(model)
    # its FFNs can still be pruned
    plan = StructuredPruner(0.0, 0.3, scope="vision", progress=False).plan(model)
    assert all(len(v) == 256 - 77 for v in plan.neurons.values())


def test_cnn_errors():
    model = tiny_cnn()
    x = torch.randn(2, 3, 16, 16)
    with pytest.raises(ValueError, match="cannot be pruned or do not exist"):
        StructuredPruner(channel_ratio={"classifier": 0.3}, progress=False).plan(model, calib=[x])
    with pytest.raises(ValueError, match="example input"):
        StructuredPruner(channel_ratio=0.3, progress=False).plan(model)


class _FlattenFrom2(torch.nn.Module):  # x.flatten(2): (N, C, H*W); the Linear mixes H*W, not channels
    def __init__(self):
        super().__init__()
        self.c1, self.fc = torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.Linear(16, 5)

    def forward(self, x):
        return self.fc(torch.relu(self.c1(x)).flatten(2))


class _Flatten12(torch.nn.Module):  # nn.Flatten(1, 2): (N, C*H, W)
    def __init__(self):
        super().__init__()
        self.c1, self.f, self.fc = torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.Flatten(1, 2), torch.nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(self.f(torch.relu(self.c1(x))))


class _LinearOnWidth(torch.nn.Module):  # a Linear over the width axis; width 8 == channels by coincidence
    def __init__(self):
        super().__init__()
        self.c1, self.fc = torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.Linear(8, 5)

    def forward(self, x):
        return self.fc(torch.relu(self.c1(x)))


@pytest.mark.parametrize("cls,size,why", [(_FlattenFrom2, 4, "flatten"), (_Flatten12, 4, "flatten"),
                                          (_LinearOnWidth, 8, "not the flattened channels")])
def test_cnn_channel_consumers_that_are_not_proven_are_refused(cls, size, why):
    from medquant.prune.cnn import channel_groups

    model = cls().eval()
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        before = model(x)
    groups, skipped = channel_groups(model, x)
    assert groups == [] and why in skipped["c1"]
    with pytest.raises(ValueError, match="found no prunable conv channels"):
        StructuredPruner(channel_ratio=0.5, progress=False).prune(model, calib=[x])
    assert model.c1.out_channels == 8  # nothing changed
    with torch.no_grad():
        assert torch.equal(model(x), before)


def test_cnn_plan_that_does_not_fit_changes_nothing():
    model = tiny_cnn()
    x = torch.randn(2, 3, 16, 16)
    plan = StructuredPruner(channel_ratio=0.3, progress=False).plan(model, calib=[x])
    plan.channel_groups[-1]["consumers"][0][1] += 1  # a consumer width the model does not have
    with pytest.raises(ValueError, match="input features"):
        StructuredPruner(channel_ratio=0.3, progress=False).apply(model, plan)
    assert model.features[0].out_channels == 32  # the first group was not pruned either


def test_numpy_ratios_accepted_and_bad_forms_named():
    import numpy as np

    e = ZOO_BY_NAME["llama"]
    plans = [StructuredPruner(h, f, progress=False).plan(e.build())
             for h, f in ((np.array([0.25, 0.5]), np.float32(0.1)), ([0.25, 0.5], 0.1))]
    assert plans[0].heads == plans[1].heads and plans[0].neurons == plans[1].neurons  # same as plain Python
    assert [len(h) for h in plans[0].heads.values()] == [3, 2]  # hand count: 4 - round(1), 4 - round(2)
    with pytest.raises(ValueError, match=r"head_ratio must be .* got an array of shape \(1, 2\)"):
        StructuredPruner(np.array([[0.1, 0.2]]))
    with pytest.raises(TypeError, match=r"ffn_ratio must be a number in \[0, 1\) .* or a dict .*got set"):
        StructuredPruner(0.0, {0.1})
    with pytest.raises(ValueError, match=r"channel_ratio must be a number .* or a dict \{conv name: ratio\}"):
        StructuredPruner(channel_ratio=np.array([0.1, 0.2]))


def test_apply_plan_that_does_not_fit_changes_nothing():
    from medquant.prune import PrunePlan

    model = ZOO_BY_NAME["llama"].build()
    pruner = StructuredPruner(0.5, 0.3, progress=False)
    plan = pruner.plan(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}

    def unchanged():
        after = model.state_dict()
        return after.keys() == before.keys() and all(torch.equal(after[k], v) for k, v in before.items())

    bad = PrunePlan.from_dict({**plan.to_dict(), "neurons": {**plan.neurons, "model.layers.1": [0, 0]}})
    with pytest.raises(ValueError, match=r"model.layers.1.mlp: FFN neuron indices must be unique"):
        pruner.apply(model, bad)
    assert unchanged()  # block 0 was not pruned either
    bad = PrunePlan.from_dict({**plan.to_dict(), "drop_blocks": ["model.layers.0", "model.layers.1"]})
    with pytest.raises(ValueError, match="drops all 2 blocks of model.layers"):
        pruner.apply(model, bad)
    assert unchanged()
    pruner.apply(model, plan)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="made for 4 attention heads, the model has 2 .*already pruned"):
        pruner.apply(model, plan)
    assert unchanged()


def test_cnn_errors_name_the_reason():
    class Shared(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.c = torch.nn.Conv2d(3, 3, 3, padding=1)

        def forward(self, x):
            return self.c(torch.relu(self.c(x)))

    with pytest.raises(ValueError, match="no prunable conv channels.*called 2 times in the forward"):
        StructuredPruner(channel_ratio=0.5, progress=False).plan(Shared(), example_input=torch.randn(1, 3, 4, 4))
    for method in ("activation", "taylor"):
        with pytest.raises(ValueError, match="calibration data is empty"):
            StructuredPruner(channel_ratio=0.5, importance=method, progress=False).plan(
                tiny_cnn(), calib=[], example_input=torch.randn(1, 3, 16, 16))


def test_drop_blocks_given_as_one_string_is_refused():
    """``drop_blocks="model.layers.0"`` would be read as one block per character."""
    with pytest.raises(TypeError, match=r"drop_blocks must be a sequence of block names, e.g. \['model.layers.0'\]"):
        StructuredPruner(drop_blocks="model.layers.0")
    assert StructuredPruner(drop_blocks=("model.layers.0",)).drop_blocks == ["model.layers.0"]


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _same(model, before):
    after = model.state_dict()
    return after.keys() == before.keys() and all(torch.equal(after[k], v) for k, v in before.items())


@pytest.mark.parametrize("build", [lambda: ZOO_BY_NAME["llama"].build(), plain_transformer])
@pytest.mark.parametrize("ratio", [0.3, {"model.layers.0.mlp.down_proj": 0.3}])
def test_channel_ratio_on_a_transformer_is_refused(build, ratio):
    # channel_ratio prunes plain CNNs; on a transformer it used to be ignored (an unpruned model, no message)
    model = build()
    before = _state(model)
    with pytest.raises(ValueError, match=r"channel_ratio=.*0\.3.* output channels of plain CNNs.* 2 transformer "
                                         r"blocks.*head_ratio / ffn_ratio"):
        StructuredPruner(0.3, 0.3, channel_ratio=ratio, progress=False).prune(model)
    assert _same(model, before)


@pytest.mark.parametrize("kw,what", [({"head_ratio": 0.3}, "head_ratio"), ({"ffn_ratio": [0.0, 0.3]}, "ffn_ratio"),
                                     ({"head_ratio": {"features.0": 0.2}}, "head_ratio"),
                                     ({"drop_blocks": ["features"]}, "drop_blocks")])
def test_transformer_ratios_on_a_cnn_are_refused(kw, what):
    # 30% fewer heads asked of a CNN used to give an unpruned model and no message
    model = tiny_cnn()
    x = torch.randn(2, 3, 16, 16)
    before = _state(model)
    with pytest.raises(ValueError, match=rf"{what}=.* TinyCNN has no transformer blocks .*2 Conv2d layers.*"
                                         r"channel_ratio"):
        StructuredPruner(**kw, channel_ratio=0.3, progress=False).prune(model, calib=[x])
    with pytest.raises(ValueError, match=rf"{what}=.* TinyCNN has no transformer blocks"):  # also without channels
        StructuredPruner(**kw, progress=False).plan(model, calib=[x])
    assert _same(model, before)


def test_zero_transformer_ratios_on_a_cnn_are_no_request():
    # ratios of 0 ask for nothing: the CNN is channel-pruned exactly as without them
    model = tiny_cnn()
    x = torch.randn(2, 3, 16, 16)
    want = StructuredPruner(channel_ratio=0.3, progress=False).plan(model, calib=[x])
    got = StructuredPruner(0.0, [0.0, 0.0], channel_ratio=0.3, progress=False).plan(model, calib=[x])
    assert got.channels == want.channels and any(len(v) < want.sizes[k]["channels"] for k, v in got.channels.items())


def _plan_with(plan, **entries):
    from medquant.prune import PrunePlan

    d = plan.to_dict()
    for key, value in entries.items():
        d[key] = {**d[key], **value} if isinstance(value, dict) else value
    return PrunePlan.from_dict(d)


_HEAD_NORM = r"layers.0.self_attn.inner_ln normalises all heads together"


@pytest.mark.parametrize("entry,match", [
    ({"heads": {"layers.0": [0, 1]}}, r"plan.heads\['layers.0'\] keeps 2 of the 4 attention heads.*" + _HEAD_NORM),
    ({"kv_heads": {"layers.0": [1, 2, 3]}}, r"plan.kv_heads\['layers.0'\] keeps 3 of the 4 key/value heads.*"
                                            + _HEAD_NORM),
    ({"neurons": {"layers.0": list(range(100))}}, r"plan.neurons\['layers.0'\] keeps 100 of the 128 FFN neurons.*"
                                                  + r"layers.0.mlp.ln normalises all 128 FFN neurons together"),
    ({"expert_neurons": {"layers.0": [[0, 1]]}}, r"plan.expert_neurons\['layers.0'\].*no MoE experts"),
])
def test_plan_entry_for_an_unprunable_block_is_refused(entry, match):
    # layers.0 normalises all heads / all FFN neurons together: checked_block marks them unprunable, and a
    # hand-written entry removing some of them used to be skipped without a word
    model = plain_transformer(head_norm=(0,), ffn_norm=(0,))
    with pytest.warns(UserWarning, match="plan.skipped"):
        plan = StructuredPruner(0.5, 0.25, progress=False).plan(model)
    assert set(plan.skipped) == {"layers.0"} and set(plan.heads) == set(plan.neurons) == {"layers.1"}
    before = _state(model)
    with pytest.raises(ValueError, match=match):
        StructuredPruner(progress=False).apply(model, _plan_with(plan, **entry))
    assert _same(model, before)  # checked before any layer changed: layers.1 was not pruned either


def test_plan_entry_removing_nothing_from_an_unprunable_block_is_fine():
    model = plain_transformer(head_norm=(0,), ffn_norm=(0,))
    x = torch.randn(2, 5, 64, generator=torch.Generator().manual_seed(0))
    with pytest.warns(UserWarning, match="plan.skipped"):
        plan = StructuredPruner(0.5, 0.25, progress=False).plan(model)
    removed = removed_from_plan(plan)
    with torch.no_grad():  # independent reference: only layers.1's removed heads / neurons zeroed
        ref = zeroed_copy(model, {"layers.1": removed["layers.1"]}, 16)(x)
    keep_all = _plan_with(plan, heads={"layers.0": [0, 1, 2, 3]}, kv_heads={"layers.0": [0, 1, 2, 3]},
                          neurons={"layers.0": list(range(128))}, expert_neurons={"layers.0": []})
    StructuredPruner(progress=False).apply(model, keep_all)
    assert model.layers[0].self_attn.q_proj.out_features == 64 and model.layers[0].mlp.fc1.out_features == 128
    assert model.layers[1].self_attn.num_heads == 2 and model.layers[1].mlp.fc1.out_features == 96
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref, rtol=1e-5, atol=1e-5)


def test_kv_heads_entry_without_heads_entry_is_refused():
    model = plain_transformer(heads=4, kv_heads=2)
    plan = StructuredPruner(0.0, 0.0, progress=False).plan(model)
    d = plan.to_dict()
    d["heads"].pop("layers.0")
    d["kv_heads"]["layers.0"] = [1]
    before = _state(model)
    from medquant.prune import PrunePlan

    with pytest.raises(ValueError, match=r"plan.kv_heads\['layers.0'\] removes key/value heads .*no plan.heads"):
        StructuredPruner(progress=False).apply(model, PrunePlan.from_dict(d))
    assert _same(model, before)
