"""medquant: compress medical vision and vision-language models without losing accuracy for any patient group.

The quantization core (``QuantConfig``, ``quantize_``, ``QuantLinear``, ``save`` / ``load``...) is imported
eagerly; the larger components (``ComplexityScorer``, ``AdaptiveQuantizer``, ``FairQuantAllocator``,
``BAQWrapper``, ``StructuredPruner``, ``Distiller``, ``QLoRAAdapter``...) are imported on first use, so
``import medquant`` stays fast. Importing medquant also registers ``quant_method="medquant"`` with transformers
(lazily: transformers is not imported until it is used).
"""
from importlib import import_module

from . import hf  # noqa: F401  (registers the transformers quantization method lazily)
from .io import CheckpointError, load, load_extras, save
from .quant import (
    FORMAT_VERSION,
    AOTDecoder,
    ConfigMap,
    QuantConfig,
    QuantConv2d,
    QuantEmbedding,
    QuantExperts,
    QuantLinear,
    compile_decoder,
    dequantize,
    dequantize_,
    fake_quantize,
    layer_table,
    load_decoder,
    model_size,
    quantize,
    quantize_,
    quantize_embeddings_,
    static_decode_,
)
from .version import __version__

# public name -> module that defines it (imported on first access)
_LAZY = {
    "ComplexityScorer": "medquant.complexity",
    "AdaptiveQuantizer": "medquant.adaptive",
    "VLMClassifier": "medquant.adaptive",
    "LearnedPolicy": "medquant.adaptive",
    "fake_quantize_per_sample": "medquant.adaptive",
    "FairQuantAllocator": "medquant.fairquant",
    "BAQWrapper": "medquant.fairquant",
    "fq_qat": "medquant.fairquant",
    "StructuredPruner": "medquant.prune",
    "save_pruned": "medquant.prune",
    "load_pruned": "medquant.prune",
    "Distiller": "medquant.distill",
    "QLoRAAdapter": "medquant.qlora",
    "MedQuantConfig": "medquant.hf",
    "save_pretrained": "medquant.hf",
    "quantize_sequential": "medquant.calibrate",
    "gptq_quantize_": "medquant.calibrate",
    "gptq_quantize_sequential": "medquant.calibrate",
    "fit_baq_distributed": "medquant.fairquant.distributed",
    "global_group_objective": "medquant.fairquant.distributed",
    "model_roles": "medquant.models",
    "export": "medquant.deploy",
    "calibrate_activations": "medquant.deploy",
    "export_formats": "medquant.deploy",
    "register_export_format": "medquant.deploy",
    "ExportReport": "medquant.deploy",
    "ExportError": "medquant.deploy",
}


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'medquant' has no attribute {name!r}")
    value = getattr(import_module(module), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_LAZY))


__all__ = [
    "FORMAT_VERSION",
    "AOTDecoder",
    "AdaptiveQuantizer",
    "BAQWrapper",
    "CheckpointError",
    "ComplexityScorer",
    "ConfigMap",
    "Distiller",
    "ExportError",
    "ExportReport",
    "FairQuantAllocator",
    "LearnedPolicy",
    "MedQuantConfig",
    "QLoRAAdapter",
    "QuantConfig",
    "QuantConv2d",
    "QuantEmbedding",
    "QuantExperts",
    "QuantLinear",
    "StructuredPruner",
    "VLMClassifier",
    "__version__",
    "calibrate_activations",
    "compile_decoder",
    "dequantize",
    "dequantize_",
    "export",
    "export_formats",
    "fake_quantize",
    "fake_quantize_per_sample",
    "fit_baq_distributed",
    "fq_qat",
    "global_group_objective",
    "gptq_quantize_",
    "gptq_quantize_sequential",
    "layer_table",
    "load",
    "load_decoder",
    "load_extras",
    "load_pruned",
    "model_roles",
    "model_size",
    "quantize",
    "quantize_",
    "quantize_embeddings_",
    "quantize_sequential",
    "register_export_format",
    "save",
    "save_pretrained",
    "save_pruned",
    "static_decode_",
]
