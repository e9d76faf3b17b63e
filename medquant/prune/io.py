"""Save and reload pruned models whose layers have different shapes.

:func:`save_pruned` writes the model with :func:`medquant.save` (safetensors + ``medquant.json`` + HF
``config.json``) and records a *shape table* in the JSON extras under ``"prune"``:

* ``blocks``: for every transformer block, its attention's ``n_heads`` / ``n_kv`` / ``head_dim``, those of its
  cross-attention (``cross_attention``: encoder-decoder blocks; a table written before this entry existed has
  none, and such a block's cross-attention keeps the shapes of the rebuilt model), its FFN's ``n_neurons`` and
  its MoE experts' (3-D weights) ``name`` and ``n_neurons`` per expert;
* ``modules``: for plain ``nn.Module`` models, the shape of every Conv2d / BatchNorm2d / Linear;
* ``stacks``: the number of blocks in each block list (``drop_blocks`` shortens it);
* ``shared_blocks`` (only when there are some): every further name of a block bound under several names (one
  block object listed twice, ``layers[1] = layers[0]``: weights shared across layers) -> its first name. The
  weights file holds such a block's tensors once, under its first name; :func:`load_pruned` binds the further
  names to the first name's block again before anything is shrunk or loaded (a model built from the saved config
  has a block of its own under each name, which the file holds no tensors for). A table written before this entry
  existed has none: a shared block then loads as it did (it reloads when the given ``model`` shares it too).

Blocks are recorded for plain ``nn.Module`` transformers too (the blocks
:func:`medquant.models.transformer_blocks` finds), and quantized layers (``QuantLinear``) count with their logical
shapes, so the table of a pruned model is the same before and after quantization.

:func:`load_pruned` rebuilds the model from the saved config (Hugging Face) or from a float instance you pass
(plain modules), shrinks every layer to the recorded shapes -- query heads ``0..g'-1`` of key/value groups
``0..n_kv'-1``, neurons ``0..n'-1``, whose values are then overwritten; the blocks are shrunk by replaying the
head / neuron removal, which also sets the attention modules' own counts (``num_heads``,
``num_key_value_groups``, ``all_head_size``...) -- and loads the tensors with
:func:`medquant.load` (checksums verified). Quantized pruned models round-trip too: quantization recipes are
stored by :func:`medquant.save` with the pruned shapes.

Blocks dropped whole (``drop_blocks``) come back by themselves for Hugging Face models whose saved config
expresses them (the new ``num_hidden_layers``); where it does not (Swin's ``depths``, a vision tower built from a
nested dict) the model built from it has more blocks than ``stacks`` records, and the plan saved with the model
(``save_pruned(..., plan=plan)``) names the ones to drop again (the saved config's indices are kept as they are:
they were renumbered before the save). A given model (plain ``nn.Module``, or a fresh Hugging Face one) has its
blocks dropped again the same way, renumbering as :func:`medquant.prune.layers.drop_blocks` does; without the plan
a block list shorter than the model's raises ``CheckpointError`` (which blocks were dropped is not known).

Uniformly pruned decoders whose config expresses the result (``plan.hf_config_exact``) also round-trip with
plain ``save_pretrained`` / ``from_pretrained``.
"""
from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..io import META_NAME, CheckpointError, atomic, build_hf_model, load, save, verify
from ..io.schema import SchemaError, TensorInfo, read_header
from ..models.blocks import transformer_blocks
from ..quant.experts import experts_layout
from .surgery import prune_attention, prune_experts, prune_ffn

__all__ = ["load_pruned", "save_pruned", "shape_table"]

TABLE_VERSION = 1


def _is_hf(model: nn.Module) -> bool:
    from transformers import PreTrainedModel

    return isinstance(model, PreTrainedModel)


@contextmanager
def _float_stand_ins(model: nn.Module) -> Iterator[None]:
    """Every ``QuantLinear`` of ``model`` replaced, for the duration, by an ``nn.Linear`` of the same logical shape
    on the meta device, so that :func:`medquant.models.transformer_blocks` (which reads ``nn.Linear`` layers) finds
    the blocks of a pruned-then-quantized model; the quantized layers are put back on exit, whatever happens."""
    from ..quant.modules import QuantLinear

    swapped: list[tuple[nn.Module, str, nn.Module]] = []
    try:
        for name, m in list(model.named_modules(remove_duplicate=False)):
            if not isinstance(m, QuantLinear):
                continue
            parent_name, _, attr = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            with torch.device("meta"):
                stand_in = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None)
            parent._modules[attr] = stand_in
            swapped.append((parent, attr, m))
        yield
    finally:
        for parent, attr, m in reversed(swapped):
            parent._modules[attr] = m


def shape_table(model: nn.Module) -> dict[str, Any]:
    """The per-layer shapes :func:`load_pruned` needs to rebuild ``model``.

    Quantized layers (``QuantLinear``) count with their logical shapes, so a model pruned then quantized records
    the same table as before quantization.

    Args:
        model: the pruned (possibly quantized) model. Hugging Face models: per block. Plain modules: per block
            of :func:`medquant.models.transformer_blocks` (a plain transformer's head and neuron counts, which
            :func:`load_pruned` replays so that attributes such as ``num_heads`` follow) and per Conv2d /
            BatchNorm2d / Linear.

    Returns:
        ``{"version", "blocks": {block: {"attention": {n_heads, n_kv, head_dim}, "cross_attention": {n_heads,
        n_kv, head_dim}, "ffn": {n_neurons}, "experts": {...}}}, "modules": {name: {"type", "in", "out"} | {"type", "n"}}, "stacks": {block list:
        number of blocks}}`` (JSON-ready), and ``"shared_blocks": {further name: first name}`` when a block is
        bound under several names (module docstring).
    """
    table: dict[str, Any] = {"version": TABLE_VERSION, "blocks": {}, "modules": {}}
    first_name: dict[int, str] = {}
    with _float_stand_ins(model):
        for b in transformer_blocks(model, "all", clamp_wrappers=True):
            stack = model.get_submodule(b.stack)
            if isinstance(stack, nn.ModuleList):  # a Hugging Face config may not express dropped blocks
                table.setdefault("stacks", {})[b.stack] = len(stack)
            e: dict[str, Any] = {}
            if b.attention is not None:
                a = b.attention
                e["attention"] = {"n_heads": a.n_heads, "n_kv": a.n_kv, "head_dim": a.head_dim}
            if b.cross_attention is not None:
                c = b.cross_attention
                e["cross_attention"] = {"n_heads": c.n_heads, "n_kv": c.n_kv, "head_dim": c.head_dim}
            if b.ffn is not None:
                e["ffn"] = {"n_neurons": b.ffn.n_neurons}
            lay = experts_layout(model.get_submodule(b.experts)) if b.experts is not None else None
            if lay is not None:
                e["experts"] = {"name": b.experts, "n_neurons": lay["inter"]}
            table["blocks"][b.name] = e
            block = model.get_submodule(b.name)
            if id(block) in first_name:  # one block bound under several names: stored once, under its first name
                table.setdefault("shared_blocks", {})[b.name] = first_name[id(block)]
            else:
                first_name[id(block)] = b.name
        if not _is_hf(model):
            for name, m in model.named_modules():
                if isinstance(m, nn.Conv2d):
                    table["modules"][name] = {"type": "Conv2d", "in": m.in_channels, "out": m.out_channels}
                elif isinstance(m, nn.BatchNorm2d):
                    table["modules"][name] = {"type": "BatchNorm2d", "n": m.num_features}
                elif isinstance(m, nn.Linear):
                    table["modules"][name] = {"type": "Linear", "in": m.in_features, "out": m.out_features}
    return table


def save_pruned(model: nn.Module, directory: str | os.PathLike, *, plan=None,
                extras: dict[str, Any] | None = None) -> Path:
    """Save a pruned (and possibly quantized) model with its shape table (:func:`medquant.save` underneath).

    Args:
        model: the pruned model.
        directory: the output folder.
        plan: the :class:`PrunePlan` that was applied, recorded as ``extras["prune_plan"]`` (optional).
        extras: more JSON extras to store (the key ``"prune"`` is reserved).

    Returns:
        The directory written.

    Raises:
        ValueError: ``extras`` uses the reserved key ``"prune"``.
    """
    ex = dict(extras or {})
    if "prune" in ex:
        raise ValueError("extras key 'prune' is reserved for the shape table")
    ex["prune"] = shape_table(model)
    if plan is not None:
        ex["prune_plan"] = plan.to_dict()
    return save(model, directory, extras=ex)


def _empty_param(p: torch.Tensor, shape: tuple[int, ...]) -> nn.Parameter:
    return nn.Parameter(torch.empty(shape, dtype=p.dtype, device=p.device), requires_grad=p.requires_grad)


_WHERE = f"{META_NAME} extras.prune"
_MAX_SIZE = 2**31 - 1


def _size(entry: Any, key: str, at: str) -> int:
    if not isinstance(entry, dict) or key not in entry:
        raise CheckpointError(f"{at} has no {key!r}: expected an object with {key!r} (a positive integer)")
    v = entry[key]
    if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= _MAX_SIZE:
        raise CheckpointError(f"{at}[{key!r}] must be a positive integer (at most {_MAX_SIZE}), got {v!r}"[:300])
    return v


def _obj(v: Any, at: str, what: str) -> dict[str, Any]:
    if not isinstance(v, dict):
        raise CheckpointError(f"{at} must be an object ({what}), got {type(v).__name__} {v!r}"[:300])
    return v


def _file_size(header: dict[str, TensorInfo], recipes: dict[str, Any], name: str, tensor: str, dim: int,
               recipe_keys: tuple[str, ...]) -> int | None:
    """The size the weights file gives a layer along ``dim`` of its ``tensor`` (or its quantization recipe's
    ``recipe_keys[dim]``, whose shapes the load checks against the file); ``None`` when the file does not say."""
    info = header.get(f"{name}.{tensor}")
    if info is not None and len(info.shape) > dim:
        return info.shape[dim]
    r = recipes.get(name)
    if isinstance(r, dict) and dim < len(recipe_keys) and isinstance(r.get(recipe_keys[dim]), int):
        return r[recipe_keys[dim]]
    return None


def _check_table(model: nn.Module, table: dict[str, Any], header: dict[str, TensorInfo],
                 recipes: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Validate the shape table before anything is built: types, ranges, every size at most the unpruned model's
    (pruning only shrinks) and equal to the size the weights file's header gives that layer (read without loading
    any tensor), so an edited table cannot make the load allocate more than the file holds.

    Returns:
        ``(blocks, modules)``, checked.

    Raises:
        CheckpointError: naming the entry, what it holds and what is expected.
    """
    blocks = _obj(table.get("blocks", {}), f"{_WHERE}.blocks", "block name -> shapes")
    modules = _obj(table.get("modules", {}), f"{_WHERE}.modules", "layer name -> shapes")
    for name, e in blocks.items():
        at = f"{_WHERE}.blocks[{name!r}]"
        e = _obj(e, at, "attention / cross_attention / ffn / experts shapes")
        for part in ("attention", "cross_attention"):
            if part not in e:
                continue
            a_at = f"{at}[{part!r}]"
            s = _obj(e[part], a_at, "n_heads, n_kv, head_dim")
            n_heads, n_kv = _size(s, "n_heads", a_at), _size(s, "n_kv", a_at)
            _size(s, "head_dim", a_at)
            if n_heads % n_kv:
                raise CheckpointError(f"{a_at}: n_heads ({n_heads}) must be a multiple of n_kv ({n_kv})")
        if "ffn" in e:
            _size(e["ffn"], "n_neurons", f"{at}['ffn']")
        if "experts" in e:
            x = _obj(e["experts"], f"{at}['experts']", "name, n_neurons")
            _size(x, "n_neurons", f"{at}['experts']")
            if not isinstance(x.get("name"), str):
                raise CheckpointError(f"{at}['experts']['name'] must be the experts module's name (a string), got "
                                      f"{x.get('name')!r}"[:300])
    linear_keys, conv_keys = ("out_features", "in_features"), ("out_channels", "in_channels")
    for name, e in modules.items():
        at = f"{_WHERE}.modules[{name!r}]"
        e = _obj(e, at, "type and sizes")
        kind = e.get("type")
        try:
            m = model.get_submodule(name)
        except AttributeError:
            raise CheckpointError(f"the saved model has a layer {name!r} ({at}) that {type(model).__name__} does "
                                  "not have") from None
        if kind == "Conv2d" and isinstance(m, nn.Conv2d):
            sizes = {"out": (m.out_channels, "weight", 0, conv_keys), "in": (m.in_channels, "weight", 1, conv_keys)}
        elif kind == "Linear" and isinstance(m, nn.Linear):
            sizes = {"out": (m.out_features, "weight", 0, linear_keys), "in": (m.in_features, "weight", 1,
                                                                               linear_keys)}
        elif kind == "BatchNorm2d" and isinstance(m, nn.BatchNorm2d):
            sizes = {"n": (m.num_features, "running_mean" if m.running_mean is not None else "weight", 0, ())}
        else:
            raise CheckpointError(f"{at}: saved as {kind!r} (expected one of 'Conv2d', 'BatchNorm2d', 'Linear'), the "
                                  f"model has {type(m).__name__} there")
        for key, (limit, tensor, dim, recipe_keys) in sizes.items():
            v = _size(e, key, at)
            if v > limit:
                raise CheckpointError(f"{at}[{key!r}] = {v} exceeds the unpruned model's {limit} "
                                      f"({type(m).__name__} {name!r}); pruning only shrinks layers")
            want = v
            if kind == "Conv2d" and key == "in" and f"{name}.{tensor}" in header:
                want = v // m.groups  # the weight holds in / groups input channels
            got = _file_size(header, recipes, name, tensor, dim, recipe_keys)
            if got is not None and got != want:
                raise CheckpointError(f"{at}[{key!r}] = {v}, but the weights file holds layer {name!r} with "
                                      f"{got} there (the table was edited or belongs to another checkpoint)")
    return blocks, modules


def _resize_modules(model: nn.Module, modules: dict[str, dict[str, Any]]) -> None:
    for name, e in modules.items():
        try:
            m = model.get_submodule(name)
        except AttributeError:
            raise CheckpointError(f"the saved model has a layer {name!r} that {type(model).__name__} "
                                        "does not have") from None
        if e["type"] == "Conv2d" and isinstance(m, nn.Conv2d):
            w = m.weight
            m.weight = _empty_param(w, (e["out"], e["in"] // m.groups, *w.shape[2:]))
            if m.bias is not None:
                m.bias = _empty_param(m.bias, (e["out"],))
            m.in_channels, m.out_channels = e["in"], e["out"]
        elif e["type"] == "BatchNorm2d" and isinstance(m, nn.BatchNorm2d):
            n = e["n"]
            if m.affine:
                m.weight, m.bias = _empty_param(m.weight, (n,)), _empty_param(m.bias, (n,))
            if m.running_mean is not None:
                m.running_mean = torch.zeros(n, dtype=m.running_mean.dtype)
                m.running_var = torch.ones(n, dtype=m.running_var.dtype)
            m.num_features = n
        elif e["type"] == "Linear" and isinstance(m, nn.Linear):
            m.weight = _empty_param(m.weight, (e["out"], e["in"]))
            if m.bias is not None:
                m.bias = _empty_param(m.bias, (e["out"],))
            m.in_features, m.out_features = e["in"], e["out"]
        else:
            raise CheckpointError(f"layer {name!r}: saved as {e['type']}, the model has "
                                        f"{type(m).__name__}")


def _resize_blocks(model: nn.Module, blocks: dict[str, dict[str, Any]]) -> None:
    """Shrink every block of the table by replaying its head / neuron removal.

    A module reachable under several block names (one block listed twice in a ``ModuleList``: weights shared
    across layers) is shrunk once, with the first name; the table must give it the same shapes under every name.
    """
    found = {b.name: b for b in transformer_blocks(model, "all", clamp_wrappers=True)}
    done: dict[tuple[str, int], tuple[str, Any]] = {}

    def first(name: str, part: str, module: nn.Module, entry: Any) -> bool:
        """Whether ``module`` is shrunk here for the first time (False: an earlier name of it did already)."""
        prev, shapes = done.setdefault((part, id(module)), (name, entry))
        if prev == name:
            return True
        if shapes != entry:
            raise CheckpointError(f"{name}: its {part} is the module of {prev} (one module shared by several "
                                  f"layers), but the table gives it {entry} there and {shapes} under {prev}")
        return False

    for name, e in blocks.items():
        b = found.get(name)
        if b is None:
            raise CheckpointError(f"the saved model has a block {name!r} that the rebuilt "
                                        f"{type(model).__name__} does not have")
        for part, a in (("attention", b.attention), ("cross_attention", b.cross_attention)):
            if part not in e:
                continue
            s = e[part]
            what = "attention" if part == "attention" else "cross-attention"
            if a is None or a.head_dim != s["head_dim"]:
                raise CheckpointError(f"{name}: saved {what} (head_dim {s['head_dim']}) does not fit the "
                                      "rebuilt model")
            g_new = s["n_heads"] // s["n_kv"]
            if s["n_kv"] > a.n_kv or g_new > a.group_size:
                raise CheckpointError(f"{name}: saved {what} {s['n_heads']} heads / {s['n_kv']} key/value heads do "
                                      f"not fit the rebuilt layer ({a.n_heads} / {a.n_kv})")
            keep = [kv * a.group_size + i for kv in range(s["n_kv"]) for i in range(g_new)]
            if first(name, part, model.get_submodule(a.q), s):
                prune_attention(model, a, keep, list(range(s["n_kv"])))
        if "ffn" in e:
            f = b.ffn
            if f is None or e["ffn"]["n_neurons"] > f.n_neurons:
                raise CheckpointError(f"{name}: saved FFN does not fit the rebuilt model")
            if first(name, "ffn", model.get_submodule(f.output), e["ffn"]):
                prune_ffn(model, f, range(e["ffn"]["n_neurons"]))
        if "experts" in e:
            x = e["experts"]
            lay = experts_layout(model.get_submodule(x["name"])) if b.experts == x["name"] else None
            if lay is None or x["n_neurons"] > lay["inter"]:
                raise CheckpointError(f"{name}: saved MoE experts {x['name']} do not fit the rebuilt model")
            if first(name, "experts", model.get_submodule(x["name"]), {"n_neurons": x["n_neurons"]}):
                prune_experts(model, x["name"], [range(x["n_neurons"])] * lay["num_experts"])


def load_pruned(directory: str | os.PathLike, model: nn.Module | None = None, *,
                device: str | torch.device = "cpu", trust_remote_code: bool = False) -> nn.Module:
    """Load a model written by :func:`save_pruned` (per-layer shapes rebuilt; checksums verified).

    Hugging Face models are rebuilt from the saved config; a plain ``nn.Module`` needs ``model``, a fresh float
    instance of the original (unpruned) architecture.

    The shape table, the config and the tensors are of one version: a save that switches the folder while it is
    read (the shape table read before the switch, the tensors after it) makes the load read the new version whole
    (:func:`medquant.io.atomic.read_stable`), starting from ``model`` as it was given (its modules' attributes,
    parameters, buffers and submodules are put back first; so a given model's unpruned tensors are kept until the
    load returns, beside the pruned ones).

    Args:
        directory: the folder :func:`save_pruned` wrote.
        model: for a plain ``nn.Module``, a fresh instance of the unpruned architecture (resized in place);
            None for Hugging Face models.
        device: where the loaded tensors go.
        trust_remote_code: rebuild a Hugging Face model whose class transformers does not provide from the code
            the folder holds (copied by the save of a model loaded with ``trust_remote_code=True``;
            :func:`medquant.io.build_hf_model`); off by default.

    Returns:
        The pruned (and quantized, if it was) model with the saved weights.

    Raises:
        CheckpointError: the folder fails verification, has no shape table, holds a plain module and no
            ``model`` was given, the saved shapes do not fit the rebuilt model, or the table's ``shared_blocks``
            names blocks the model or the table lacks (or of different types); or saves switched the folder
            during each of three reads; or the saved class is the folder's own code and ``trust_remote_code`` is
            false.
    """
    directory = Path(directory)
    restore = _as_given(model) if model is not None else None

    def read(_root: Path) -> nn.Module:
        if restore is not None:
            restore()  # a read again starts from the model as it was given, not as the last read resized it
        return _load_pruned_once(directory, model, device, trust_remote_code)

    return atomic.read_stable(directory, read, error=CheckpointError)


def _as_given(model: nn.Module) -> Callable[[], None]:
    """A function that puts ``model`` back as it is now: every module's attributes, parameters, buffers and
    submodules (the objects, and each tensor's data, shape, dtype and device; values the load copied into them are
    left, since a read again loads every tensor)."""
    saved = []
    for m in model.modules():
        state = dict(m.__dict__)
        saved.append((m, state, {k: dict(v) for k, v in state.items() if isinstance(v, dict)},
                      {k: set(v) for k, v in state.items() if isinstance(v, set)}))
    tensors = [(t, t.data) for m in model.modules() for t in (*m._parameters.values(), *m._buffers.values())
               if t is not None]

    def restore() -> None:
        for m, state, dicts, sets in saved:
            m.__dict__.clear()
            m.__dict__.update(state)
            for k, v in dicts.items():
                state[k].clear()
                state[k].update(v)
            for k, w in sets.items():
                state[k].clear()
                state[k].update(w)
        for t, data in tensors:
            t.data = data

    return restore


def _load_pruned_once(directory: Path, model: nn.Module | None, device: str | torch.device,
                      trust_remote_code: bool = False) -> nn.Module:
    meta = verify(directory)
    table = meta.get("extras", {}).get("prune")
    if not isinstance(table, dict) or table.get("version") != TABLE_VERSION:
        raise CheckpointError(f"{directory} has no pruning shape table (version {TABLE_VERSION}); was it "
                                    "saved with medquant.prune.save_pruned?")
    if model is None:
        if meta["model"]["kind"] != "hf":
            raise CheckpointError(
                f"{directory} holds a plain nn.Module ({meta['model']['class']}); pass a fresh float instance: "
                f"load_pruned(path, model={meta['model']['class']}(...))")
        model = build_hf_model(directory, meta, trust_remote_code=trust_remote_code)
        # the saved config holds the renumbered indices; where it cannot express the dropped blocks (Swin's stages,
        # a tower built from a nested dict) the model built from it has them again: drop them without renumbering
        _redrop_blocks(model, table, meta.get("extras", {}).get("prune_plan"), directory, renumber=False)
    else:
        _redrop_blocks(model, table, meta.get("extras", {}).get("prune_plan"), directory)
    _bind_shared_blocks(model, table)
    root = atomic.resolve(directory)
    try:
        header = read_header(root / meta["weights"]["file"])
    except SchemaError as e:  # pragma: no cover - verify read the same header
        raise CheckpointError(str(e)) from None
    blocks, modules = _check_table(model, table, header, meta.get("modules", {}))
    with torch.no_grad():
        _resize_blocks(model, blocks)
        _resize_modules(model, modules)
    return load(directory, model=model, device=device)


def _bind_shared_blocks(model: nn.Module, table: dict[str, Any]) -> None:
    """Bind every further name of a block the saved model shared (the table's ``shared_blocks``) to the block of
    its first name, as it was when saved; a name already bound to it is left as it is.

    Raises:
        CheckpointError: ``shared_blocks`` is not an object of block names, names a block that is not in the
            table's ``blocks`` or not in ``model``, chains names (a first name that is itself a further name), or
            pairs blocks of different types.
    """
    shared = _obj(table.get("shared_blocks", {}), f"{_WHERE}.shared_blocks", "further block name -> first name")
    blocks = table.get("blocks", {})
    for alias, name in shared.items():
        at = f"{_WHERE}.shared_blocks[{alias!r}]"
        if not isinstance(name, str) or name == alias or name in shared:
            raise CheckpointError(f"{at} must be the first name of the block (a string, itself not a further name),"
                                  f" got {name!r}"[:300])
        for n in (alias, name):
            if not isinstance(blocks, dict) or n not in blocks:
                raise CheckpointError(f"{at}: {n!r} is not a block of {_WHERE}.blocks")
        try:
            target, old = model.get_submodule(name), model.get_submodule(alias)
        except AttributeError:
            raise CheckpointError(f"{at}: the blocks {alias!r} / {name!r} are not both in {type(model).__name__}"
                                  ) from None
        if old is target:
            continue
        if type(old) is not type(target):
            raise CheckpointError(f"{at}: {alias!r} is a {type(old).__name__}, the block {name!r} it shared is a "
                                  f"{type(target).__name__} in {type(model).__name__}")
        parent_name, _, attr = alias.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        parent._modules[attr] = target


def _redrop_blocks(model: nn.Module, table: dict[str, Any], plan: Any, directory: Path, renumber: bool = True
                   ) -> None:
    """Drop from ``model`` (a given fresh one, or one built from the saved config) the blocks the saved model lost
    (``drop_blocks``): the saved plan's ``drop_blocks`` when the table's ``stacks`` give a block list fewer blocks
    than ``model`` has (``renumber``: as :func:`medquant.prune.layers.drop_blocks` does; False for a model built
    from the saved config, whose indices are renumbered already).

    Raises:
        CheckpointError: a block list of the table is not one of ``model``, or is shorter than ``model``'s and the
            saved plan does not drop exactly that many blocks of it.
    """
    stacks = _obj(table.get("stacks", {}), f"{_WHERE}.stacks", "block list -> number of blocks")
    dropped = plan.get("drop_blocks") if isinstance(plan, dict) else None
    dropped = [n for n in dropped if isinstance(n, str)] if isinstance(dropped, list) else []
    todo: list[str] = []
    for stack, n in stacks.items():
        try:
            have = model.get_submodule(stack)
        except AttributeError:
            have = None
        if not isinstance(have, nn.ModuleList):
            raise CheckpointError(f"{_WHERE}.stacks names the block list {stack!r}, which {type(model).__name__} "
                                  "does not have")
        n = _size(stacks, stack, f"{_WHERE}.stacks")
        if n == len(have):
            continue
        mine = sorted({d for d in dropped if d.rpartition(".")[0] == stack})
        if n > len(have) or len(have) - len(mine) != n:
            raise CheckpointError(f"{directory}: the saved model has {n} block(s) in {stack}, the given "
                                  f"{type(model).__name__} has {len(have)}" + (
                                      "; blocks were dropped (drop_blocks), but the saved plan does not say which "
                                      "(save with save_pruned(..., plan=plan))" if n < len(have) else ""))
        todo += mine
    if todo:
        from .layers import _drop

        try:
            _drop(model, todo, renumber=renumber)
        except ValueError as e:
            raise CheckpointError(f"{directory}: cannot drop the blocks the saved plan dropped: {e}") from None
