"""``quantize_``: swap the Linear / Conv2d layers of any model for packed quantized ones, in place.

Patterns (keys of the mapping, entries of ``skip``):

* ``"model.layers.0.mlp.up_proj"`` - an exact module name: that module, or every module below it when it names
  a container (``"model.vision_tower"`` covers the whole tower);
* ``"re:<regex>"`` - a regular expression that must match a module's full name (``re.fullmatch``);
* ``"@vision"``, ``"@projector"``, ``"@language"``, ``"@head"`` - a role of a Hugging Face VLM/LM, resolved by
  :func:`medquant.models.model_roles` (Gemma 3, LLaVA, Qwen2-VL, PaliGemma, Idefics3, SigLIP, ViT, LLaMA-style).

Resolution: exact full-name matches first, then the other patterns in the order given; the first match decides.
A value of ``None`` (or a config with 16/32 bits) leaves the module in floating point; an ``int`` is shorthand
for ``QuantConfig(bits=int)``. ``skip`` wins over everything. A pattern that matches no module raises
``ValueError`` naming the pattern: a skip list that silently misses is worse than an error.
"""
from __future__ import annotations

import difflib
import re
from collections.abc import Callable, Iterable, Mapping

from torch import nn

from .config import QuantConfig
from .modules import QUANT_MODULES, QuantConv2d, QuantLinear

ROLE_PREFIX = "@"
REGEX_PREFIX = "re:"


def _quantizable(model: nn.Module) -> dict[str, nn.Module]:
    """Linear and Conv2d modules that can be swapped (not inside nn.MultiheadAttention, which reads
    ``out_proj.weight`` directly)."""
    out = {}
    skip_prefixes = [n + "." for n, m in model.named_modules() if isinstance(m, nn.MultiheadAttention)]
    for name, m in model.named_modules():
        # torch.nn's own classes only: subclasses from other libraries (bitsandbytes' Linear4bit, ...) are
        # already quantized or compute differently
        if isinstance(m, (nn.Linear, nn.Conv2d)) and type(m).__module__.startswith("torch.nn"):
            if any(name.startswith(p) for p in skip_prefixes):
                continue
            out[name] = m
    return out


class _Pattern:
    def __init__(self, pattern: str, model: nn.Module, all_names: list[str]):
        if not isinstance(pattern, str) or not pattern:
            raise TypeError(f"module patterns must be non-empty strings, got {pattern!r}")
        self.text = pattern
        self.kind = "exact"
        if pattern.startswith(REGEX_PREFIX):
            self.kind = "regex"
            try:
                self.regex = re.compile(pattern[len(REGEX_PREFIX):])
            except re.error as e:
                raise ValueError(f"pattern {pattern!r} is not a valid regular expression: {e}") from None
        elif pattern.startswith(ROLE_PREFIX):
            self.kind = "role"
            from ..models import model_roles

            role = pattern[len(ROLE_PREFIX):]
            roles = model_roles(model)
            valid = ("vision", "projector", "language", "head")
            if role not in valid:
                raise ValueError(f"unknown role pattern {pattern!r}; accepted: " + ", ".join("@" + r for r in valid))
            if role not in roles:
                raise ValueError(
                    f"pattern {pattern!r}: {type(model).__name__} has no {role} part "
                    f"(it has: {', '.join('@' + r for r in roles) or 'no known roles - use explicit names'})"
                )
            self.prefixes = list(roles[role])
        matched = [n for n in all_names if self.matches(n)]
        if not matched:
            hint = difflib.get_close_matches(pattern, all_names, n=3)
            raise ValueError(
                f"pattern {pattern!r} matches no module of {type(model).__name__}"
                + (f"; did you mean {', '.join(map(repr, hint))}?" if hint else "")
                + " (patterns are exact module names, 're:<regex>' or '@vision/@projector/@language/@head')"
            )

    def matches(self, name: str) -> bool:
        if self.kind == "exact":
            return name == self.text or name.startswith(self.text + ".")
        if self.kind == "regex":
            return self.regex.fullmatch(name) is not None
        return any(name == p or name.startswith(p + ".") for p in self.prefixes)


def _as_config(value, pattern: str) -> QuantConfig | None:
    if value is None or isinstance(value, QuantConfig):
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return QuantConfig(bits=value)
    raise TypeError(
        f"value for pattern {pattern!r} must be a QuantConfig, an int bit-width or None, got {type(value).__name__}"
    )


def resolve_configs(
    model: nn.Module,
    config_or_map: QuantConfig | int | Mapping[str, QuantConfig | int | None],
    *,
    skip: Iterable[str] | None = None,
) -> dict[str, QuantConfig]:
    """Which config each quantizable module gets (modules left in float are absent). Raises on bad patterns."""
    if isinstance(skip, str):
        raise TypeError("skip must be a list of patterns, not a single string")
    all_names = [n for n, _ in model.named_modules() if n]
    targets = _quantizable(model)
    skip_patterns = [_Pattern(p, model, all_names) for p in (skip or [])]
    plan: dict[str, QuantConfig] = {}
    if isinstance(config_or_map, Mapping):
        entries = [(_Pattern(p, model, all_names), _as_config(v, p)) for p, v in config_or_map.items()]
        for pat, cfg in entries:
            if cfg is not None and not any(pat.matches(n) for n in targets):
                raise ValueError(
                    f"pattern {pat.text!r} matches modules but none of them is an nn.Linear or nn.Conv2d to quantize"
                )
        for name in targets:
            exact = [e for e in entries if e[0].kind == "exact" and e[0].text == name]
            chosen = exact[0] if exact else next((e for e in entries if e[0].matches(name)), None)
            if chosen is not None and chosen[1] is not None:
                plan[name] = chosen[1]
    else:
        cfg = _as_config(config_or_map, "<all>")
        if cfg is None:
            return {}
        plan = {name: cfg for name in targets}
    for name in list(plan):
        if any(p.matches(name) for p in skip_patterns) or plan[name].is_float:
            del plan[name]
    return plan


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attr, new)


def quantize_(
    model: nn.Module,
    config_or_map: QuantConfig | int | Mapping[str, QuantConfig | int | None],
    *,
    skip: Iterable[str] | None = None,
    filter_fn: Callable[[nn.Module, str], bool] | None = None,
    progress: bool = False,
) -> nn.Module:
    """Quantize ``model``'s Linear and Conv2d weights in place (see the module docstring for patterns).

    Example::

        quantize_(vlm, {"@language": QuantConfig(bits=4), "@vision": None}, skip=["@head"])
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"quantize_ expects an nn.Module, got {type(model).__name__}")
    plan = resolve_configs(model, config_or_map, skip=skip)
    items = list(plan.items())
    if progress:
        from tqdm.auto import tqdm

        items = tqdm(items, desc="quantizing", unit="layer")
    # two phases: build every quantized layer first, swap only when all succeeded, so an error (NaN weights,
    # a bad channel_bits length...) leaves the model exactly as it was
    built = []
    for name, cfg in items:
        mod = model.get_submodule(name)
        if filter_fn is not None and not filter_fn(mod, name):
            continue
        qcls = QuantLinear if isinstance(mod, nn.Linear) else QuantConv2d
        try:
            q = qcls.from_float(mod, cfg)
        except (ValueError, TypeError) as e:
            raise type(e)(f"{name}: {e}") from None
        q.train(mod.training)
        built.append((name, q))
    for name, q in built:
        _set_submodule(model, name, q)
    return model


def quantized_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Name -> QuantLinear / QuantConv2d module."""
    return {n: m for n, m in model.named_modules() if isinstance(m, QUANT_MODULES)}


def dequantize_(model: nn.Module) -> nn.Module:
    """Replace every QuantLinear / QuantConv2d by the float layer it computes with (in place)."""
    for name, m in list(quantized_modules(model).items()):
        _set_submodule(model, name, m.to_float())
    return model
