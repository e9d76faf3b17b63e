"""Layer selection from activation distributions on calibration data.

For every block ``l`` with input hidden states ``X`` and output ``Y`` (tokens x hidden) over the calibration data:

* ``cosine``: ``1 - mean_tokens cos(x_t, y_t)`` -- how much the block turns the residual stream (0 = identity);
* ``wasserstein``: the 1-D Wasserstein-1 distance between the empirical distributions of the values of ``X`` and
  of ``Y``, ``W1 = mean_i |sort(X)_i - sort(Y)_i|`` (equal sample counts), divided by ``std(X)`` so that layers
  with different activation scales compare (0 = same value distribution).

Both are averaged over the block's calls (one per batch for most models). Blocks with low scores change their
input least and are pruned harder (:func:`allocate_ratios`) or dropped whole (:func:`least_influential` +
``StructuredPruner(drop_blocks=...)``).

Tokens are those of :mod:`medquant.prune.importance`'s activation statistics: the rows of a batch whose
``attention_mask`` is 0 (padding) are left out (``decoder_attention_mask`` for the decoder blocks of an
encoder-decoder; vision blocks and batches without a ``(batch, seq)`` mask matching the hidden states count every
row), so right-padded batches of different lengths score their real tokens only. A call with no real token adds
nothing. The Wasserstein estimate reads at most ``_MAX_VALUES`` values per call, a strided subsample whose stride
shares no factor with the hidden size (so every channel is read, not only the multiples of the stride).

Every score must be finite, and every block must run: a NaN / inf score (NaN weights, float16 overflow) or a
block the calibration batches never reach (e.g. a vision tower given text-only batches, which would score 0 and
look least influential) raises ``ValueError``.
"""
from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn

from ..models.blocks import shares_position_bias, stack_side, transformer_blocks
from ..models.runner import eval_mode, run_model
from .importance import _iter, _mask, _named

__all__ = ["allocate_ratios", "block_influence", "drop_blocks", "index_updates", "influence_table",
           "least_influential", "plot_influence"]

_MAX_VALUES = 1 << 18  # values per batch entering the Wasserstein estimate (strided subsample)


def _hidden(x: Any) -> torch.Tensor:
    return x[0] if isinstance(x, (tuple, list)) else x


@torch.no_grad()
def block_influence(model: nn.Module, calib: Iterable[Any], scope: str | list[str] | None = None,
                    progress: bool = True) -> list[dict[str, Any]]:
    """Per-block influence scores, in block order: ``[{"block", "index", "cosine", "wasserstein"}, ...]``.

    For block input ``x`` and output ``y`` (hidden states, flattened over the non-padding tokens, see the module
    docstring): ``cosine`` is the mean over tokens of ``1 - cos(x_t, y_t)``, ``wasserstein`` is ``W1(x, y) /
    std(x)`` of the value distributions (sorted values, subsampled); both are averaged over the block's calls on
    the calibration batches. A block that changes its input little has low influence.

    Args:
        model: the model (a Hugging Face LM / VLM / encoder or a plain module with a block list).
        calib: calibration batches (an iterable: a list, a data loader), run as :func:`medquant.models.run_model`
            runs them; a dict, or a tensor / tuple bound to ``model.forward``'s parameters, may carry the
            ``attention_mask`` that marks padding.
        scope: which blocks (see :func:`medquant.models.transformer_blocks`).
        progress: tqdm bar over batches.

    Returns:
        One dict per block: ``block`` (name), ``index``, ``cosine``, ``wasserstein``.

    Raises:
        ValueError: no block in scope, empty calibration data, a block the batches never run (or run on padding
            only), or a score that is not finite.
        TypeError: ``calib`` is one dict batch (pass ``[batch]``).
        RuntimeError: a block whose input / output hidden states cannot be read (different shapes).
    """
    blocks = transformer_blocks(model, scope, clamp_wrappers=True)
    if not blocks:
        raise ValueError(f"{type(model).__name__}: no transformer blocks in scope {scope!r}")
    acc = {b.name: [0.0, 0.0, 0] for b in blocks}  # sum of 1 - cos, sum of W1 / std, calls with real tokens
    handles = []
    named: Any = {}

    def make_hook(name: str, key: str | None):
        def hook(mod, args, kwargs, out):
            x = args[0] if args else kwargs.get("hidden_states")
            y = _hidden(out)
            if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor) or x.shape != y.shape:
                raise RuntimeError(f"{name}: cannot read the block's input/output hidden states")
            x, y = x.detach(), y.detach()
            keep = _mask(named, key, x)
            if keep is not None:  # padding rows are not calibration tokens
                x, y = x[keep], y[keep]
            xf, yf = x.float().reshape(-1, x.shape[-1]), y.float().reshape(-1, y.shape[-1])
            if xf.shape[0] == 0:
                return
            cos = torch.nn.functional.cosine_similarity(xf, yf, dim=-1, eps=1e-8).mean()
            fx, fy = xf.flatten(), yf.flatten()
            step = max(1, math.ceil(fx.numel() / _MAX_VALUES))
            while math.gcd(step, xf.shape[1]) != 1:  # a stride dividing the hidden size reads a few channels only
                step += 1
            fx, fy = fx[::step], fy[::step]
            w1 = (fx.sort().values - fy.sort().values).abs().mean() / fx.std().clamp_min(1e-8)
            acc[name][0] += float(1.0 - cos)
            acc[name][1] += float(w1)
            acc[name][2] += 1
        return hook

    for b in blocks:
        key = None if b.role == "vision" else (
            "decoder_attention_mask" if stack_side(b.stack) == "decoder" else "attention_mask")
        handles.append(model.get_submodule(b.name).register_forward_hook(make_hook(b.name, key), with_kwargs=True))
    try:
        with eval_mode(model):
            for batch in _iter(calib, "block influence", progress):
                named = _named(model, batch)
                run_model(model, batch)
    finally:
        for h in handles:
            h.remove()
    missing = [b.name for b in blocks if acc[b.name][2] == 0]
    if missing:
        raise ValueError(f"block influence: the calibration batches never ran {missing[0]} on a real (non-padding) "
                         f"token ({len(missing)} block(s) in all): give batches that reach every block in scope "
                         "(e.g. images for a vision tower: --calib-images on the command line) or narrow the scope")
    out = [{"block": b.name, "index": i, "cosine": acc[b.name][0] / acc[b.name][2],
            "wasserstein": acc[b.name][1] / acc[b.name][2]} for i, b in enumerate(blocks)]
    _check_scores(out, ("cosine", "wasserstein"))
    return out


def _check_scores(scores: Sequence[dict[str, Any]], metrics: Sequence[str]) -> None:
    """Refuse scores that are not finite numbers: NaN / inf cannot be ranked, so the blocks pruned would be arbitrary.

    Raises:
        ValueError: the first block whose ``metric`` is NaN / inf, naming it.
    """
    for s in scores:
        for m in metrics:
            v = s[m]
            try:
                ok = not isinstance(v, bool) and math.isfinite(float(v))
            except (TypeError, ValueError):
                ok = False
            if not ok:
                raise ValueError(f"{s['block']}: its {m} score {v!r} is not finite (NaN / inf weights, or NaN / inf "
                                 "calibration activations, e.g. float16 overflow); such scores cannot be ranked")


def allocate_ratios(scores: Sequence[dict[str, Any]], mean_ratio: float, spread: float = 0.5,
                    metric: str = "cosine", max_ratio: float = 0.9) -> dict[str, float]:
    """Per-block ratios averaging ``mean_ratio``, higher for less influential blocks.

    Blocks are ranked by ``metric`` (rank 0 = least influential; tied blocks share the mean of their ranks and so
    get the same ratio); with ``L`` blocks, block of rank ``k`` gets ``mean_ratio * (1 + spread * (1 - 2k/(L-1)))``,
    i.e. ``(1 + spread)`` times the mean for the least influential block down to ``(1 - spread)`` times for the
    most influential. Where that exceeds ``max_ratio`` the block gets ``max_ratio`` and the excess is spread evenly
    over the other blocks (each gets the same amount more, none above ``max_ratio``), so the mean over blocks is
    always ``mean_ratio`` and the order is kept.

    Args:
        scores: the output of :func:`block_influence` (``{"block", "index", "cosine", "wasserstein"}`` per block).
        mean_ratio: the average fraction removed, in ``[0, 1)``.
        spread: in ``[0, 1]``; 0 gives every block ``mean_ratio``.
        metric: ``"cosine"`` or ``"wasserstein"``.
        max_ratio: the highest ratio of a block, in ``[mean_ratio, 1)``.

    Returns:
        ``{block name: ratio}``.

    Raises:
        ValueError: ``mean_ratio``, ``spread``, ``metric`` or ``max_ratio`` out of range, or a score that is not
            finite.
    """
    if not 0 <= mean_ratio < 1:
        raise ValueError(f"mean_ratio must be in [0, 1), got {mean_ratio}")
    if not 0 <= spread <= 1:
        raise ValueError(f"spread must be in [0, 1], got {spread}")
    if metric not in ("cosine", "wasserstein"):
        raise ValueError(f"metric must be 'cosine' or 'wasserstein', got {metric!r}")
    if not mean_ratio <= max_ratio < 1:
        raise ValueError(f"max_ratio must be in [mean_ratio, 1) = [{mean_ratio}, 1) (a ratio of 1 removes every head "
                         f"/ neuron of a block; below the mean the mean cannot be met), got {max_ratio}")
    _check_scores(scores, (metric,))
    L = len(scores)
    order = sorted(range(L), key=lambda i: (scores[i][metric], i))
    t = [0.0] * L
    start = 0
    while start < L:  # tied blocks share the mean of their ranks' positions
        end = start
        while end + 1 < L and scores[order[end + 1]][metric] == scores[order[start]][metric]:
            end += 1
        mid = (start + end) / 2
        for rank in range(start, end + 1):
            t[order[rank]] = 1.0 - 2.0 * mid / (L - 1) if L > 1 else 0.0
        start = end + 1
    base = [mean_ratio * (1.0 + spread * t[i]) for i in range(L)]
    clipped: set[int] = set()
    delta = 0.0
    while len(clipped) < L:  # water-filling: clip at max_ratio, spread the excess over the others
        free = [i for i in range(L) if i not in clipped]
        delta = (L * mean_ratio - len(clipped) * max_ratio - sum(base[i] for i in free)) / len(free)
        over = {i for i in free if base[i] + delta > max_ratio}
        if not over:
            break
        clipped |= over
    return {s["block"]: max_ratio if i in clipped else min(max_ratio, max(0.0, base[i] + delta))
            for i, s in enumerate(scores)}


def least_influential(scores: Sequence[dict[str, Any]], k: int, metric: str = "cosine") -> list[str]:
    """Names of the ``k`` blocks with the lowest ``metric`` (candidates for dropping whole).

    Args:
        scores: the output of :func:`block_influence` (``{"block", "index", "cosine", "wasserstein"}`` per block).
        k: how many, ``0 <= k < len(scores)`` (at least one block stays).
        metric: ``"cosine"`` or ``"wasserstein"``; ties go to the earlier block.

    Returns:
        ``k`` block names, least influential first.

    Raises:
        ValueError: ``k`` or ``metric`` out of range, or a score that is not finite.
    """
    if not 0 <= k < len(scores):
        raise ValueError(f"can drop 0..{len(scores) - 1} of {len(scores)} blocks, not {k}")
    if metric not in ("cosine", "wasserstein"):
        raise ValueError(f"metric must be 'cosine' or 'wasserstein', got {metric!r}")
    _check_scores(scores, (metric,))
    return [s["block"] for s in sorted(scores, key=lambda s: (s[metric], s["index"]))[:k]]


def drop_blocks(model: nn.Module, names: Sequence[str]) -> nn.Module:
    """Remove whole blocks in place; later blocks are renumbered and the owning config follows.

    A Hugging Face model whose updated config no longer builds the pruned model (a model of its class built from
    it has other weights or shapes: Swin's ``depths`` and stage widths, ConvNeXt's ``hidden_sizes``, a tower built
    from a nested dict) gets a ``UserWarning`` naming the first differences: ``save_pretrained`` /
    ``from_pretrained`` would not give it back (transformers would initialise the missing weights at random); save
    it with :func:`medquant.prune.save_pruned` and a plan naming the dropped blocks instead. (Not checked for a
    quantized model: its layers never match a float model built from the config.)

    Later blocks get new ``layer_idx`` values (so KV caches line up); the owning config's ``num_hidden_layers``
    and ``layer_types`` are updated (``encoder_layers`` / ``decoder_layers`` for the encoder / decoder stack of a
    BART-style config; ``num_layers`` / ``num_decoder_layers`` of a T5-style config, and ``num_layers`` of the
    stack's own copy of it). The first block of a T5 stack computes the relative position bias that every later
    block adds (``relative_attention_bias``): it cannot be dropped.

    Indices that point into a block list are renumbered so the model equals the original with the dropped blocks
    skipped (each passing its input through); see :func:`index_updates` (LLaVA's ``vision_feature_layer``,
    Qwen2.5-VL's ``fullatt_block_indexes``, Qwen3-VL's ``deepstack_visual_indexes``, Mllama's
    ``intermediate_layers_indices`` and text ``cross_attention_layers``, Phi-4-multimodal's image
    ``feature_layer``, a DINOv2 / BEiT backbone config's ``out_indices``, IDEFICS's ``cross_layer_interval``). A
    drop that no index can express (a Qwen3-VL deepstack merger left without a block output to read, IDEFICS
    groups of different sizes) is refused, as is any drop in a stack with per-layer input embeddings or key / value
    sharing (Gemma 3n, Gemma 4) and a drop removing every softmax-attention layer of a hybrid stack (Qwen3.5, LFM2).

    Args:
        model: the model, changed in place.
        names: block names (entries of a block ``ModuleList``, e.g. ``"model.layers.7"``).

    Returns:
        ``model``.

    Raises:
        ValueError: a name that is not an entry of a block list, dropping every block of a list, dropping the
            block that computes a T5 stack's shared position bias, or a drop :func:`index_updates` refuses;
            nothing is changed then.
    """
    _drop(model, names)
    from transformers import PreTrainedModel

    from ..quant.api import quantized_modules

    # a quantized model never matches a float model built from its config: not checked
    if isinstance(model, PreTrainedModel) and not quantized_modules(model):
        bad = _fresh_mismatch(model, [])
        if bad:
            warnings.warn(f"drop_blocks: the config of {type(model).__name__} no longer builds the pruned model (a "
                          f"model built from it differs at {', '.join(bad[:3])}{', ...' if len(bad) > 3 else ''}), so "
                          "save_pretrained / from_pretrained would not give this model back; save it with "
                          "medquant.prune.save_pruned(model, path, plan=PrunePlan(drop_blocks=[...])) and load it "
                          "with load_pruned", UserWarning, stacklevel=2)
    return model


def _drop(model: nn.Module, names: Sequence[str], renumber: bool = True) -> None:
    """:func:`drop_blocks` without the check of the config against the pruned model (:func:`apply_plan` reports
    that in the plan, :func:`load_pruned` rebuilds from the plan); ``renumber=False`` leaves the indices into the
    block lists as they are (a model built from a pruned model's saved config, which holds them renumbered
    already)."""
    by_stack: dict[str, list[int]] = {}
    for name in names:
        stack, _, idx = name.rpartition(".")
        holder = model.get_submodule(stack)
        if not idx.isdigit() or not isinstance(holder, nn.ModuleList):
            raise ValueError(f"{name!r} is not an entry of a block list")
        if int(idx) >= len(holder):
            raise ValueError(f"{name!r} is not an entry of a block list: {stack} has {len(holder)} blocks")
        why = bias_holder(model, name)
        if why is not None:
            raise ValueError(f"refusing to drop {name}: {why}")
        by_stack.setdefault(stack, []).append(int(idx))
    for stack_name, idxs in by_stack.items():  # checked for every list before any changes
        blocks = model.get_submodule(stack_name)
        if isinstance(blocks, nn.ModuleList) and len(set(idxs)) >= len(blocks):
            raise ValueError(f"refusing to drop all {len(blocks)} blocks of {stack_name}")
    updates = _index_updates(model, by_stack) if renumber else []  # may refuse: before any change
    for stack_name, idxs in by_stack.items():
        old_list = cast(nn.ModuleList, model.get_submodule(stack_name))  # checked above
        kept = [m for i, m in enumerate(old_list) if i not in set(idxs)]
        parent_name = stack_name.rpartition(".")[0]
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, stack_name.rpartition(".")[2], nn.ModuleList(kept))
        for new_i, blk in enumerate(kept):
            for m in blk.modules():
                if isinstance(getattr(m, "layer_idx", None), int):
                    setattr(m, "layer_idx", new_i)  # noqa: B010 (a plain attribute, not a parameter)
        cfg = _owner_config(model, stack_name)
        part = parent_name.rpartition(".")[2]
        if cfg is not None and part in ("encoder", "decoder") and isinstance(getattr(cfg, f"{part}_layers", None),
                                                                              int):
            setattr(cfg, f"{part}_layers", len(kept))  # BART-style: num_hidden_layers aliases encoder_layers
        elif cfg is not None and part in ("encoder", "decoder") and isinstance(
                getattr(cfg, "num_decoder_layers", None), int):
            # T5: the saved config has num_layers (encoder) / num_decoder_layers; each stack holds a copy of it
            # whose num_layers is that stack's depth
            root = outer_config(model, stack_name, cfg)
            setattr(root, "num_decoder_layers" if part == "decoder" else "num_layers", len(kept))
            if root is not cfg:
                cfg.num_layers = len(kept)
        elif cfg is not None:
            old_n = getattr(cfg, "num_hidden_layers", None)
            if isinstance(old_n, int):
                cfg.num_hidden_layers = len(kept)
            lt = getattr(cfg, "layer_types", None)
            if isinstance(lt, list) and old_n is not None and len(lt) == old_n:
                cfg.layer_types = [t for i, t in enumerate(lt) if i not in set(idxs)]
    for obj, key, value in updates:
        setattr(obj, key, value)


# Indices into a block list held beside it: (path of the block list from the module holding the attribute, the
# module attribute, the attribute of that module's config (dotted), what an index means; see index_updates).
_INDEX_RULES: tuple[tuple[str, str, str, str], ...] = (
    ("blocks", "fullatt_block_indexes", "fullatt_block_indexes", "runs"),  # Qwen2.5-VL: full-attention blocks
    ("blocks", "deepstack_visual_indexes", "deepstack_visual_indexes", "feeds"),  # Qwen3-VL: deepstack mergers
    ("transformer.layers", "intermediate_layers_indices", "intermediate_layers_indices", "output"),  # Mllama
    ("img_processor.encoder.layers", "layer_idx", "vision_config.feature_layer", "hidden"),  # Phi-4-multimodal
    ("layers", "cross_attention_layers", "cross_attention_layers", "runs"),  # Mllama text: cross-attention layers
)
_FEATURE_LAYER_KEYS = ("vision_feature_layer", "vision_feature_layers")  # LLaVA family: config of the VLM


def index_updates(model: nn.Module, names: Sequence[str]) -> list[tuple[Any, str, Any]]:
    """The renumbered indices that keep ``model`` equal to the original with the blocks ``names`` skipped.

    For a block list of ``n`` blocks losing the set ``D`` (``#D<(x)`` = dropped blocks below ``x``):

    * hidden-state positions (``n + 1`` entries, entry ``p`` = output of block ``p - 1``, entry 0 the block list's
      input; negative counts from the end): LLaVA's ``config.vision_feature_layer`` / ``vision_feature_layers``
      (a VLM config whose module holds the block list under ``vision_tower``) and Phi-4-multimodal's image
      ``layer_idx`` / ``vision_config.feature_layer``: ``p -> p - #D<(p)``, a negative index stays negative
      (from the new end). A dropped block's output is its input, the previous entry, so this is exact.
    * block outputs (``n`` entries, entry ``d`` = output of block ``d``): Mllama's ``intermediate_layers_indices``
      (``transformer.layers``): ``d -> #{kept blocks <= d} - 1``, the last kept block at or before ``d`` (whose
      output is what a skipped ``d`` outputs); refused when that is none (block 0's input is no entry).
    * blocks feeding a merger (Qwen3-VL ``deepstack_visual_indexes``: merger ``k`` reads the output of block
      ``indexes[k]``, transformers' vision loop tests ``layer_num in indexes`` and takes merger
      ``indexes.index(layer_num)``, and feature ``k`` is added after text layer ``k``): the same map as block
      outputs; refused when a merger would have no block (every block up to its index dropped) or two mergers
      would read one block (the loop runs only the first of them, so a text layer would lose its feature).
      Negative entries never match a block and are left as they are.
    * blocks that run differently (Qwen2.5-VL ``fullatt_block_indexes``, full instead of windowed attention;
      Mllama's text ``cross_attention_layers``, which attend to the image and are built and skipped as such): a
      dropped block leaves the list, a kept one ``i -> i - #D<(i)``.
    * a backbone config's stages (DINOv2, BEiT: ``stage_names`` = ``stem``, ``stage1`` .. ``stage{n}``, hidden-state
      positions): ``stage_names`` shrinks with the blocks and ``out_indices`` / ``out_features`` are renumbered as
      hidden-state positions, so the config still loads; refused when two outputs would become one stage.

    * interleaved cross-attention (IDEFICS: gated cross-attention layer ``k`` runs before layer
      ``k * cross_layer_interval``): exact only when every group of ``cross_layer_interval`` layers keeps the same
      number ``I' >= 1`` of layers; ``cross_layer_interval`` becomes ``I'``. Other drops, and dropping a
      cross-attention layer, are refused.

    Indices out of range, and entries that are not ints, are left as they are. Both the module attribute and its
    config (``save_pretrained`` writes it) are renumbered.

    Args:
        model: the model, before the drop.
        names: the blocks to drop (entries of block lists, checked by the caller).

    Returns:
        ``(object, attribute, new value)`` for every index that changes, to be set after the drop.

    Raises:
        ValueError: a drop that no index can express (see above); nothing is changed.
    """
    by_stack: dict[str, list[int]] = {}
    for name in names:
        stack, _, idx = name.rpartition(".")
        by_stack.setdefault(stack, []).append(int(idx))
    return _index_updates(model, by_stack)


def _index_updates(model: nn.Module, by_stack: dict[str, list[int]]) -> list[tuple[Any, str, Any]]:
    out: list[tuple[Any, str, Any]] = []
    seen: set[tuple[int, str]] = set()
    for stack, idxs in by_stack.items():
        n = len(cast(nn.ModuleList, model.get_submodule(stack)))
        gone = set(idxs)
        _refuse_per_layer_state(_owner_config(model, stack), n, gone, stack)
        for obj, key, kind in _index_targets(model, stack):
            if (id(obj), key) in seen:
                continue
            seen.add((id(obj), key))
            old = getattr(obj, key)
            new = _renumbered(old, kind, n, gone, f"{key} of {type(obj).__name__} (blocks of {stack})")
            if new != old:
                out.append((obj, key, new))
        out += _stage_updates(_owner_config(model, stack), n, gone, stack)
        out += _interval_updates(model, stack, n, gone)
    return out


def _interval_updates(model: nn.Module, stack: str, n: int, gone: set[int]) -> list[tuple[Any, str, Any]]:
    """IDEFICS: a module holding ``layers`` and ``gated_cross_attn_layers`` with an int ``cross_layer_interval``
    ``I`` runs cross-attention layer ``k`` before layer ``k * I`` (``K = n // I`` of them). Skipping the dropped
    layers, cross-attention layer ``k`` still runs before the layers kept of group ``[k * I, (k + 1) * I)``; the
    pruned model runs it before its layer ``k * I'``. The two agree when every group keeps the same number ``I' >= 1``
    of layers: ``cross_layer_interval`` (module and config) becomes ``I'``. Any other drop - a group emptied (two
    cross-attention layers in a row), groups of different sizes, or a cross-attention layer itself (its group would
    run without the image) - is refused."""
    parent_name, _, leaf = stack.rpartition(".")
    holder = model.get_submodule(parent_name) if parent_name else model
    interval = getattr(holder, "cross_layer_interval", None)
    cross = getattr(holder, "gated_cross_attn_layers", None)
    if not (isinstance(interval, int) and interval > 0 and isinstance(cross, nn.ModuleList)
            and isinstance(getattr(holder, "layers", None), nn.ModuleList)):
        return []
    if leaf == "gated_cross_attn_layers":
        raise ValueError(f"refusing to drop blocks {sorted(gone)} of {stack}: cross-attention layer k runs before "
                         f"layer k * cross_layer_interval ({interval}) of {parent_name or 'the model'}.layers, and "
                         "that group of layers would run without reading the image -- nothing was changed")
    if leaf != "layers":
        return []
    groups = [sum(1 for j in range(k * interval, min((k + 1) * interval, n)) if j not in gone)
              for k in range(len(cross))]
    if n != len(cross) * interval or len(set(groups)) != 1 or groups[0] == 0:
        raise ValueError(f"refusing to drop blocks {sorted(gone)} of {stack}: a gated cross-attention layer runs "
                         f"before each group of {interval} layers (cross_layer_interval), so the pruned model equals "
                         "the original with those layers skipped only when every group keeps the same number (>= 1) "
                         f"of layers; kept per group: {groups} -- nothing was changed")
    out: list[tuple[Any, str, Any]] = [(holder, "cross_layer_interval", groups[0])]
    cfg = _owner_config(model, stack)
    if cfg is not None and getattr(cfg, "cross_layer_interval", None) == interval:
        out.append((cfg, "cross_layer_interval", groups[0]))
    return out


def _refuse_per_layer_state(cfg: Any, n: int, gone: set[int], stack: str) -> None:
    """Refuse a drop in a stack whose config gives each layer a slice of a shared tensor or another layer's cache:
    per-layer input embeddings (``hidden_size_per_layer_input``: Gemma 3n, Gemma 4 read slice ``i`` of
    ``embed_tokens_per_layer`` / ``per_layer_model_projection``, reshaped by ``num_hidden_layers``) or key / value
    sharing (``num_kv_shared_layers``: the last layers reuse the keys and values of earlier ones). Neither is
    renumbered here; the pruned model would fail in its forward or read another layer's keys. Also refused: a drop
    that removes every softmax-attention layer of a hybrid stack (``layer_types``) while keeping its other layers."""
    if getattr(cfg, "num_hidden_layers", None) != n:
        return
    ple, shared = getattr(cfg, "hidden_size_per_layer_input", None), getattr(cfg, "num_kv_shared_layers", None)
    what = [w for w, v in (("per-layer input embeddings (hidden_size_per_layer_input, one slice per layer)", ple),
                           ("key / value sharing (num_kv_shared_layers)", shared)) if isinstance(v, int) and v > 0]
    if what:
        raise ValueError(f"refusing to drop blocks {sorted(gone)} of {stack}: its {type(cfg).__name__} has "
                         f"{' and '.join(what)}, tied to the layer count and positions, which drop_blocks does not "
                         "renumber (Gemma 3n / Gemma 4 style); prune heads or neurons instead -- nothing was changed")
    types = getattr(cfg, "layer_types", None)
    if isinstance(types, list) and len(types) == n:  # a hybrid stack (Qwen3.5, LFM2, Jamba...)
        softmax = [i for i, t in enumerate(types) if t in _SOFTMAX_ATTENTION_TYPES]
        if softmax and set(softmax) <= gone and len(gone) < n:
            raise ValueError(f"refusing to drop blocks {sorted(gone)} of {stack}: they are every attention layer "
                             f"({', '.join(sorted({types[i] for i in softmax}))}) of a stack whose other layers are "
                             f"{', '.join(sorted({t for t in types if t not in _SOFTMAX_ATTENTION_TYPES}))}; "
                             "transformers builds the attention masks and the cache from an attention layer, so the "
                             "pruned model would fail in its forward; keep one -- nothing was changed")


#: ``layer_types`` entries of layers with softmax attention (their masks and cache sizes come from such a layer);
#: the others of hybrid stacks are ``linear_attention``, ``conv``, ``mamba``, ``mlp``, ``moe``.
_SOFTMAX_ATTENTION_TYPES = frozenset({"full_attention", "sliding_attention", "chunked_attention", "attention",
                                      "hybrid"})


def _stage_updates(cfg: Any, n: int, gone: set[int], stack: str) -> list[tuple[Any, str, Any]]:
    """A backbone config's (DINOv2, BEiT: ``BackboneConfigMixin``) ``stage_names`` (``stem`` + ``stage1`` ..
    ``stage{n}``, entry ``p`` the output of block ``p - 1``) and the ``out_indices`` / ``out_features`` picking
    some of them, renumbered as hidden-state positions (:func:`index_updates`); a backbone's outputs must be
    distinct stages, so a drop that maps two of them onto one is refused."""
    names = getattr(cfg, "stage_names", None)
    idx = getattr(cfg, "_out_indices", None)
    if (getattr(cfg, "num_hidden_layers", None) != n or names != ["stem"] + [f"stage{i}" for i in range(1, n + 1)]
            or not isinstance(idx, list)):
        return []
    new_idx = _renumbered(idx, "hidden", n, gone, f"out_indices of {type(cfg).__name__} (blocks of {stack})")
    m = n - len(gone)
    if len({i % (m + 1) for i in new_idx}) < len(new_idx):
        raise ValueError(f"refusing to drop blocks {sorted(gone)} of {stack}: the backbone's out_indices {idx} would "
                         f"become {new_idx}, two outputs of one stage (a dropped block's output is the output of the "
                         "block before it), which a backbone config refuses; keep a block between them -- nothing "
                         "was changed")
    new_names = ["stem"] + [f"stage{i}" for i in range(1, m + 1)]
    return [(cfg, "stage_names", new_names), (cfg, "_out_indices", new_idx),
            (cfg, "_out_features", [new_names[i] for i in new_idx])]


def _index_targets(model: nn.Module, stack: str) -> list[tuple[Any, str, str]]:
    """``(object, attribute, kind)`` of the indices into block list ``stack`` held by it ancestors (and their
    configs), per :data:`_INDEX_RULES` and :data:`_FEATURE_LAYER_KEYS`."""
    parts = stack.split(".")
    found: list[tuple[Any, str, str]] = []
    for cut in range(len(parts) - 1, -1, -1):
        holder = model.get_submodule(".".join(parts[:cut])) if cut else model
        rel = ".".join(parts[cut:])
        cfg = getattr(holder, "config", None)
        for path, attr, cfg_key, kind in _INDEX_RULES:
            if rel != path:
                continue
            if hasattr(holder, attr):
                found.append((holder, attr, kind))
            *inner, leaf = cfg_key.split(".")
            obj = cfg
            for part in inner:
                obj = getattr(obj, part, None)
            if obj is not None and hasattr(obj, leaf):
                found.append((obj, leaf, kind))
        if rel.startswith("vision_tower.") and cfg is not None:
            found += [(cfg, key, "hidden") for key in _FEATURE_LAYER_KEYS if hasattr(cfg, key)]
    return found


def _renumbered(old: Any, kind: str, n: int, gone: set[int], what: str) -> Any:
    """``old`` (an int or a list / tuple of ints) renumbered for the drop of ``gone`` out of ``n`` blocks
    (``kind``: ``"hidden"``, ``"output"``, ``"feeds"``, ``"runs"``; see :func:`index_updates`)."""
    m = n - len(gone)

    def is_int(v: Any) -> bool:
        return isinstance(v, int) and not isinstance(v, bool)

    def one(v: Any) -> Any:
        if not is_int(v):
            return v
        if kind == "hidden":
            if not -(n + 1) <= v <= n:
                return v
            p = v if v >= 0 else n + 1 + v
            q = p - sum(i < p for i in gone)
            return q if v >= 0 else q - (m + 1)
        if not (0 if kind == "feeds" else -n) <= v < n:
            return v
        d = v if v >= 0 else n + v
        q = sum(i <= d and i not in gone for i in range(n)) - 1
        if q < 0:
            raise ValueError(f"refusing to drop blocks {sorted(gone)}: {what} reads the output of block {d}, which "
                             f"would be the input of the block list (no block before it is kept), and no index "
                             "can express that; keep one of those blocks -- nothing was changed")
        return q if v >= 0 else q - m

    if kind == "runs":
        if isinstance(old, (list, tuple)) and all(is_int(i) for i in old):
            return type(old)(i - sum(d < i for d in gone) for i in old if i not in gone)
        return old
    if isinstance(old, (list, tuple)):
        new = [one(v) for v in old]
        if kind == "feeds":
            fed = [q for v, q in zip(old, new) if is_int(v) and 0 <= v < n]
            if len(set(fed)) < len(fed) and len({v for v in old if is_int(v) and 0 <= v < n}) == len(fed):
                raise ValueError(f"refusing to drop blocks {sorted(gone)}: {what} {list(old)} would become {new}, "
                                 "two deepstack mergers reading the output of one block, and the vision model runs "
                                 "only the first of them (a text layer would lose its deepstack feature); keep a "
                                 "block between them -- nothing was changed")
        return type(old)(new)
    return one(old)


def _fresh_mismatch(model: nn.Module, ignore: Sequence[str]) -> list[str]:
    """State-dict keys whose shape differs between ``model`` and a model of its class built (on the meta device)
    from its config after a JSON round trip, then the keys only one of them has (``"<key> (missing)"``: the fresh
    model lacks it; ``"<key> (extra)"``: only the fresh model has it); keys under ``ignore`` prefixes are not
    compared."""
    cfg = getattr(model, "config", None)
    try:
        cfg = type(cfg).from_dict(cfg.to_dict())
        with torch.device("meta"):
            fresh = type(model)._from_config(cfg)
    except Exception as e:  # noqa: BLE001 - any failure means the config does not rebuild the model
        return [f"<the config does not build {type(model).__name__}: {type(e).__name__}: {e}>"]
    want = {k: tuple(v.shape) for k, v in fresh.state_dict().items()}
    have = {k: tuple(v.shape) for k, v in model.state_dict().items()}

    def kept(k: str) -> bool:
        return not any(k.startswith(p) for p in ignore)
    return ([k for k, v in have.items() if k in want and want[k] != v and kept(k)]
            + [f"{k} (missing)" for k in have if k not in want and kept(k)]
            + [f"{k} (extra)" for k in want if k not in have and kept(k)])


def bias_holder(model: nn.Module, block: str) -> str | None:
    """Why ``block`` cannot be removed because it computes the relative position bias of its whole stack, or None.

    The first block of a T5 stack (``has_relative_attention_bias``, see
    :func:`medquant.models.blocks.shares_position_bias`) computes the bias from its ``relative_attention_bias``
    and passes it to every later block: without it the later blocks would run without a position bias.

    Args:
        model: the model.
        block: a block name.

    Returns:
        The reason, or None when the block holds no such bias.
    """
    for name, m in model.get_submodule(block).named_modules():
        if shares_position_bias(m) and m.has_relative_attention_bias is True:
            return (f"{block}.{name}.relative_attention_bias computes the relative position bias that every later "
                    f"block of {block.rpartition('.')[0]} adds (T5): the stack would run without it; drop later "
                    "blocks instead")
    return None


def outer_config(model: nn.Module, stack_name: str, cfg):
    """The outermost config of ``cfg``'s class on the way from ``model`` to ``stack_name`` (the saved config of a
    T5 model, whose stacks hold copies of it), else ``cfg``.

    Args:
        model: the model.
        stack_name: a module name inside it (a block list, or a block).
        cfg: the config that owns the module.

    Returns:
        The first config of ``type(cfg)`` held by ``model`` or a module on the path (``cfg`` itself when it is
        that one), else ``cfg``.
    """
    parts = stack_name.split(".")
    for cut in range(len(parts)):
        owner = getattr(model.get_submodule(".".join(parts[:cut])) if cut else model, "config", None)
        if type(owner) is type(cfg):
            return owner
    return cfg


def _owner_config(model: nn.Module, stack_name: str):
    from transformers import PretrainedConfig

    parts = stack_name.split(".")
    for cut in range(len(parts) - 1, -1, -1):
        mod = model.get_submodule(".".join(parts[:cut])) if cut else model
        cfg = getattr(mod, "config", None)
        if isinstance(cfg, PretrainedConfig):
            return cfg
    return None


def influence_table(scores: Sequence[dict[str, Any]], ratios: dict[str, float] | None = None) -> str:
    """Markdown table of the scores (and per-block ratios when given).

    Args:
        scores: the output of :func:`block_influence` (``{"block", "index", "cosine", "wasserstein"}`` per block).
        ratios: optional ``{block name: ratio}`` (e.g. from :func:`allocate_ratios`), shown as a fourth column.

    Returns:
        The table text: ``| block | 1 - cos | W1 / std | [ratio |]``, one row per block.
    """
    head = "| block | 1 - cos | W1 / std |" + (" ratio |" if ratios else "")
    lines = [head, "|" + "---|" * (4 if ratios else 3)]
    for s in scores:
        row = f"| {s['block']} | {s['cosine']:.4f} | {s['wasserstein']:.4f} |"
        if ratios:
            row += f" {ratios.get(s['block'], 0.0):.3f} |"
        lines.append(row)
    return "\n".join(lines)


def plot_influence(scores: Sequence[dict[str, Any]], path: str | Path, title: str = "block influence") -> Path:
    """Bar chart (PNG) of both influence scores per block.

    Args:
        scores: the output of :func:`block_influence` (``{"block", "index", "cosine", "wasserstein"}`` per block).
        path: the PNG to write (parent folders are created).
        title: the chart title.

    Returns:
        ``path`` as a ``Path``.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    x = list(range(len(scores)))
    fig, ax1 = plt.subplots(figsize=(max(6, 0.3 * len(scores) + 3), 3.5))
    ax1.bar([i - 0.2 for i in x], [s["cosine"] for s in scores], width=0.4, label="1 - cos(in, out)")
    ax2 = ax1.twinx()
    ax2.bar([i + 0.2 for i in x], [s["wasserstein"] for s in scores], width=0.4, color="tab:orange",
            label="W1(in, out) / std(in)")
    ax1.set_xlabel("block")
    ax1.set_ylabel("1 - cosine")
    ax2.set_ylabel("W1 / std")
    ax1.set_xticks(x)
    fig.legend(loc="upper right", fontsize=8)
    ax1.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
