"""Independent reference for pruning tests: zero what a plan removes, in plain torch, by layer names.

Removing head h must equal zeroing q/k/v rows h*d..h*d+d-1 (weights and biases) and the same columns of the
output projection; o's bias is per output feature and present in both models. Removing FFN neuron j must equal
zeroing row j of gate/up (fc1, intermediate) with its bias and column j of down (fc2, output).
"""
from __future__ import annotations

import copy

import torch
from torch import nn

Q = ("self_attn.q_proj", "attention.q_proj", "attention.self.query")
K = ("self_attn.k_proj", "attention.k_proj", "attention.self.key")
V = ("self_attn.v_proj", "attention.v_proj", "attention.self.value")
O = ("self_attn.o_proj", "self_attn.out_proj", "attention.o_proj", "attention.output.dense")
FFN_IN = ("mlp.gate_proj", "mlp.up_proj", "mlp.fc1", "intermediate.dense")
FFN_OUT = ("mlp.down_proj", "mlp.fc2", "output.dense")


def _mods(model: nn.Module, block: str, suffixes) -> list[nn.Linear]:
    names = dict(model.named_modules())
    return [names[f"{block}.{s}"] for s in suffixes if f"{block}.{s}" in names]


def _rows(heads, d):
    return torch.tensor([h * d + i for h in heads for i in range(d)], dtype=torch.long)


@torch.no_grad()
def zeroed_copy(model: nn.Module, removed: dict[str, dict[str, list[int]]], head_dim: int) -> nn.Module:
    """``removed[block] = {"heads": [...], "kv_heads": [...], "neurons": [...]}``."""
    ref = copy.deepcopy(model)
    for block, r in removed.items():
        qr, kvr = _rows(r.get("heads", []), head_dim), _rows(r.get("kv_heads", []), head_dim)
        for lin in _mods(ref, block, Q):
            lin.weight[qr] = 0
            if lin.bias is not None:
                lin.bias[qr] = 0
        for lin in _mods(ref, block, K) + _mods(ref, block, V):
            lin.weight[kvr] = 0
            if lin.bias is not None:
                lin.bias[kvr] = 0
        (o,) = _mods(ref, block, O)
        o.weight[:, qr] = 0
        n = torch.tensor(r.get("neurons", []), dtype=torch.long)
        for lin in _mods(ref, block, FFN_IN):
            lin.weight[n] = 0
            if lin.bias is not None:
                lin.bias[n] = 0
        outs = [m for m in _mods(ref, block, FFN_OUT) if m is not o]
        assert len(outs) == 1, (block, outs)
        outs[0].weight[:, n] = 0
    return ref


def removed_from_plan(plan) -> dict[str, dict[str, list[int]]]:
    return {b: {"heads": plan.removed_heads(b) if b in plan.heads else [],
                "kv_heads": plan.removed_kv_heads(b) if b in plan.kv_heads else [],
                "neurons": plan.removed_neurons(b) if b in plan.neurons else []}
            for b in plan.sizes}
