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


def plain_transformer(seed: int = 0, d: int = 64, ffn: int = 128, shared: bool = False, heads: int = 4,
                      kv_heads: int | None = None, head_norm: tuple[int, ...] = (),
                      ffn_norm: tuple[int, ...] = ()) -> nn.Module:
    """A plain nn.Module transformer of two blocks with LLaMA-style names whose forward reads its own
    ``num_heads`` / ``num_key_value_heads`` (``heads`` heads of ``d / heads``, ``kv_heads`` key/value heads, each
    read by ``heads / kv_heads`` consecutive query heads as ``repeat_kv`` does; an FFN of ``ffn`` neurons);
    ``shared``: one block listed twice (weights shared across layers); ``head_norm``: indices of the blocks whose
    attention applies a ``LayerNorm(d)`` over all heads together before ``o_proj`` (as Kosmos-2's
    ``inner_attn_ln``), which makes their heads unprunable; ``ffn_norm``: likewise a ``LayerNorm(ffn)`` over all FFN
    neurons between ``fc1`` and ``fc2`` (Kosmos-2's ``ffn_layernorm``), which makes their neurons unprunable."""
    import torch.nn.functional as F

    n_kv = heads if kv_heads is None else kv_heads

    class Attn(nn.Module):
        def __init__(self, norm: bool):
            super().__init__()
            self.head_dim, self.num_heads, self.num_key_value_heads = d // heads, heads, n_kv
            self.q_proj, self.k_proj, self.v_proj, self.o_proj = (nn.Linear(d, d if i in (0, 3) else n_kv * (d // heads))
                                                                  for i in range(4))
            self.inner_ln = nn.LayerNorm(d) if norm else None

        def forward(self, x):
            b, t, _ = x.shape
            q = self.q_proj(x).view(b, t, self.num_heads, self.head_dim).transpose(1, 2)
            k, v = (p(x).view(b, t, self.num_key_value_heads, self.head_dim).transpose(1, 2)
                    for p in (self.k_proj, self.v_proj))
            g = self.num_heads // self.num_key_value_heads
            k, v = k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1)
            y = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, t, -1)
            return self.o_proj(y if self.inner_ln is None else self.inner_ln(y))

    class Blk(nn.Module):
        def __init__(self, i: int):
            super().__init__()
            self.self_attn = Attn(i in head_norm)
            self.mlp = nn.Module()
            self.mlp.fc1, self.mlp.fc2 = nn.Linear(d, ffn), nn.Linear(ffn, d)
            self.mlp.ln = nn.LayerNorm(ffn) if i in ffn_norm else None

        def forward(self, x):
            x = x + self.self_attn(x)
            h = F.gelu(self.mlp.fc1(x))
            return x + self.mlp.fc2(h if self.mlp.ln is None else self.mlp.ln(h))

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(seed)
            if shared:
                blk = Blk(0)
                self.layers = nn.ModuleList([blk, blk])
            else:
                self.layers = nn.ModuleList([Blk(i) for i in range(2)])

        def forward(self, x):
            for layer in self.layers:
                x = layer(x)
            return x

    return Net().eval()
