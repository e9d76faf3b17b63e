"""medquant: compress medical vision and vision-language models without losing accuracy for any patient group."""
__version__ = "0.1.0"

from .quant import (  # noqa: E402
    FORMAT_VERSION,
    QuantConfig,
    QuantConv2d,
    QuantLinear,
    dequantize,
    dequantize_,
    fake_quantize,
    layer_table,
    model_size,
    quantize,
    quantize_,
)
from .io import CheckpointError, load, load_extras, save  # noqa: E402

__all__ = [
    "QuantConfig",
    "QuantLinear",
    "QuantConv2d",
    "quantize",
    "dequantize",
    "fake_quantize",
    "quantize_",
    "dequantize_",
    "model_size",
    "layer_table",
    "save",
    "load",
    "load_extras",
    "CheckpointError",
    "FORMAT_VERSION",
    "__version__",
]
