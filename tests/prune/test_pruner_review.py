"""Review findings for :mod:`medquant.prune.pruner`, each checked against an independent reference.

Reference: the unpruned model with the removed heads zeroed where they leave the block (the output projection's
input columns of a removed head): exactly what removing them computes, when every kept head is computed as before.
"""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
import transformers
from torch import nn

from medquant.prune import StructuredPruner, load_pruned, save_pruned


def _stablelm(seed: int = 0, kv_heads: int = 2) -> nn.Module:
    """StableLM with ``qk_layernorm``: its q / k norms are ``StableLmLayerNormPerHead``, a ``ModuleList`` of one
    ``LayerNorm(head_dim)`` per (query / key-value) head, applied to the heads in order; partial rotary too."""
    cfg = transformers.StableLmConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=kv_heads, qk_layernorm=True,
                                      partial_rotary_factor=0.5, use_qkv_bias=True)
    torch.manual_seed(seed)
    model = transformers.StableLmForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():  # per-head norms that differ from head to head
            p.normal_(0.0, 0.3)
    return model


@torch.no_grad()
def _zeroed(model: nn.Module, plan, head_dim: int) -> nn.Module:
    ref = copy.deepcopy(model)
    for name in plan.heads:
        o = ref.get_submodule(f"{name}.self_attn.o_proj")
        for h in plan.removed_heads(name):
            o.weight[:, h * head_dim:(h + 1) * head_dim] = 0
    return ref


@pytest.mark.parametrize("gqa,kv_heads", [("query", 2), ("group", 2), ("query", 4)])
def test_per_head_norm_module_lists_follow_their_heads(gqa, kv_heads, tmp_path):
    model = _stablelm(kv_heads=kv_heads)
    ids = torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(0))
    pruner = StructuredPruner(0.5, 0.0, gqa=gqa, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plan = pruner.plan(model)
    assert not plan.skipped
    removed = {name: plan.removed_heads(name) for name in plan.heads}
    # the lowest-magnitude heads are not simply the last ones: a kept head moves to another position
    assert any(r != list(range(4 - len(r), 4)) for r in removed.values()), removed
    ref = _zeroed(model, plan, 16)
    pruner.apply(model, plan)
    with torch.no_grad():
        out, want = model(ids).logits, ref(ids).logits
    torch.testing.assert_close(out, want, rtol=1e-4, atol=1e-5)
    attn = model.model.layers[0].self_attn
    assert len(attn.q_layernorm.norms) == len(plan.heads["model.layers.0"])
    assert len(attn.k_layernorm.norms) == len(plan.kv_heads["model.layers.0"])
    save_pruned(model, tmp_path, plan=plan)
    again = load_pruned(tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(again(ids).logits, out)


def _per_head_module_net(seed: int = 0, blocks: tuple[int, ...] = (0, 1)) -> nn.Module:
    """Two blocks, LLaMA-style names, 4 heads of 8; each head's attention output goes through its own
    ``nn.Linear(8, 8)`` (``self_attn.per_head``, a ``ModuleList`` read with ``zip`` over the heads) before
    ``o_proj`` in the blocks ``blocks``: a per-head module that is not a norm."""
    import torch.nn.functional as F

    class Attn(nn.Module):
        def __init__(self, per_head: bool):
            super().__init__()
            self.head_dim, self.num_heads = 8, 4
            self.q_proj, self.k_proj, self.v_proj, self.o_proj = (nn.Linear(32, 32) for _ in range(4))
            self.per_head = nn.ModuleList(nn.Linear(8, 8) for _ in range(4)) if per_head else None

        def forward(self, x):
            b, t, _ = x.shape
            q, k, v = (p(x).view(b, t, -1, 8).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
            y = F.scaled_dot_product_attention(q, k, v)  # (b, heads, t, 8)
            if self.per_head is not None:
                y = torch.stack([f(y[:, i]) for i, f in zip(range(y.shape[1]), self.per_head)], 1)
            return self.o_proj(y.transpose(1, 2).reshape(b, t, -1))

    class Blk(nn.Module):
        def __init__(self, i: int):
            super().__init__()
            self.self_attn = Attn(i in blocks)
            self.mlp = nn.Module()
            self.mlp.fc1, self.mlp.fc2 = nn.Linear(32, 64), nn.Linear(64, 32)

        def forward(self, x):
            x = x + self.self_attn(x)
            return x + self.mlp.fc2(F.gelu(self.mlp.fc1(x)))

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(seed)
            self.layers = nn.ModuleList([Blk(0), Blk(1)])

        def forward(self, x):
            for layer in self.layers:
                x = layer(x)
            return x

    return Net().eval()


def test_unknown_per_head_module_list_keeps_the_heads():
    model = _per_head_module_net()
    x = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = model(x)
    # removing heads would leave the per-head modules misaligned with the kept heads: refused, naming the list
    with pytest.raises(ValueError, match=r"layers\.0\.self_attn\.per_head has one entry per head"):
        StructuredPruner(0.5, 0.25, progress=False).prune(model)
    with torch.no_grad():
        assert torch.equal(model(x), before)
    # only block 0 has the list: its heads are kept (said in plan.skipped), block 1's heads and every FFN are
    # pruned, exactly as zeroing the removed heads' o_proj columns and neurons' fc2 columns in the original
    model = _per_head_module_net(blocks=(0,))
    pruner = StructuredPruner(0.5, 0.25, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plan = pruner.plan(model)
    assert "per_head" in " ".join(plan.skipped["layers.0"]), plan.skipped
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for name in plan.neurons:
            ref.get_submodule(f"{name}.mlp.fc2").weight[:, plan.removed_neurons(name)] = 0
        for h in plan.removed_heads("layers.1"):
            ref.layers[1].self_attn.o_proj.weight[:, h * 8:(h + 1) * 8] = 0
    assert "layers.0" not in plan.heads and len(plan.heads["layers.1"]) == 2
    pruner.apply(model, plan)
    assert len(model.layers[0].self_attn.per_head) == 4 and model.layers[0].self_attn.o_proj.in_features == 32
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x), rtol=1e-4, atol=1e-5)
