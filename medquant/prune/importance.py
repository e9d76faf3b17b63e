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
    for a neuron, where ``X`` are the inputs of the output linear over all calibration tokens: the rows of a batch
    whose ``attention_mask`` is 0 (padding) are left out (``decoder_attention_mask`` for the decoder blocks of an
    encoder-decoder; vision blocks and batches without a ``(batch, seq)`` mask matching the input count every
    row). ``||X[:, j]||_2^2`` is summed over all batches, so the score does not depend on how the tokens are split
    into batches.

A key/value group (grouped-query attention pruned by whole groups) scores the sum of its query heads. The
cross-attention of an encoder-decoder block (:attr:`medquant.models.Block.cross_attention`) is a second attention
unit scored the same way from its own q / o projections (its o's inputs are the decoder's positions: the
``decoder_attention_mask`` applies), under the key ``"cross_heads"``.

Calibration data is an iterable of batches (a list, a data loader; one dict batch is refused, wrap it in a
list), each run with :func:`medquant.models.run_model`: a dict (``model(**batch)``), a tensor (``model(batch)``)
or a tuple/list (``model(*batch)``). A tensor or tuple is read by the names of ``model.forward``'s parameters it
binds to (``(input_ids, attention_mask)`` for a Hugging Face LM), so its ``attention_mask`` counts as a dict's
does. The Taylor loss is ``loss_fn(model, batch)`` when given; otherwise the model's own ``.loss`` (a causal LM
-- a model with ``lm_head`` and ``generation_config`` -- given integer ``input_ids`` and no ``labels`` gets
``labels = input_ids`` with the padding (``attention_mask == 0``) and a multimodal model's image / video / audio
placeholder tokens (:func:`medquant.models.runner.placeholder_token_ids`) set to -100, so the loss is next-token
cross-entropy over the real text tokens; an encoder-decoder given ``decoder_input_ids`` gets the decoder's next
tokens); otherwise, for models without a loss, the proxy ``0.5 * mean(y^2)`` of the
main output ``y`` (:func:`medquant.models.main_output`: the logits, else the last hidden state, else the first
element of a tuple), the mean over the non-padding positions (mask as above) and the features. Gradients are
computed also when the caller has disabled them (``torch.no_grad()``).

Every score must be finite: a NaN or inf score (NaN weights, float16 overflow in the activations or gradients)
raises ``ValueError`` naming the block, as does a scored linear that the calibration batches never run (e.g. a
vision tower given text-only batches). A scored linear that runs but gets no gradient is checked: when the loss
stays bit-identical with its output replaced by large random values, the loss does not read it (the last layer of
a vision tower whose features come from an earlier layer, LLaVA's ``vision_feature_layer = -2``) and its Taylor
importance is exactly 0 (warned); otherwise the model detached it and ``ValueError`` says so.
"""
from __future__ import annotations

import inspect
import warnings
from collections.abc import Callable, Iterable, Mapping
from typing import Any, cast

import torch
from torch import nn
from tqdm.auto import tqdm

from ..models.blocks import AttentionUnit, Block, stack_side
from ..models.runner import eval_mode, main_output, placeholder_token_ids, run_model

__all__ = ["METHODS", "block_scores", "calibration_loss"]

METHODS = ("magnitude", "taylor", "activation")


def _named(model: nn.Module, batch: Any) -> Mapping[str, Any]:
    """The batch's inputs by name: a mapping as it is; a tensor or tuple/list bound to the parameters of
    ``model.forward`` as :func:`run_model` passes them (``{}`` when they do not bind)."""
    if isinstance(batch, Mapping):
        return batch
    args = tuple(batch) if isinstance(batch, (tuple, list)) else (batch,)
    try:
        return inspect.signature(model.forward).bind_partial(*args).arguments
    except (TypeError, ValueError):
        return {}


def _mask(named: Mapping[str, Any], key: str | None, x: torch.Tensor) -> torch.Tensor | None:
    """``named[key] != 0`` when it is a ``(batch, seq)`` mask matching the leading dims of ``x`` (3-D or more)."""
    m = named.get(key) if key is not None else None
    if isinstance(m, torch.Tensor) and m.dim() == 2 and x.dim() >= 3 and tuple(x.shape[:2]) == tuple(m.shape):
        return (m != 0).to(x.device)
    return None


def _encoder_decoder(model: nn.Module) -> bool:
    return bool(getattr(getattr(model, "config", None), "is_encoder_decoder", False))


def calibration_loss(model: nn.Module, batch: Any,
                     loss_fn: Callable[[nn.Module, Any], torch.Tensor] | None = None) -> torch.Tensor:
    """The scalar loss used for Taylor importance.

    ``loss_fn(model, batch)`` when given; else the model's own ``.loss``, a causal LM getting ``labels`` when the
    batch (a dict, or a tensor / tuple bound to ``model.forward``'s parameters) has integer ``input_ids`` and no
    ``labels``: ``labels = input_ids`` with the padding (``attention_mask == 0``) and the image / video / audio
    placeholder tokens of :func:`medquant.models.runner.placeholder_token_ids` set to -100; for an encoder-decoder
    given ``decoder_input_ids`` ``d``, the decoder's next tokens ``labels[:, t] = d[:, t + 1]`` (-100 at the last
    position and where ``decoder_attention_mask == 0``), the targets of which ``d`` is the shifted input. Else
    ``0.5 * mean(y^2)`` of the main output ``y`` over its non-padding positions (``attention_mask``,
    ``decoder_attention_mask`` for an encoder-decoder, when it matches ``y``'s leading ``(batch, seq)`` dims) and
    features.

    Args:
        model: the model.
        batch: one calibration batch (a dict, a tensor or a tuple / list, run with :func:`run_model`).
        loss_fn: ``loss_fn(model, batch)`` replacing the default loss.

    Returns:
        The scalar loss tensor (with its autograd graph).
    """
    if loss_fn is not None:
        return loss_fn(model, batch)
    named = _named(model, batch)
    extra: dict[str, Any] = {}
    ids = named.get("input_ids")
    if ("labels" not in named and isinstance(ids, torch.Tensor) and not ids.is_floating_point()
            and hasattr(model, "lm_head") and hasattr(model, "generation_config")):
        labels, mask = ids.clone(), named.get("attention_mask")
        dec = named.get("decoder_input_ids")
        if isinstance(dec, torch.Tensor) and _encoder_decoder(model):  # targets: the decoder's next tokens
            labels = torch.cat([dec[:, 1:], torch.full_like(dec[:, :1], -100)], 1)
            mask = named.get("decoder_attention_mask")
        if isinstance(mask, torch.Tensor) and mask.shape == labels.shape:
            labels[mask == 0] = -100
        for token in placeholder_token_ids(model):  # image / video / audio features sit there, no text token
            labels[labels == token] = -100
        extra["labels"] = labels
    out = run_model(model, batch, **extra)
    loss = getattr(out, "loss", None)
    if isinstance(loss, torch.Tensor):
        return loss
    y = main_output(out)
    keep = _mask(named, "decoder_attention_mask" if _encoder_decoder(model) else "attention_mask", y)
    if keep is not None:
        y = y[keep]
    return 0.5 * y.float().pow(2).mean()


def _iter(calib: Iterable[Any] | None, desc: str, progress: bool):
    if calib is None:
        raise ValueError(f"{desc} needs calibration data: pass calib=<iterable of batches>")
    if isinstance(calib, Mapping):
        raise TypeError(f"{desc}: calib must be an iterable of batches, got one batch ({type(calib).__name__}); "
                        "pass calib=[batch]")
    try:
        total = len(calib)  # type: ignore[arg-type]
    except TypeError:
        total = None
    n = 0
    for batch in tqdm(calib, desc=desc, total=total, disable=not progress, leave=False):
        if isinstance(batch, str):
            raise TypeError(f"{desc}: calib must be an iterable of batches, but batch {n} is the string {batch!r} "
                            "(a key of one dict batch?); pass calib=[batch]")
        n += 1
        yield batch
    if n == 0:
        raise ValueError(f"{desc}: the calibration data is empty")


def _lin(model: nn.Module, name: str) -> nn.Linear:
    return cast(nn.Linear, model.get_submodule(name))


def _head_sum(per_channel: torch.Tensor, head_dim: int) -> torch.Tensor:
    return per_channel.reshape(-1, head_dim).sum(1)


def _neuron_sum(per_row: torch.Tensor, chunks: int) -> torch.Tensor:
    """Per-row values of an FFN input with ``chunks`` blocks of rows (fused gate_up: 2) -> per neuron."""
    return per_row.reshape(chunks, -1).sum(0)


def _attention_units(b: Block) -> list[tuple[str, AttentionUnit]]:
    """``[(score key, unit)]``: the block's attention (``"heads"``) and, with it, its cross-attention
    (``"cross_heads"``)."""
    if b.attention is None:
        return []
    return [("heads", b.attention)] + ([("cross_heads", b.cross_attention)] if b.cross_attention is not None else [])


@torch.no_grad()
def _magnitude(model: nn.Module, blocks: list[Block]) -> dict[str, dict[str, torch.Tensor]]:
    out: dict[str, dict[str, torch.Tensor]] = {}
    for b in blocks:
        s: dict[str, torch.Tensor] = {}
        for key, a in _attention_units(b):
            s[key] = (_head_sum(_lin(model, a.q).weight.float().pow(2).sum(1), a.q_rows)
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
    # output linear -> (its block, the batch key of its padding mask: none for vision blocks)
    targets: dict[str, tuple[str, str | None]] = {}
    for b in blocks:
        key = None if b.role == "vision" else (
            "decoder_attention_mask" if stack_side(b.stack) == "decoder" else "attention_mask")
        for _, a in _attention_units(b):
            targets[a.o] = (b.name, key)
        if b.ffn is not None:
            targets[b.ffn.output] = (b.name, key)
    sums: dict[str, torch.Tensor] = {}
    handles = []
    named: Mapping[str, Any] = {}

    def make_hook(name: str, key: str | None):
        def hook(mod, args):
            x = args[0].detach()
            keep = _mask(named, key, x)
            if keep is not None:  # padding rows are not calibration tokens
                x = x[keep]
            x = x.float()
            sq = x.reshape(-1, x.shape[-1]).pow(2).sum(0)
            sums[name] = sums[name] + sq if name in sums else sq
        return hook

    for name, (_, key) in targets.items():
        handles.append(_lin(model, name).register_forward_pre_hook(make_hook(name, key)))
    try:
        for batch in _iter(calib, "activation statistics", progress):
            named = _named(model, batch)
            run_model(model, batch)
    finally:
        for h in handles:
            h.remove()
    missing = [name for name in targets if name not in sums]
    if missing:
        raise ValueError(f"activation statistics: the calibration batches never ran {missing[0]} (block "
                         f"{targets[missing[0]][0]}; {len(missing)} scored linear(s) in all): give batches that "
                         "reach every block in scope (e.g. images for a vision tower: --calib-images on the command "
                         "line) or narrow the scope")
    out: dict[str, dict[str, torch.Tensor]] = {}
    for b in blocks:
        s: dict[str, torch.Tensor] = {}
        for hkey, a in _attention_units(b):
            ch = sums[a.o].sqrt() * _lin(model, a.o).weight.float().norm(dim=0)
            s[hkey] = _head_sum(ch, a.head_dim)
        if b.ffn is not None:
            f = b.ffn
            s["neurons"] = sums[f.output].sqrt() * _lin(model, f.output).weight.float().norm(dim=0)
        out[b.name] = s
    return out


def _rows_gw(lin: nn.Linear) -> torch.Tensor:
    assert lin.weight.grad is not None  # checked by _taylor
    gw = (lin.weight.grad.float() * lin.weight.float()).sum(1)
    if lin.bias is not None and lin.bias.grad is not None:
        gw = gw + lin.bias.grad.float() * lin.bias.float()
    return gw


def _cols_gw(lin: nn.Linear) -> torch.Tensor:
    assert lin.weight.grad is not None  # checked by _taylor
    return (lin.weight.grad.float() * lin.weight.float()).sum(0)


def _taylor(model: nn.Module, blocks: list[Block], calib, loss_fn, progress: bool
            ) -> dict[str, dict[str, torch.Tensor]]:
    names: set[str] = set()
    for b in blocks:
        for _, a in _attention_units(b):
            names.update((a.q, a.o))
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
    ran: set[str] = set()  # scored linears whose output joined the autograd graph in this batch
    unused: set[str] = set()  # ... whose output the loss provably does not read (importance 0)

    def _record(name: str):
        def hook(_m: nn.Module, _args: Any, out: Any) -> None:
            if isinstance(out, torch.Tensor) and out.requires_grad:
                ran.add(name)
        return hook

    handles = [_lin(model, nm).register_forward_hook(_record(nm)) for nm in sorted(names)]
    try:
        for batch in _iter(calib, "taylor importance", progress):
            for p in params:
                p.grad = None
            ran.clear()
            with torch.enable_grad():  # also inside the caller's torch.no_grad()
                loss = calibration_loss(model, batch, loss_fn)
                if not torch.isfinite(loss):
                    raise ValueError(f"the calibration loss is {loss.item()} on batch {n}; Taylor importance needs "
                                     "a finite loss")
                if loss.requires_grad:  # else no scored linear was reached at all: named below
                    loss.backward()
            missing = sorted(nm for nm in names if _lin(model, nm).weight.grad is None)
            never = [nm for nm in missing if nm not in ran]
            if never:
                raise ValueError(f"taylor importance: {never[0]} ({len(never)} scored linear(s) in all) gets no "
                                 f"gradient from the calibration loss on batch {n}: the calibration batches never "
                                 "run it (e.g. no images for a vision tower: --calib-images on the command line) or "
                                 "run it without gradients; give batches that reach every block in scope or narrow "
                                 "the scope")
            if missing:
                new = [nm for nm in missing if nm not in unused]  # checked once: whether a layer is read is structural
                if new:
                    _check_unread(model, batch, loss_fn, new, n)
                unused.update(missing)
                for nm in missing:  # d loss / d theta = 0 exactly: the loss does not read their outputs
                    lin = _lin(model, nm)
                    for p in lin.parameters():
                        p.grad = torch.zeros_like(p)
            n += 1
            with torch.no_grad():
                for b in blocks:
                    s = acc[b.name]
                    for hkey, a in _attention_units(b):
                        v = (_head_sum(_rows_gw(_lin(model, a.q)), a.q_rows)
                             + _head_sum(_cols_gw(_lin(model, a.o)), a.head_dim)).abs()
                        s[hkey] = s[hkey] + v if hkey in s else v
                    if b.ffn is not None:
                        f = b.ffn
                        ch = _cols_gw(_lin(model, f.output))
                        for nm in f.inputs:
                            ch = ch + _neuron_sum(_rows_gw(_lin(model, nm)), f.chunks)
                        s["neurons"] = s["neurons"] + ch.abs() if "neurons" in s else ch.abs()
    finally:
        for h in handles:
            h.remove()
        for p in model.parameters():
            p.requires_grad_(saved_req[id(p)])
        for p in params:
            p.grad = saved_grad[id(p)]
    if unused:
        first = min(unused)
        warnings.warn(f"taylor importance: {first} ({len(unused)} scored linear(s) in all) runs, but the calibration "
                      "loss does not read its output (perturbing it leaves the loss bit-identical; e.g. the last "
                      "layer of a vision tower whose features are taken from an earlier layer, LLaVA's "
                      "vision_feature_layer = -2): its importance is 0, so its heads / neurons are removed first; "
                      "drop_blocks can remove such a block whole", stacklevel=4)
    return {k: {kk: vv / n for kk, vv in v.items()} for k, v in acc.items()}


@torch.no_grad()
def _check_unread(model: nn.Module, batch: Any, loss_fn, names: list[str], n: int) -> None:
    """Refuse, unless the loss of ``batch`` is bit-identical with the outputs of the linears ``names`` (which ran
    but got no gradient) replaced by large random values: only then is their gradient exactly 0 because the loss
    does not read them, and not because the model detached them (``.detach()``, ``torch.no_grad()`` inside its
    forward), which would make a 0 score wrong."""
    gen = torch.Generator().manual_seed(n)

    def scramble(_m: nn.Module, _args: Any, out: Any) -> Any:
        if not isinstance(out, torch.Tensor):
            return out
        noise = torch.randn(out.shape, generator=gen, dtype=torch.float32).to(out.device, out.dtype)
        return noise * (1.0 + float(out.detach().abs().amax()))

    base = calibration_loss(model, batch, loss_fn)
    handles = [_lin(model, nm).register_forward_hook(scramble) for nm in names]
    try:
        changed = calibration_loss(model, batch, loss_fn)
    finally:
        for h in handles:
            h.remove()
    if not torch.equal(base, changed):
        raise ValueError(f"taylor importance: {names[0]} ({len(names)} scored linear(s) in all) runs and the "
                         f"calibration loss depends on its output (batch {n}: {base.item():.6g} -> "
                         f"{changed.item():.6g} with its output scrambled), but no gradient reaches it: the model "
                         "detaches it (.detach() or torch.no_grad() inside its forward), so its Taylor score would "
                         "be wrong; use importance='activation' or 'magnitude', or narrow the scope")


def _check_finite(scores: torch.Tensor, what: str) -> None:
    """Refuse scores that are not all finite: NaN / inf cannot be ranked, so the structures removed would be
    arbitrary.

    Args:
        scores: importance scores.
        what: what they score, leading the message (``"taylor importance of model.layers.0 heads"``).

    Raises:
        ValueError: some scores are NaN or inf (how many, of how many).
    """
    bad = int((~torch.isfinite(scores)).sum())
    if bad:
        raise ValueError(f"{what}: {bad} of {scores.numel()} scores are not finite (NaN / inf weights, or NaN / inf "
                         "calibration activations or gradients, e.g. float16 overflow); such scores cannot be ranked")


def block_scores(model: nn.Module, blocks: list[Block], method: str = "magnitude",
                 calib: Iterable[Any] | None = None,
                 loss_fn: Callable[[nn.Module, Any], torch.Tensor] | None = None,
                 progress: bool = True) -> dict[str, dict[str, torch.Tensor]]:
    """Per-block importance: ``{block: {"heads": (n_heads,), "neurons": (n_neurons,)}}`` (float32, CPU), and
    ``"cross_heads": (n_heads of the cross-attention,)`` for a block with a cross-attention unit.

    The scores are those of the module docstring. Raises ``ValueError`` for an unknown ``method``, missing or
    empty ``calib`` (activation, taylor), a non-finite Taylor loss, a scored linear the calibration batches never
    run, or a non-finite score; ``TypeError`` when ``calib`` is one dict batch instead of an iterable of batches.
    The model's train/eval modes, ``requires_grad`` flags and ``.grad`` are left as they were.
    """
    if method not in METHODS:
        raise ValueError(f"unknown importance {method!r}; use one of {', '.join(METHODS)}")
    with eval_mode(model):
        if method == "magnitude":
            res = _magnitude(model, blocks)
        elif method == "activation":
            res = _activation(model, blocks, calib, progress)
        else:
            res = _taylor(model, blocks, calib, loss_fn, progress)
    for k, v in res.items():
        for kk, vv in v.items():
            _check_finite(vv, f"{method} importance of {k} {kk}")
    return {k: {kk: vv.detach().cpu() for kk, vv in v.items()} for k, v in res.items()}
