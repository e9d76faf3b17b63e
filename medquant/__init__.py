"""medquant: compress medical vision and vision-language models without losing accuracy for any patient group."""
from .quant import FORMAT_VERSION, QuantConfig, dequantize, fake_quantize, quantize

__version__ = "0.1.0"

__all__ = ["QuantConfig", "quantize", "dequantize", "fake_quantize", "FORMAT_VERSION", "__version__"]
