"""Quantization primitives: config, packed layout, quantize/dequantize/fake-quantize, quantized modules."""
from .api import dequantize_, quantize_, quantized_modules, resolve_configs
from .config import QuantConfig
from .core import QTensor, dequantize, fake_quantize, quantize
from .modules import QuantConv2d, QuantLinear
from .packing import FORMAT_VERSION, container_bits, pack, unpack
from .size import SizeReport, layer_table, model_size

__all__ = [
    "QuantConfig",
    "QTensor",
    "quantize",
    "dequantize",
    "fake_quantize",
    "pack",
    "unpack",
    "container_bits",
    "FORMAT_VERSION",
    "QuantLinear",
    "QuantConv2d",
    "quantize_",
    "dequantize_",
    "quantized_modules",
    "resolve_configs",
    "model_size",
    "layer_table",
    "SizeReport",
]
