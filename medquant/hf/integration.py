"""``MedQuantHfQuantizer``, :func:`save_pretrained`, :func:`attach_quantizer`: medquant as a transformers
quantization method (its ``quantization_config``, :class:`~medquant.hf.config.MedQuantConfig`, is in
:mod:`medquant.hf.config`).

Two ways in (the quantization itself is :func:`medquant.quantize_`'s; nothing here changes a number):

* **pre-quantized** - ``config.json`` holds ``quantization_config = {"quant_method": "medquant", "modules": {...},
  "skipped_modules": [...], ...}``, written by :func:`save_pretrained` (or by ``model.save_pretrained`` on a model
  that came from ``from_pretrained``). ``modules`` records, for every quantized layer, its type, shape, weight
  dtype and full :class:`~medquant.QuantConfig` (bits, scheme, scope, group size, scale dtype and the per-output-
  channel ``channel_bits`` of mixed-precision layers); ``skipped_modules`` lists the Linear / Conv2d layers left
  in floating point. On load the model skeleton is built on the meta device, each recorded layer is replaced by an
  empty :class:`~medquant.QuantLinear` / :class:`~medquant.QuantConv2d` of the same recipe
  (:func:`medquant.quant.recipe.layer_from_recipe`), and transformers fills the packed codes, scales and zero
  points from the safetensors file like any other tensor.
* **quantize on load** - ``from_pretrained(float_path, quantization_config=MedQuantConfig(QuantConfig(4)))``
  (or a pattern map + ``skip``, exactly as :func:`medquant.quantize_` takes them). Each planned layer is
  quantized as soon as its float weight is read, so the float model never exists whole in memory; layers whose
  weight is not in the checkpoint, and tied ones (``lm_head``, even where the checkpoint stores it too), are
  quantized after loading, once transformers has tied them. The result is bit-identical to
  ``quantize_(float_model, same_config)``. A plan given as recorded ``modules`` only may hold embedding tables
  (``"QuantEmbedding"`` entries) and heads ``tied_to`` them (:meth:`MedQuantConfig.recorded_embeddings`): they are
  quantized after loading with :func:`~medquant.quant.embeddings.quantize_embeddings_` (each table read whole in
  floating point first; a recorded tied head becomes a QuantLinear sharing the table's packed tensors again), so
  the model equals ``quantize_`` + ``quantize_embeddings_`` with the same per-module configs. ``skip`` wins over
  them as over the Linear entries: a skipped table stays float (with any head tied to it), a skipped tied head
  stays float while its table is quantized untied. Refused up front,
  naming the module: a table the model lacks, of another shape or ``padding_idx``, or not a plain
  ``nn.Embedding``; a ``tied_to`` naming no recorded table or with another config / shape than it; a head recorded
  tied whose weight the model does not tie to the table (``tie_word_embeddings=False``). A tied checkpoint that
  stores the head with other values than the table (transformers loads it apart) is refused after loading.

Non-persistent row-index buffers of mixed-precision layers are rebuilt from the recipe after loading (transformers
leaves non-persistent buffers uninitialised), and each stored ``bit_map`` is checked against its recipe.

Checks on load (:func:`medquant.io.verify_pretrained`): the folder's ``medquant.manifest.json`` when it has one
(written by :func:`save_pretrained`), every recipe of ``modules`` against the schema and the safetensors headers
(shapes, dtypes, bits, scheme, scope; every packed buffer present, no packed tensor of an unrecorded module) before
any tensor is read; a pre-quantized folder whose weights are in other files than ``model.safetensors`` or its
``model-XXXXX-of-YYYYY.safetensors`` shards (a ``variant=`` save, a pickle ``.bin``) is refused. A quantize-on-load
plan given as recorded ``modules`` only has its recipes checked the same way (schema, and type and shape against
the model's layer of that name); a plan that quantizes a layer its ``skipped_modules`` lists is refused (that
field records float layers, ``skip`` keeps them). ``from_pretrained(..., dtype=...)`` of a pre-quantized folder casts the quantized
layers as ``.to(dtype)`` does: packed codes, scales and float rows keep their saved dtypes. Saves
(:func:`save_pretrained`, and ``model.save_pretrained`` of a model loaded or prepared by medquant) replace the folder
as one unit with a manifest (:func:`medquant.io.write_checkpoint`); ``variant=`` is refused.
"""
from __future__ import annotations

import re
import tempfile
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import torch
from torch import nn
from transformers.core_model_loading import ConversionOps
from transformers.quantizers.base import HfQuantizer

from ..io import verify_pretrained, write_checkpoint
from ..io.checkpoint import check_saved_hooks
from ..io.schema import parse_layer
from ..models.checkpoint_names import checkpoint_renaming
from ..quant.activations import attach_recorded, input_quantizers
from ..quant.api import (
    names_by_module,
    quantize_,
    quantize_module,
    quantized_modules,
    swap_module,
    swap_under_all_names,
)
from ..quant.config import QuantConfig
from ..quant.embeddings import quantize_embeddings_
from ..quant.experts import expand_recorded_experts, is_experts_module
from ..quant.modules import (
    QUANT_LAYERS,
    QUANT_MODULES,
    QuantEmbedding,
    QuantLinear,
    tie_quantized_head,
    tied_heads,
)
from ..quant.recipe import RecipeError, bit_map_matches, layer_from_recipe, shared_modules
from .config import MedQuantConfig, recipe_of
from .method import QUANT_METHOD

# MedQuantConfig and recipe_of live in medquant.hf.config; they stay importable from here
__all__ = ["MedQuantConfig", "MedQuantHfQuantizer", "attach_quantizer", "bind_save_pretrained", "recipe_of",
           "register_with_transformers", "save_pretrained"]

_FLOAT_TYPES = (nn.Linear, nn.Conv2d)


# ---------------------------------------------------------------------------------------------- module surgery
def _shell(entry: Mapping, name: str, device: torch.device | str) -> nn.Module:
    """An empty QuantLinear / QuantConv2d of the recorded recipe (buffers on ``device``, e.g. meta)."""
    try:
        return layer_from_recipe(entry, device=device)
    except RecipeError as e:
        raise ValueError(f"quantization_config.modules[{name!r}] is not a valid medquant recipe: {e}") from None


def _check_fits(old: nn.Module, entry: Mapping, name: str) -> None:
    if entry["type"] == "QuantLinear":
        ok = isinstance(old, nn.Linear) and (old.in_features, old.out_features) == (
            entry["in_features"], entry["out_features"])
    elif entry["type"] == "QuantEmbedding":  # a subclass (e.g. a scaled embedding) computes more than a lookup
        ok = type(old) is nn.Embedding and (old.num_embeddings, old.embedding_dim) == (
            entry["out_features"], entry["in_features"])
    else:
        ok = isinstance(old, nn.Conv2d) and (old.in_channels, old.out_channels) == (
            entry["in_channels"], entry["out_channels"])
    if not ok:
        raise ValueError(f"quantization_config.modules[{name!r}] records a {entry['type']} that does not fit the "
                         f"model's {type(old).__name__} at that name ({old})")


def _untie(model: nn.Module, names: Iterable[str]) -> None:
    """Drop tied-weight entries that involve a quantized module's weight (it has packed codes, not a weight).

    Float weights tied to the same quantized one (T5's ``encoder.embed_tokens`` and ``decoder.embed_tokens``, tied
    to a quantized ``shared``) still share one tensor: the others are tied to the first of them instead, so
    transformers saves it once and ties it again on load."""
    tied = getattr(model, "all_tied_weights_keys", None)
    if not tied:
        return
    keys = {n + ".weight" for n in names}
    first: dict[str, str] = {}  # quantized source -> its first float target, the new source of the others
    for target, source in list(tied.items()):
        if target in keys or source in keys:
            tied.pop(target)
            if source in keys and target not in keys:
                if source in first:
                    tied[target] = first[source]
                else:
                    first[source] = target


def _shared_buffer_keys(model: nn.Module, heads: Mapping[str, str]) -> dict[str, str]:
    """``{head buffer key: embedding buffer key}`` of the tensors a tied head shares with its embedding."""
    out = {}
    for hn, en in heads.items():
        head, emb = model.get_submodule(hn), model.get_submodule(en)
        for b, t in head._buffers.items():
            if t is not None and emb._buffers.get(b) is t:
                out[f"{hn}.{b}"] = f"{en}.{b}"
    return out


def _shared_names(model: nn.Module, modules: Mapping[str, Mapping], shared: Mapping[str, str],
                  hf_quantizer: HfQuantizer) -> dict[str, str]:
    """``{further name: recorded module}`` of ``shared`` (``quantization_config.shared_modules``) under this model's
    names (``modules``: the recorded modules under them), each further name checked to be a module the recorded
    layer fits; :func:`_bind_shared` binds them once the file is read (the file holds the layer's tensors once)."""
    if not shared:
        return {}
    recorded = hf_quantizer.quantization_config.modules or {}
    # saved name -> this model's name, renamed as the recorded modules are (all of them: the renaming depends on
    # the whole set); names outside this model (a head read into its base model) have none
    inside, _ = _model_names(model, {n: {"saved": n} for n in [*recorded, *shared]}, hf_quantizer)
    to_model = {e["saved"]: n for n, e in inside.items()}
    out = {}
    for alias, target in shared.items():
        name, tname = to_model.get(alias), to_model.get(target)
        if name is None or tname not in modules:  # outside this model, with the layer it shares
            continue
        try:
            old = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"quantization_config.shared_modules binds {name!r} to {tname!r}, but "
                             f"{type(model).__name__} has no module {name!r}") from None
        _check_fits(old, modules[tname], name)
        out[name] = tname
    return out


def _bind_shared(model: nn.Module, shared: Mapping[str, str]) -> None:
    """Bind each further name of ``shared`` (:func:`_shared_names`) to the loaded layer it shares."""
    for name, target in shared.items():
        swap_module(model, name, model.get_submodule(target))


def _shared_module_keys(model: nn.Module) -> dict[str, str]:
    """``{buffer key under a further name: buffer key under the first name}`` of the quantized layers bound under
    several names (:func:`~medquant.quant.recipe.shared_modules`), bias included: transformers saves them once
    when declared tied."""
    out = {}
    for alias, name in shared_modules(model).items():
        for key in model.get_submodule(name).state_dict(keep_vars=True):  # packed buffers and the bias
            out[f"{alias}.{key}"] = f"{name}.{key}"
    return out


def _retie_heads(model: nn.Module, modules: Mapping[str, Mapping]) -> None:
    """Tie again every head whose recipe records ``tied_to`` (its tensors were stored once, under the embedding)."""
    for name, entry in modules.items():
        target = entry.get("tied_to") if isinstance(entry, Mapping) else None
        if target:
            head, emb = model.get_submodule(name), model.get_submodule(target)
            if not (isinstance(head, QuantLinear) and isinstance(emb, QuantEmbedding)):
                raise ValueError(f"quantization_config ties {name!r} to {target!r}, but they are "
                                 f"{type(head).__name__} and {type(emb).__name__}, not a quantized head and embedding")
            tie_quantized_head(head, emb)


def _hide_rows(m: nn.Module) -> None:
    """Turn the non-persistent row-index buffers of a mixed layer into plain CPU attributes for the duration of
    ``from_pretrained``: transformers replaces every non-persistent buffer by an uninitialised tensor after
    loading, and some ``_init_weights`` read ``layer.weight`` (dequantized through these indices) before the
    quantizer's post-processing runs. :func:`_finalize` registers them again."""
    if not isinstance(m, QUANT_MODULES) or not m.mixed:
        return
    with torch.device("cpu"):  # from_pretrained builds the skeleton inside a meta-device context
        rb = m.config.row_bits(m.out_rows)
        for b in m.bit_groups:
            key = f"rows_{b}"
            m._buffers.pop(key, None)
            m._non_persistent_buffers_set.discard(key)
            m.__dict__[key] = torch.nonzero(rb == b).flatten()


def _finalize(model: nn.Module) -> None:
    """Rebuild the row indices of mixed layers, check bit maps against recipes, freeze biases, and hand each layer's
    compute dtype to the CPU kernels (transformers replaced the tensors they were keyed by)."""
    for name, m in quantized_modules(model).items():
        if m.mixed:
            rb = m.config.row_bits(m.out_rows)
            if not bit_map_matches(m):
                raise ValueError(f"module {name!r}: the stored bit map disagrees with its recipe in "
                                 "quantization_config (the checkpoint was altered or the config edited)")
            dev = m.bit_map.device
            for b in m.bit_groups:
                key = f"rows_{b}"
                m.__dict__.pop(key, None)
                m._buffers.pop(key, None)
                m.register_buffer(key, torch.nonzero(rb == b).flatten().to(dev), persistent=False)
        if m.bias is not None:
            m.bias.requires_grad_(False)
        m.refresh_kernels()


def _checkpoint_key_map(model: nn.Module, hf_quantizer: HfQuantizer):
    """Checkpoint key -> the model's name for it, as transformers renames keys on load (VLMs saved in their legacy
    layout; :func:`medquant.models.checkpoint_renaming`); ``None`` where this transformers has no renaming
    machinery."""
    return checkpoint_renaming(model, hf_quantizer)


def _resolves(model: nn.Module, name: str) -> bool:
    """Whether a recorded name is a module of ``model``, or an expert layer of one of its experts modules."""
    for path in (name, name.rsplit(".", 2)[0] if name.count(".") >= 2 else None):
        if path is None:
            continue
        try:
            mod = model.get_submodule(path)
        except AttributeError:
            continue
        if path == name or is_experts_module(mod):
            return True
    return False


def _model_names(model: nn.Module, modules: Mapping[str, Mapping], hf_quantizer: HfQuantizer
                 ) -> tuple[dict[str, Mapping], dict[str, Mapping]]:
    """The recorded modules under this model's names, and the records this model has no module for.

    transformers renames checkpoint keys on load: a VLM saved in its legacy layout, the base model of a checkpoint
    with a head (``AutoModel`` of a ``...ForCausalLM`` folder drops the ``model.`` prefix and ignores ``lm_head``),
    a model with a head from a base-model checkpoint (the prefix is added). The recorded names follow the same
    renaming. Records outside the base model of a checkpoint read into the base model alone (its head) are
    returned apart: their tensors are keys transformers ignores. Names that resolve nowhere are kept as they are
    (the caller reports them).
    """
    key_map = _checkpoint_key_map(model, hf_quantizer)
    prefix = getattr(model, "base_model_prefix", None) or ""
    into_base = bool(prefix) and getattr(model, "base_model", None) is model and any(
        n.startswith(prefix + ".") for n in modules)
    out: dict[str, Mapping] = {}
    outside: dict[str, Mapping] = {}
    for name, entry in modules.items():
        candidates = [name]
        if key_map is not None:
            candidates.insert(0, key_map(name + ".weight").removesuffix(".weight"))
        if prefix:
            candidates += [name[len(prefix) + 1:]] if name.startswith(prefix + ".") else [f"{prefix}.{name}"]
        found = next((c for c in candidates if _resolves(model, c)), None)
        if found is None and into_base and not name.startswith(prefix + "."):
            outside[name] = entry
        else:
            out[found or name] = entry
    return out, outside


# the weight files medquant's checks read in a pre-quantized folder (medquant.io.verify_pretrained): one file, or
# the shards listed by model.safetensors.index.json
_WEIGHT_FILE = re.compile(r"model(-\d{5}-of-\d{5})?\.safetensors")


def _check_weight_files(checkpoint_files: Iterable[str]) -> None:
    """Refuse a pre-quantized folder whose weights transformers reads from other files than ``model.safetensors``
    or its ``model-XXXXX-of-YYYYY.safetensors`` shards (a ``variant=`` save, a pickle ``.bin``): medquant's checks
    (:func:`medquant.io.verify_pretrained`) read those names, so they would check another file or fail on a missing
    one."""
    odd = sorted({n for n in (Path(f).name for f in checkpoint_files) if not _WEIGHT_FILE.fullmatch(n)})
    if odd:
        raise ValueError(f"the medquant checkpoint's weights are read from {odd}: a pre-quantized medquant folder "
                         "holds model.safetensors (or its model-XXXXX-of-YYYYY.safetensors shards) only; "
                         "weight-name variants (save_pretrained(..., variant=...)) and pickle files are not "
                         "supported: save the model again without variant= into a folder of its own")


def _check_recorded_plan(model: nn.Module, modules: Mapping[str, Mapping]) -> None:
    """The recipes of a quantize-on-load plan given as recorded ``modules``, checked as the pre-quantized loader
    checks them: each against the schema (no unknown or missing key) and, where the name is a layer of
    ``model``, of its type and shape (:func:`_check_fits`)."""
    for name, entry in modules.items():
        parse_layer(dict(entry), name, "quantization_config", "modules")
        table = entry["type"] == "QuantEmbedding"
        try:
            old = model.get_submodule(name)
        except AttributeError:
            if table:  # resolve() never sees a table: report it here
                raise ValueError(f"quantization_config.modules[{name!r}] records a quantized QuantEmbedding that "
                                 f"{type(model).__name__} does not have") from None
            continue  # an expert layer of an experts module, or a name resolve() reports
        if isinstance(old, _FLOAT_TYPES) or table:
            _check_fits(old, entry, name)
        if table and entry.get("padding_idx") != old.padding_idx:
            raise ValueError(f"quantization_config.modules[{name!r}] records padding_idx={entry.get('padding_idx')!r}"
                             f", but the model's embedding has padding_idx={old.padding_idx!r}: the table would be "
                             "quantized with the model's; load a checkpoint built with that padding index, or record "
                             "the model's")


def _check_recorded_ties(model: nn.Module, tied: Mapping[str, str]) -> None:
    """Each head recorded ``tied_to`` a table (``{head: table}``) is tied to it in ``model`` as transformers will
    load it (``all_tied_weights_keys``, either direction), and is a plain ``nn.Linear`` without bias: otherwise
    the loaded head has a weight of its own, and neither tying it (another head than the checkpoint's) nor
    quantizing it apart (not what was recorded) replays the record."""
    pairs = {frozenset(p) for p in (getattr(model, "all_tied_weights_keys", None) or {}).items()}
    for head, table in tied.items():
        try:
            old = model.get_submodule(head)
        except AttributeError:
            raise ValueError(f"quantization_config.modules[{head!r}] records a head tied_to {table!r} that "
                             f"{type(model).__name__} does not have") from None
        if type(old) is not nn.Linear or old.bias is not None:
            raise ValueError(f"quantization_config.modules[{head!r}] records a head tied_to {table!r}, but the "
                             f"model's {head!r} is a {type(old).__name__}"
                             f"{' with a bias' if type(old) is nn.Linear else ''}, not a plain nn.Linear without "
                             "bias that can share the table's packed tensors")
        if frozenset((f"{head}.weight", f"{table}.weight")) not in pairs:
            tie = getattr(getattr(model, "config", None), "tie_word_embeddings", None)
            raise ValueError(f"quantization_config.modules[{head!r}] records a head tied_to {table!r} (sharing its "
                             f"packed tensors), but in {type(model).__name__} {head}.weight is not tied to "
                             f"{table}.weight (tie_word_embeddings={tie!r}): the tie cannot be replayed on this "
                             f"checkpoint. Load a checkpoint whose head is tied to that table, or remove 'tied_to' "
                             f"from modules[{head!r}] to quantize {head!r} from its own weight with the recorded "
                             "config")


def _outside_key_map(model: nn.Module, key_map: Callable[[str], str] | None, outside: Mapping[str, Mapping]
                     ) -> Callable[[str], str]:
    """``key_map`` that also names the tensors of the records outside the model (:func:`_model_names`) as they
    are recorded: a checkpoint may store a head under a longer key (``language_model.lm_head`` of a LLaVA saved in
    its original layout) that only the head model's own renaming shortens."""
    def mapped(key: str) -> str:
        k = key_map(key) if key_map is not None else key
        mod, _, leaf = k.rpartition(".")
        if outside and mod not in outside and not _resolves(model, mod):
            hits = [n for n in outside if mod.endswith("." + n)]
            if len(hits) == 1:
                return f"{hits[0]}.{leaf}"
        return k
    return mapped


def _tied_keys(model: nn.Module) -> set[str]:
    """The weights transformers ties after loading (both sides of ``model.all_tied_weights_keys``). A planned layer
    whose weight is one of them stays float while loading and is quantized after transformers' tie, as a leftover:
    transformers ties a stored copy equal to its source, keeps a differing one apart and ties a missing source to
    the stored target, and the quantized layer then holds what ``quantize_`` of the loaded float model would read
    (a tied ``lm_head`` stored in the checkpoint too, as many Hub checkpoints hold it)."""
    tied = getattr(model, "all_tied_weights_keys", None) or {}
    return set(tied) | set(tied.values())


def _quantize_recorded_tables(model: nn.Module, tables: Mapping[str, QuantConfig], tied: Mapping[str, str]) -> None:
    """Quantize the recorded embedding tables of a loaded model as :func:`quantize_embeddings_` does, each with its
    recorded config, and turn the float heads recorded ``tied_to`` a table into QuantLinear heads sharing its packed
    tensors (``tie=True`` only for a table with such a head: a head recorded apart keeps what ``quantize_`` gave
    it). Raises ``ValueError`` when a recorded tie did not come back (transformers kept a head stored in the
    checkpoint with other values than the table apart)."""
    for name, cfg in tables.items():
        heads = sorted(h for h, t in tied.items() if t == name)
        quantize_embeddings_(model, cfg, names=[name], tie=bool(heads))
        got = tied_heads(model)
        for head in heads:
            if got.get(head) != name:
                raise ValueError(f"quantization_config.modules[{head!r}] records a head tied_to {name!r}, but the "
                                 f"checkpoint stores {head}.weight with other values than {name}.weight, and "
                                 "transformers loaded it apart: the tie cannot be replayed; remove 'tied_to' from "
                                 f"modules[{head!r}] to quantize {head!r} from its own weight")


class _QuantizeOnLoad(ConversionOps):
    """Quantize a planned Linear / Conv2d as soon as its float weight is read, swapping the module in place (under
    every name it is bound to: a layer shared by construction becomes one quantized layer, as with ``quantize_``)."""

    def __init__(self, hf_quantizer: MedQuantHfQuantizer) -> None:
        self.hf_quantizer = hf_quantizer

    def convert(self, input_dict, model=None, full_layer_name=None, missing_keys=None, **kwargs):
        plan = self.hf_quantizer._plan
        tied = _tied_keys(model)
        out = {}
        for key, value in input_dict.items():
            value = value[0] if isinstance(value, list) else value
            mod_name, _, attr = key.rpartition(".")
            cfg = plan.get(mod_name)
            old = model.get_submodule(mod_name) if cfg is not None else None
            if cfg is None or attr != "weight" or not isinstance(old, _FLOAT_TYPES) or key in tied:
                out[key] = value
                continue
            q = _quantize_weight(old, value, cfg, mod_name)
            _hide_rows(q)
            q._is_hf_initialized = True
            # under every name the float layer is bound to (a head shared by construction), as quantize_ does; the
            # weight of each such name was read with this one (and is now the packed codes: no tensor to look up)
            swapped = swap_under_all_names(model, mod_name, q, self.hf_quantizer._aliases)
            if missing_keys is not None:
                missing_keys.difference_update(f"{name}.weight" for name, _ in swapped)
        return out


def _quantize_weight(old: nn.Module, weight: torch.Tensor, cfg: QuantConfig, name: str) -> nn.Module:
    """:func:`~medquant.quant.quantize_module` of ``old`` with ``weight`` (``old`` may still live on meta)."""
    weight = weight.detach()
    with torch.device("meta"):
        if isinstance(old, nn.Linear):
            tmp = nn.Linear(old.in_features, old.out_features, bias=False)
        else:
            tmp = nn.Conv2d(old.in_channels, old.out_channels, old.kernel_size, old.stride, old.padding,
                            old.dilation, old.groups, bias=False, padding_mode=old.padding_mode)
    tmp.weight = nn.Parameter(weight, requires_grad=False)
    q = quantize_module(tmp, cfg, name=name)
    if old.bias is not None:
        bias = old.bias.detach()
        loaded = bias.device.type != "meta"
        if not loaded:  # not read yet: transformers sets it on the new module later
            bias = torch.zeros(bias.shape, dtype=weight.dtype, device=weight.device)
        q.bias = nn.Parameter(bias.to(weight.device), requires_grad=False)
        if loaded and getattr(old.bias, "_is_hf_initialized", False):
            # already read from the checkpoint: keep transformers' mark, or the parent module's _init_weights
            # (SigLIP's MLP and attention) overwrites the loaded bias with a fresh initialisation
            q.bias._is_hf_initialized = True  # type: ignore[attr-defined]
    q.train(old.training)
    return q


class MedQuantHfQuantizer(HfQuantizer):
    """transformers quantizer of the ``"medquant"`` method (see the module docstring).

    Args:
        quantization_config: the :class:`MedQuantConfig` (or its dict, as read from ``config.json``).
        **kwargs: passed to transformers' ``HfQuantizer`` (e.g. ``pre_quantized``).

    Raises:
        TypeError: ``quantization_config`` is neither a MedQuantConfig nor a mapping.
    """

    requires_calibration = False

    def __init__(self, quantization_config: MedQuantConfig, **kwargs) -> None:
        if isinstance(quantization_config, Mapping):
            quantization_config = MedQuantConfig.from_dict(dict(quantization_config))
        if not isinstance(quantization_config, MedQuantConfig):
            raise TypeError(f"MedQuantHfQuantizer needs a MedQuantConfig, got {type(quantization_config).__name__}")
        super().__init__(quantization_config, **kwargs)
        self._plan: dict[str, QuantConfig] = {}
        self._skeleton_dtypes: dict[str, torch.dtype] = {}  # pre-quantized: the float layer's dtype, per module
        self._modules: dict[str, Mapping] = {}  # pre-quantized: the recorded modules under the model's names
        self._tables: dict[str, QuantConfig] = {}  # quantize on load: recorded embedding tables -> config
        self._tied: dict[str, str] = {}  # quantize on load: recorded tied heads -> their table
        self._shared: dict[str, str] = {}  # pre-quantized: further names of a shared layer -> its recorded name
        self._aliases: dict[int, list[str]] = {}  # quantize on load: id -> every name of a module bound under several

    def validate_environment(self, *args, device_map=None, **kwargs) -> None:
        if self.pre_quantized and not self.quantization_config.modules:
            raise ValueError("the checkpoint's quantization_config (quant_method 'medquant') records no quantized "
                             "modules: save it with medquant.hf.save_pretrained(model, path)")
        if not self.pre_quantized and not self.quantization_config.has_plan:
            raise ValueError("MedQuantConfig has nothing to quantize with: pass MedQuantConfig(QuantConfig(...)) or "
                             "MedQuantConfig({pattern: QuantConfig}, skip=[...])")
        if isinstance(device_map, Mapping) and "disk" in device_map.values():
            raise ValueError("medquant models cannot be offloaded to disk by from_pretrained: use a device_map "
                             "with GPU and CPU devices only (the packed weights are already small)")

    def param_needs_quantization(self, model, param_name: str, **kwargs) -> bool:
        if self.pre_quantized:
            return False
        mod_name, _, attr = param_name.rpartition(".")
        if attr != "weight" or mod_name not in self._plan or param_name in _tied_keys(model):
            return False  # a tied weight is quantized after transformers ties it (_tied_keys)
        try:
            return isinstance(model.get_submodule(mod_name), _FLOAT_TYPES)
        except AttributeError:
            return False

    def get_quantize_ops(self):
        return _QuantizeOnLoad(self)

    def _process_model_before_weight_loading(self, model, checkpoint_files=None, **kwargs):
        folder = Path(checkpoint_files[0]).parent if checkpoint_files else None
        if self.pre_quantized and checkpoint_files:
            _check_weight_files(checkpoint_files)
        if folder is not None:  # the folder's manifest, every recipe against the schema
            verify_pretrained(folder, self.quantization_config.modules or {}, quantized=self.pre_quantized,
                              tensors=False)
        if self.pre_quantized:
            # under this model's names (transformers renames the checkpoint's keys the same way)
            modules, outside = _model_names(model, self.quantization_config.modules, self)
            self._modules = modules
            expand_recorded_experts(model, modules)  # MoE experts: their per-expert layers become modules
            for name, entry in modules.items():
                try:
                    old = model.get_submodule(name)
                except AttributeError:
                    raise ValueError(f"quantization_config records a quantized module {name!r} that "
                                     f"{type(model).__name__} does not have") from None
                _check_fits(old, entry, name)
                w = getattr(old, "weight", None)
                if isinstance(w, torch.Tensor) and w.is_floating_point():
                    self._skeleton_dtypes[name] = w.dtype
                shell = _shell(entry, name, "meta")
                shell.train(old.training)
                _hide_rows(shell)
                swap_module(model, name, shell)
            self._shared = _shared_names(model, modules, self.quantization_config.shared_modules or {}, self)
            _untie(model, [*modules, *self._shared])
            # stored once, under the recorded module: not "missing", bound to it after loading
            tied = [n for n, e in modules.items() if isinstance(e, Mapping) and e.get("tied_to")] + [*self._shared]
            if tied:  # stored once, under the embedding: not "missing", tied again after loading
                ignore = set(getattr(model, "_keys_to_ignore_on_load_missing", None) or ())
                model._keys_to_ignore_on_load_missing = ignore | {rf"^{re.escape(n)}\." for n in tied}
            if folder is not None:  # every packed buffer in the files, with the recipe's shape and dtype
                key_map = _outside_key_map(model, _checkpoint_key_map(model, self), outside)
                verify_pretrained(folder, {**modules, **outside}, files=False, key_map=key_map)
        else:
            qc = self.quantization_config
            if qc.config is None and qc.config_map is None and qc.modules:  # recorded recipes as the plan
                _check_recorded_plan(model, qc.modules)
                try:
                    self._tables, self._tied = qc.recorded_embeddings(model)  # skip wins, as in plan()
                except ValueError as e:
                    raise ValueError(f"quantization_config.{e}") from None
                _check_recorded_ties(model, self._tied)
            self._plan = qc.plan(model)
            self._aliases = {i: names for i, names in names_by_module(model).items() if len(names) > 1}
            listed = sorted(set(qc.skipped_modules or ()) & {*self._plan, *self._tied})
            if listed:  # skipped_modules records a saved model's float layers; it never keeps a layer in float
                raise ValueError(f"MedQuantConfig.skipped_modules lists {listed}, which its plan quantizes: "
                                 "skipped_modules only records the float layers of a saved model; keep layers in "
                                 "floating point with skip=[...]")
            if not self._plan and not self._tables:  # a float model recorded as medquant: it would not load again
                raise ValueError(f"MedQuantConfig quantizes no layer of {type(model).__name__}: its patterns select "
                                 "no Linear / Conv2d layer or recorded embedding table (every match maps to None or "
                                 "is skipped); give a pattern with a QuantConfig, or load without "
                                 "quantization_config for a float model")
        return model

    def _process_model_after_weight_loading(self, model, **kwargs):
        if self.pre_quantized:
            _retie_heads(model, self._modules)
            _bind_shared(model, self._shared)
            # from_pretrained(dtype=...) built the float layers in another dtype than the one saved: the quantized
            # ones follow them (their biases and dequantized weight; the stored codes and scales are not cast)
            for name, dtype in self._skeleton_dtypes.items():
                m = model.get_submodule(name)
                if isinstance(m, QUANT_LAYERS) and m.weight_dtype != dtype:
                    m.to(dtype)
        if not self.pre_quantized:
            mods = dict(model.named_modules())
            leftovers = {n: c for n, c in self._plan.items() if isinstance(mods.get(n), _FLOAT_TYPES)
                         or (n in mods and is_experts_module(mods[n]))}  # MoE experts: quantized once loaded
            _untie(model, [*self._plan, *self._tables, *self._tied])
            if leftovers:  # weights not read from the checkpoint (tied lm_head, ...)
                quantize_(model, leftovers)
            _quantize_recorded_tables(model, self._tables, self._tied)
        _finalize(model)
        if self.quantization_config.input_quantizers:  # static activation quantizers of the saved model
            # under this model's names, as the recorded modules (a head's, read into the base model, is left out)
            records, _ = _model_names(model, self.quantization_config.input_quantizers, self)
            attach_recorded(model, records, "quantization_config.input_quantizers")
        self.quantization_config.record(model)
        model.config.quantization_config = self.quantization_config
        bind_save_pretrained(model)
        return model

    def get_state_dict_and_metadata(self, model):
        # called by save_pretrained before it writes config.json: record the model as it is now
        self.quantization_config.record(model)
        _untie(model, [*(self.quantization_config.modules or {}), *(self.quantization_config.shared_modules or {})])
        model.config.quantization_config = self.quantization_config
        return None, {}

    def _dequantize(self, model, dtype=None):
        from ..quant.api import dequantize_

        dequantize_(model)
        if dtype is not None:
            model.to(dtype)
        return model

    def is_serializable(self) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return False


def attach_quantizer(model: nn.Module) -> MedQuantHfQuantizer:
    """Make a model quantized with :func:`medquant.quantize_` look like one loaded by ``from_pretrained``.

    Sets ``model.hf_quantizer`` and ``model.config.quantization_config`` (recording every module's recipe) and makes
    ``model.save_pretrained`` crash-safe with a manifest.

    Args:
        model: a transformers model quantized in place with medquant.

    Returns:
        The attached :class:`MedQuantHfQuantizer`.

    Raises:
        TypeError: ``model`` is not a transformers ``PreTrainedModel``.
        ValueError: the model is quantized by another transformers method, or has no medquant-quantized layer
            (neither a QuantLinear / QuantConv2d nor a QuantEmbedding table).
    """
    from transformers import PreTrainedModel

    if not isinstance(model, PreTrainedModel):
        raise TypeError(f"expected a transformers PreTrainedModel, got {type(model).__name__}; plain modules are "
                        "saved with medquant.save(model, path)")
    existing = getattr(model, "hf_quantizer", None)
    if existing is not None and not isinstance(existing, MedQuantHfQuantizer):
        method = getattr(existing.quantization_config, "quant_method", "?")
        raise ValueError(f"the model is already quantized by transformers with {method!r}, not medquant")
    if not _has_quantized(model):
        raise ValueError(f"{type(model).__name__} has no medquant-quantized layer: run medquant.quantize_(model, "
                         "config) (Linear / Conv2d layers) or medquant.quant.embeddings.quantize_embeddings_(model, "
                         "config) (embedding tables) first (a float model is saved with model.save_pretrained)")
    if existing is None:
        existing = MedQuantHfQuantizer(MedQuantConfig(), pre_quantized=True)
        model.hf_quantizer = existing
    existing.get_state_dict_and_metadata(model)
    model.config._is_quantized = True
    bind_save_pretrained(model)
    return existing


_MISSING = object()


def _has_quantized(model: nn.Module) -> bool:
    """Whether ``model`` has a medquant-quantized layer that its recipe records: a QuantLinear / QuantConv2d (MoE
    experts are quantized per expert into them) or a QuantEmbedding table (``quantize_embeddings_`` alone)."""
    return any(isinstance(m, QUANT_LAYERS) for m in model.modules())


def _saves_on_this_rank(model: nn.Module, is_main_process: bool) -> bool:
    """Whether transformers' ``save_pretrained`` writes the checkpoint's files in this process (``is_main_process``,
    and rank 0 where ``torch.distributed`` is initialised)."""
    should = getattr(model, "should_save_on_this_rank", None)
    if callable(should):
        return bool(should(is_main_process))
    if is_main_process and torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank() == 0  # pragma: no cover - transformers without should_save_on_this_rank
    return bool(is_main_process)


def _crash_safe_save_pretrained(self: nn.Module, save_directory, **kwargs) -> None:
    """The class's ``save_pretrained`` into a new version of ``save_directory``, switched in atomically with a
    manifest (:func:`medquant.io.write_checkpoint`).

    In a process that does not write (``is_main_process=False``, or a rank other than 0, as every rank of a
    distributed script calls it), the class's ``save_pretrained`` still runs (it may gather sharded tensors with
    the other ranks) but into a temporary folder that is then removed: ``save_directory`` is left as it is, as
    transformers leaves it, instead of being switched to a version without the files the writing rank saved."""
    if kwargs.get("variant") is not None:
        raise ValueError(f"save_pretrained(variant={kwargs['variant']!r}) of a medquant model is not supported: "
                         "from_pretrained checks a pre-quantized folder's model.safetensors (or its shards); save "
                         "each variant into a folder of its own, without variant=")
    if kwargs.get("push_to_hub") and "repo_id" not in kwargs:
        kwargs["repo_id"] = Path(save_directory).name
    shared = {**_shared_buffer_keys(self, tied_heads(self)), **_shared_module_keys(self)}
    declared = self.__dict__.get("_tied_weights_keys", _MISSING)
    if shared:  # a tied quantized head: transformers saves shared tensors once when they are declared tied
        self._tied_weights_keys = {**(getattr(self, "_tied_weights_keys", None) or {}), **shared}
    try:
        if not _saves_on_this_rank(self, kwargs.get("is_main_process", True)):
            with tempfile.TemporaryDirectory(prefix="medquant-save-pretrained-") as scratch:
                type(self).save_pretrained(self, scratch, **kwargs)  # type: ignore[attr-defined]
            return
        with write_checkpoint(save_directory) as folder:
            type(self).save_pretrained(self, folder, **kwargs)
    finally:
        if shared:
            if declared is _MISSING:
                del self._tied_weights_keys
            else:
                self._tied_weights_keys = declared


class _SavePretrained:
    """``model.save_pretrained`` of a medquant-quantized model: the crash-safe one with a manifest (an instance
    attribute, the class is not touched; copies, deep copies and pickles of the model keep it)."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def __call__(self, save_directory, **kwargs) -> None:
        check_saved_hooks(self.model, "save_pretrained")  # as medquant.hf.save_pretrained: nothing lost silently
        if not _has_quantized(self.model):  # every layer float again (medquant.dequantize_): a float folder
            _save_float(self.model, save_directory, **kwargs)
            return
        if getattr(self.model, "hf_quantizer", None) is None:
            attach_quantizer(self.model)  # quantized in place (quantize_, GPTQ...): the recipe goes into config.json
        _crash_safe_save_pretrained(self.model, save_directory, **kwargs)


def _save_float(model: nn.Module, save_directory, **kwargs) -> None:
    """Save a model bound to the medquant ``save_pretrained`` that holds no quantized layer (all made float again
    by :func:`medquant.dequantize_`) as the float model it is: a ``quantization_config`` would record no module, a
    folder ``from_pretrained`` refuses. medquant's quantizer and ``quantization_config`` (left by
    ``from_pretrained`` or an earlier save) are set aside for the save only, as transformers' own
    ``model.dequantize()`` drops them; the folder is still replaced as one unit with a manifest.

    Raises:
        ValueError: the model has active input quantizers, which only a medquant ``quantization_config`` records
            (with quantized layers): the float folder would load without them (nothing is written).
    """
    acts = input_quantizers(model)
    if acts:
        raise ValueError(
            f"save_pretrained: the model holds no quantized layer (a float model), but {len(acts)} module(s) "
            f"fake-quantize their inputs with an input quantizer ({', '.join(list(acts)[:8])}"
            f"{' ...' if len(acts) > 8 else ''}), which a folder records only in medquant's quantization_config "
            "next to quantized layers: saved as a float model it would load with float activations. Accepted: "
            "quantize the layers again before saving (medquant.quantize_), or remove the input quantizers "
            "(module.input_quantizer_handle.remove()) to save the float model; medquant.save(model, path) "
            "records them with any model")
    config = getattr(model, "config", None)
    quantizer = model.__dict__.get("hf_quantizer", _MISSING)
    recorded = config.__dict__.get("quantization_config", _MISSING) if config is not None else _MISSING
    if quantizer is not _MISSING and isinstance(quantizer, MedQuantHfQuantizer):
        model.hf_quantizer = None
    else:
        quantizer = _MISSING
    if recorded is not _MISSING and isinstance(recorded, MedQuantConfig):
        del config.quantization_config
    else:
        recorded = _MISSING
    try:
        _crash_safe_save_pretrained(model, save_directory, **kwargs)
    finally:
        if quantizer is not _MISSING:
            model.hf_quantizer = quantizer
        if recorded is not _MISSING:
            config.quantization_config = recorded


def bind_save_pretrained(model: nn.Module) -> None:
    """Make ``model.save_pretrained`` the medquant one (an instance attribute; the class is untouched): the folder
    gets ``quantization_config`` with every quantized layer's recipe, is replaced as one unit and carries a
    manifest. Bound when medquant loads, prepares or quantizes a transformers model (idempotent). A model with no
    quantized layer left (:func:`medquant.dequantize_`) is saved as the float model, without
    ``quantization_config``; one that still has active input quantizers is then refused (the float folder could not
    record them).

    Args:
        model: a transformers model.
    """
    if not isinstance(model.__dict__.get("save_pretrained"), _SavePretrained):
        model.__dict__["save_pretrained"] = _SavePretrained(model)


def save_pretrained(model: nn.Module, save_directory, **kwargs) -> None:
    """``model.save_pretrained(save_directory, **kwargs)`` for a medquant-quantized transformers model.

    Writes ``config.json`` with ``quantization_config`` (quant_method ``"medquant"``, every quantized module's
    recipe, the float Linear / Conv2d layers) and the safetensors weights, so that after ``import medquant``
    ``AutoModel...from_pretrained(save_directory)`` rebuilds the model with the same quantized layers and every
    saved tensor bit for bit. Buffers that are not saved (non-persistent ones, such as the rotary embedding's
    ``inv_freq``) are recomputed by transformers when it builds the model, in float32: for a model cast with
    ``.to(torch.bfloat16)`` (or float16) before saving they differ from the saved model's, so its outputs after
    ``from_pretrained`` can differ slightly (about 1e-2 in the logits of the tiny bfloat16 LLaMA; plain
    transformers does the same with its own bfloat16 models). :func:`medquant.save` / :func:`medquant.load` record
    those buffers' dtypes and give the identical model back. Like :func:`medquant.save` the folder is replaced as
    one unit and gets ``medquant.manifest.json`` (:func:`medquant.io.write_checkpoint`), which ``from_pretrained``
    verifies.

    Args:
        model: a transformers model with a medquant-quantized layer: a QuantLinear / QuantConv2d
            (:func:`medquant.quantize_`, GPTQ...) or only a QuantEmbedding table
            (:func:`~medquant.quant.embeddings.quantize_embeddings_`).
        save_directory: the output folder.
        **kwargs: passed to transformers' ``save_pretrained`` (e.g. ``max_shard_size``: sharded files reload
            identically; ``safe_serialization`` is ignored by transformers 5, which always writes safetensors).

    Raises:
        ValueError: ``variant=`` (``from_pretrained`` checks ``model.safetensors`` or its shards, so a
            ``model.<variant>.safetensors`` folder would not load); a model without any quantized layer (save a
            float model with transformers' ``model.save_pretrained``); forward hooks the folder would lose that
            change what the model computes (:func:`medquant.io.checkpoint.check_saved_hooks`: an
            AdaptiveQuantizer's sites, a torch reparametrisation; other hooks are warned about); nothing is written.
    """
    check_saved_hooks(model, "medquant.hf.save_pretrained")
    attach_quantizer(model)
    _crash_safe_save_pretrained(model, save_directory, **kwargs)


def register_with_transformers() -> None:
    """Put :class:`MedQuantConfig` and :class:`MedQuantHfQuantizer` into transformers' quantization registries.

    They are registered under ``"medquant"`` (idempotent; :func:`medquant.hf.register` calls it).
    """
    from transformers.quantizers import auto

    # another import of medquant (reload, second interpreter state) may have registered already
    if auto.AUTO_QUANTIZATION_CONFIG_MAPPING.get(QUANT_METHOD) is not MedQuantConfig:
        auto.AUTO_QUANTIZATION_CONFIG_MAPPING.pop(QUANT_METHOD, None)
        auto.register_quantization_config(QUANT_METHOD)(MedQuantConfig)
    if auto.AUTO_QUANTIZER_MAPPING.get(QUANT_METHOD) is not MedQuantHfQuantizer:
        auto.AUTO_QUANTIZER_MAPPING.pop(QUANT_METHOD, None)
        auto.register_quantizer(QUANT_METHOD)(MedQuantHfQuantizer)


register_with_transformers()  # the transformers import above may have run the import hook while this module was
# incomplete, so medquant.hf.register() returned early
