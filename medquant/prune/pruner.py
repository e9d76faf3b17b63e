"""``StructuredPruner``: physically remove attention heads, FFN neurons and CNN channels.

Usage (three lines on a Hugging Face model)::

    from medquant.prune import StructuredPruner
    pruner = StructuredPruner(head_ratio=0.3, ffn_ratio=0.3, importance="activation")
    plan = pruner.prune(model, calib=batches)       # plan + apply, in place; returns the PrunePlan

Counting. A ratio ``r`` of ``n`` structures removes ``floor(r*n + 0.5)`` of them, those with the lowest importance
scores (:mod:`medquant.prune.ratios`; e.g. ``head_ratio=0.3, ffn_ratio=0.3`` removes 30% of the heads and 30% of
the FFN neurons of every layer). Grouped-query attention (``n_kv < n_heads``, ``g = n_heads / n_kv`` query
heads per key/value head) is pruned consistently, in one of two ways (``gqa=``):

* ``"query"`` (default): remove ``floor(r*g + 0.5)`` query heads inside *every* key/value group (the lowest scoring
  of each group); key/value heads stay. Every group keeps the same size, as ``repeat_kv`` requires.
* ``"group"``: remove ``floor(r*n_kv + 0.5)`` whole key/value groups (the key/value head and its ``g`` query
  heads), scored by the sum of their query heads' scores; shrinks k/v and the KV cache as well.

A removal that would leave a layer with no head / no neuron / no channel raises ``ValueError`` naming the layer.
Key/value heads whose keys and values later layers reuse (KV sharing: Gemma 3n / Gemma 4 ``num_kv_shared_layers``,
the layer with ``store_full_length_kv`` hands them to the ``is_kv_shared_layer`` layers of its type) are never
removed: ``gqa="group"`` (or any head ratio when each key/value head has one query head) on such a layer raises
``ValueError``; ``gqa="query"`` removes query heads there only.

Per-layer ratios: ``head_ratio`` / ``ffn_ratio`` may be a float (uniform), a sequence with one ratio per block in
scope (see :func:`medquant.models.transformer_blocks`), or a dict ``{block name: ratio}`` (blocks left out keep
everything). :func:`medquant.prune.layers.allocate_ratios` turns the block-influence scores of
:func:`medquant.prune.layers.block_influence` (how much each block changes its input, ``1 - cos(x, y)``) into such
per-layer ratios, and ``drop_blocks`` removes whole blocks (equal to skipping them: indices into a block list,
such as a LLaVA-style ``config.vision_feature_layer``, Qwen2.5-VL's ``fullatt_block_indexes``, Qwen3-VL's
``deepstack_visual_indexes`` or IDEFICS's ``cross_layer_interval``, are renumbered by
:func:`medquant.prune.layers.drop_blocks`, which refuses a drop no index can express; see
:func:`medquant.prune.layers.index_updates`).

Config. After pruning, each Hugging Face config whose blocks all kept the same counts is updated
(``num_attention_heads``, ``num_key_value_heads``, ``head_dim``, ``intermediate_size``) when a fresh module built
from it has exactly the pruned shapes; then ``save_pretrained`` / ``from_pretrained`` round-trips the model. Where
the config cannot express the result (per-layer counts, or encoders whose head size is derived as
``hidden_size / num_attention_heads``: BERT, SigLIP, CLIP) it is left as it was, ``plan.hf_config_exact`` is
False, and :func:`medquant.prune.save_pruned` / :func:`medquant.prune.load_pruned` rebuild every layer's shapes.
"""
from __future__ import annotations

import dataclasses
import inspect
import numbers
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..models.blocks import AttentionUnit, Block, shares_position_bias, stack_side, transformer_blocks
from ..models.introspect import language_model_layers, model_roles, vision_layers
from ..quant.experts import experts_layout
from .importance import METHODS, block_scores
from .ratios import check_ratio, lowest_indices, n_to_remove, plain_ratios
from .surgery import (
    checked_expert_neurons,
    checked_heads,
    checked_neurons,
    expert_neuron_rows,
    head_norm_lists,
    head_tables,
    prune_attention,
    prune_experts,
    prune_ffn,
)

__all__ = ["PrunePlan", "StructuredPruner", "parameter_report"]

Ratio = float | Sequence[float] | dict[str, float]


@dataclass
class PrunePlan:
    """What to remove; JSON-serialisable through :meth:`to_dict`.

    ``heads[block]`` / ``kv_heads[block]`` / ``neurons[block]`` list the *kept* indices (sorted) of the block's
    attention query heads, key/value heads and FFN neurons; ``removed_*`` give the complement.
    ``cross_heads[block]`` / ``cross_kv_heads[block]`` do the same for the cross-attention of an encoder-decoder
    block (:attr:`medquant.models.Block.cross_attention`: BART's ``encoder_attn``, BERT's ``crossattention``),
    a second attention unit scored and pruned on its own with the block's head ratio; a plan dict written before
    these fields existed has none (its cross-attention heads are kept). ``channels`` maps
    a CNN producer conv to its kept output channels; ``drop_blocks`` lists blocks removed whole.

    ``expert_neurons[block]`` lists the kept neurons of every routed expert of the block's MoE experts (3-D
    weights): each expert keeps its own highest-magnitude neurons, every expert the same number (the stacked weights
    need one size), ``floor(r*I + 0.5)`` removed of ``I`` and the kept count rounded to a multiple of 8 (for
    transformers' grouped experts kernels; the shared expert of the block follows the same rule); scored by
    magnitude whatever ``importance`` is.

    ``skipped[block]`` lists, for each block in scope that the ratios asked to prune but that has a part the
    pruner cannot handle, the reason (fused qkv, linear attention, convolution mixer, MoE experts in an unknown
    layout, cross-attention kept, a norm over all heads or all FFN neurons at once, an FFN activation threshold
    taken over all its neurons (Gemma 3n's activation sparsity), a per-head parameter it does
    not know, a stage of several blocks, a layer of the model's block list without a prunable attention or FFN:
    :func:`checked_block`, :func:`unprunable_layers`); ``config_notes`` says why a config was left as it was when
    the pruned model does not fit it (``hf_config_exact`` False).

    Attributes:
        heads: block name -> kept query-head indices.
        kv_heads: block name -> kept key/value-head indices (grouped-query attention).
        cross_heads: block name -> kept query-head indices of the block's cross-attention.
        cross_kv_heads: block name -> kept key/value-head indices of the block's cross-attention.
        neurons: block name -> kept FFN neuron indices.
        channels: producer conv name -> kept output channels (plain CNNs).
        drop_blocks: names of blocks removed whole.
        channel_groups: for CNNs, each producer conv with its BatchNorm and consumer layers.
        sizes: original counts per block / conv (``heads``, ``kv_heads``, ``cross_heads``, ``cross_kv_heads``,
            ``neurons``, ``channels``).
        importance: the score that chose the kept indices (``"magnitude"``, ``"taylor"``, ``"activation"``).
        hf_config_exact: after :func:`apply_plan`, whether a fresh model built from the updated config loads
            the pruned weights (``None`` before applying or for non-Hugging Face models).
        skipped: block name -> reasons it was left unpruned.
        config_notes: why a config was left as it was.
        expert_neurons: block name -> kept neurons of each routed expert.
    """

    heads: dict[str, list[int]] = field(default_factory=dict)
    kv_heads: dict[str, list[int]] = field(default_factory=dict)
    neurons: dict[str, list[int]] = field(default_factory=dict)
    channels: dict[str, list[int]] = field(default_factory=dict)
    drop_blocks: list[str] = field(default_factory=list)
    channel_groups: list[dict[str, Any]] = field(default_factory=list)  # CNN producer -> BN -> consumers
    sizes: dict[str, dict[str, int]] = field(default_factory=dict)  # original counts per block / conv
    importance: str = "magnitude"
    hf_config_exact: bool | None = None
    skipped: dict[str, list[str]] = field(default_factory=dict)
    config_notes: list[str] = field(default_factory=list)
    expert_neurons: dict[str, list[list[int]]] = field(default_factory=dict)  # block -> kept neurons per expert
    cross_heads: dict[str, list[int]] = field(default_factory=dict)  # block -> kept cross-attention query heads
    cross_kv_heads: dict[str, list[int]] = field(default_factory=dict)  # block -> kept cross-attention k/v heads

    def removed_heads(self, block: str) -> list[int]:
        """Query heads removed from ``block`` (the complement of ``heads[block]``).

        Args:
            block: a block name of the plan.

        Returns:
            Sorted head indices.
        """
        return sorted(set(range(self.sizes[block]["heads"])) - set(self.heads.get(block, [])))

    def removed_kv_heads(self, block: str) -> list[int]:
        """Key/value heads removed from ``block`` (the complement of ``kv_heads[block]``).

        Args:
            block: a block name of the plan.

        Returns:
            Sorted key/value head indices.
        """
        return sorted(set(range(self.sizes[block]["kv_heads"])) - set(self.kv_heads.get(block, [])))

    def removed_cross_heads(self, block: str) -> list[int]:
        """Cross-attention query heads removed from ``block`` (the complement of ``cross_heads[block]``).

        Args:
            block: a block name of the plan with a cross-attention.

        Returns:
            Sorted head indices.
        """
        return sorted(set(range(self.sizes[block]["cross_heads"])) - set(self.cross_heads.get(block, [])))

    def removed_neurons(self, block: str) -> list[int]:
        """FFN neurons removed from ``block`` (the complement of ``neurons[block]``).

        Args:
            block: a block name of the plan.

        Returns:
            Sorted neuron indices.
        """
        return sorted(set(range(self.sizes[block]["neurons"])) - set(self.neurons.get(block, [])))

    def removed_channels(self, conv: str) -> list[int]:
        """Output channels removed from the producer conv ``conv`` (the complement of ``channels[conv]``).

        Args:
            conv: a producer conv name of the plan.

        Returns:
            Sorted channel indices.
        """
        return sorted(set(range(self.sizes[conv]["channels"])) - set(self.channels.get(conv, [])))

    def to_dict(self) -> dict[str, Any]:
        """The plan as a JSON-serialisable dict (every field; :meth:`from_dict` reads it back).

        Returns:
            ``{field name: value}``.
        """
        return {"heads": self.heads, "kv_heads": self.kv_heads, "neurons": self.neurons,
                "channels": self.channels, "drop_blocks": self.drop_blocks,
                "channel_groups": self.channel_groups, "sizes": self.sizes,
                "importance": self.importance, "hf_config_exact": self.hf_config_exact,
                "skipped": self.skipped, "config_notes": self.config_notes,
                "expert_neurons": self.expert_neurons, "cross_heads": self.cross_heads,
                "cross_kv_heads": self.cross_kv_heads}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PrunePlan:
        """The plan written by :meth:`to_dict`.

        Args:
            d: the dict (JSON-decoded); unknown keys raise ``TypeError`` from the dataclass constructor; keys left
                out (a plan written by an older medquant: no ``cross_heads``) take their defaults.

        Returns:
            The plan.
        """
        return cls(**d)


def _per_block(ratio: Ratio, blocks: list[Block], what: str) -> dict[str, float]:
    if isinstance(ratio, dict):
        names = {b.name for b in blocks}
        unknown = sorted(set(ratio) - names)
        if unknown:
            raise ValueError(f"{what}: unknown block names {unknown[:3]}; blocks in scope: "
                             f"{[b.name for b in blocks][:4]}...")
        return {b.name: check_ratio(ratio.get(b.name, 0.0), f"{what}[{b.name!r}]") for b in blocks}
    if isinstance(ratio, (list, tuple)):
        if len(ratio) != len(blocks):
            raise ValueError(f"{what}: got {len(ratio)} per-layer ratios for {len(blocks)} blocks in scope")
        return {b.name: check_ratio(r, f"{what}[{i}]") for i, (b, r) in enumerate(zip(blocks, ratio))}
    r = check_ratio(ratio, what)
    return {b.name: r for b in blocks}


def _as_ratio(ratio: Any, what: str, forms: str, sequences: bool = True) -> Any:
    """``ratio`` checked and normalised: a number (NumPy / 0-d torch scalars become a float), a dict, or (when
    ``sequences``) a list / tuple; a 1-D NumPy array or torch tensor becomes a list. Entries of dicts and sequences
    are checked later, per block. float32 / float16 / bfloat16 values are read as typed (their shortest decimal,
    :func:`medquant.prune.ratios.typed_float`).

    Raises:
        TypeError: a type that is none of these; ``forms`` names the accepted forms besides a number.
        ValueError: a number outside ``[0, 1)``, or an array with more than one dimension.
    """
    if hasattr(ratio, "tolist") and isinstance(getattr(ratio, "ndim", None), int):  # NumPy / torch
        if ratio.ndim > 1 or (ratio.ndim == 1 and not sequences):
            raise ValueError(f"{what} must be a number in [0, 1) (fraction to remove) or {forms}; got an array of "
                             f"shape {tuple(ratio.shape)}")
        ratio = plain_ratios(ratio)
    if isinstance(ratio, dict) or (sequences and isinstance(ratio, (list, tuple))):
        return ratio
    if not isinstance(ratio, numbers.Real) or isinstance(ratio, bool):
        raise TypeError(f"{what} must be a number in [0, 1) (fraction to remove) or {forms}; got "
                        f"{type(ratio).__name__} {ratio!r}")
    return check_ratio(ratio, what)


def _check_not_quantized(model: nn.Module) -> None:
    """Refuse a model holding quantized layers: heads, FFN neurons and channels are removed from float
    ``nn.Linear`` / ``nn.Conv2d`` layers only (slicing a quantized layer's packed codes and per-group scales by input
    columns would need the removed columns to fill whole quantization groups)."""
    from ..quant.modules import QuantConv2d, QuantLinear

    found = [(name, type(m).__name__) for name, m in model.named_modules() if isinstance(m, (QuantLinear, QuantConv2d))]
    if found:
        name, cls = found[0]
        more = f" (and {len(found) - 1} more quantized layers)" if len(found) > 1 else ""
        raise ValueError(
            f"{name} is a {cls}{more}: pruning removes heads, FFN neurons and channels from float nn.Linear / "
            "nn.Conv2d layers only; prune the float model first, then quantize it")


class StructuredPruner:
    """Remove whole attention heads, FFN neurons and CNN channels, physically.

    Args:
        head_ratio: fraction of attention heads to remove per layer (a number, also a NumPy scalar; a per-block
            sequence: list, tuple or 1-D NumPy array / torch tensor; or a dict).
        ffn_ratio: fraction of FFN neurons to remove per layer (same forms).
        channel_ratio: fraction of output channels to remove from each prunable conv of a plain CNN
            (float or ``{conv name: ratio}``); see :mod:`medquant.prune.cnn`. A float ``r`` removes
            ``min(floor(r * n + 0.5), n - 1)`` of a conv's ``n`` channels (every conv keeps one); a dict entry
            that would remove all of its conv's channels raises ``ValueError``. A plain CNN (no transformer blocks)
            is pruned by this ratio only, a model with transformer blocks by ``head_ratio`` / ``ffn_ratio`` /
            ``drop_blocks`` only: a ratio above 0 that does not apply to the model raises ``ValueError`` in
            :meth:`plan`.
        importance: ``"magnitude"``, ``"taylor"`` or ``"activation"`` (see :mod:`medquant.prune.importance`).
        gqa: ``"query"`` or ``"group"`` for grouped-query attention (module docstring).
        scope: which blocks: ``None`` (the language model of LMs/VLMs, the tower of vision encoders), ``"language"``,
            ``"vision"`` or ``"all"``.
        drop_blocks: names of whole blocks to remove (see :func:`medquant.prune.layers.least_influential`).
        progress: show tqdm bars during calibration.

    Raises:
        ValueError: an unknown ``importance`` or ``gqa``, a ratio outside [0, 1), or a ratio array with more
            than one dimension.
        TypeError: a ratio that is none of the accepted forms, or ``drop_blocks`` given as one string.
    """

    def __init__(self, head_ratio: Ratio = 0.0, ffn_ratio: Ratio = 0.0, *, channel_ratio: float | dict = 0.0,
                 importance: str = "magnitude", gqa: str = "query", scope: str | list[str] | None = None,
                 drop_blocks: Sequence[str] = (), progress: bool = True) -> None:
        if importance not in METHODS:
            raise ValueError(f"unknown importance {importance!r}; use one of {', '.join(METHODS)}")
        if gqa not in ("query", "group"):
            raise ValueError(f"gqa must be 'query' or 'group', got {gqa!r}")
        per_block = "a sequence (list, tuple, 1-D array) with one ratio per block in scope, or a dict {block: ratio}"
        head_ratio = _as_ratio(head_ratio, "head_ratio", per_block)
        ffn_ratio = _as_ratio(ffn_ratio, "ffn_ratio", per_block)
        channel_ratio = _as_ratio(channel_ratio, "channel_ratio", "a dict {conv name: ratio}", sequences=False)
        self.head_ratio, self.ffn_ratio, self.channel_ratio = head_ratio, ffn_ratio, channel_ratio
        self.importance, self.gqa, self.scope = importance, gqa, scope
        if isinstance(drop_blocks, str):  # list("model.layers.0") would name one block per character
            raise TypeError(f"drop_blocks must be a sequence of block names, e.g. [{drop_blocks!r}], got the string "
                            f"{drop_blocks!r}")
        self.drop_blocks = list(drop_blocks)
        self.progress = progress

    # ------------------------------------------------------------------------------------------ planning
    def plan(self, model: nn.Module, calib: Iterable[Any] | None = None,
             loss_fn: Callable[[nn.Module, Any], torch.Tensor] | None = None,
             example_input: Any = None) -> PrunePlan:
        """Score the structures and choose what to remove; the model is not changed.

        Args:
            model: the float model (a quantized one is refused: prune first, then quantize).
            calib: calibration batches (needed for ``taylor`` / ``activation``; for a CNN the first batch also
                serves as the example input that traces shapes).
            loss_fn: ``loss_fn(model, batch)`` overrides the Taylor loss.
            example_input: the input that traces a CNN's shapes when ``calib`` is not given.

        Returns:
            The :class:`PrunePlan`.

        Raises:
            ValueError: the model is quantized, or has no transformer block with prunable attention or FFN in
                scope and is not a plain CNN; or a ratio asks for something the model does not have:
                ``channel_ratio`` above 0 for a model with transformer blocks, ``head_ratio`` / ``ffn_ratio``
                above 0 or ``drop_blocks`` for a plain CNN (a model without transformer blocks); or the head ratio
                would remove key/value heads that later layers reuse (KV sharing, module docstring).
        """
        _check_not_quantized(model)
        plan = PrunePlan(importance=self.importance)
        if isinstance(calib, Iterable) and not isinstance(calib, (list, tuple)) and calib is not None:
            calib = list(calib)  # iterated more than once
        blocks = [checked_block(model, b) for b in transformer_blocks(model, self.scope, clamp_wrappers=True)]
        cnn = not blocks and not _is_hf(model)
        channels = _asks(self.channel_ratio, "channel_ratio")
        if not blocks and not cnn:
            raise ValueError(f"{type(model).__name__}: no transformer blocks with prunable attention or FFN found "
                             f"in scope {self.scope!r}" + (" (channel_ratio prunes plain nn.Module CNNs, not Hugging "
                                                           "Face models)" if channels else ""))
        if blocks and channels:
            raise ValueError(f"channel_ratio={self.channel_ratio!r} removes output channels of plain CNNs (models "
                             f"without transformer blocks), but {type(model).__name__} has {len(blocks)} transformer "
                             f"blocks in scope {self.scope!r} ({blocks[0].name}, ...): channel pruning does not apply "
                             "to it; set channel_ratio to 0 and prune its heads / FFN neurons with head_ratio / "
                             "ffn_ratio")
        if cnn:
            self._refuse_transformer_requests(model)
            from .cnn import plan_channels

            plan_channels(model, self, plan, calib, loss_fn, example_input)
            return plan
        known = {b.name for b in transformer_blocks(model, "all", clamp_wrappers=True)} | {b.name for b in blocks}
        for name in self.drop_blocks:
            if name not in known:
                raise ValueError(f"drop_blocks: {name!r} is not a block of this model; blocks: "
                                 f"{sorted(known)[:4]}...")
        _check_droppable(model, self.drop_blocks)
        plan.drop_blocks = list(self.drop_blocks)
        hr = _per_block(self.head_ratio, blocks, "head_ratio")
        fr = _per_block(self.ffn_ratio, blocks, "ffn_ratio")
        need = [b for b in blocks if b.name not in plan.drop_blocks
                and ((b.attention is not None and hr[b.name] > 0) or (b.ffn is not None and fr[b.name] > 0))]
        for b in blocks:  # what the ratios ask for but cannot be done: said per block, never silently left
            if b.name in plan.drop_blocks:
                continue
            why = []
            if hr[b.name] > 0 and "heads" in b.unsupported:
                why.append(f"heads: {b.unsupported['heads']}")
            if fr[b.name] > 0 and "ffn" in b.unsupported:
                why.append(f"ffn: {b.unsupported['ffn']}")
            if fr[b.name] > 0 and b.experts is not None and experts_layout(model.get_submodule(b.experts)) is None:
                why.append(f"ffn: MoE experts {b.experts} ({type(model.get_submodule(b.experts)).__name__}) are "
                           "in a layout medquant does not know; their neurons are kept")
            if why:
                plan.skipped[b.name] = why
        if _asks(self.head_ratio, "head_ratio") or _asks(self.ffn_ratio, "ffn_ratio"):
            plan.skipped.update(unprunable_layers(model, self.scope, blocks))
        for part, ratios, has in (("heads", hr, lambda b: b.attention is not None),
                                  ("ffn", fr, lambda b: b.ffn is not None or _known_experts(model, b))):
            asked = [b for b in blocks if ratios[b.name] > 0 and b.name not in plan.drop_blocks]
            if asked and not any(has(b) for b in asked):
                raise ValueError(f"{'head_ratio' if part == 'heads' else 'ffn_ratio'} asks to prune {part} of "
                                 f"{len(asked)} block(s) in scope {self.scope!r}, but none can be: "
                                 f"{asked[0].name}: {asked[0].unsupported.get(part, '?')}; set it to 0 for them")
        if plan.skipped:
            warnings.warn(f"pruning skips parts of {len(plan.skipped)} block(s) (plan.skipped says why), e.g. "
                          f"{next(iter(plan.skipped))}: {next(iter(plan.skipped.values()))[0]}", UserWarning,
                          stacklevel=2)
        scores = block_scores(model, need, self.importance, calib, loss_fn, self.progress) if need else {}
        for b in blocks:
            if b.name in plan.drop_blocks:
                continue
            sizes: dict[str, int] = {}
            if b.attention is not None:
                a = b.attention
                sizes.update(heads=a.n_heads, kv_heads=a.n_kv)
                kh, kk = list(range(a.n_heads)), list(range(a.n_kv))
                if hr[b.name] > 0:
                    kh, kk = self._choose_heads(b.name, a, scores[b.name]["heads"], hr[b.name])
                    _refuse_shared_kv(model, b.name, a, kk, f"gqa={self.gqa!r}")
                plan.heads[b.name], plan.kv_heads[b.name] = kh, kk
            if b.attention is not None and b.cross_attention is not None:
                c = b.cross_attention
                sizes.update(cross_heads=c.n_heads, cross_kv_heads=c.n_kv)
                kh, kk = list(range(c.n_heads)), list(range(c.n_kv))
                if hr[b.name] > 0:
                    kh, kk = self._choose_heads(b.name, c, scores[b.name]["cross_heads"], hr[b.name])
                plan.cross_heads[b.name], plan.cross_kv_heads[b.name] = kh, kk
            if b.ffn is not None:
                f = b.ffn
                sizes["neurons"] = f.n_neurons
                keep = list(range(f.n_neurons))
                if fr[b.name] > 0:
                    k = n_to_remove(fr[b.name], f.n_neurons) if b.experts is None else \
                        f.n_neurons - _moe_kept(fr[b.name], f.n_neurons)
                    if k >= f.n_neurons:
                        raise ValueError(f"{b.name}: ffn ratio {fr[b.name]} would remove all {f.n_neurons} FFN "
                                         "neurons; use a smaller ratio or drop the block")
                    drop = set(lowest_indices(scores[b.name]["neurons"], k))
                    keep = [j for j in keep if j not in drop]
                plan.neurons[b.name] = keep
            if _known_experts(model, b):
                mod = model.get_submodule(b.experts)
                lay = experts_layout(mod)
                sizes.update(experts=lay["num_experts"], expert_neurons=lay["inter"])
                kept = [list(range(lay["inter"]))] * lay["num_experts"]
                if fr[b.name] > 0:
                    k = lay["inter"] - _moe_kept(fr[b.name], lay["inter"])
                    if k >= lay["inter"]:
                        raise ValueError(f"{b.name}: ffn ratio {fr[b.name]} would remove all {lay['inter']} neurons "
                                         "of every expert; use a smaller ratio")
                    scores_e = _expert_scores(mod, lay)
                    kept = [sorted(set(range(lay["inter"])) - set(lowest_indices(sc, k))) for sc in scores_e]
                plan.expert_neurons[b.name] = kept
            plan.sizes[b.name] = sizes
        return plan

    def _refuse_transformer_requests(self, model: nn.Module) -> None:
        """Raise ``ValueError`` when ``head_ratio`` / ``ffn_ratio`` ask to remove something, or ``drop_blocks``
        names blocks, of a model without transformer blocks (pruned as a plain CNN, by ``channel_ratio`` only)."""
        requests = [(what, value, thing) for what, value, thing, asks in (
            ("head_ratio", self.head_ratio, "attention heads", _asks(self.head_ratio, "head_ratio")),
            ("ffn_ratio", self.ffn_ratio, "FFN neurons", _asks(self.ffn_ratio, "ffn_ratio")),
            ("drop_blocks", self.drop_blocks, "whole transformer blocks", bool(self.drop_blocks))) if asks]
        if not requests:
            return
        what, value, thing = requests[0]
        n_conv = sum(isinstance(m, nn.Conv2d) for m in model.modules())
        has = f"it has {n_conv} Conv2d layers" if n_conv else "it has no Conv2d layer either"
        raise ValueError(f"{what}={value!r} asks to remove {thing}, but {type(model).__name__} has no transformer "
                         f"blocks (no nn.ModuleList of blocks with q/k/v/o attention projections or FFN linears; "
                         f"{has}): a plain CNN is pruned by channel_ratio only; leave "
                         f"{' and '.join(r[0] for r in requests)} out for this model")

    def _choose_heads(self, name: str, a: AttentionUnit, s: torch.Tensor, r: float) -> tuple[list[int], list[int]]:
        """Kept ``(query heads, key/value heads)`` of the attention unit ``a`` of block ``name`` (its
        self-attention or its cross-attention) by the scores ``s`` at ratio ``r``."""
        g = a.group_size
        if g == 1 or self.gqa == "group":
            gs = s.reshape(a.n_kv, g).sum(1)
            k = n_to_remove(r, a.n_kv)
            if k >= a.n_kv:
                raise ValueError(f"{name}: head ratio {r} would remove all {a.n_heads} attention heads of {a.name} "
                                 f"({a.n_kv} key/value groups); use a smaller ratio or drop the block")
            drop = set(lowest_indices(gs, k))
            kk = [i for i in range(a.n_kv) if i not in drop]
            return [h for h in range(a.n_heads) if h // g in kk], kk
        k = n_to_remove(r, g)
        if k >= g:
            raise ValueError(f"{name}: head ratio {r} would remove all {g} query heads of every key/value group "
                             f"(grouped-query attention, {a.n_heads} query / {a.n_kv} key/value heads); use a "
                             "smaller ratio, gqa='group', or drop the block")
        keep: list[int] = []
        for kv in range(a.n_kv):
            members = list(range(kv * g, (kv + 1) * g))
            drop = {members[i] for i in lowest_indices(s[members], k)}
            keep.extend(h for h in members if h not in drop)
        return keep, list(range(a.n_kv))

    # ------------------------------------------------------------------------------------------ applying
    def apply(self, model: nn.Module, plan: PrunePlan) -> nn.Module:
        """Physically remove what ``plan`` says, in place; updates configs (see the module docstring).

        Args:
            model: the model the plan was made for.
            plan: the plan (:meth:`plan`, or :meth:`PrunePlan.from_dict`).

        Returns:
            ``model``, pruned.
        """
        return apply_plan(model, plan, scope=self.scope)

    def prune(self, model: nn.Module, calib: Iterable[Any] | None = None,
              loss_fn: Callable[[nn.Module, Any], torch.Tensor] | None = None,
              example_input: Any = None) -> PrunePlan:
        """:meth:`plan` then :meth:`apply`.

        Args:
            model: the float model, pruned in place.
            calib: calibration batches (as :meth:`plan`).
            loss_fn: overrides the Taylor loss (as :meth:`plan`).
            example_input: traces a CNN's shapes (as :meth:`plan`).

        Returns:
            The plan, with ``hf_config_exact`` filled in.
        """
        plan = self.plan(model, calib, loss_fn, example_input)
        self.apply(model, plan)
        return plan


_MOE_ALIGN = 8


def _moe_kept(ratio: float, n: int) -> int:
    """Neurons kept of ``n`` in an MoE block (experts and shared expert alike): ``n - floor(r*n + 0.5)`` rounded to
    the nearest multiple of 8 (at least 8) when ``n`` is one: transformers' grouped experts kernels
    (``torch.nn.functional.grouped_mm``) need 16-byte row strides."""
    kept = n - n_to_remove(ratio, n)
    if n % _MOE_ALIGN or n < _MOE_ALIGN:
        return kept
    return min(n, max(_MOE_ALIGN, _MOE_ALIGN * round(kept / _MOE_ALIGN)))


def _known_experts(model: nn.Module, b: Block) -> bool:
    return b.experts is not None and experts_layout(model.get_submodule(b.experts)) is not None


@torch.no_grad()
def _expert_scores(mod: nn.Module, lay: dict) -> torch.Tensor:
    """``(E, I)`` magnitude of every expert's neurons: ``sqrt(sum ||up rows of j||^2 + ||down column j||^2)``."""
    up = mod._parameters["gate_up_proj" if lay["gate"] else "up_proj"].detach().float()
    down = mod._parameters["down_proj"].detach().float()
    if lay["transposed"]:  # (E, in, out) / (E, I, H) -> (E, out, in) / (E, H, I)
        up, down = up.transpose(1, 2), down.transpose(1, 2)
    rows = up.pow(2).sum(2)  # (E, out)
    idx = torch.arange(lay["inter"])
    pos = expert_neuron_rows(lay, idx, not getattr(mod, "is_concatenated", True)).reshape(-1, lay["inter"])
    return (rows[:, pos].sum(1) + down.pow(2).sum(1)).sqrt()


def _asks(ratio: Any, what: str) -> bool:
    """Whether ``ratio`` (a number, a sequence or a dict, as :func:`_as_ratio` leaves it) asks to remove anything:
    a value above 0; every entry is checked first (``what`` names it in the error)."""
    if isinstance(ratio, dict):
        checked = [check_ratio(r, f"{what}[{k!r}]") for k, r in ratio.items()]
    elif isinstance(ratio, (list, tuple)):
        checked = [check_ratio(r, f"{what}[{i}]") for i, r in enumerate(ratio)]
    else:
        checked = [check_ratio(ratio, what)]
    return max(checked, default=0.0) > 0


def _norm_over(container: nn.Module, widths: set[int], exclude: set[str]) -> str | None:
    """The name of a direct child of ``container`` that normalises a whole width in ``widths`` at once (a 1-D
    ``weight`` of that size, no linear inside), or None."""
    for name, child in container.named_children():
        w = getattr(child, "weight", None)
        if (name in exclude or isinstance(child, nn.Linear) or not isinstance(w, torch.Tensor) or w.dim() != 1
                or w.numel() not in widths or any(isinstance(m, nn.Linear) for m in child.modules())):
            continue
        return name
    return None


def checked_block(model: nn.Module, b: Block) -> Block:
    """``b`` with the units whose pruning would not be exact taken out and said in ``unsupported``.

    A norm over all heads together inside the attention (Kosmos-2's ``inner_attn_ln`` before the output
    projection, a ``q_norm`` / ``k_norm`` over the full projected width as in OLMo 2) computes its mean and
    variance over every head, so removing heads changes what the kept heads produce; likewise a norm over all FFN
    neurons (Kosmos-2's ``ffn_layernorm`` between ``fc1`` and ``fc2``), and so does an FFN with activation sparsity
    (Gemma 3n's ``activation_sparsity`` above 0: its gate activations are cut at ``mean + k * std`` over all of its
    neurons), whose neurons are kept. Per-head norms (weight ``(n_heads, d)``
    or ``(d,)``; a ``(d,)`` norm is shared by every head, also when a single key/value head makes it as wide as
    the whole key projection; StableLM's lists of one ``LayerNorm(d)`` per head, :func:`head_norm_lists`), relative
    position bias tables with one column per head and attention sinks are pruned exactly and stay. Any
    other parameter of the attention with one entry per head, another ``nn.Linear`` as wide as the heads' channels
    (AFM-MoE's output gate), or ``nn.ModuleList`` of one module per head that is
    not such a norm list, keeps the heads, as does an attention whose heads are mixed before the output projection
    (DiffLlama's differential attention pairs head ``h`` with head ``h + n/2``), and so does a layer that holds
    several attention modules of the same kind (a stage of several blocks, e.g. a Swin stage of depth 2): only
    its first block would be seen. A block list whose holder has an ``nn.Embedding`` with one column per head (MPNet's
    ``encoder.relative_attention_bias``, added in every block) keeps its heads. T5-style attention keeps its heads too
    (:func:`medquant.models.blocks.shares_position_bias`: the relative position bias of the stack's first block is
    added in every block, so no block can lose heads alone); T5's FFN neurons are pruned. A block's cross-attention
    (:attr:`medquant.models.Block.cross_attention`) is checked the same way: when it cannot lose heads exactly it is
    taken out (its heads are kept, said in ``unsupported["heads"]``) and the self-attention is still pruned.

    Args:
        model: the model holding the block.
        b: a block of :func:`medquant.models.transformer_blocks`.

    Returns:
        ``b`` itself when nothing is in the way, else a copy with ``attention`` / ``ffn`` set to None and the
        reason under ``unsupported["heads"]`` / ``unsupported["ffn"]``.
    """
    attention, ffn, why = b.attention, b.ffn, dict(b.unsupported)
    if attention is not None and shares_position_bias(model.get_submodule(attention.holder)):
        # T5: the bias of block 0 is added in every block of the stack (the reason: transformer_blocks)
        why.setdefault("heads", f"{attention.name} adds a relative position bias shared by its whole stack; its "
                                "heads are kept")
        attention = None
    if attention is not None:
        problem = _stack_head_bias(model, b.stack, attention.n_heads) or _attention_problem(model, attention)
        if problem is not None:
            attention = None
            why["heads"] = problem
    cross = b.cross_attention if attention is not None else None
    if cross is not None:
        problem = _attention_problem(model, cross)
        if problem is not None:  # the cross-attention keeps its heads; the self-attention is still pruned
            cross = None
            why.setdefault("heads", f"cross-attention {b.cross_attention.name}: {problem}")
    twins = _attention_twins(model, b)
    if twins:
        attention = ffn = cross = None
        why["heads"] = why["ffn"] = (f"this layer holds {len(twins)} attention modules of the same kind "
                                     f"({', '.join(twins[:3])}): a stage of several blocks, which medquant does not "
                                     "prune one by one; its heads and neurons are kept")
    if ffn is not None:
        own = {n.rpartition(".")[2] for n in (*ffn.inputs, ffn.output)}
        hit = _norm_over(model.get_submodule(ffn.name), {ffn.n_neurons}, own) if ffn.name != b.name else None
        if hit is not None:
            why["ffn"] = (f"{ffn.name}.{hit} normalises all {ffn.n_neurons} FFN neurons together: removing neurons "
                          "would change the kept ones' output; its neurons are kept")
            ffn = None
    if ffn is not None:
        sparsity = getattr(model.get_submodule(ffn.name), "activation_sparsity", None)
        if isinstance(sparsity, numbers.Real) and not isinstance(sparsity, bool) and sparsity > 0:
            why["ffn"] = (f"{ffn.name} keeps only the gate activations above mean + k * std taken over all "
                          f"{ffn.n_neurons} FFN neurons (activation sparsity {sparsity}, Gemma 3n): removing neurons "
                          "would change the kept ones' output; its neurons are kept")
            ffn = None
    if attention is b.attention and ffn is b.ffn and cross is b.cross_attention:
        return b
    return dataclasses.replace(b, attention=attention, ffn=ffn, unsupported=why, cross_attention=cross)


def _stack_head_bias(model: nn.Module, stack: str, n_heads: int) -> str | None:
    """Why no block of the block list ``stack`` can lose heads when the module holding it has an ``nn.Embedding``
    with one column per head (MPNet's ``encoder.relative_attention_bias``: a relative position bias computed once
    and added to the scores of every block, head by head), or None."""
    parent = stack.rpartition(".")[0]
    holder = model.get_submodule(parent) if parent else model
    for name, child in holder.named_children():
        if isinstance(child, nn.Embedding) and child.embedding_dim == n_heads and n_heads > 1:
            where = f"{parent}.{name}" if parent else name
            return (f"{where} is a position bias with one column per head ({n_heads}) added in every block of "
                    f"{stack}, so no block can lose heads alone; its heads are kept")
    return None


#: attention classes whose forward cannot run with fewer heads than their config gives: class name -> why
_WIDTH = "reshapes its output to the model width (embed_dim), not to heads x head_dim"
_FIXED_HEAD_COUNT = {
    "TrOCRAttention": _WIDTH,
    "MoonshineAttention": "reshapes its queries with config.num_key_value_heads, shared by every layer",
    "XGLMAttention": _WIDTH,
    "MvpAttention": _WIDTH,
    "LEDDecoderAttention": _WIDTH,
    "GroupViTAttention": _WIDTH,
    "SpeechT5Attention": _WIDTH,
}


#: attention classes whose heads do not each own their q / k / v rows and o columns alone: class name -> why
_MIXED_HEADS = {
    "DiffLlamaAttention": "pairs query head h with head h + n_heads / 2 and splits the value heads into two halves "
                          "(differential attention), each pair writing 2 x head_dim columns of o_proj after a norm "
                          "over the pair",
}


def _attention_problem(model: nn.Module, a: AttentionUnit) -> str | None:
    """Why removing heads of the attention unit ``a`` would not be exact (:func:`checked_block`), or None."""
    cls = type(model.get_submodule(a.holder)).__name__
    fixed = _FIXED_HEAD_COUNT.get(cls)
    if fixed is not None:  # pruned, its forward would fail (a shape error), so it keeps its heads
        return f"{cls} {fixed}; its heads are kept"
    mixed = _MIXED_HEADS.get(cls)
    if mixed is not None:  # pruned, its forward would run and give another output
        return f"{cls} {mixed}: removing heads would change the kept heads' output; its heads are kept"
    # a norm of width head_dim is applied per head (shared by every head: Qwen3, Gemma 3); it is the width of a
    # whole projection only with a single (key/value) head, whose removal is refused anyway
    widths = {model.get_submodule(a.o).in_features, model.get_submodule(a.q).out_features,
              model.get_submodule(a.k).out_features} - {a.head_dim}
    own = {n.rpartition(".")[2] for n in (a.q, a.k, a.v, a.o, a.q_norm, a.k_norm) if n}
    for cname in dict.fromkeys((a.name, a.holder)):
        hit = _norm_over(model.get_submodule(cname), widths, own)
        if hit is not None:
            return (f"{cname}.{hit} normalises all heads together (a norm of width "
                    f"{model.get_submodule(cname + '.' + hit).weight.numel()}): removing heads would "
                    "change the kept heads' output; its heads are kept")
    per_head = _unknown_per_head(model, a)
    if per_head:
        if isinstance(dict(model.named_modules()).get(per_head), nn.Linear):  # else a parameter's name
            return (f"{per_head} is a linear with one row / column per head channel besides the q / k / v / o "
                    "projections, which medquant does not prune; its heads are kept")
        return f"{per_head} has one entry per head in a form medquant does not prune; its heads are kept"
    return None


def _unknown_per_head(model: nn.Module, a) -> str | None:
    """A parameter inside the attention container ``a.name`` (outside its projections, per-head norms and
    relative position tables) with a dimension of ``n_heads`` (or ``n_kv``) entries, an ``nn.Linear`` besides the
    projections with as many input or output features as the heads have channels (``n_heads * head_dim``, or
    ``n_kv * head_dim``: AFM-MoE's output gate ``gate_proj``, applied head channel by head channel), or an
    ``nn.ModuleList`` of
    ``n_heads`` (or ``n_kv``) modules with parameters other than a list of per-head norms
    (:func:`medquant.prune.surgery.head_norm_lists`), or None."""
    if a.n_heads < 2:
        return None
    cont = model.get_submodule(a.name)
    known = [n for n in (a.q, a.k, a.v, a.o, a.q_norm, a.k_norm) if n]
    known += [f"{a.name}.{n}.relative_position_bias_table" if n else f"{a.name}.relative_position_bias_table"
              for n, _ in head_tables(cont, a.n_heads)]
    sinks = cont._parameters.get("sinks")
    if isinstance(sinks, nn.Parameter) and tuple(sinks.shape) == (a.n_heads,):
        known.append(f"{a.name}.sinks")
    for pname, p in cont.named_parameters():
        full = f"{a.name}.{pname}"
        if any(full == k or full.startswith(k + ".") for k in known):
            continue
        if any(d in (a.n_heads, a.n_kv) for d in p.shape):
            return full
    channels = {a.n_heads * a.q_rows, a.n_heads * a.head_dim, a.n_kv * a.head_dim}
    for mname, m in cont.named_modules():  # a linear with one row / column per head channel (AFM-MoE's gate_proj)
        full = f"{a.name}.{mname}" if mname else a.name
        if (isinstance(m, nn.Linear) and not any(full == k or full.startswith(k + ".") for k in known)
                and (m.in_features in channels or m.out_features in channels)):
            return full
    holder = model.get_submodule(a.holder)
    norm_lists = {id(m) for n in {a.n_heads, a.n_kv} for m in head_norm_lists(holder, n, a.head_dim)}
    for mname, m in cont.named_modules():  # one module per head (StableLM's per-head norms are known and pruned)
        if (isinstance(m, nn.ModuleList) and len(m) in (a.n_heads, a.n_kv) and id(m) not in norm_lists
                and any(True for _ in m.parameters())):
            full = f"{a.name}.{mname}"
            if not any(full == k or full.startswith(k + ".") or k.startswith(full + ".") for k in known):
                return full
    return None


def _attention_twins(model: nn.Module, b: Block) -> list[str]:
    """Names of the modules inside block ``b`` of the same class as its attention container, when there is more
    than one (cross-attention such as ``encoder_attn`` aside): the block is a stage of several blocks."""
    if b.attention is None:
        return []
    cls = type(model.get_submodule(b.attention.name))
    twins = [f"{b.name}.{n}" for n, m in model.get_submodule(b.name).named_modules()
             if type(m) is cls and not any(k in n for k in ("encoder_attn", "cross", "EncDecAttention"))]
    return twins if len(twins) > 1 else []


def unprunable_layers(model: nn.Module, scope: str | Sequence[str] | None, blocks: Sequence[Block]
                      ) -> dict[str, list[str]]:
    """Layers of the model's block lists in ``scope`` that are not among ``blocks``, each with the reason.

    :func:`medquant.models.transformer_blocks` leaves out a layer in which it finds neither an attention nor an
    FFN it can prune (projections wrapped in modules other than a clamp around one ``nn.Linear``; a
    convolutional stage); pruning reports them in ``plan.skipped`` instead of leaving them silently.

    Args:
        model: a model with roles (for a plain ``nn.Module`` the result is empty).
        scope: the pruner's scope (``None``, ``"language"``, ``"vision"``, ``"all"`` or a list of those).
        blocks: the blocks found in that scope.

    Returns:
        ``{layer name: [reason]}`` in layer order.
    """
    roles = model_roles(model)
    if not roles:
        return {}
    if scope is None:
        wanted = {"language"} if "language" in roles else {"vision"}
    elif scope == "all":
        wanted = {"language", "vision"}
    else:
        wanted = {scope} if isinstance(scope, str) else set(scope)
    names = (language_model_layers(model) if "language" in wanted else []) + (
        vision_layers(model) if "vision" in wanted else [])
    found = {b.name for b in blocks}
    out: dict[str, list[str]] = {}
    for name in names:
        if name in found:
            continue
        layer = model.get_submodule(name)
        wrapped = sorted({type(m).__name__ for n, m in layer.named_modules()
                          if n.rpartition(".")[2] in _PROJECTION_NAMES and not isinstance(m, nn.Linear)})
        kinds = ", ".join(sorted({type(m).__name__ for m in layer.children()})[:4]) or type(layer).__name__
        detail = (f"its projections are {', '.join(wrapped)} modules, not nn.Linear" if wrapped
                  else f"children: {kinds}")
        out[name] = [f"no attention or FFN that medquant can prune in this layer ({detail}); it is kept whole"]
    return out


_PROJECTION_NAMES = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "fc1", "fc2"}


def _is_hf(model: nn.Module) -> bool:
    from transformers import PreTrainedModel

    return isinstance(model, PreTrainedModel)


def apply_plan(model: nn.Module, plan: PrunePlan, scope: str | list[str] | None = "all") -> nn.Module:
    """Apply ``plan`` to ``model`` in place (see :class:`StructuredPruner`).

    Args:
        model: the float model the plan was made for.
        plan: what to remove; its ``hf_config_exact`` and ``config_notes`` are filled in here.
        scope: the block scope used to find the blocks of a non-Hugging Face model (``"all"`` by default).

    Returns:
        ``model``, pruned.

    Raises:
        ValueError: the model is quantized, the plan names blocks the model does not have, or does not fit them
            (sizes other than the plan's, invalid indices, every block of a list dropped, layers that share a
            module with different kept indices), or has an entry it would not apply although it removes something
            (heads or FFN neurons of a part :func:`checked_block` marks unprunable, cross-attention heads of a
            block without a prunable cross-attention, expert neurons of a block without MoE experts, ``kv_heads``
            without ``heads``; an entry keeping every index is skipped), or removes key/value heads that later
            layers reuse (KV sharing, module docstring); the
            whole plan is checked before any layer changes, so the model is left as it was.
    """
    _check_not_quantized(model)
    found = {b.name: b for b in transformer_blocks(model, "all" if _is_hf(model) else scope, clamp_wrappers=True)}
    blocks = {name: checked_block(model, b) for name, b in found.items()}
    entries = (set(plan.heads) | set(plan.kv_heads) | set(plan.neurons) | set(plan.expert_neurons)
               | set(plan.cross_heads) | set(plan.cross_kv_heads))
    if not _is_hf(model) and not blocks and entries:
        raise ValueError("the plan names transformer blocks but the model has none")
    missing = sorted((entries | set(plan.drop_blocks)) - set(blocks))
    if missing:
        raise ValueError(f"the plan names blocks this model does not have: {missing[:3]}")
    for name in sorted(entries):
        _check_applies(plan, blocks[name], found[name])
    shared = _check_plan(model, plan, blocks)
    if plan.channels:
        from .cnn import apply_channels

        apply_channels(model, plan)
    touched: list[Block] = []
    for name in sorted(set(plan.heads) | set(plan.neurons) | set(plan.expert_neurons) | set(plan.cross_heads)):
        b = blocks[name]
        if name in plan.heads and b.attention is not None and (name, "heads") not in shared:
            prune_attention(model, b.attention, plan.heads[name], plan.kv_heads.get(name))
        if name in plan.cross_heads and b.cross_attention is not None and (name, "cross_heads") not in shared:
            prune_attention(model, b.cross_attention, plan.cross_heads[name], plan.cross_kv_heads.get(name))
        if name in plan.neurons and b.ffn is not None and (name, "neurons") not in shared:
            prune_ffn(model, b.ffn, plan.neurons[name])
        if name in plan.expert_neurons and b.experts is not None and (name, "experts") not in shared:
            prune_experts(model, b.experts, plan.expert_neurons[name])
        touched.append(b)
    aligned = _renumber_alignment_heads(model, plan, blocks)
    if plan.drop_blocks:
        from .layers import _drop

        _drop(model, plan.drop_blocks)  # renumbers the indices into the block lists (index_updates)
    if _is_hf(model):
        stacks = {b.stack for b in touched} | {n.rpartition(".")[0] for n in plan.drop_blocks}
        plan.hf_config_exact, notes = _sync_configs(model, stacks, dropped=bool(plan.drop_blocks))
        plan.config_notes = notes + aligned
    return model


def _renumber_alignment_heads(model: nn.Module, plan: PrunePlan, blocks: dict[str, Block]) -> list[str]:
    """Whisper's ``generation_config.alignment_heads`` (``[decoder layer, cross-attention head]`` pairs read by
    ``generate(return_token_timestamps=True)``) renumbered to what ``plan`` keeps: a head's index among the kept
    cross-attention heads of its decoder block, a layer's index among the kept decoder layers
    (``plan.drop_blocks``); the pair of a removed head or of a dropped layer is left out (the attribute is removed
    when none is left). Returns the notes for ``plan.config_notes``."""
    gc = getattr(model, "generation_config", None)
    pairs = getattr(gc, "alignment_heads", None)
    pruned = {name: plan.cross_heads[name] for name in plan.cross_heads
              if blocks[name].cross_attention is not None
              and len(plan.cross_heads[name]) != plan.sizes.get(name, {}).get("cross_heads")}

    def decoder_index(name: str) -> int | None:
        stack, _, idx = name.rpartition(".")
        return int(idx) if stack_side(stack) == "decoder" and idx.isdigit() else None

    dropped = {i for i in (decoder_index(n) for n in plan.drop_blocks) if i is not None}
    if not pairs or not (pruned or dropped):
        return []
    # a kept head's new index is its rank among the kept heads (prune_attention keeps them in their original order,
    # however the plan lists them)
    layers = {i: sorted(int(h) for h in keep) for i, keep in ((decoder_index(n), k) for n, k in pruned.items())
              if i is not None}
    out, gone = [], []
    for layer, head in pairs:
        keep = layers.get(int(layer))
        if int(layer) in dropped or (keep is not None and int(head) not in keep):
            gone.append([layer, head])
            continue
        shift = sum(1 for d in dropped if d < int(layer))
        out.append([int(layer) - shift, head if keep is None else keep.index(int(head))])
    if not gone and out == pairs:
        return []
    if out:
        gc.alignment_heads = out
    else:
        del gc.alignment_heads
    return ["generation_config.alignment_heads renumbered to the kept cross-attention heads and decoder layers"
            + (f"; pairs of removed heads or dropped layers left out: {gone}" if gone else "")
            + ("" if out else " (none is left: token timestamps are not available)")]


def _keeps_all(keep: Any, n: int | None) -> bool:
    """Whether the kept indices ``keep`` are every index of ``n`` (``n`` None: unknown, so no)."""
    try:
        return n is not None and sorted(int(i) for i in keep) == list(range(n))
    except (TypeError, ValueError):
        return False


def _check_applies(plan: PrunePlan, b: Block, raw: Block) -> None:
    """Raise ``ValueError`` for an entry of ``plan`` about block ``b`` that :func:`apply_plan` would not apply
    although it removes something: heads, key/value heads or FFN neurons of a part :func:`checked_block` marks
    unprunable (``b.attention`` / ``b.ffn`` None; ``raw`` is the block before that check, which gives the counts),
    expert neurons of a block without MoE experts, or key/value heads without the block's query heads. An entry
    that keeps every index (an empty list of experts for a block without experts) removes nothing and is skipped.
    """
    name, sizes = b.name, plan.sizes.get(b.name, {})

    def refuse(label: str, keep: Any, n: int | None, what: str, reason: str) -> None:
        count = f"{len(keep)} of the {n}" if n is not None else f"{len(keep)}"
        raise ValueError(f"plan.{label}[{name!r}] keeps {count} {what}, but this plan entry cannot be applied: "
                         f"{reason}; keep every index there (or leave the entry out) -- nothing was changed")

    if b.attention is None:
        a = raw.attention
        n_h = a.n_heads if a is not None else sizes.get("heads")
        n_kv = a.n_kv if a is not None else sizes.get("kv_heads", n_h)
        why = b.unsupported.get("heads") or "no attention medquant can prune was found in this block"
        for label, n, what in (("heads", n_h, "attention heads"), ("kv_heads", n_kv, "key/value heads")):
            keep = getattr(plan, label).get(name)
            if keep is not None and not _keeps_all(keep, n):
                refuse(label, keep, n, what, f"the heads of {name} cannot be pruned ({why})")
    elif name in plan.kv_heads and name not in plan.heads and not _keeps_all(plan.kv_heads[name], b.attention.n_kv):
        raise ValueError(f"plan.kv_heads[{name!r}] removes key/value heads of {name} but there is no plan.heads "
                         f"entry for it: key/value heads are removed with their query heads; give plan.heads"
                         f"[{name!r}] (the kept query heads) too -- nothing was changed")
    if b.cross_attention is None:
        c = raw.cross_attention
        n_h = c.n_heads if c is not None else sizes.get("cross_heads")
        n_kv = c.n_kv if c is not None else sizes.get("cross_kv_heads", n_h)
        why = b.unsupported.get("heads") or "no cross-attention medquant can prune was found in this block"
        for label, n, what in (("cross_heads", n_h, "cross-attention heads"),
                               ("cross_kv_heads", n_kv, "cross-attention key/value heads")):
            keep = getattr(plan, label).get(name)
            if keep is not None and not _keeps_all(keep, n):
                refuse(label, keep, n, what, f"the cross-attention heads of {name} cannot be pruned ({why})")
    elif (name in plan.cross_kv_heads and name not in plan.cross_heads
          and not _keeps_all(plan.cross_kv_heads[name], b.cross_attention.n_kv)):
        raise ValueError(f"plan.cross_kv_heads[{name!r}] removes cross-attention key/value heads of {name} but there "
                         f"is no plan.cross_heads entry for it: key/value heads are removed with their query heads; "
                         f"give plan.cross_heads[{name!r}] too -- nothing was changed")
    if b.ffn is None and name in plan.neurons:
        n = raw.ffn.n_neurons if raw.ffn is not None else sizes.get("neurons")
        why = b.unsupported.get("ffn") or "no FFN linears medquant can prune were found in this block"
        if not _keeps_all(plan.neurons[name], n):
            refuse("neurons", plan.neurons[name], n, "FFN neurons", f"the FFN neurons of {name} cannot be pruned "
                                                                   f"({why})")
    if b.experts is None and name in plan.expert_neurons:
        keep_e, n = plan.expert_neurons[name], sizes.get("expert_neurons")
        if not (isinstance(keep_e, list) and all(_keeps_all(k, n) for k in keep_e)):
            raise ValueError(f"plan.expert_neurons[{name!r}] lists kept neurons for experts, but {name} has no MoE "
                             "experts with 3-D weights: this plan entry cannot be applied; leave it out -- nothing "
                             "was changed")


def _check_plan(model: nn.Module, plan: PrunePlan, blocks: dict[str, Block]) -> set[tuple[str, str]]:
    """Raise ``ValueError`` when a block entry of ``plan`` does not fit ``model`` (checked before any change): the
    counts the plan recorded in ``sizes`` differ from the model's (already pruned, or another model), kept indices
    that :func:`prune_attention` / :func:`prune_ffn` / :func:`prune_experts` would refuse, blocks that share a
    module (weights shared across layers) keeping different indices of it, or dropping every block of a list.

    Returns:
        The ``(block, part)`` pairs (``part``: ``"heads"``, ``"cross_heads"``, ``"neurons"``, ``"experts"``) whose
        modules an earlier
        block of the plan prunes already: they are pruned once, with that earlier block.
    """
    def sized(name: str, key: str, have: int, what: str) -> None:
        want = plan.sizes.get(name, {}).get(key)
        if want is not None and want != have:
            raise ValueError(f"{name}: the plan was made for {want} {what}, the model has {have} (was it already "
                             "pruned, or is the plan for another model?)")

    seen: dict[tuple[str, int], tuple[str, Any]] = {}
    shared: set[tuple[str, str]] = set()

    def once(name: str, part: str, module: nn.Module, keep: Any) -> None:
        first, kept = seen.setdefault((part, id(module)), (name, keep))
        if first == name:
            return
        if kept != keep:
            raise ValueError(f"{name}: its {part} are in the same modules as {first}'s (one module shared by "
                             "several layers), but the plan keeps other indices there; give the layers that "
                             "share it the same ratio")
        shared.add((name, part))

    for name in sorted(set(plan.heads) | set(plan.neurons) | set(plan.expert_neurons) | set(plan.cross_heads)):
        b = blocks[name]
        if name in plan.heads and b.attention is not None:
            sized(name, "heads", b.attention.n_heads, "attention heads")
            sized(name, "kv_heads", b.attention.n_kv, "key/value heads")
            keep = checked_heads(b.attention, plan.heads[name], plan.kv_heads.get(name))
            _refuse_shared_kv(model, name, b.attention, keep[1], "the plan")
            once(name, "heads", model.get_submodule(b.attention.q), keep)
        if name in plan.cross_heads and b.cross_attention is not None:
            sized(name, "cross_heads", b.cross_attention.n_heads, "cross-attention heads")
            sized(name, "cross_kv_heads", b.cross_attention.n_kv, "cross-attention key/value heads")
            keep = checked_heads(b.cross_attention, plan.cross_heads[name], plan.cross_kv_heads.get(name))
            once(name, "cross_heads", model.get_submodule(b.cross_attention.q), keep)
        if name in plan.neurons and b.ffn is not None:
            sized(name, "neurons", b.ffn.n_neurons, "FFN neurons")
            once(name, "neurons", model.get_submodule(b.ffn.output), checked_neurons(b.ffn, plan.neurons[name]))
        if name in plan.expert_neurons and b.experts is not None:
            lay, keep = checked_expert_neurons(model, b.experts, plan.expert_neurons[name])
            sized(name, "expert_neurons", lay["inter"], "neurons per expert")
            once(name, "experts", model.get_submodule(b.experts), keep)
    per_stack: dict[str, set[str]] = {}
    for name in plan.drop_blocks:
        per_stack.setdefault(blocks[name].stack, set()).add(name)
    for stack, names in per_stack.items():
        n = len(model.get_submodule(stack))
        if len(names) >= n:
            raise ValueError(f"the plan drops all {n} blocks of {stack}; keep at least one")
    _check_droppable(model, plan.drop_blocks)
    return shared


def _kv_readers(model: nn.Module, a: AttentionUnit) -> list[str]:
    """The attention modules that reuse the keys and values the attention unit ``a`` computes (KV sharing).

    Gemma 3n / Gemma 4 with ``num_kv_shared_layers``: the attention with ``store_full_length_kv`` hands its keys and
    values to every later attention of the same ``layer_type`` with ``is_kv_shared_layer`` (which has no k / v
    projections of its own), whose query heads read them through ``repeat_kv`` with their own head counts.

    Args:
        model: the model holding ``a``.
        a: an attention unit of one of its blocks.

    Returns:
        The readers' module names, in module order (``[]`` when ``a`` stores nothing or nothing reads it).
    """
    holder = model.get_submodule(a.holder)
    if getattr(holder, "store_full_length_kv", False) is not True:
        return []
    kind = getattr(holder, "layer_type", None)
    return [n for n, m in model.named_modules() if m is not holder
            and getattr(m, "is_kv_shared_layer", False) is True and getattr(m, "layer_type", None) == kind]


def _refuse_shared_kv(model: nn.Module, block: str, a: AttentionUnit, keep_kv: Sequence[int], who: str) -> None:
    """Raise ``ValueError`` when keeping only the key/value heads ``keep_kv`` of ``a`` (block ``block``) removes
    key/value heads that other layers reuse (:func:`_kv_readers`): their queries would read keys and values with
    fewer heads than they expect (the pruned model's forward fails). ``who`` names what asked for it."""
    if len(keep_kv) == a.n_kv:
        return
    readers = _kv_readers(model, a)
    if not readers:
        return
    gone = sorted(set(range(a.n_kv)) - {int(i) for i in keep_kv})
    more = f" and {len(readers) - 1} more" if len(readers) > 1 else ""
    remedy = ("use gqa='query' (removes query heads inside every key/value group, keeping the key/value heads)"
              if a.group_size > 1 else "keep its heads (give this block a head ratio of 0: a dict or sequence of "
              "per-block ratios)")
    raise ValueError(f"{block}: {who} removes key/value heads {gone} of {a.name}, whose keys and values "
                     f"{readers[0]}{more} reuse (KV sharing, num_kv_shared_layers) with their own query heads "
                     f"reading all {a.n_kv} key/value heads; {remedy} -- nothing was changed")


def _check_droppable(model: nn.Module, names: Iterable[str]) -> None:
    """Raise ``ValueError`` for a block whose removal would take the stack's shared position bias with it (T5),
    or a drop that no index into the block list can express (:func:`medquant.prune.layers.index_updates`, e.g. a
    Qwen3-VL deepstack merger left without a block to read); checked before any layer changes."""
    from .layers import bias_holder, index_updates

    names = list(names)
    for name in names:
        why = bias_holder(model, name)
        if why is not None:
            raise ValueError(f"drop_blocks: cannot drop {name}: {why}")
    try:
        index_updates(model, names)
    except ValueError as e:
        raise ValueError(f"drop_blocks: {e}") from None


# ---------------------------------------------------------------------------------------------- configs
def _config_of(model: nn.Module, b: Block):
    from transformers import PretrainedConfig

    for name in ([b.attention.holder, b.attention.name] if b.attention else []) + (
            [b.ffn.name] if b.ffn else []) + [b.name]:
        cfg = getattr(model.get_submodule(name), "config", None)
        if isinstance(cfg, PretrainedConfig):
            return cfg
    parts = b.name.split(".")  # blocks without a config of their own (LFM2, Qwen3.5): the nearest owner's
    for cut in range(len(parts) - 1, -1, -1):
        cfg = getattr(model.get_submodule(".".join(parts[:cut])) if cut else model, "config", None)
        if isinstance(cfg, PretrainedConfig):
            return cfg
    return None


def _build_like(mod: nn.Module, cfg) -> nn.Module | None:
    """A fresh module of ``mod``'s class from ``cfg`` on the meta device (``cls(cfg, layer_idx)`` when the second
    parameter is ``layer_idx``, else ``cls(cfg)``), or None when the class is not built from a config."""
    cls = type(mod)
    try:
        params = list(inspect.signature(cls.__init__).parameters)[1:]
    except (TypeError, ValueError):
        return None
    args: tuple = (cfg,)
    if len(params) > 1 and params[1] == "layer_idx":
        args = (cfg, getattr(mod, "layer_idx", 0) or 0)
    with torch.device("meta"):
        try:
            return cls(*args)
        except Exception:  # noqa: BLE001 - the class rejects the config (e.g. hidden size not a multiple of heads)
            return None


def _shapes(root: nn.Module, names: Sequence[str]) -> list[tuple[int, ...]]:
    return [tuple(root.get_submodule(n).weight.shape) for n in names]


def _rel(name: str, prefix: str) -> str:
    return name[len(prefix) + 1:]


def _common_parent(a: str, b: str, floor: str) -> str:
    """The deepest module name containing both ``a`` and ``b`` (at most as deep as their shared prefix), never
    above ``floor``."""
    pa, pb = a.split("."), b.split(".")
    n = 0
    while n < min(len(pa), len(pb)) - 1 and pa[n] == pb[n]:
        n += 1
    common = ".".join(pa[:n])
    return common if common == floor or common.startswith(floor + ".") else floor


def _fits(model: nn.Module, blocks: list[Block], cfg) -> bool:
    """Would ``from_pretrained`` rebuild these blocks with their current shapes from ``cfg``?

    The config must survive a dict round trip (transformers validates it on load, e.g. LLaMA requires
    ``hidden_size % num_attention_heads == 0`` even with an explicit ``head_dim``) and a module built from the
    round-tripped config must have exactly the current weight shapes.
    """
    try:
        cfg = type(cfg).from_dict(cfg.to_dict())
    except Exception:  # noqa: BLE001 - transformers' validators raise several types; any means "not loadable"
        return False
    for b in blocks:
        block_fresh: list[nn.Module | None] = []
        for unit, names in ((b.attention, lambda u: (u.q, u.k, u.v, u.o)),
                            (b.cross_attention, lambda u: (u.q, u.k, u.v, u.o)),
                            (b.ffn, lambda u: (*u.inputs, u.output))):
            if unit is None:
                continue
            root = unit.name
            if b.experts is not None and unit is b.ffn:  # a shared expert is sized by its MoE container (Qwen-MoE:
                # shared_expert_intermediate_size), not by building its MLP class alone (intermediate_size)
                root = _common_parent(unit.name, b.experts, b.name)
            fresh = _build_like(model.get_submodule(root), cfg)
            if fresh is None:  # a container not built from the config alone (BART attention): the whole block
                if not block_fresh:
                    block_fresh.append(_build_like(model.get_submodule(b.name), cfg))
                root, fresh = b.name, block_fresh[0]
            if fresh is None:
                return False
            rel = [_rel(n, root) for n in names(unit)]
            try:
                if _shapes(fresh, rel) != _shapes(model.get_submodule(root), rel):
                    return False
            except AttributeError:
                return False
        if b.experts is not None:  # MoE experts: every stacked weight's shape
            cur = model.get_submodule(b.experts)
            fresh = _build_like(cur, cfg)
            if fresh is None:
                if not block_fresh:
                    block_fresh.append(_build_like(model.get_submodule(b.name), cfg))
                fresh = block_fresh[0].get_submodule(_rel(b.experts, b.name)) if block_fresh[0] is not None else None
            if fresh is None or {k: tuple(p.shape) for k, p in fresh.named_parameters()} != {
                    k: tuple(p.shape) for k, p in cur.named_parameters()}:
                return False
    return True


def sync_configs(model: nn.Module, stacks: set[str] | None = None) -> bool:
    """Write uniform head / neuron counts into the HF configs where a rebuilt module then matches exactly.

    Only block lists in ``stacks`` (default: all) are considered; untouched stacks keep their configs. Returns
    True when every considered config describes its blocks exactly and a fresh model built from the (JSON
    round-tripped) config has every tensor shape of the pruned model, i.e. ``from_pretrained`` loads it. When the
    config also sizes something pruning did not change (Idefics2's connector MLP is sized by
    ``text_config.intermediate_size``; Llama 4's routed experts share ``intermediate_size`` with the shared
    expert), every change is undone and the result is False: :func:`medquant.prune.load_pruned` reloads it.
    """
    return _sync_configs(model, stacks)[0]


def _count_keys(cfg, stack: str) -> tuple[str, str]:
    """(heads key, FFN size key) of ``cfg`` for the blocks of ``stack``: ``encoder_attention_heads`` /
    ``encoder_ffn_dim`` for the encoder (decoder) stack of a BART-style config, ``num_attention_heads`` / ``d_ff``
    for a T5-style config (one ``d_ff`` for both stacks), else ``num_attention_heads`` / ``intermediate_size``."""
    part = stack.rpartition(".")[0].rpartition(".")[2]
    if part in ("encoder", "decoder") and hasattr(cfg, f"{part}_ffn_dim"):
        return f"{part}_attention_heads", f"{part}_ffn_dim"
    if not hasattr(cfg, "intermediate_size") and isinstance(getattr(cfg, "d_ff", None), int):
        return "num_attention_heads", "d_ff"
    return "num_attention_heads", "intermediate_size"


def _root_config(model: nn.Module, b: Block, cfg):
    """The config that sizes ``b`` when the model is rebuilt: the outermost config of ``cfg``'s class on the way
    from ``model`` to the block, when it gives the same counts as ``cfg`` (T5 gives each stack a deep copy of its
    config: ``encoder.config`` / ``decoder.config`` are not the config that is saved); else ``cfg``."""
    from .layers import outer_config

    owner = outer_config(model, b.name, cfg)
    if owner is cfg:
        return cfg
    same = all(getattr(owner, k, _ABSENT) == getattr(cfg, k, _ABSENT) for k in _count_keys(cfg, b.stack))
    return owner if same else cfg


def _sync_configs(model: nn.Module, stacks: set[str] | None, dropped: bool = False) -> tuple[bool, list[str]]:
    from .layers import _fresh_mismatch

    groups: dict[tuple[int, str], tuple[Any, list[Block]]] = {}
    copies: dict[int, dict[int, Any]] = {}  # root config -> the stacks' own copies of it (T5), which follow it
    exact = True
    notes: list[str] = []
    all_blocks = transformer_blocks(model, "all", clamp_wrappers=True)
    per_layer = _per_layer_error()
    for b in all_blocks:
        if stacks is not None and b.stack not in stacks:
            continue
        cfg = _config_of(model, b)
        if cfg is None:
            exact = False
            notes.append(f"{b.stack}: no transformers config owns these blocks")
            continue
        try:
            root = _root_config(model, b, cfg)
            ffn_count_key = _count_keys(root, b.stack)[1]
        except per_layer as e:
            exact = False
            note = _per_layer_note(b.stack, e)
            if note not in notes:
                notes.append(note)
            continue
        if root is not cfg:
            copies.setdefault(id(root), {})[id(cfg)] = cfg
        groups.setdefault((id(root), ffn_count_key), (root, []))[1].append(b)
    changed: list[tuple[Any, dict[str, Any]]] = []
    for cfg, blocks in groups.values():
        if _fits(model, blocks, cfg):
            continue
        old: dict[str, Any] = {}
        try:
            fitted, twins = _update_config(model, cfg, blocks, copies.get(id(cfg), {}), old)
        except per_layer as e:  # a heterogeneous config (Gemma 4): its per-layer counts are not read globally
            _restore(cfg, old)
            exact = False
            notes.append(_per_layer_note(blocks[0].stack, e))
            continue
        if not fitted:
            _restore(cfg, old)
            exact = False
            notes.append(f"{blocks[0].stack}: its config cannot express the pruned blocks (per-layer counts, or a "
                         "head size derived from hidden_size / heads); reload with medquant.prune.load_pruned")
        else:
            changed.append((cfg, old))
            changed.extend(twins)
    if dropped and exact and not changed:  # the blocks fit their config; does the config build the whole model?
        bad = _fresh_mismatch(model, [])
        if bad:
            exact = False
            notes.append(f"a model built from the config differs from the pruned one at {', '.join(bad[:3])}"
                         f"{', ...' if len(bad) > 3 else ''} (the dropped blocks change what the config describes, "
                         "e.g. Swin's depths and stage widths); reload with medquant.prune.load_pruned")
    if changed:
        ignore = [] if exact else [n + "." for b in all_blocks for n in _unit_modules(b)]
        bad = _fresh_mismatch(model, ignore)
        if bad:
            for cfg, old in reversed(changed):
                _restore(cfg, old)
            exact = False
            notes.append(f"a model built from the updated config differs from the pruned one at {', '.join(bad[:3])}"
                         f"{', ...' if len(bad) > 3 else ''} (the config also sizes parts pruning did not change, e.g. "
                         "a connector sized by text_config.intermediate_size or MoE experts); the config is left as "
                         "it was: reload with medquant.prune.load_pruned")
    return exact, notes


def _update_config(model: nn.Module, cfg, blocks: list[Block], twins: dict[int, Any], old: dict[str, Any]
                   ) -> tuple[bool, list[tuple[Any, dict[str, Any]]]]:
    """Write the uniform counts of ``blocks`` into ``cfg`` (and into the stacks' own copies ``twins`` of it, T5);
    returns ``(whether a module built from cfg now has the blocks' shapes, [(twin, its old values)])``. ``old``
    (filled in place) gets cfg's value of every key before it is written, so the caller can restore ``cfg`` with
    :func:`_restore` whatever happens: when it does not fit, or when a read raises part way."""
    heads_key, ffn_key = _count_keys(cfg, blocks[0].stack)
    heads = {(u.n_heads, u.n_kv, u.head_dim) for b in blocks for u in (b.attention, b.cross_attention) if u}
    neurons = {b.ffn.n_neurons for b in blocks if b.ffn}
    new: dict[str, Any] = {}
    if len(heads) == 1:
        nh, nkv, hd = heads.pop()
        new[heads_key] = nh
        if heads_key == "num_attention_heads":
            new["head_dim"] = hd
            if hasattr(cfg, "num_key_value_heads"):
                new["num_key_value_heads"] = nkv
    if any(b.experts for b in blocks) and isinstance(getattr(cfg, "shared_expert_intermediate_size", None), int):
        ffn_key = "shared_expert_intermediate_size"  # Qwen-MoE: the block's FFN is its shared expert
    if len(neurons) == 1 and hasattr(cfg, ffn_key):
        new[ffn_key] = neurons.pop()
        if getattr(cfg, "block_auto_adjust_ff_dim", False) is True:  # LFM2: size = 2/3 of the config's
            new["block_auto_adjust_ff_dim"] = False
    old.update({k: getattr(cfg, k, _ABSENT) for k in new})
    for k, v in new.items():
        setattr(cfg, k, v)
    experts = {model.get_submodule(b.experts).down_proj.shape[1 if _transposed(model, b) else 2]
               for b in blocks if b.experts is not None and experts_layout(model.get_submodule(b.experts))}
    if len(experts) == 1:  # the key that sizes the experts: moe_intermediate_size or intermediate_size
        n_e = experts.pop()
        for key in ("moe_intermediate_size", "intermediate_size"):
            if not isinstance(getattr(cfg, key, None), int) or new.get(key, n_e) != n_e:
                continue
            old.setdefault(key, getattr(cfg, key))
            prev = getattr(cfg, key)
            setattr(cfg, key, n_e)
            if _fits(model, blocks, cfg):
                new[key] = n_e
                break
            setattr(cfg, key, prev)
    if not new or not _fits(model, blocks, cfg):
        return False, []
    out: list[tuple[Any, dict[str, Any]]] = []
    for twin in twins.values():  # the stacks' own copies (T5) follow the saved config
        old_t = {k: getattr(twin, k, _ABSENT) for k in new if getattr(twin, k, _ABSENT) == old[k]}
        for k in old_t:
            setattr(twin, k, new[k])
        out.append((twin, old_t))
    return True, out


class _NoPerLayerConfigs(Exception):
    """Stands for transformers' ``AmbiguousGlobalPerLayerAttributeError`` where transformers has none."""


def _per_layer_error() -> type[Exception]:
    """The error a heterogeneous transformers config (per-layer values: Gemma 4's ``head_dim`` /
    ``num_key_value_heads`` of its full-attention layers) raises when such a value is read globally."""
    try:
        from transformers.integrations.heterogeneity.configuration_utils import (
            AmbiguousGlobalPerLayerAttributeError,
        )
    except ImportError:
        return _NoPerLayerConfigs
    return AmbiguousGlobalPerLayerAttributeError


def _per_layer_note(stack: str, e: Exception) -> str:
    return (f"{stack}: its config gives some counts per layer ({str(e).split(' is a per-layer')[0]} is one), which "
            "one global value cannot update; the config is left as it was: reload with medquant.prune.load_pruned")


def _transposed(model: nn.Module, b: Block) -> bool:
    lay = experts_layout(model.get_submodule(b.experts)) if b.experts else None
    return bool(lay and lay["transposed"])


def _restore(cfg, old: dict[str, Any]) -> None:
    for k, v in old.items():
        if v is _ABSENT:
            delattr(cfg, k)
        else:
            setattr(cfg, k, v)


def _unit_modules(b: Block) -> list[str]:
    out: list[str] = []
    if b.attention is not None:
        a = b.attention
        out += [a.q, a.k, a.v, a.o] + [n for n in (a.q_norm, a.k_norm) if n]
    if b.cross_attention is not None:
        c = b.cross_attention
        out += [c.q, c.k, c.v, c.o] + [n for n in (c.q_norm, c.k_norm) if n]
    if b.ffn is not None:
        out += [*b.ffn.inputs, b.ffn.output]
    if b.experts is not None:
        out.append(b.experts)
    return out


_ABSENT = object()


# ---------------------------------------------------------------------------------------------- reports
def parameter_report(model: nn.Module) -> dict[str, int]:
    """Parameter and byte counts; each tensor counted once (tied weights once).

    ``embedding_params`` are the weights of embedding tables (``nn.Embedding`` and the quantized
    ``QuantEmbedding``: token, position, type); a tied output head shares the token embedding's tensor (or, quantized,
    its packed tensors) and is counted there. ``non_embedding_params`` is everything else. A quantized layer
    (``QuantLinear`` / ``QuantConv2d`` / ``QuantEmbedding``, whose weight is stored in buffers) counts its logical
    weight elements (``rows x k``) as parameters. ``bytes`` counts what is stored: the parameters and the persistent
    buffers (those in ``state_dict``); non-persistent buffers (e.g. rotary ``inv_freq`` tables, recomputed from the
    config when a model is built) are not counted.

    Args:
        model: any module.

    Returns:
        ``{"params", "embedding_params", "non_embedding_params", "bytes"}`` counts.
    """
    from ..quant.modules import QUANT_LAYERS, QuantEmbedding, tied_heads

    total = emb = nbytes = 0
    tied = set(tied_heads(model))
    for name, m in model.named_modules():
        if isinstance(m, QUANT_LAYERS) and name not in tied:
            total += m.out_rows * m.k
            if isinstance(m, QuantEmbedding):
                emb += m.out_rows * m.k
    emb_ids = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    seen: set[int] = set()
    for m in model.modules():
        stored = list(m._parameters.items()) + [(n, b) for n, b in m._buffers.items()
                                                  if n not in m._non_persistent_buffers_set]
        for _, p in stored:
            if p is None or id(p) in seen:
                continue
            seen.add(id(p))
            nbytes += p.numel() * p.element_size()
            if isinstance(p, nn.Parameter):
                total += p.numel()
                if id(p) in emb_ids:
                    emb += p.numel()
    return {"params": total, "embedding_params": emb, "non_embedding_params": total - emb, "bytes": nbytes}
