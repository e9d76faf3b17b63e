"""``MedQuantConfig``: the transformers ``quantization_config`` of medquant models (``quant_method="medquant"``).

It holds either a plan (what :func:`medquant.quantize_` takes: one :class:`~medquant.QuantConfig`, or a pattern map
plus ``skip``) to quantize a float checkpoint while loading, or the record of an already quantized model: every
quantized layer's recipe (``modules``), the float Linear / Conv2d layers (``skipped_modules``) and the saved-format
version (:func:`medquant.io.format_version_of`). It round-trips through ``config.json`` (``to_dict`` /
``from_dict``). Importing this module imports ``transformers.utils.quantization_config`` only (not the quantizer
registry); :mod:`medquant.hf.integration` holds the quantizer that uses it.
"""
from __future__ import annotations

import copy
import json
from collections.abc import Iterable, Mapping
from typing import Any

from torch import nn
from transformers.utils.quantization_config import QuantizationConfigMixin

from ..io import format_version_of
from ..kernels.layout import FORMAT_VERSION
from ..quant.activations import checked_records, input_quantizers
from ..quant.api import DEFAULT_KEY, ConfigMap, quantizable_modules, without_moe_routers
from ..quant.config import QuantConfig
from ..quant.recipe import model_recipe, shared_modules
from ..version import __version__
from .method import QUANT_METHOD

__all__ = ["MedQuantConfig", "recipe_of"]

# the fields of a MedQuantConfig: what update() sets (and to_dict() writes)
_FIELDS = ("quant_method", "format_version", "medquant_version", "config", "config_map", "skip", "modules",
           "skipped_modules", "input_quantizers", "shared_modules")


def _as_shared(value: Any, modules: Mapping[str, Any] | None) -> dict[str, str] | None:
    """``shared_modules`` checked: ``{further name: recorded module name}``, each target a key of ``modules`` and
    no further name one (its recipe is the target's)."""
    if value is None:
        return None
    if not isinstance(value, Mapping) or not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        raise TypeError(f"shared_modules must be a mapping module name -> the name of the module it shares, got "
                        f"{value!r}")
    for alias, target in value.items():
        if modules is None or target not in modules:
            raise ValueError(f"shared_modules[{alias!r}] names {target!r}, which modules does not record")
        if alias in modules:
            raise ValueError(f"shared_modules[{alias!r}]: {alias!r} has a recipe of its own in modules")
    return dict(value)


def _as_config_dict(value: Any, what: str) -> dict | None:
    """QuantConfig | int | QuantConfig-dict | None -> validated QuantConfig dict (or None = keep float)."""
    if value is None:
        return None
    if isinstance(value, QuantConfig):
        return value.to_dict()
    if isinstance(value, int) and not isinstance(value, bool):
        return QuantConfig(bits=value).to_dict()
    if isinstance(value, Mapping):
        try:
            return QuantConfig.from_dict(dict(value)).to_dict()
        except (TypeError, ValueError) as e:
            raise ValueError(f"{what}: not a valid QuantConfig: {e}") from None
    raise TypeError(f"{what} must be a medquant.QuantConfig, an int bit-width, a QuantConfig dict or None, "
                    f"got {type(value).__name__}")


def _as_names(value: Iterable[str] | None, what: str) -> list[str] | None:
    """A list of module names / patterns (``None`` stays ``None``); a single string or a non-string entry is refused."""
    if value is None:
        return None
    if isinstance(value, (str, bytes, Mapping)) or not isinstance(value, Iterable):
        raise TypeError(f"{what} must be a list of module names / patterns, got {type(value).__name__} {value!r}")
    out = list(value)
    bad = [v for v in out if not isinstance(v, str) or not v]
    if bad:
        raise TypeError(f"{what} must hold non-empty strings (module names / patterns), got {bad!r}")
    return out


def _as_pattern_map(value: Any) -> dict[str, dict | None]:
    """``config_map`` as read from Python or JSON -> ``{pattern: QuantConfig dict | None}`` in the given order.

    Accepts a mapping (its insertion order is kept) or the JSON form, a list of ``[pattern, config]`` pairs. The
    order matters: a module takes the first regular-expression or role pattern that matches it.
    """
    if isinstance(value, Mapping):
        pairs = list(value.items())
    elif isinstance(value, (list, tuple)) and all(isinstance(p, (list, tuple)) and len(p) == 2 for p in value):
        pairs = [tuple(p) for p in value]
    else:
        raise TypeError(f"config_map must be a mapping pattern -> QuantConfig, or a list of [pattern, config] "
                        f"pairs, got {type(value).__name__} {value!r}")
    out: dict[str, dict | None] = {}
    for pattern, cfg in pairs:
        if not isinstance(pattern, str) or not pattern:
            raise TypeError(f"config_map patterns must be non-empty strings, got {pattern!r}")
        if pattern in out:
            raise ValueError(f"config_map: pattern {pattern!r} is given twice")
        out[pattern] = _as_config_dict(cfg, f"config_map[{pattern!r}]")
    return out


def recipe_of(model: nn.Module) -> tuple[dict[str, dict], list[str]]:
    """``(modules, skipped_modules)`` of a model: its quantized layers' recipes and its float Linear / Conv2d layers.

    ``modules`` maps each quantized layer's name to its recipe (type, shape, ``weight_dtype``, QuantConfig dict:
    :func:`medquant.quant.recipe.layer_recipe`); ``skipped_modules`` lists the torch Linear / Conv2d layers still
    in float.

    Args:
        model: a model quantized with medquant.

    Returns:
        ``(modules, skipped_modules)``.
    """
    return model_recipe(model, weight_dtype=True), sorted(quantizable_modules(model))


class MedQuantConfig(QuantizationConfigMixin):
    """transformers ``quantization_config`` of medquant models.

    JSON form (``to_dict``): ``quant_method``, ``format_version``, ``medquant_version``, ``config`` (a QuantConfig
    dict) or ``config_map`` (a list of ``[pattern, QuantConfig dict / null]`` pairs, in the map's order: a module
    takes the first regular-expression or role pattern that matches it, and JSON objects are written with sorted
    keys), ``skip``, ``modules``, ``skipped_modules``, and ``input_quantizers`` when the model has static
    activation quantizers, ``shared_modules`` when a quantized layer is bound under several names.

    Args:
        config_or_map: what :func:`medquant.quantize_` takes - a :class:`~medquant.QuantConfig` (or int bit-width)
            for every Linear / Conv2d, or a mapping ``pattern -> QuantConfig | int | None`` (exact names,
            ``"re:<regex>"``, roles ``"@vision"`` / ``"@projector"`` / ``"@language"`` / ``"@head"``). The
            ``skip`` patterns of a :class:`~medquant.quant.ConfigMap` are kept (before those of ``skip``).
        skip: patterns to keep in floating point (wins over everything).
        config: the one QuantConfig (or its dict), as read from JSON; alternative to ``config_or_map``.
        config_map: the pattern map, as read from JSON (a list of ``[pattern, config]`` pairs, or a mapping: its
            order is kept); alternative to ``config_or_map``. A ConfigMap's ``skip`` is kept as above.
        modules: per-module recipe of an already quantized model (written by :func:`save_pretrained`); when
            quantizing on load with only ``modules`` given, exactly those modules get exactly those configs
            (embedding tables and heads tied to them included: :meth:`recorded_embeddings`).
        skipped_modules: Linear / Conv2d names left in float in a saved model (recorded for the reader; it keeps no
            layer in float: quantize-on-load refuses a plan that quantizes a listed layer, use ``skip``).
        input_quantizers: the static activation quantizers of a saved model (learned rounding with ``act_bits``),
            ``{module name: {"bits", "symmetric", "scale", "zero"}}``
            (:class:`~medquant.quant.activations.InputQuantizer`); ``from_pretrained`` attaches them again.
        shared_modules: ``{further name: recorded module}`` of a quantized layer bound under several names (its
            recipe and tensors are stored once, under the recorded name); ``from_pretrained`` binds the further
            names to the one loaded layer. Each target must be a key of ``modules``, no further name one.
        format_version: the saved-format version of the recorded model (at most this medquant's).
        medquant_version: the medquant version that wrote it, a string (default: this one).
        quant_method: must be ``"medquant"``.
        **unknown: refused (a clear error instead of an ignored field).

    Raises:
        ValueError: unknown fields, another ``quant_method``, a newer ``format_version``, both a config and a map,
            an invalid QuantConfig, a pattern given twice, a ``modules`` entry that is not a recipe, an invalid
            ``input_quantizers`` record, or a ``shared_modules`` target ``modules`` does not record (or a further
            name with a recipe of its own).
        TypeError: ``skip`` is a single string, or ``config_map`` / a config / ``medquant_version`` /
            ``input_quantizers`` / ``shared_modules`` is of the wrong type.
    """

    def __init__(
        self,
        config_or_map: QuantConfig | int | Mapping[str, QuantConfig | int | None] | None = None,
        skip: Iterable[str] | None = None,
        *,
        config: QuantConfig | int | Mapping | None = None,
        config_map: Mapping[str, Any] | list | None = None,
        modules: Mapping[str, Mapping] | None = None,
        skipped_modules: Iterable[str] | None = None,
        input_quantizers: Mapping[str, Mapping] | None = None,
        shared_modules: Mapping[str, str] | None = None,
        format_version: int = FORMAT_VERSION,
        medquant_version: str | None = None,
        quant_method: str = QUANT_METHOD,
        **unknown: Any,
    ) -> None:
        if unknown:
            raise ValueError(f"unknown MedQuantConfig fields {sorted(unknown)}; accepted: config_or_map, skip, "
                             "config, config_map, modules, skipped_modules, input_quantizers, shared_modules, "
                             "format_version, medquant_version")
        if quant_method != QUANT_METHOD:
            raise ValueError(f"quant_method must be {QUANT_METHOD!r}, got {quant_method!r}")
        if not isinstance(format_version, int) or isinstance(format_version, bool) or not (
                1 <= format_version <= FORMAT_VERSION):
            raise ValueError(f"quantization_config has format version {format_version!r}; this medquant "
                             f"{__version__} reads versions 1 to {FORMAT_VERSION}")
        if config_or_map is not None:
            if config is not None or config_map is not None:
                raise ValueError("give config_or_map, or config / config_map, not both")
            if isinstance(config_or_map, Mapping) and not isinstance(config_or_map, QuantConfig):
                config_map = config_or_map
            else:
                config = config_or_map
        if config is not None and config_map is not None:
            raise ValueError("give either config (one QuantConfig for every layer) or config_map (patterns), "
                             "not both")
        if isinstance(skip, str):
            raise TypeError("skip must be a list of patterns, not a single string")
        if isinstance(config_map, ConfigMap) and config_map.skip:  # quantize_ honours a ConfigMap's own skip
            extra = [p for p in (_as_names(skip, "skip") or []) if p not in config_map.skip]
            skip = [*config_map.skip, *extra]
        if medquant_version is not None and not isinstance(medquant_version, str):
            raise TypeError(f"medquant_version must be a version string (or None: this one), got "
                            f"{type(medquant_version).__name__} {medquant_version!r}")
        if modules is not None and not isinstance(modules, Mapping):
            raise TypeError(f"modules must be a mapping module name -> recipe dict, got {type(modules).__name__}")
        self.quant_method = QUANT_METHOD  # type: ignore[assignment]  # transformers types it as its enum
        self.format_version = format_version
        self.medquant_version = medquant_version or __version__
        self.config = _as_config_dict(config, "config")
        self.config_map = _as_pattern_map(config_map) if config_map is not None else None
        self.skip = _as_names(skip, "skip")
        self.modules = None
        if modules is not None:
            self.modules = {}
            for name, entry in modules.items():
                if not isinstance(entry, Mapping) or "config" not in entry or "type" not in entry:
                    raise ValueError(f"modules[{name!r}] must be a recipe dict with 'type' and 'config', got {entry!r}")
                e = copy.deepcopy(dict(entry))
                e["config"] = _as_config_dict(e["config"], f"modules[{name!r}].config")
                self.modules[str(name)] = e
        skipped = _as_names(skipped_modules, "skipped_modules")
        self.skipped_modules = sorted(skipped) if skipped is not None else None
        self.input_quantizers = (checked_records(input_quantizers, "quantization_config.input_quantizers")
                                 if input_quantizers is not None else None)
        self.shared_modules = _as_shared(shared_modules, self.modules)

    # ------------------------------------------------------------------ updates
    @classmethod
    def from_dict(cls, config_dict: Mapping[str, Any], return_unused_kwargs: bool = False,
                  **kwargs: Any) -> MedQuantConfig | tuple[MedQuantConfig, dict[str, Any]]:
        """The config of a JSON form (``to_dict``), with fields in ``kwargs`` overriding it (through :meth:`update`).

        Args:
            config_dict: the fields, as written by :meth:`to_dict` (unknown ones are refused).
            return_unused_kwargs: also return the ``kwargs`` that are not fields (transformers' signature).
            **kwargs: fields to set after building (validated as by the constructor); the others are unused.

        Returns:
            The config, or ``(config, unused kwargs)`` with ``return_unused_kwargs``.
        """
        config = cls(**config_dict)
        unused = config.update(**kwargs)
        return (config, unused) if return_unused_kwargs else config

    def update(self, **kwargs: Any) -> dict[str, Any]:
        """Set the fields named in ``kwargs``, validated exactly as by the constructor; return the other kwargs.

        The fields are ``quant_method``, ``format_version``, ``medquant_version``, ``config``, ``config_map``,
        ``skip``, ``modules``, ``skipped_modules``, ``input_quantizers`` and ``shared_modules``; they are normalised
        as the constructor does (an int bit-width or a QuantConfig becomes its dict...). As transformers'
        ``QuantizationConfigMixin.update`` (``AutoQuantizationConfig.from_pretrained`` passes it every
        ``from_pretrained`` keyword), keys that are not fields (method and property names included) are not used
        and come back; ``kwargs`` is not changed. The result must be a valid config as a whole: replacing ``config``
        by ``config_map`` takes ``config=None`` in the same call.

        Args:
            **kwargs: new field values, and anything else (returned).

        Returns:
            The ``kwargs`` that are not fields.

        Raises:
            TypeError: a field value of the wrong type (as the constructor); the config is unchanged.
            ValueError: a value the constructor refuses (an invalid QuantConfig, a newer ``format_version``, both
                ``config`` and ``config_map``...); the config is unchanged.
        """
        used = {k: v for k, v in kwargs.items() if k in _FIELDS}
        unused = {k: v for k, v in kwargs.items() if k not in _FIELDS}
        if used:
            try:  # build the whole new config first: a refusal leaves this one as it was
                new = type(self)(**{**self.to_dict(), **used})
            except (TypeError, ValueError) as e:
                raise type(e)(f"MedQuantConfig.update: {e} (the config is unchanged)") from None
            self.__dict__.update({k: new.__dict__[k] for k in _FIELDS})
        return unused

    # ------------------------------------------------------------------ helpers
    @property
    def has_plan(self) -> bool:
        """Whether the config says what to quantize (a config, a pattern map or recorded modules)."""
        return self.config is not None or self.config_map is not None or bool(self.modules)

    def quantize_spec(self) -> QuantConfig | ConfigMap:
        """The ``config_or_map`` argument for :func:`medquant.quantize_` this config stands for, without ``skip``.

        Returns:
            The one QuantConfig, or a :class:`~medquant.quant.ConfigMap` of the patterns or of the recorded modules
            (exact names). Recorded ``QuantEmbedding`` entries and the heads ``tied_to`` them are not in that map
            (``quantize_`` quantizes Linear / Conv2d layers): :meth:`recorded_embeddings` lists them.
            :meth:`to_config_map` includes ``skip``.

        Raises:
            ValueError: the config has nothing to quantize with, or a recorded ``tied_to`` is inconsistent
                (:meth:`recorded_embeddings`).
        """
        if self.config is not None:
            return QuantConfig.from_dict(self.config)
        if self.config_map is not None:
            return ConfigMap(self.config_map)
        if self.modules:
            tables, tied = self.recorded_embeddings()
            return ConfigMap({name: e["config"] for name, e in self.modules.items()
                              if name not in tables and name not in tied})
        raise ValueError("MedQuantConfig has nothing to quantize with: give a QuantConfig, a pattern map or modules")

    def recorded_embeddings(self, model: nn.Module | None = None) -> tuple[dict[str, QuantConfig], dict[str, str]]:
        """The recorded embedding tables and the heads tied to them (the part ``quantize_embeddings_`` quantizes).

        They are the part of ``modules`` that :func:`~medquant.quant.embeddings.quantize_embeddings_` quantizes,
        not :func:`medquant.quantize_`. A ``"QuantEmbedding"`` entry is a table quantized with its ``config`` (``e[i, j] = (u[i, j] - z) *
        s[i, j // group_size]``); a ``"QuantLinear"`` entry with ``"tied_to": <table>`` is a head sharing that
        table's packed tensors (it computes ``x @ e^T`` with the table's codes, so it has no config of its own). A
        plan given as ``modules`` only quantizes each table with ``quantize_embeddings_(model, config,
        names=[table], tie=<a head is recorded tied to it>)`` and every other entry with ``quantize_``
        (:meth:`quantize_spec`).

        ``skip`` wins here as it does for the recorded Linear entries (:meth:`plan`): given ``model``, a table or
        head that a ``skip`` pattern matches (exact name or a container above it, ``re:``, role; resolved as by
        :meth:`~medquant.quant.ConfigMap.resolve`) is left out. A skipped table leaves out the heads tied to it
        too: they stay the float head sharing the table's float weight, as ``quantize_`` with the same ``skip``
        leaves them. A skipped tied head stays float with its own weight, and its table (not skipped) is
        quantized without tying (``tie=False``), as ``quantize_embeddings_(..., tie=False)`` does.

        Args:
            model: the model to resolve ``skip`` against; ``None`` ignores ``skip`` (every recorded entry).

        Returns:
            ``({table name: QuantConfig}, {tied head name: table name})``, both empty without ``modules``.

        Raises:
            ValueError: a ``tied_to`` that names no QuantEmbedding entry, is not a string or is on another type than
                QuantLinear, or a tied head whose recorded shape, config, layout or bias differs from its table's
                (it shares the table's tensors); the message names the head and says what to record instead.
        """
        modules = self.modules or {}
        tables = {n: QuantConfig.from_dict(e["config"]) for n, e in modules.items() if e["type"] == "QuantEmbedding"}
        tied: dict[str, str] = {}
        for name, e in modules.items():
            target = e.get("tied_to")
            if target is None:
                continue
            apart = f"or remove 'tied_to' from modules[{name!r}] to quantize {name!r} from its own weight"
            if e["type"] != "QuantLinear" or not isinstance(target, str):
                raise ValueError(f"modules[{name!r}] records tied_to={target!r} on a {e['type']}: only a QuantLinear "
                                 f"head can be tied, to a QuantEmbedding entry named by a string; {apart}")
            if target not in tables:
                raise ValueError(f"modules[{name!r}] records tied_to={target!r}, but modules has no QuantEmbedding "
                                 f"entry {target!r}: a tied head shares the packed tensors of a quantized embedding "
                                 f"table; record the table too ({target!r} with type 'QuantEmbedding'), {apart}")
            t = modules[target]
            mine = (e.get("in_features"), e.get("out_features"), e.get("bias"), e.get("layout", 1))
            theirs = (t.get("in_features"), t.get("out_features"), False, t.get("layout", 1))
            if QuantConfig.from_dict(e["config"]) != tables[target] or mine != theirs:
                raise ValueError(f"modules[{name!r}] is tied_to {target!r} but records another config, shape, "
                                 f"layout or bias than the table's (config {e['config']}, in/out/bias/layout {mine} "
                                 f"vs config {t['config']}, {theirs}): a tied head computes with the table's packed "
                                 f"codes; record the table's config and shape without bias, {apart}")
            tied[name] = target
        if model is not None and self.skip and (tables or tied):
            tables, tied = self._without_skipped(model, tables, tied)
        return tables, tied

    def _without_skipped(self, model: nn.Module, tables: dict[str, QuantConfig], tied: dict[str, str]
                         ) -> tuple[dict[str, QuantConfig], dict[str, str]]:
        """``tables`` and ``tied`` without the modules of ``model`` that ``skip`` matches (and without the heads
        tied to a skipped table). Names ``model`` does not have are kept: the loader's checks report them."""
        targets: dict[str, nn.Module] = {}
        for name in (*tables, *tied):
            try:
                targets[name] = model.get_submodule(name)
            except AttributeError:
                continue
        kept = ConfigMap({DEFAULT_KEY: QuantConfig(8)}, skip=self.skip).resolve(model, targets)
        tables = {n: c for n, c in tables.items() if n in kept or n not in targets}
        tied = {h: t for h, t in tied.items() if (h in kept or h not in targets) and t in tables}
        return tables, tied

    def to_config_map(self) -> ConfigMap:
        """Everything this config quantizes as one :class:`~medquant.quant.ConfigMap`.

        Returns:
            The map: one QuantConfig becomes the ``"_default"`` entry; ``skip`` is included.
        """
        spec = self.quantize_spec()
        return ConfigMap(spec if isinstance(spec, ConfigMap) else {DEFAULT_KEY: spec}, skip=self.skip)

    def plan(self, model: nn.Module) -> dict[str, QuantConfig]:
        """Module name -> QuantConfig for ``model``: the layers :func:`medquant.quantize_` quantizes with this config.

        The patterns are resolved as by :func:`medquant.quantize_` (:meth:`~medquant.quant.ConfigMap.resolve`),
        and, as there, the MoE routers (:func:`~medquant.quant.experts.moe_routers`: Qwen2-MoE's
        ``shared_expert_gate``, Gemma 4's ``router.proj`` ...) stay in floating point unless named exactly in
        the map, with one warning listing them (:func:`~medquant.quant.api.without_moe_routers`). With recorded
        ``modules`` only, the embedding tables and their tied heads are not in the plan: :meth:`recorded_embeddings`
        gives them (quantize-on-load quantizes them after loading, with
        :func:`~medquant.quant.embeddings.quantize_embeddings_`).

        Args:
            model: the (float) model to plan for.

        Returns:
            The plan.
        """
        cmap = self.to_config_map()
        return without_moe_routers(model, cmap, cmap.resolve(model), stacklevel=2)

    def record(self, model: nn.Module) -> MedQuantConfig:
        """Record a quantized model in this config: its recipes, its float layers and the format version it needs.

        Sets ``modules`` and ``skipped_modules`` (:func:`recipe_of`), ``input_quantizers`` (the active static
        activation quantizers, ``None`` when there are none), ``shared_modules`` (the further names of quantized
        layers bound under several, ``None`` when there are none), ``format_version``
        (:func:`medquant.io.format_version_of`: 2 only when a layer stores dense rows) and ``medquant_version``.

        Args:
            model: a model quantized with medquant.

        Returns:
            ``self``.
        """
        self.modules, self.skipped_modules = recipe_of(model)
        acts = input_quantizers(model)
        self.input_quantizers = {n: q.as_dict() for n, q in acts.items()} or None
        self.shared_modules = shared_modules(model) or None
        self.format_version = format_version_of(model)  # 2 only when a layer stores dense rows
        self.medquant_version = __version__
        return self

    @classmethod
    def from_model(cls, model: nn.Module) -> MedQuantConfig:
        """A config recording ``model`` (:meth:`record` on an empty config).

        Args:
            model: a model quantized with medquant.

        Returns:
            The config.
        """
        return cls().record(model)

    def to_dict(self) -> dict[str, Any]:
        """The JSON form written to ``config.json`` (see the class docstring).

        Returns:
            A dict of deep copies (changing it does not change the config); ``config_map`` is a list of
            ``[pattern, config dict]`` pairs in the map's order, so two maps that differ only in order differ.
        """
        return {
            "quant_method": self.quant_method,
            "format_version": self.format_version,
            "medquant_version": self.medquant_version,
            "config": copy.deepcopy(self.config),
            "config_map": ([[k, copy.deepcopy(v)] for k, v in self.config_map.items()]
                           if self.config_map is not None else None),
            "skip": list(self.skip) if self.skip is not None else None,
            "modules": copy.deepcopy(self.modules),
            "skipped_modules": list(self.skipped_modules) if self.skipped_modules is not None else None,
        } | ({"input_quantizers": copy.deepcopy(self.input_quantizers)} if self.input_quantizers else {}) | (
            {"shared_modules": dict(self.shared_modules)} if self.shared_modules else {})

    def __iter__(self):
        yield from self.to_dict().items()

    def to_json_string(self, use_diff: bool = True) -> str:
        """The JSON form as text, keys sorted (the same config gives the same text).

        Args:
            use_diff: accepted for transformers' signature; every field is written.

        Returns:
            The JSON text with a final newline.
        """
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, MedQuantConfig) and self.to_dict() == other.to_dict()

    __hash__ = None  # type: ignore[assignment]  # mutable
