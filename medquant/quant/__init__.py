"""Quantization primitives: config, packed layout, quantize/dequantize/fake-quantize, quantized modules."""
from ..kernels.layout import FORMAT_VERSION, container_bits, pack, unpack
from .aot import AOTDecoder, compile_decoder, load_decoder
from .api import (
    DEFAULT_KEY,
    ConfigMap,
    as_config_map,
    dequantize_,
    quantizable_modules,
    quantize_,
    quantize_module,
    quantized_modules,
    register_quantize_module_handler,
    resolve_configs,
    swap_module,
)
from .config import QuantConfig
from .core import QTensor, dequantize, fake_quantize, quantize
from .decode import static_decode_
from .embeddings import quantize_embeddings_
from .experts import QuantExperts, moe_routers, unsupported_experts
from .modules import QuantConv2d, QuantEmbedding, QuantLinear
from .recipe import RecipeError, bit_map_matches, layer_from_recipe, layer_recipe, model_recipe
from .size import SizeReport, layer_table, model_size

__all__ = [
    "DEFAULT_KEY",
    "FORMAT_VERSION",
    "AOTDecoder",
    "ConfigMap",
    "QTensor",
    "QuantConfig",
    "QuantConv2d",
    "QuantEmbedding",
    "QuantExperts",
    "QuantLinear",
    "RecipeError",
    "SizeReport",
    "as_config_map",
    "bit_map_matches",
    "compile_decoder",
    "container_bits",
    "dequantize",
    "dequantize_",
    "fake_quantize",
    "layer_from_recipe",
    "layer_recipe",
    "layer_table",
    "load_decoder",
    "model_recipe",
    "model_size",
    "moe_routers",
    "pack",
    "quantizable_modules",
    "quantize",
    "quantize_",
    "quantize_embeddings_",
    "quantize_module",
    "quantized_modules",
    "register_quantize_module_handler",
    "resolve_configs",
    "static_decode_",
    "swap_module",
    "unpack",
    "unsupported_experts",
]
