"""Export medquant models to the runtimes that serve them.

``export(model, path, format=...)`` is the one entry point; formats are backends in a registry
(:func:`register_export_format`): ``"compressed-tensors"`` (a Hugging Face folder that vLLM, SGLang and
transformers load), ``"gguf"`` (llama.cpp, Ollama) and ``"onnx"`` (ONNX Runtime). Every export returns an
:class:`ExportReport` that says, per weight, whether it was copied exactly, re-expressed exactly, rounded, or
requantized.
"""
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

__all__ = ["HOW", "ExportBackend", "ExportError", "ExportReport", "LayerExport", "check_format", "export",
           "export_formats", "format_description", "parse_size", "register_export_format"]
