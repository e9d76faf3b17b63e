"""``static_decode_``: a static KV cache and a compiled decode step on CPU give the eager model's tokens."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import medquant as mq
from medquant.quant.decode import static_decode_


def test_compiled_static_decode_of_a_quantized_llama_matches_eager_generate():
    """torch.compile traces the quantized model on CPU (fullgraph: no graph break at the packed-linear ops) and
    the compiled static-cache decode gives the same greedy tokens as eager decoding with a dynamic cache."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from medquant.testing.zoo import text_kwargs

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**text_kwargs())).eval()
    mq.quantize_(model, mq.QuantConfig(4, group_size=32))
    ids = torch.randint(1, 100, (1, 6))
    torch._dynamo.reset()
    with torch.no_grad():
        eager = model.generate(ids, max_new_tokens=3, do_sample=False)
        static_decode_(model, backend="aot_eager", fullgraph=True)
        assert model.generation_config.cache_implementation == "static"
        frames = torch._dynamo.utils.counters["stats"]["unique_graphs"]
        compiled = model.generate(ids, max_new_tokens=3, do_sample=False)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > frames  # the decode step was compiled
    assert torch.equal(compiled, eager)
    torch._dynamo.reset()


def test_static_cache_only_and_bad_input():
    from transformers import LlamaConfig, LlamaForCausalLM

    from medquant.testing.zoo import text_kwargs

    model = LlamaForCausalLM(LlamaConfig(**text_kwargs())).eval()
    static_decode_(model, compile=False)
    assert model.generation_config.cache_implementation == "static"
    assert model.generation_config.compile_config is None
    with pytest.raises(TypeError, match="generative model"):
        static_decode_(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="backend"):
        static_decode_(model, backend="")
