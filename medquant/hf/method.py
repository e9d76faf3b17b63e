"""The name medquant registers with transformers as its quantization method (``quant_method`` in config.json)."""

QUANT_METHOD = "medquant"
