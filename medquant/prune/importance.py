"""Importance of attention heads and FFN neurons.

For a head ``h`` with channels ``J_h`` (its ``head_dim`` rows of q and columns of the output projection o) and an
FFN neuron ``j`` (row ``j`` of each input linear, column ``j`` of the output linear):

``magnitude``
    ``||theta_S||_2`` over the structure's weights: ``sqrt(sum_{j in J_h} ||W_q[j,:]||^2 + ||W_o[:,j]||^2)`` for a
    head, ``sqrt(sum_in ||W_in[j,:]||^2 + ||W_out[:,j]||^2)`` for a neuron. Needs no data. A head's q rows are
    its ``2 * head_dim`` rows in gated attention (query and gate); a neuron's rows of a fused ``gate_up_proj`` are
    ``j`` and ``I + j``.
``taylor``
    First-order Taylor estimate of the loss change when the structure is zeroed (Molchanov et al. 2019):
    ``mean_batches |sum_{theta in S} g_theta * theta|`` with the gradient ``g`` of the calibration loss
    (weights and biases of the q rows / input rows, and the o / output columns).
``activation``
    Activation statistics on calibration data, weighted by the outgoing weights (as in Wanda):
    ``sum_{j in J_h} ||X_o[:, j]||_2 * ||W_o[:, j]||_2`` for a head and ``||X_out[:, j]||_2 * ||W_out[:, j]||_2``
    for a neuron, where ``X`` are the inputs of the output linear over all calibration tokens.

A key/value group (grouped-query attention pruned by whole groups) scores the sum of its query heads.

Calibration data is an iterable of batches, each run with :func:`medquant.models.run_model`: a dict
(``model(**batch)``), a tensor (``model(batch)``) or a tuple/list (``model(*batch)``). The Taylor loss is
``loss_fn(model, batch)`` when given; otherwise the model's own ``.loss`` (a causal LM gets ``labels =
input_ids``, so the loss is next-token cross-entropy); otherwise, for models without a loss, the proxy
``0.5 * mean(y^2)`` of the main output ``y`` (:func:`medquant.models.main_output`: the logits, else the last
hidden state, else the first element of a tuple).
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ..models.blocks import Block
from ..models.runner import eval_mode, main_output, run_model

__all__ = ["METHODS", "block_scores", "calibration_loss"]

METHODS = ("magnitude", "taylor", "activation")


def calibration_loss(model: nn.Module, batch: Any,
                     loss_fn: Callable[[nn.Module, Any], torch.Tensor] | None = None) -> torch.Tensor:
    """The scalar loss used for Taylor importance (see the module docstring for the default)."""
    if loss_fn is not None:
        return loss_fn(model, batch)
    extra: dict[str, Any] = {}
    if (isinstance(batch, Mapping) and "labels" not in batch and "input_ids" in batch
            and hasattr(model, "lm_head") and hasattr(model, "generation_config")):
        labels = batch["input_ids"].clone()
        if "attention_mask" in batch:
            labels[batch["attention_mask"] == 0] = -100
        extra["labels"] = labels
    out = run_model(model, batch, **extra)
    loss = getattr(out, "loss", None)
    if isinstance(loss, torch.Tensor):
        return loss
    y = main_output(out)
    return 0.5 * y.float().pow(2).mean()


def _iter(calib: Iterable[Any] | None, desc: str, progress: bool):
    if calib is None:
        raise ValueError(f"{desc} needs calibration data: pass calib=<iterable of batches>")
    try:
        total = len(calib)  # type: ignore[arg-type]
    except TypeError:
        total = None
    n = 0
    for batch in tqdm(calib, desc=desc, total=total, disable=not progress, leave=False):
        n += 1
        yield batch
    if n == 0:
        raise ValueError(f"{desc}: the calibration data is empty")


def _lin(model: nn.Module, name: str) -> nn.Linear:
    return model.get_submodule(name)


def _head_sum(per_channel: torch.Tensor, head_dim: int) -> torch.Tensor:
    return per_channel.reshape(-1, head_dim).sum(1)


def _neuron_sum(per_row: torch.Tensor, chunks: int) -> torch.Tensor:
    """Per-row values of an FFN input with ``chunks`` blocks of rows (fused gate_up: 2) -> per neuron."""
    return per_row.reshape(chunks, -1).sum(0)


@torch.no_grad()
def _magnitude(model: nn.Module, blocks: list[Block]) -> dict[str, dict[str, torch.Tensor]]:
    out: dict[str, dict[str, torch.Tensor]] = {}
    for b in blocks:
        s: dict[str, torch.Tensor] = {}
        if b.attention is not None:
            a = b.attention
            s["heads"] = (_head_sum(_lin(model, a.q).weight.float().pow(2).sum(1), a.q_rows)
                          + _head_sum(_lin(model, a.o).weight.float().pow(2).sum(0), a.head_dim)).sqrt()
        if b.ffn is not None:
            f = b.ffn
            ch = _lin(model, f.output).weight.float().pow(2).sum(0)
            for n in f.inputs:
                ch = ch + _neuron_sum(_lin(model, n).weight.float().pow(2).sum(1), f.chunks)
            s["neurons"] = ch.sqrt()
        out[b.name] = s
    return out


@torch.no_grad()
def _activation(model: nn.Module, blocks: list[Block], calib, progress: bool) -> dict[str, dict[str, torch.Tensor]]:
    targets = {}
    for b in blocks:
        if b.attention is not None:
            targets[b.attention.o] = None
        if b.ffn is not None:
            targets[b.ffn.output] = None
    sums: dict[str, torch.Tensor] = {}
    handles = []

    def make_hook(name: str):
        def hook(mod, args):
            x = args[0].detach().float()
            sq = x.reshape(-1, x.shape[-1]).pow(2).sum(0)
            sums[name] = sums[name] + sq if name in sums else sq
        return hook

    for name in targets:
        handles.append(_lin(model, name).register_forward_pre_hook(make_hook(name)))
    try:
        for batch in _iter(calib, "activation statistics", progress):
            run_model(model, batch)
    finally:
        for h in handles:
            h.remove()
    out: dict[str, dict[str, torch.Tensor]] = {}
    for b in blocks:
        s: dict[str, torch.Tensor] = {}
        if b.attention is not None:
            a = b.attention
            ch = sums[a.o].sqrt() * _lin(model, a.o).weight.float().norm(dim=0)
            s["heads"] = _head_sum(ch, a.head_dim)
        if b.ffn is not None:
            f = b.ffn
            s["neurons"] = sums[f.output].sqrt() * _lin(model, f.output).weight.float().norm(dim=0)
        out[b.name] = s
    return out


def _rows_gw(lin: nn.Linear) -> torch.Tensor:
    gw = (lin.weight.grad.float() * lin.weight.float()).sum(1)
    if lin.bias is not None and lin.bias.grad is not None:
        gw = gw + lin.bias.grad.float() * lin.bias.float()
    return gw


def _cols_gw(lin: nn.Linear) -> torch.Tensor:
    return (lin.weight.grad.float() * lin.weight.float()).sum(0)


def _taylor(model: nn.Module, blocks: list[Block], calib, loss_fn, progress: bool
            ) -> dict[str, dict[str, torch.Tensor]]:
    names = set()
    for b in blocks:
        if b.attention is not None:
            names.update((b.attention.q, b.attention.o))
        if b.ffn is not None:
            names.update((*b.ffn.inputs, b.ffn.output))
    params = [p for n in names for p in _lin(model, n).parameters()]
    saved_req = {id(p): p.requires_grad for p in model.parameters()}
    saved_grad = {id(p): p.grad for p in params}
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    acc: dict[str, dict[str, torch.Tensor]] = {b.name: {} for b in blocks}
    n = 0
    try:
        for batch in _iter(calib, "taylor importance", progress):
            for p in params:
                p.grad = None
            loss = calibration_loss(model, batch, loss_fn)
            if not torch.isfinite(loss):
                raise ValueError(f"the calibration loss is {loss.item()} on batch {n}; Taylor importance needs a "
                                 "finite loss")
            loss.backward()
            n += 1
            with torch.no_grad():
                for b in blocks:
                    s = acc[b.name]
                    if b.attention is not None:
                        a = b.attention
                        v = (_head_sum(_rows_gw(_lin(model, a.q)), a.q_rows)
                             + _head_sum(_cols_gw(_lin(model, a.o)), a.head_dim)).abs()
                        s["heads"] = s["heads"] + v if "heads" in s else v
                    if b.ffn is not None:
                        f = b.ffn
                        ch = _cols_gw(_lin(model, f.output))
                        for nm in f.inputs:
                            ch = ch + _neuron_sum(_rows_gw(_lin(model, nm)), f.chunks)
                        s["neurons"] = s["neurons"] + ch.abs() if "neurons" in s else ch.abs()
    finally:
        for p in model.parameters():
            p.requires_grad_(saved_req[id(p)])
        for p in params:
            p.grad = saved_grad[id(p)]
    return {k: {kk: vv / n for kk, vv in v.items()} for k, v in acc.items()}


def block_scores(model: nn.Module, blocks: list[Block], method: str = "magnitude",
                 calib: Iterable[Any] | None = None,
                 loss_fn: Callable[[nn.Module, Any], torch.Tensor] | None = None,
                 progress: bool = True) -> dict[str, dict[str, torch.Tensor]]:
    """Per-block importance: ``{block: {"heads": (n_heads,), "neurons": (n_neurons,)}}`` (float32, CPU)."""
    if method not in METHODS:
        raise ValueError(f"unknown importance {method!r}; use one of {', '.join(METHODS)}")
    with eval_mode(model):
        if method == "magnitude":
            res = _magnitude(model, blocks)
        elif method == "activation":
            res = _activation(model, blocks, calib, progress)
        else:
            res = _taylor(model, blocks, calib, loss_fn, progress)
    return {k: {kk: vv.detach().cpu() for kk, vv in v.items()} for k, v in res.items()}
