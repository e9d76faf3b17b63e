"""Physical removal of heads and FFN neurons from ``nn.Linear`` layers.

All functions edit the model in place and keep the selected rows / columns in their original order:

* a head ``h`` owns the rows ``h*d .. h*d+d-1`` of q (and of k, v for its key/value head) and the same columns
  of the output projection o; removing it deletes those rows (weight and bias) and columns. The bias of o is
  per output feature, not per head, and stays.
* an FFN neuron ``j`` owns row ``j`` (weight and bias) of each input linear (gate/up, w1/w3, fc1, intermediate)
  and column ``j`` of the output linear (down, w2, fc2); of a fused ``gate_up_proj`` with ``2I`` rows (gate half,
  then up half) it owns rows ``j`` and ``I + j``.
* gated attention (Qwen3.5): head ``h`` owns rows ``2hd .. 2hd+2d-1`` of q (its query and its output gate);
  per-head q/k norms (Chameleon, weight ``(n_heads, d)``) lose the rows of the removed heads; relative position
  bias tables with one column per head (Swin, BEiT: ``(positions, n_heads)``) lose their columns, and attention
  sinks (GPT-OSS: ``sinks`` of shape ``(n_heads,)``) their entries; lists of one norm per head (StableLM's
  ``qk_layernorm``: a ``ModuleList`` of ``LayerNorm(head_dim)``, entry ``h`` for head ``h``) lose the removed heads'
  entries (:func:`head_norm_lists`).

After a head removal the attention module carries its own counts (``num_heads`` / ``num_attention_heads``,
``num_key_value_heads``, ``num_key_value_groups`` = n_heads / n_kv, BERT's ``all_head_size``), which is what the
transformers attention code reads at run time (it reshapes with ``-1`` heads of ``head_dim``), so layers of one
model may keep different numbers of heads.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ..models.blocks import AttentionUnit, FFNUnit, not_float_remedy, peft_adapter_layer

__all__ = ["checked_expert_neurons", "checked_heads", "checked_neurons", "expert_neuron_rows", "head_norm_lists",
           "head_rows", "keep_linear", "prune_attention", "prune_experts", "prune_ffn"]


def head_rows(heads: Sequence[int], head_dim: int, device=None) -> torch.Tensor:
    """Row indices of ``heads`` (each ``head_dim`` rows, in the given order)."""
    idx = [h * head_dim + i for h in heads for i in range(head_dim)]
    return torch.tensor(idx, dtype=torch.long, device=device)


def _refuse_not_float(layer: nn.Module, name: str) -> None:
    if not isinstance(layer, nn.Linear):
        kind = ("PEFT " if peft_adapter_layer(layer) else "") + type(layer).__name__
        raise ValueError(  # noqa: TRY004 - a valid model in the wrong state, not a wrong type
            f"{name} is a {kind}, not a float nn.Linear: heads and FFN neurons are removed from float nn.Linear "
            f"layers only; {not_float_remedy([layer])}")


def _check_float(model: nn.Module, names: Sequence[str]) -> None:
    """Every layer ``names`` names is a float ``nn.Linear`` (checked before a unit's first change)."""
    for n in names:
        _refuse_not_float(model.get_submodule(n), n)


@torch.no_grad()
def keep_linear(lin: nn.Linear, rows: torch.Tensor | None = None, cols: torch.Tensor | None = None) -> None:
    """Keep only ``rows`` (output features) and/or ``cols`` (input features) of ``lin``, in place.

    Raises:
        ValueError: ``lin`` is not a float ``nn.Linear`` (a quantized ``QuantLinear``); nothing is changed.
    """
    _refuse_not_float(lin, "the layer")
    w = lin.weight
    req = w.requires_grad
    if rows is not None:
        rows = rows.to(w.device)
        w = w.index_select(0, rows)
        if lin.bias is not None:
            lin.bias = nn.Parameter(lin.bias.index_select(0, rows).clone(), requires_grad=lin.bias.requires_grad)
        lin.out_features = int(rows.numel())
    if cols is not None:
        w = w.index_select(1, cols.to(w.device))
        lin.in_features = int(cols.numel())
    lin.weight = nn.Parameter(w.clone().contiguous(), requires_grad=req)


def _check_heads(unit: AttentionUnit, keep_heads: Sequence[int], keep_kv: Sequence[int]) -> None:
    kh, kk = list(keep_heads), list(keep_kv)
    if not kh:
        raise ValueError(f"{unit.name}: refusing to prune all {unit.n_heads} attention heads of the layer; "
                         "keep at least one head (or drop the whole block)")
    if len(set(kh)) != len(kh) or len(set(kk)) != len(kk):
        raise ValueError(f"{unit.name}: duplicate head indices in {kh} / {kk}")
    if any(not 0 <= h < unit.n_heads for h in kh) or any(not 0 <= g < unit.n_kv for g in kk):
        raise ValueError(f"{unit.name}: head indices out of range (layer has {unit.n_heads} query and "
                         f"{unit.n_kv} key/value heads): {kh} / {kk}")
    if sorted(kh) != kh or sorted(kk) != kk:
        raise ValueError(f"{unit.name}: kept head indices must be sorted ascending")
    g = unit.group_size
    per_group = {kv: sum(1 for h in kh if h // g == kv) for kv in range(unit.n_kv)}
    if any(per_group[kv] == 0 for kv in kk) or any(per_group[kv] for kv in range(unit.n_kv) if kv not in kk):
        raise ValueError(f"{unit.name}: every kept key/value head needs kept query heads and every kept query head "
                         f"its key/value head (group size {g}); got query heads {kh}, key/value heads {kk}")
    counts = {per_group[kv] for kv in kk}
    if len(counts) != 1:
        raise ValueError(f"{unit.name}: grouped-query attention needs the same number of query heads in each kept "
                         f"key/value group; got { {kv: per_group[kv] for kv in kk} }")


def checked_heads(unit: AttentionUnit, keep_heads: Sequence[int], keep_kv: Sequence[int] | None = None
                  ) -> tuple[list[int], list[int]]:
    """``(keep_heads, keep_kv)`` sorted, ``keep_kv`` defaulted as :func:`prune_attention` does, after checking them
    against ``unit`` (nothing is changed).

    Raises:
        ValueError: no head kept, duplicate or out-of-range indices, or groups that do not fit grouped-query
            attention.
    """
    kh = sorted(int(h) for h in keep_heads)
    kk = sorted({h // unit.group_size for h in kh}) if keep_kv is None else sorted(int(h) for h in keep_kv)
    _check_heads(unit, kh, kk)
    return kh, kk


@torch.no_grad()
def prune_attention(model: nn.Module, unit: AttentionUnit, keep_heads: Sequence[int],
                    keep_kv: Sequence[int] | None = None) -> AttentionUnit:
    """Keep query heads ``keep_heads`` and key/value heads ``keep_kv`` of ``unit``; returns the updated unit.

    For multi-head attention (``n_kv == n_heads``) ``keep_kv`` defaults to ``keep_heads``. For grouped-query
    attention every kept key/value head must keep the same number of its query heads (query head ``h`` reads
    key/value head ``h // group_size``); ``keep_kv`` defaults to the groups that keep query heads.

    Raises:
        ValueError: head indices that :func:`checked_heads` refuses, or a projection that is not a float
            ``nn.Linear`` (a quantized model: prune the float model first); nothing is changed then.
    """
    keep_heads, keep_kv = checked_heads(unit, keep_heads, keep_kv)
    _check_float(model, (unit.q, unit.k, unit.v, unit.o))
    d = unit.head_dim
    q, k, v, o = (model.get_submodule(n) for n in (unit.q, unit.k, unit.v, unit.o))
    kvrows = head_rows(keep_kv, d)
    holder = model.get_submodule(unit.holder)
    # found before any change (a pruned query list may get the key/value count); with n_kv == n_heads the lists of
    # both go with the query heads (keep_kv == keep_heads then)
    q_lists = head_norm_lists(holder, unit.n_heads, d)
    kv_lists = head_norm_lists(holder, unit.n_kv, d) if unit.n_kv != unit.n_heads else []
    if len(keep_heads) != unit.n_heads:
        keep_linear(q, rows=head_rows(keep_heads, unit.q_rows))
        keep_linear(o, cols=head_rows(keep_heads, d))
        if unit.q_norm is not None:
            _keep_norm_rows(model.get_submodule(unit.q_norm), keep_heads)
        for _, table in head_tables(model.get_submodule(unit.name), unit.n_heads):
            _keep_table_columns(table, keep_heads)
        _keep_list_entries(q_lists, keep_heads)
        cont = model.get_submodule(unit.name)
        sinks = cont._parameters.get("sinks")
        if isinstance(sinks, nn.Parameter) and tuple(sinks.shape) == (unit.n_heads,):  # GPT-OSS: one per head
            cont.sinks = nn.Parameter(sinks[torch.tensor(keep_heads, device=sinks.device)].clone(),
                                      requires_grad=sinks.requires_grad)
    if len(keep_kv) != unit.n_kv:
        keep_linear(k, rows=kvrows)
        keep_linear(v, rows=kvrows)
        if unit.k_norm is not None:
            _keep_norm_rows(model.get_submodule(unit.k_norm), keep_kv)
        _keep_list_entries(kv_lists, keep_kv)
    nh, nkv = len(keep_heads), len(keep_kv)
    for attr, val in (("num_heads", nh), ("num_attention_heads", nh), ("num_key_value_heads", nkv),
                      ("num_key_value_groups", nh // nkv), ("all_head_size", nh * d)):
        if isinstance(getattr(holder, attr, None), int):
            setattr(holder, attr, val)
    unit.n_heads, unit.n_kv = nh, nkv
    return unit


def head_norm_lists(holder: nn.Module, n: int, head_dim: int) -> list[nn.ModuleList]:
    """The ``nn.ModuleList`` s inside the attention module ``holder`` that hold one norm per head: ``n`` entries,
    each without a linear and with only 1-D parameters of ``head_dim`` entries (StableLM's ``qk_layernorm``:
    ``q_layernorm.norms`` has one ``LayerNorm(head_dim)`` per query head, ``k_layernorm.norms`` one per key/value
    head, entry ``i`` applied to head ``i``). Removing head ``h`` removes entry ``h``.

    Args:
        holder: the attention module.
        n: the number of heads (query heads, or key/value heads).
        head_dim: features per head.

    Returns:
        The lists, in module order.
    """
    out = []
    for mod in holder.modules():
        if not isinstance(mod, nn.ModuleList) or len(mod) != n or n < 2:
            continue
        if all(not any(isinstance(m, nn.Linear) for m in e.modules())
               and any(True for _ in e.parameters())
               and all(p.dim() == 1 and p.numel() == head_dim for p in e.parameters()) for e in mod):
            out.append(mod)
    return out


def _keep_list_entries(lists: Sequence[nn.ModuleList], keep: Sequence[int]) -> None:
    for lst in lists:
        kept = [lst[i] for i in keep]
        for i in range(len(lst) - 1, -1, -1):
            del lst[i]
        lst.extend(kept)


def head_tables(attention: nn.Module, n_heads: int) -> list[tuple[str, nn.Module]]:
    """The relative position bias tables inside ``attention`` with one column per head.

    Swin's and BEiT's window attention add ``table[index]`` (a ``relative_position_bias_table`` parameter of shape
    ``(positions, n_heads)``) to the scores of each head: removing head ``h`` removes column ``h``.

    Args:
        attention: an attention container.
        n_heads: its number of query heads.

    Returns:
        ``[(name of the module holding the table, that module)]``, names relative to ``attention``.
    """
    out = []
    for name, mod in attention.named_modules():
        t = mod._parameters.get("relative_position_bias_table")
        if isinstance(t, nn.Parameter) and t.dim() == 2 and t.shape[1] == n_heads:
            out.append((name, mod))
    return out


@torch.no_grad()
def _keep_table_columns(mod: nn.Module, heads: Sequence[int]) -> None:
    t = mod.relative_position_bias_table
    idx = torch.tensor(list(heads), dtype=torch.long, device=t.device)
    mod.relative_position_bias_table = nn.Parameter(t.index_select(1, idx).clone(), requires_grad=t.requires_grad)
    if isinstance(getattr(mod, "num_heads", None), int):
        mod.num_heads = len(idx)


@torch.no_grad()
def _keep_norm_rows(norm: nn.Module, heads: Sequence[int]) -> None:
    """Keep the rows ``heads`` of a per-head norm's ``weight`` / ``bias`` ``(n, head_dim)``."""
    idx = torch.tensor(list(heads), dtype=torch.long)
    for attr in ("weight", "bias"):
        p = getattr(norm, attr, None)
        if isinstance(p, nn.Parameter):
            setattr(norm, attr, nn.Parameter(p.index_select(0, idx.to(p.device)).clone(),
                                             requires_grad=p.requires_grad))
    if isinstance(getattr(norm, "normalized_shape", None), tuple) and len(norm.normalized_shape) == 2:
        norm.normalized_shape = (len(idx), norm.normalized_shape[1])


def checked_neurons(unit: FFNUnit, keep: Sequence[int]) -> list[int]:
    """``keep`` sorted, after checking it against ``unit`` (nothing is changed).

    Raises:
        ValueError: no neuron kept, or duplicate or out-of-range indices.
    """
    keep = sorted(int(j) for j in keep)
    if not keep:
        raise ValueError(f"{unit.name}: refusing to prune all {unit.n_neurons} FFN neurons of the layer; "
                         "keep at least one (or drop the whole block)")
    if len(set(keep)) != len(keep) or keep[0] < 0 or keep[-1] >= unit.n_neurons:
        raise ValueError(f"{unit.name}: FFN neuron indices must be unique and in [0, {unit.n_neurons}); got "
                         f"{len(keep)} indices from {keep[0]} to {keep[-1]}")
    return keep


@torch.no_grad()
def prune_ffn(model: nn.Module, unit: FFNUnit, keep: Sequence[int]) -> FFNUnit:
    """Keep the FFN neurons ``keep`` (sorted, unique) of ``unit``; returns the updated unit.

    Raises:
        ValueError: neuron indices that :func:`checked_neurons` refuses, or a linear of the unit that is not a float
            ``nn.Linear`` (a quantized model: prune the float model first); nothing is changed then.
    """
    keep = checked_neurons(unit, keep)
    if len(keep) == unit.n_neurons:
        return unit
    _check_float(model, (*unit.inputs, unit.output))
    idx = torch.tensor(keep, dtype=torch.long)
    rows = torch.cat([idx + c * unit.n_neurons for c in range(unit.chunks)])
    for name in unit.inputs:
        keep_linear(model.get_submodule(name), rows=rows)
    keep_linear(model.get_submodule(unit.output), cols=idx)
    container = model.get_submodule(unit.name)
    if isinstance(getattr(container, "intermediate_size", None), int):
        container.intermediate_size = len(keep)
    unit.n_neurons = len(keep)
    return unit


def expert_neuron_rows(layout: dict, neurons: torch.Tensor, interleaved: bool) -> torch.Tensor:
    """Positions along the output dimension of an expert's up (or fused gate/up) projection owned by ``neurons``
    (``I`` = ``layout["inter"]``): ``j`` and ``I + j`` for a concatenated gate/up (gate half, then up half),
    ``2j`` and ``2j + 1`` for an interleaved one (GPT-OSS), ``j`` without a gate."""
    if not layout["gate"]:
        return neurons
    if interleaved:
        return torch.stack([2 * neurons, 2 * neurons + 1], 1).flatten()
    return torch.cat([neurons, neurons + layout["inter"]])


def checked_expert_neurons(model: nn.Module, name: str, keep: Sequence[Sequence[int]]
                           ) -> tuple[dict, list[list[int]]]:
    """``(layout, keep)`` of the MoE experts module ``name`` with every expert's list sorted, after checking
    ``keep`` against it (nothing is changed).

    Raises:
        ValueError: not an experts module medquant knows, not one non-empty list per expert all of one length,
            or duplicate or out-of-range indices.
    """
    from ..quant.experts import experts_layout

    mod = model.get_submodule(name)
    lay = experts_layout(mod)
    if lay is None:
        raise ValueError(f"{name}: {type(mod).__name__} is not an experts module with 3-D weights medquant knows")
    e_n, n = lay["num_experts"], lay["inter"]
    keep = [sorted(int(j) for j in k) for k in keep]
    counts = {len(k) for k in keep}
    if len(keep) != e_n or len(counts) != 1 or 0 in counts:
        raise ValueError(f"{name}: need one non-empty keep list per expert ({e_n}), all of one length; got lengths "
                         f"{sorted(len(k) for k in keep)}")
    if any(len(set(k)) != len(k) or k[0] < 0 or k[-1] >= n for k in keep):
        raise ValueError(f"{name}: expert neuron indices must be unique and in [0, {n})")
    return lay, keep


@torch.no_grad()
def prune_experts(model: nn.Module, name: str, keep: Sequence[Sequence[int]]) -> int:
    """Keep, for every expert ``e`` of the MoE experts module ``name`` (3-D weights), its neurons ``keep[e]``
    (sorted, unique, the same count for every expert, as the stacked weights need); returns the new count.

    Neuron ``j`` of expert ``e`` owns the positions :func:`expert_neuron_rows` of ``gate_up_proj[e]`` (or
    ``up_proj[e]``) along its output dimension (with its bias entries) and position ``j`` of ``down_proj[e]``
    along its input dimension; transposed layouts (``(E, in, out)``) are indexed on the other axis."""
    mod = model.get_submodule(name)
    lay, keep = checked_expert_neurons(model, name, keep)
    n, new_n = lay["inter"], len(keep[0])
    if new_n == n:
        return n
    interleaved = not getattr(mod, "is_concatenated", True)
    up_name = "gate_up_proj" if lay["gate"] else "up_proj"
    up_axis, down_axis = (1, 0) if lay["transposed"] else (0, 1)  # axes of one expert's 2-D slice
    ups, downs, biases = [], [], []
    up, down = mod._parameters[up_name], mod._parameters["down_proj"]
    up_b = mod._parameters.get(up_name + "_bias") if lay["bias"] else None
    for e, k in enumerate(keep):
        idx = torch.tensor(k, dtype=torch.long, device=up.device)
        rows = expert_neuron_rows(lay, idx, interleaved)
        ups.append(up[e].index_select(up_axis, rows))
        downs.append(down[e].index_select(down_axis, idx))
        if up_b is not None:
            biases.append(up_b[e].index_select(0, rows))
    for pname, parts, ref in ((up_name, ups, up), ("down_proj", downs, down)) + (
            ((up_name + "_bias", biases, up_b),) if up_b is not None else ()):
        setattr(mod, pname, nn.Parameter(torch.stack(parts).contiguous(), requires_grad=ref.requires_grad))
    for attr in ("intermediate_dim", "intermediate_size", "expert_dim", "moe_intermediate_size"):
        if getattr(mod, attr, None) == n:
            setattr(mod, attr, new_n)
    return new_n
