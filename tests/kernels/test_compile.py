"""``torch.compile(fullgraph=True)`` over QuantLinear layers: the packed matmul is one custom op, no graph breaks.

On CPU the op body runs the torch reference; the fake (meta) implementation gives dynamo / AOTAutograd the
output shapes. ``fullgraph=True`` makes any graph break an error, so passing is the check.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

from medquant.kernels import fake_quantize_rows
from medquant.quant import QuantConfig
from medquant.quant.modules import QuantLinear


def _quantize_linears(model: nn.Module, config_for) -> int:
    """Replace every nn.Linear by QuantLinear.from_float (setattr on the parent); returns how many."""
    targets = [(name, mod) for name, mod in model.named_modules() if isinstance(mod, nn.Linear)]
    for name, lin in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, QuantLinear.from_float(lin, config_for(lin)))
    return len(targets)


class _MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(48, 64)
        self.b = nn.Linear(64, 33)
        self.c = nn.Linear(33, 10, bias=False)

    def forward(self, x):
        return self.c(torch.relu(self.b(torch.relu(self.a(x)))))


def _mixed_config(lin: nn.Linear) -> QuantConfig:
    palette = (2, 4, 8, 16, 0, 3)
    bits = tuple(palette[i % len(palette)] for i in range(lin.out_features))
    return QuantConfig(4, scope="group", group_size=32, channel_bits=bits)


@pytest.mark.parametrize("mixed,backend", [(False, "aot_eager"), pytest.param(True, "inductor", marks=pytest.mark.slow)],
                         ids=["uniform-aot_eager", "mixed-bits-inductor"])
def test_compile_fullgraph_quantlinear_mlp(mixed, backend):
    torch.manual_seed(0)
    model = _MLP().eval()
    n = _quantize_linears(model, _mixed_config if mixed else (lambda lin: QuantConfig(4, group_size=32)))
    assert n == 3
    x = torch.randn(5, 7, 48)
    eager = model(x)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend=backend)
    out = compiled(x)
    torch.testing.assert_close(out, eager, rtol=1e-4, atol=1e-5)
    # the packed matmul reaches the graph as the custom op
    from torch._dynamo.testing import CompileCounterWithBackend

    cnt = CompileCounterWithBackend("eager")
    torch._dynamo.reset()
    torch.compile(model, fullgraph=True, backend=cnt)(x)
    assert cnt.frame_count == 1
    graph_ops = {str(node.target) for g in cnt.graphs for node in g.graph.nodes}
    assert any("medquant.packed_linear" in op for op in graph_ops), graph_ops


def _tiny_llama() -> nn.Module:
    try:
        from medquant.testing.zoo import ZOO_BY_NAME

        if "llama" in ZOO_BY_NAME:
            return ZOO_BY_NAME["llama"].build()
    except ImportError:
        pass
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=256)
    return LlamaForCausalLM(cfg).float().eval()


def test_compile_fullgraph_quantized_llama():
    pytest.importorskip("transformers")
    model = _tiny_llama()
    n = _quantize_linears(model, lambda lin: QuantConfig(4))
    assert n >= 2 * 7  # q, k, v, o, gate, up, down per layer (+ lm_head)
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        eager = model(input_ids=ids, use_cache=False).logits
        torch._dynamo.reset()
        compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
        out = compiled(input_ids=ids, use_cache=False).logits
    torch.testing.assert_close(out, eager, rtol=1e-4, atol=1e-4)


def test_compile_fullgraph_fake_quantize_rows_with_grad():
    def f(x, bits):
        return fake_quantize_rows(x, bits, False, mask_outside=True).sum()

    x = torch.randn(4, 30, requires_grad=True)
    bits = torch.tensor([2, 4, 8, 32])
    torch._dynamo.reset()
    out = torch.compile(f, fullgraph=True, backend="aot_eager")(x, bits)
    out.backward()
    _, inside = __import__("medquant.kernels", fromlist=["x"]).fake_quantize_rows_reference(
        x.detach(), bits, False, return_mask=True)
    assert torch.equal(x.grad, inside.float())


def test_benchmark_script_refuses_to_run_without_cuda():
    import subprocess
    import sys
    from pathlib import Path

    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the benchmark would run")
    repo = Path(__file__).resolve().parents[2]
    res = subprocess.run([sys.executable, "-m", "benchmarks.kernels", "--quick"], capture_output=True, text=True,
                         timeout=120, check=False, cwd=repo)
    assert res.returncode != 0
    assert "needs a CUDA GPU" in res.stderr
