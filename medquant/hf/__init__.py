"""transformers integration: ``quantization_config={"quant_method": "medquant", ...}`` in ``config.json``.

After ``import medquant`` (which imports this package), a model saved with :func:`save_pretrained` reloads with
plain ``AutoModelForCausalLM.from_pretrained(path)`` (or any ``<Class>.from_pretrained``), and
``from_pretrained(float_path, quantization_config=MedQuantConfig(QuantConfig(4)))`` quantizes while loading.

Registration with transformers (``register_quantization_config("medquant")`` / ``register_quantizer("medquant")``)
is lazy: importing this package installs an import hook and does *not* import transformers; the classes are
registered the moment ``transformers.quantizers.auto`` is imported (which ``from_pretrained`` always does), or
at once when it already is. :func:`register` does it explicitly and is idempotent.

The heavy names (:class:`MedQuantConfig`, :class:`MedQuantHfQuantizer`, :func:`save_pretrained`,
:func:`recipe_of`) are imported on first attribute access. Inside: :mod:`medquant.hf.config` (the
``quantization_config`` class, :class:`MedQuantConfig`), :mod:`medquant.hf.integration` (the transformers quantizer
that swaps layers while loading, and the workflow: :func:`save_pretrained`, :func:`attach_quantizer`),
:mod:`medquant.hf.method` (the method name).
"""
from __future__ import annotations

import importlib.abc
import importlib.util
import sys

from ..io.checkpoint import register_quantization_config
from ..quant.api import on_quantized
from .method import QUANT_METHOD

_HOOKED_MODULE = "transformers.quantizers.auto"
_LAZY = {"MedQuantConfig", "MedQuantHfQuantizer", "save_pretrained", "recipe_of", "attach_quantizer"}
_registered = False

__all__ = ["QUANT_METHOD", "MedQuantConfig", "MedQuantHfQuantizer", "attach_quantizer", "is_registered", "recipe_of",
           "register", "save_pretrained"]


def register() -> None:
    """Register ``"medquant"`` with transformers' quantization registries (idempotent; imports transformers)."""
    global _registered
    if _registered:
        return
    integration = sys.modules.get(__name__ + ".integration")
    if integration is not None and not hasattr(integration, "register_with_transformers"):
        return  # integration.py is being imported (it imports transformers); it registers itself when done
    from .integration import register_with_transformers

    register_with_transformers()
    _registered = True


def is_registered() -> bool:
    """Whether transformers currently knows the ``"medquant"`` method (does not import transformers).

    Returns:
        ``True`` once ``transformers.quantizers.auto`` is imported and holds the medquant quantizer.
    """
    auto = sys.modules.get(_HOOKED_MODULE)
    return auto is not None and QUANT_METHOD in getattr(auto, "AUTO_QUANTIZER_MAPPING", {})


class _RegisterAfterExec(importlib.abc.Loader):
    def __init__(self, loader: importlib.abc.Loader) -> None:
        self._loader = loader

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module) -> None:
        self._loader.exec_module(module)
        sys.modules[module.__name__] = module  # register() imports it by name
        register()


class _RegisterHook(importlib.abc.MetaPathFinder):
    """Finds ``transformers.quantizers.auto`` through the other finders and registers medquant after it runs."""

    def find_spec(self, fullname, path, target=None):
        if fullname != _HOOKED_MODULE:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None and spec.loader is not None:
                spec.loader = _RegisterAfterExec(spec.loader)
                return spec
        return None


def _install_hook() -> None:
    if _HOOKED_MODULE in sys.modules:
        register()
        return
    if not any(isinstance(f, _RegisterHook) for f in sys.meta_path):
        sys.meta_path.insert(0, _RegisterHook())


def __getattr__(name: str):
    if name in _LAZY:
        from . import integration

        register()
        return getattr(integration, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _bind_save_on_quantize(model) -> None:
    """:func:`medquant.quant.api.on_quantized` hook: a transformers model that now holds medquant-quantized layers
    gets the medquant ``model.save_pretrained`` (config.json with the recipe, crash-safe, with a manifest), so that
    the plain ``model.save_pretrained(dir)`` after ``quantize_`` reloads with ``from_pretrained``. Nothing is
    imported when transformers' modeling code is not loaded (then ``model`` is no transformers model); an instance
    ``save_pretrained`` already set (by medquant or by the user) is kept."""
    modeling = sys.modules.get("transformers.modeling_utils")
    if modeling is None or "save_pretrained" in vars(model) or not isinstance(model, modeling.PreTrainedModel):
        return
    from .integration import bind_save_pretrained

    bind_save_pretrained(model)


def _quantization_config_of(model) -> dict:
    """:func:`medquant.io.checkpoint.register_quantization_config` writer: the ``quantization_config`` that
    ``medquant.save`` writes into a quantized transformers model's ``config.json``, as :func:`save_pretrained`
    records it (called for transformers models only, so transformers is already imported)."""
    from .config import MedQuantConfig

    return MedQuantConfig.from_model(model).to_dict()


_install_hook()
on_quantized(_bind_save_on_quantize)
register_quantization_config(_quantization_config_of)
