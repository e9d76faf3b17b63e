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
    static_decode_(model, options={"cpp_wrapper": True})
    cfg = model.generation_config.compile_config
    assert cfg.options == {"cpp_wrapper": True} and cfg.mode is None  # torch.compile takes options or a mode
    assert cfg.to_dict()["options"] == {"cpp_wrapper": True} and not model.generation_config.disable_compile
    static_decode_(model)
    assert model.generation_config.compile_config.options is None
    assert model.generation_config.compile_config.mode == "default"
    with pytest.raises(TypeError, match="options must be a dict"):
        static_decode_(model, options="cpp_wrapper")
    with pytest.raises(ValueError, match="cannot both be given"):
        static_decode_(model, mode="max-autotune", options={"cpp_wrapper": True})


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_bound_cpu_kernels_compile_to_the_eager_tokens_and_are_dropped_on_load(dtype):
    """``static_decode_`` binds each quantized layer to its CPU kernel: the compiled graph calls it directly (the
    native kernel by handle, ``medquant::gemv4_bound``, with none of the layers' tensors among the graph's inputs;
    or aten's int4 op; no medquant::packed_linear node), the greedy tokens equal eager decoding (a float32 and a
    bfloat16 model), and load_state_dict drops the binding."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from medquant.quant import QuantLinear
    from medquant.quant.modules import _BOUND
    from medquant.testing.zoo import text_kwargs

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**text_kwargs())).eval().to(dtype)
    mq.quantize_(model, mq.QuantConfig(4, group_size=32))
    qlayers = [m for m in model.modules() if isinstance(m, QuantLinear)]
    ids = torch.randint(1, 100, (1, 6))
    graphs: list[torch.fx.GraphModule] = []
    inputs: list[torch.Tensor] = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        inputs.extend(t for t in example_inputs if isinstance(t, torch.Tensor))
        return gm.forward

    torch._dynamo.reset()
    with torch.no_grad():
        eager = model.generate(ids, max_new_tokens=3, do_sample=False)
        static_decode_(model, backend=backend, fullgraph=True)
        assert all(_BOUND in m.__dict__ for m in qlayers)
        compiled = model.generate(ids, max_new_tokens=3, do_sample=False)
    assert torch.equal(compiled, eager)
    targets = {str(n.target) for g in graphs for n in g.graph.nodes if n.op == "call_function"}
    from medquant.kernels.native import native_status

    kernel = "medquant.gemv4_bound" if native_status()["gemv4"] else "_weight_int4pack_mm"  # native4 / aten int4
    assert any(kernel in t for t in targets), targets
    if native_status()["gemv4"]:  # called by handle: no layer's codes, scales or zero points enter the graph
        stored = {t.untyped_storage().data_ptr() for m in qlayers for t in m.buffers()}
        assert not stored & {t.untyped_storage().data_ptr() for t in inputs}
    assert not any("packed_linear" in t for t in targets)
    qlayers[0].load_state_dict(qlayers[0].state_dict())
    assert _BOUND not in qlayers[0].__dict__
    assert qlayers[1].bind_cpu_kernels() and _BOUND in qlayers[1].__dict__
    torch._dynamo.reset()
