"""Export medquant models to the runtimes that serve them.

``export(model, path, format=...)`` is the one entry point; formats are backends in a registry
(:func:`register_export_format`): ``"compressed-tensors"`` (a Hugging Face folder that vLLM, SGLang and
transformers load), ``"gguf"`` (llama.cpp, Ollama) and ``"onnx"`` (ONNX Runtime). Every export returns an
:class:`ExportReport` that says, per weight, whether it was copied exactly, re-expressed exactly, rounded, or
requantized.
"""
from .onnx import (
    CalibrationError,
    OnnxClassifier,
    calibrate_activations,
    check_inputs,
    logits_tolerance,
    optimized_op_counts,
    session_options,
)
from .registry import (
    HOW,
    ExportBackend,
    ExportError,
    ExportReport,
    LayerExport,
    check_format,
    export,
    export_formats,
    format_description,
    parse_size,
    register_export_format,
)

__all__ = ["HOW", "CalibrationError", "ExportBackend", "ExportError", "ExportReport", "LayerExport", "OnnxClassifier",
           "calibrate_activations", "check_format", "check_inputs", "export", "export_formats", "format_description",
           "logits_tolerance", "optimized_op_counts", "parse_size", "register_export_format", "session_options"]
