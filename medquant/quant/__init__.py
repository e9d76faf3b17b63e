"""Quantization primitives: config, packed layout, quantize/dequantize/fake-quantize, quantized modules."""
from .config import QuantConfig
from .core import QTensor, dequantize, fake_quantize, quantize
from .packing import FORMAT_VERSION, container_bits, pack, unpack

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
]
