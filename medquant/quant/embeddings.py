"""Quantized input embeddings and tied output heads stored once: :func:`quantize_embeddings_`.

``quantize_`` quantizes Linear / Conv2d layers (the output head is one of them unless ``skip=["@head"]``); the
input embedding tables are left in floating point. ``quantize_embeddings_(model, config)`` quantizes them too:

* each embedding ``E`` (an ``nn.Embedding``) becomes a :class:`~medquant.quant.modules.QuantEmbedding`: packed
  rows with ``config``'s bits / scope / group size; a lookup dequantizes only the looked-up rows,
  ``e[i, j] = (u[i, j] - z) * s[i, j // group_size]``;
* an output head *tied* to ``E`` (``head.weight is E.weight``, e.g. SmolLM2 / Llama with
  ``tie_word_embeddings``) becomes a :class:`~medquant.quant.modules.QuantLinear` holding the **same** packed
  tensors (one copy in memory; ``medquant.save`` writes it once and ``medquant.load`` ties it again: the head's
  recipe records ``"tied_to"``). A head that ``quantize_`` already quantized with the same config (its codes equal
  the embedding's) is tied the same way when a transformers config declares it tied (``tie_word_embeddings`` of
  the model or of a model inside it whose input embedding is ``E``, e.g. BLIP-2's ``language_model``); one with
  another config keeps its own tensors (a warning says so).

Two ways to use it on a model with a tied head:

* ``quantize_(model, QuantConfig(bits=4, group_size=128), skip=["@head"])`` then
  ``quantize_embeddings_(model, QuantConfig(bits=8, scope="channel"))``: the body at 4 bits, the embedding table
  at 8 bits per row, and the head computing with that same 8-bit table (CPU: the int8 kernel);
* ``quantize_(model, cfg)`` then ``quantize_embeddings_(model, cfg)`` with the same ``cfg``: the head (already
  quantized by ``quantize_``) and the table hold equal codes, and are tied (one copy).
"""
from __future__ import annotations

import warnings

import torch
from torch import nn

from .api import swap_module, swap_under_all_names
from .config import QuantConfig
from .modules import QuantEmbedding, QuantLinear, _remember_float_class, tie_quantized_head, tied_to

__all__ = ["quantize_embeddings_"]


def _check_plain(name: str, m: nn.Module) -> None:
    """Refuse ``nn.Embedding`` subclasses: their forward may change the lookup (Gemma 3's scaled word embedding
    multiplies every row by ``embed_scale``), which a ``QuantEmbedding`` would silently drop."""
    if isinstance(m, nn.Embedding) and type(m) is not nn.Embedding:
        raise TypeError(f"quantize_embeddings_: {name!r} is a {type(m).__name__}, a subclass of nn.Embedding whose "
                        "forward may change the lookup (e.g. a scale); only plain nn.Embedding tables are "
                        "quantized: leave it float or pass names= of plain tables")


def _targets(model: nn.Module, names) -> list[str]:
    if names is not None:
        if isinstance(names, str):
            names = [names]
        out = []
        for n in names:
            try:
                m = model.get_submodule(n)
            except AttributeError:
                raise ValueError(f"quantize_embeddings_: {type(model).__name__} has no module {n!r}") from None
            if not isinstance(m, (nn.Embedding, QuantEmbedding)):
                raise TypeError(f"quantize_embeddings_: {n!r} is a {type(m).__name__}, not an nn.Embedding")
            _check_plain(n, m)
            out.append(n)
        return out
    get = getattr(model, "get_input_embeddings", None)
    if callable(get):
        try:
            emb = get()
        except NotImplementedError:
            emb = None
        if isinstance(emb, (nn.Embedding, QuantEmbedding)):
            found = [n for n, m in model.named_modules() if m is emb][:1]
            for n in found:
                _check_plain(n, emb)
            return found
    return [n for n, m in model.named_modules() if type(m) is nn.Embedding or isinstance(m, QuantEmbedding)]


_LOOKUP = ("num_embeddings", "embedding_dim", "padding_idx", "max_norm", "norm_type", "scale_grad_by_freq", "sparse")


def _other_uses(model: nn.Module, name: str, old: nn.Embedding) -> list[str]:
    """The other names that look ``old``'s table up: ``old`` bound under several names, and plain ``nn.Embedding``
    modules holding ``old.weight`` itself with the same lookup settings (T5 under transformers 5 ties
    ``encoder.embed_tokens`` / ``decoder.embed_tokens`` to ``shared`` that way)."""
    return [n for n, m in model.named_modules(remove_duplicate=False) if n and n != name and (m is old or (
        type(m) is nn.Embedding and m.weight is old.weight
        and all(getattr(m, a) == getattr(old, a) for a in _LOOKUP)))]


def _declared_tied_head(model: nn.Module, emb: nn.Module) -> nn.Module | None:
    """The output head a transformers config declares tied to the table ``emb``: ``get_output_embeddings()`` of
    ``model`` or of a model inside it (BLIP-2's ``language_model``, whose config alone carries the flag, as
    transformers' own ``get_expanded_tied_weights_keys(all_submodels=True)`` reads it) whose
    ``config.tie_word_embeddings`` is true and whose ``get_input_embeddings()`` is ``emb``; ``None`` if none."""
    for m in model.modules():
        if getattr(getattr(m, "config", None), "tie_word_embeddings", False) is not True:
            continue
        get_in, get_out = getattr(m, "get_input_embeddings", None), getattr(m, "get_output_embeddings", None)
        if not (callable(get_in) and callable(get_out)):
            continue
        try:
            if get_in() is not emb:
                continue
            head = get_out()
        except (NotImplementedError, AttributeError):
            continue
        if isinstance(head, nn.Module):
            return head
    return None


@torch.no_grad()
def quantize_embeddings_(model: nn.Module, config: QuantConfig | None = None, *, names=None,
                         tie: bool = True) -> dict[str, list[str]]:
    """Quantize the input embeddings of ``model`` in place and share their storage with tied output heads.

    Calling it again re-ties heads whose codes equal their embedding's (e.g. after moving the head or the table
    alone to another device, which gives it its own copy; ``model.to(device)`` keeps the tie).

    Args:
        model: the model, changed in place.
        config: bits (1..8, one for all rows), scope and group size of the tables; default
            ``QuantConfig(bits=8, scope="channel")`` (8-bit rows, one scale per row).
        names: module names of the embeddings to quantize; default the model's input embedding
            (``get_input_embeddings()`` for Hugging Face models), else every ``nn.Embedding``.
        tie: share the packed tensors with tied heads (default). ``False`` leaves heads as they are. A tied
            head with a bias, or of a subclass of ``nn.Linear`` with its own ``forward``, stays in floating point
            on the float table, with a ``RuntimeWarning``; a tied head bound under several names becomes one
            quantized head under all of them.

    A table used under several names (one ``nn.Embedding`` bound under several, or plain ``nn.Embedding`` modules
    holding its very ``weight`` with the same lookup settings, as T5's encoder and decoder embeddings under
    transformers 5) becomes one ``QuantEmbedding`` bound under all of them.

    Returns:
        ``{"embeddings": [...], "tied_heads": [...]}``: the module names quantized (every name of a table used under
        several) and the heads now sharing their tensors; a model with no table to quantize gives empty lists
        and a ``UserWarning``.

    Raises:
        TypeError: ``config`` is not a ``QuantConfig``; a named module is not an ``nn.Embedding``, or is a
            subclass of it (its own forward, e.g. Gemma 3's scaled embedding, would be lost).
        ValueError: ``model`` is itself an ``nn.Embedding`` (``QuantEmbedding.from_float`` quantizes one table),
            ``model`` has no module of a given name, ``config`` is given and a table is already
            quantized with another one, or a table cannot be quantized (NaN / inf values, on the meta device; the
            message names it): nothing is changed then.
    """
    explicit = config is not None
    config = config if config is not None else QuantConfig(bits=8, scope="channel")
    if not isinstance(config, QuantConfig):
        raise TypeError(f"config must be a medquant.QuantConfig, got {type(config).__name__}")
    targets = _targets(model, names)
    if not targets:  # as quantize_, a call that does nothing says so
        warnings.warn(f"quantize_embeddings_ quantized nothing in {type(model).__name__}: it holds no plain "
                      "nn.Embedding table", UserWarning, stacklevel=2)
    if "" in targets:  # the model is itself one table: there is no parent to swap it in
        raise ValueError(f"the model passed to quantize_embeddings_ is itself the table ({type(model).__name__}); "
                         "it replaces tables in place, so it needs a model holding the table: quantize one table "
                         "with QuantEmbedding.from_float(table, config), or wrap it (nn.Sequential(table))")
    # a table already quantized with another config is not silently kept (checked before anything changes)
    other = [f"{n!r} ({m.config})" for n in targets
             if isinstance(m := model.get_submodule(n), QuantEmbedding) and explicit and m.config != config]
    if other:
        raise ValueError(f"quantize_embeddings_: {', '.join(other)} already quantized with another config than "
                         f"{config}; dequantize it first (module.to_float()) to quantize it again, or call "
                         "without config to keep it and re-tie its heads")
    # every float table is quantized before any is swapped in: a table that cannot be (NaN / inf values, a config it
    # cannot take) raises with the model unchanged
    built: dict[int, QuantEmbedding] = {}
    for name in targets:
        old = model.get_submodule(name)
        if isinstance(old, nn.Embedding) and id(old) not in built:
            try:
                built[id(old)] = QuantEmbedding.from_float(old, config).train(old.training)  # quantize_ keeps it
            except (ValueError, TypeError) as e:  # which table, as quantize_ names the layer
                raise type(e)(f"quantize_embeddings_: {name!r}: {e}") from None
    done: dict[str, list[str]] = {"embeddings": [], "tied_heads": []}
    for name in targets:
        old = model.get_submodule(name)
        float_weight = old.weight if isinstance(old, nn.Embedding) else None
        heads = [(n, m) for n, m in model.named_modules()
                 if isinstance(m, nn.Linear) and float_weight is not None and m.weight is float_weight]
        if isinstance(old, nn.Embedding):
            emb = built[id(old)]
            uses = [name, *_other_uses(model, name, old)]
            for n in uses:  # one quantized table under every name that looks the float one up
                swap_module(model, n, emb)
            done["embeddings"].extend(uses)
        else:
            emb = old
        if not tie:
            continue
        for hname, head in heads:  # float heads tied to the float table: a QuantLinear on the same tensors
            if head.bias is not None:  # a tied QuantLinear shares the table's tensors and has no bias
                warnings.warn(f"quantize_embeddings_: the head {hname!r} tied to {name!r} has a bias, which a head "
                              "sharing the table's packed tensors does not carry; it stays in floating point on "
                              "the float table (stored a second time, beside the packed one)", RuntimeWarning,
                              stacklevel=2)
                continue
            if type(head).forward is not nn.Linear.forward:  # a QuantLinear computes x W^T only: it would drop it
                warnings.warn(f"quantize_embeddings_: the head {hname!r} tied to {name!r} is a "
                              f"{type(head).__name__}, a subclass of nn.Linear with its own forward, which a head "
                              "sharing the table's packed tensors would drop; it stays in floating point on the "
                              "float table (stored a second time, beside the packed one)", RuntimeWarning,
                              stacklevel=2)
                continue
            q = QuantLinear(head.in_features, head.out_features, False, emb.config, device=head.weight.device,
                            dtype=head.weight.dtype, layout=emb.layout_version)
            tie_quantized_head(q, emb)
            _remember_float_class(q, head, nn.Linear)  # dequantize_ gives a subclass computing as nn.Linear back
            # a head bound under several names becomes one quantized head under all of them
            swapped = swap_under_all_names(model, hname, q.train(head.training))
            done["tied_heads"].extend(n for n, _ in swapped)
        head = _declared_tied_head(model, emb)
        if isinstance(head, QuantLinear) and not tied_to(head, emb):
            hname = next(n for n, m in model.named_modules() if m is head)
            same = (head.config == emb.config and head.layout_version == emb.layout_version and head.bias is None
                    and head.bit_groups == emb.bit_groups
                    and all(torch.equal(head.get_buffer(k), emb.get_buffer(k)) for k, _ in emb.named_buffers()))
            if same:
                tie_quantized_head(head, emb)
                done["tied_heads"].append(hname)
            else:
                warnings.warn(f"quantize_embeddings_: the head {hname!r} is tied to {name!r} in the model config "
                              f"but was quantized with another config ({head.config} vs {emb.config}); it keeps its "
                              f"own packed tensors (stored twice). Quantize the model with skip=['@head'] first to "
                              f"share the embedding's.", RuntimeWarning, stacklevel=2)
    return done
