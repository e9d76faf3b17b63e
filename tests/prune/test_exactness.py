"""Pruning removes exactly what it claims: the pruned model equals the original with those heads/neurons zeroed."""
from __future__ import annotations

import copy

import pytest
import torch

from medquant.prune import StructuredPruner, parameter_report
from medquant.testing.zoo import HEAD_DIM, ZOO, tiny_cnn
from tests.prune._reference import plain_transformer, removed_from_plan, zeroed_copy

# VLM towers with fused qkv (Qwen2-VL vision) cannot lose heads: prune their language model only.
SCOPE = {"qwen2_vl": "language", "qwen2_5_vl": "language"}
METHOD = {"llama": "taylor", "qwen2": "activation", "bert": "activation", "vit": "taylor"}


def _close(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * max(1.0, float(b.abs().max())))


@pytest.mark.parametrize("entry", ZOO, ids=[e.name for e in ZOO])
def test_pruned_equals_zeroed_original(entry):
    model = entry.build()
    inputs = entry.inputs(model)
    method = METHOD.get(entry.name, "magnitude")
    pruner = StructuredPruner(0.3, 0.3, importance=method, scope=SCOPE.get(entry.name, "all"), progress=False)
    plan = pruner.plan(model, calib=[inputs])
    removed = removed_from_plan(plan)
    assert removed and all(r["heads"] and r["neurons"] for r in removed.values())
    ref_model = zeroed_copy(model, removed, HEAD_DIM)
    with torch.no_grad():
        ref = entry.output(ref_model, inputs)
        full = entry.output(model, inputs)
    before = parameter_report(model)["params"]
    pruner.apply(model, plan)
    with torch.no_grad():
        out = entry.output(model, inputs)
    assert out.shape == ref.shape
    _close(out, ref)
    # negative control: the zeroing matters (the test could fail)
    assert (full - ref).abs().max() > 1e-3
    # the model really got smaller, by exactly the removed rows/columns
    n_q = sum(len(r["heads"]) for r in removed.values())
    assert parameter_report(model)["params"] < before
    for b, r in removed.items():
        assert len(plan.heads[b]) == plan.sizes[b]["heads"] - len(r["heads"])
    assert n_q > 0


def test_gqa_query_mode_keeps_groups_equal_and_kv_heads():
    from medquant.testing.zoo import ZOO_BY_NAME

    e = ZOO_BY_NAME["qwen2"]
    model = e.build()
    plan = StructuredPruner(0.3, 0.0, progress=False).prune(model)
    for b in plan.heads:
        kept = plan.heads[b]
        assert [h // 2 for h in kept] == [0, 1]  # one query head kept in each of the 2 groups
        assert plan.kv_heads[b] == [0, 1]
        attn = model.get_submodule(f"{b}.self_attn")
        assert attn.q_proj.out_features == 2 * HEAD_DIM and attn.k_proj.out_features == 2 * HEAD_DIM
        assert attn.num_key_value_groups == 1


def test_gqa_group_mode_exact_and_shrinks_kv():
    from medquant.testing.zoo import ZOO_BY_NAME

    e = ZOO_BY_NAME["gemma3_text"]
    model = e.build()
    inputs = e.inputs(model)
    pruner = StructuredPruner(0.3, 0.0, gqa="group", progress=False)
    plan = pruner.plan(model)
    removed = removed_from_plan(plan)
    assert all(len(r["kv_heads"]) == 1 and len(r["heads"]) == 2 for r in removed.values())
    with torch.no_grad():
        ref = e.output(zeroed_copy(model, removed, HEAD_DIM), inputs)
    pruner.apply(model, plan)
    with torch.no_grad():
        _close(e.output(model, inputs), ref)
    attn = model.model.layers[0].self_attn
    assert attn.k_proj.out_features == HEAD_DIM and attn.num_key_value_groups == 2


def test_per_layer_ratios_exact_and_generate():
    from medquant.testing.zoo import ZOO_BY_NAME

    e = ZOO_BY_NAME["llama"]
    model = e.build()
    inputs = e.inputs(model)
    pruner = StructuredPruner([0.25, 0.5], [0.1, 0.6], importance="activation", progress=False)
    plan = pruner.plan(model, calib=[inputs])
    assert [len(plan.heads[b]) for b in sorted(plan.heads)] == [3, 2]
    assert [len(plan.neurons[b]) for b in sorted(plan.neurons)] == [256 - 26, 256 - 154]
    with torch.no_grad():
        ref = e.output(zeroed_copy(model, removed_from_plan(plan), HEAD_DIM), inputs)
    pruner.apply(model, plan)
    assert plan.hf_config_exact is False  # per-layer counts: config left as it was
    with torch.no_grad():
        _close(e.output(model, inputs), ref)
        gen = model.generate(inputs["input_ids"], max_new_tokens=4, do_sample=False)
    assert gen.shape[1] == inputs["input_ids"].shape[1] + 4


@torch.no_grad()
def _cnn_zeroed(model, plan):
    """A copy of ``model`` with the plan's removed channels zeroed: each producer's filters and bias, and its
    BatchNorm's gamma and beta (then the channel is 0 whatever reaches the BatchNorm)."""
    ref = copy.deepcopy(model)
    mods = dict(ref.named_modules())
    for g in plan.channel_groups:
        idx = torch.tensor(plan.removed_channels(g["conv"]), dtype=torch.long)
        mods[g["conv"]].weight[idx] = 0
        if mods[g["conv"]].bias is not None:
            mods[g["conv"]].bias[idx] = 0
        if g["bn"]:
            mods[g["bn"]].weight[idx] = 0
            mods[g["bn"]].bias[idx] = 0
    return ref


@pytest.mark.parametrize("method", ["magnitude", "activation", "taylor"])
def test_tiny_cnn_channels_exact(method):
    model = tiny_cnn()
    x = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    pruner = StructuredPruner(channel_ratio=0.3, importance=method, progress=False)
    plan = pruner.plan(model, calib=[x])
    assert set(plan.channels) == {"features.0", "features.3"}
    with torch.no_grad():
        full, ref = model(x), _cnn_zeroed(model, plan)(x)
    pruner.apply(model, plan)
    assert model.features[0].out_channels == 32 - 10 and model.features[1].num_features == 22
    assert model.features[3].in_channels == 22 and model.classifier.in_features == 64 - 19
    with torch.no_grad():
        _close(model(x), ref)
    assert (full - ref).abs().max() > 1e-4


def test_cnn_flatten_linear_consumer_exact():
    from torch import nn

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
                          nn.Flatten(), nn.Linear(8 * 4 * 4, 5)).eval()
    with torch.no_grad():
        model[1].running_mean.uniform_(-1, 1)
        model[1].running_var.uniform_(0.5, 2)
    x = torch.randn(3, 1, 8, 8)
    pruner = StructuredPruner(channel_ratio=0.5, progress=False)
    plan = pruner.plan(model, calib=[x])
    with torch.no_grad():
        ref = _cnn_zeroed(model, plan)(x)
    pruner.apply(model, plan)
    assert model[5].in_features == 4 * 16
    with torch.no_grad():
        _close(model(x), ref)


@pytest.mark.parametrize("family", ["qwen3", "gemma3"])
def test_single_kv_head_with_shared_qk_norm_prunes_query_heads(family):
    # 4 query heads, 1 key/value head: q_norm / k_norm have weight (head_dim,), shared by every head, as wide as
    # the whole key projection; removing query heads is exact, not "a norm over all heads"
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig, Qwen3Config, Qwen3ForCausalLM

    from medquant.testing.zoo import text_kwargs

    torch.manual_seed(0)
    if family == "qwen3":
        model = Qwen3ForCausalLM(Qwen3Config(**text_kwargs(num_key_value_heads=1, head_dim=HEAD_DIM)))
    else:
        model = Gemma3ForCausalLM(Gemma3TextConfig(**text_kwargs(
            num_key_value_heads=1, head_dim=HEAD_DIM, query_pre_attn_scalar=HEAD_DIM, sliding_window=16,
            layer_types=["sliding_attention", "full_attention"])))
    model.eval()
    with torch.no_grad():  # non-trivial norm weights, so that a wrongly pruned norm would show
        for blk in model.model.layers:
            blk.self_attn.q_norm.weight.uniform_(0.5, 1.5)
            blk.self_attn.k_norm.weight.uniform_(0.5, 1.5)
    ids = torch.randint(3, 200, (2, 7), generator=torch.Generator().manual_seed(0))
    pruner = StructuredPruner(0.5, 0.0, progress=False)
    plan = pruner.plan(model)
    assert not plan.skipped and [len(h) for h in plan.heads.values()] == [2, 2]
    removed = removed_from_plan(plan)
    with torch.no_grad():
        ref = zeroed_copy(model, removed, HEAD_DIM)(ids).logits
    pruner.apply(model, plan)
    assert model.model.layers[0].self_attn.q_proj.out_features == 2 * HEAD_DIM
    with torch.no_grad():
        _close(model(ids).logits, ref)


class _ConvBN(torch.nn.Module):
    def __init__(self, **bn):
        super().__init__()
        torch.manual_seed(0)
        self.c1 = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.bn = torch.nn.BatchNorm2d(8, **bn)
        self.c2 = torch.nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.c2(torch.relu(self.bn(self.c1(x))))


@pytest.mark.parametrize("method", ["magnitude", "activation", "taylor"])
@pytest.mark.parametrize("bn", [{"affine": False}, {"track_running_stats": False}])
def test_cnn_batchnorm_without_affine_or_running_stats(method, bn):
    model = _ConvBN(**bn).eval()
    if model.bn.running_var is not None:
        with torch.no_grad():
            model.bn.running_mean.uniform_(-1, 1)
            model.bn.running_var.uniform_(0.5, 2)
    x = torch.randn(4, 3, 6, 6, generator=torch.Generator().manual_seed(0))
    pruner = StructuredPruner(channel_ratio=0.5, importance=method, progress=False)
    plan = pruner.plan(model, calib=[x])
    removed = plan.removed_channels("c1")
    assert len(removed) == 4 and plan.channel_groups[0]["bn"] == "bn"
    # reference: the original model with the removed channels of the BatchNorm's output zeroed (plain torch hook)
    ref = copy.deepcopy(model)

    def zero(mod, args, out):
        out = out.clone()
        out[:, removed] = 0
        return out

    ref.bn.register_forward_hook(zero)
    with torch.no_grad():
        full, want = model(x), ref(x)
    pruner.apply(model, plan)
    assert model.c1.out_channels == 4 and model.bn.num_features == 4 and model.c2.in_channels == 4
    for t in (model.bn.weight, model.bn.bias, model.bn.running_mean, model.bn.running_var):
        assert t is None or t.shape == (4,)
    with torch.no_grad():
        _close(model(x), want)
    assert (full - want).abs().max() > 1e-4


def test_cnn_tensor_flatten_method_linear_consumer_exact():
    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.c1 = torch.nn.Conv2d(3, 8, 3, padding=1)
            self.fc = torch.nn.Linear(8 * 16, 5)

        def forward(self, x):
            return self.fc(torch.relu(self.c1(x)).flatten(1))

    model = Net().eval()
    x = torch.randn(2, 3, 4, 4)
    pruner = StructuredPruner(channel_ratio=0.5, progress=False)
    plan = pruner.plan(model, calib=[x])
    with torch.no_grad():
        want = _cnn_zeroed(model, plan)(x)
    pruner.apply(model, plan)
    assert model.fc.in_features == 4 * 16
    with torch.no_grad():
        _close(model(x), want)


class _SharedConv(torch.nn.Module):
    """``s`` is called twice (shared weights): neither it nor ``c1`` (whose output reaches it) may be pruned."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.c0 = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.c1 = torch.nn.Conv2d(8, 8, 3, padding=1)
        self.s = torch.nn.Conv2d(8, 8, 3, padding=1)
        self.fc = torch.nn.Linear(8, 3)

    def forward(self, x):
        x = torch.relu(self.c1(torch.relu(self.c0(x))))
        x = torch.relu(self.s(torch.relu(self.s(x))))
        return self.fc(torch.nn.functional.adaptive_avg_pool2d(x, 1).flatten(1))


def test_cnn_module_called_twice_is_not_pruned_and_the_rest_is_exact():
    model = _SharedConv().eval()
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    pruner = StructuredPruner(channel_ratio=0.5, progress=False)
    plan = pruner.plan(model, calib=[x])
    assert set(plan.channels) == {"c0"}  # c1 feeds the shared conv, the shared conv feeds itself
    with torch.no_grad():
        want = _cnn_zeroed(model, plan)(x)
    pruner.apply(model, plan)
    assert (model.c0.out_channels, model.c1.in_channels, model.s.in_channels) == (4, 4, 8)
    with torch.no_grad():
        _close(model(x), want)


def test_cnn_plan_leaves_a_model_in_train_mode_unchanged():
    model = tiny_cnn().train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    StructuredPruner(channel_ratio=0.3, progress=False).plan(model, calib=[torch.randn(4, 3, 16, 16)])
    assert model.training
    for k, v in model.state_dict().items():  # BatchNorm running statistics included
        assert torch.equal(v, before[k]), k


def test_cnn_taylor_on_a_frozen_model_with_gradients():
    model = tiny_cnn()
    x = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(0))

    def loss_fn(m, batch):
        return m(batch).logsumexp(-1).mean()

    # reference: |sum g*theta| over each filter of features.0 and its BatchNorm's gamma, beta, by plain autograd
    ref = copy.deepcopy(model)
    loss_fn(ref, x).backward()
    conv, bn = ref.features[0], ref.features[1]
    s = (conv.weight.grad * conv.weight).flatten(1).sum(1) + bn.weight.grad * bn.weight + bn.bias.grad * bn.bias
    want_removed = sorted(s.abs().argsort()[:10].tolist())
    # the user's model: frozen, with gradients of its own that must survive
    model.classifier.weight.grad = torch.ones_like(model.classifier.weight)
    model.requires_grad_(False)
    plan = StructuredPruner(channel_ratio=0.3, importance="taylor", progress=False).plan(
        model, calib=[x], loss_fn=loss_fn)
    assert plan.removed_channels("features.0") == want_removed
    assert not any(p.requires_grad for p in model.parameters())
    assert torch.equal(model.classifier.weight.grad, torch.ones_like(model.classifier.weight))
    assert all(p.grad is None for n, p in model.named_parameters() if n != "classifier.weight")


@pytest.mark.parametrize("method", ["magnitude", "activation"])
def test_block_shared_across_layers_is_pruned_once_and_exact(method):
    model = plain_transformer(d=32, ffn=48, shared=True)
    x = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(0))
    pruner = StructuredPruner(0.5, 0.25, importance=method, progress=False)
    plan = pruner.plan(model, calib=[x])
    removed = removed_from_plan(plan)
    assert removed["layers.0"] == removed["layers.1"] and removed["layers.0"]["heads"]
    with torch.no_grad():  # layers.1 is layers.0: zeroing it once zeroes both uses
        ref = zeroed_copy(model, {"layers.0": removed["layers.0"]}, 8)(x)
        assert (model(x) - ref).abs().max() > 1e-3
    pruner.apply(model, plan)
    assert model.layers[0] is model.layers[1]
    assert model.layers[0].self_attn.q_proj.out_features == 2 * 8 and model.layers[0].self_attn.num_heads == 2
    assert model.layers[0].mlp.fc1.out_features == 48 - 12
    with torch.no_grad():
        _close(model(x), ref)


def test_block_shared_across_layers_with_different_plans_is_refused_unchanged():
    model = plain_transformer(d=32, ffn=48, shared=True)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"layers.1.*same .* as layers.0"):
        StructuredPruner([0.25, 0.5], 0.0, progress=False).prune(model)
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())
