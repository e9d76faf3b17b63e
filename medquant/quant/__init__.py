"""Quantization primitives: config, packed layout, quantize/dequantize/fake-quantize, quantized modules."""
from ..kernels.layout import FORMAT_VERSION, container_bits, pack, unpack
from .api import dequantize_, quantize_, quantized_modules, resolve_configs
from .config import QuantConfig
from .core import QTensor, dequantize, fake_quantize, quantize
from .modules import QuantConv2d, QuantLinear
from .size import SizeReport, layer_table, model_size

__all__ = [
    "FORMAT_VERSION",
    "QTensor",
    "QuantConfig",
    "QuantConv2d",
    "QuantLinear",
    "SizeReport",
    "container_bits",
    "dequantize",
    "dequantize_",
    "fake_quantize",
    "layer_table",
    "model_size",
    "pack",
    "quantize",
    "quantize_",
    "quantized_modules",
    "resolve_configs",
    "unpack",
]
