"""benchmarks.bf16_rounding_attribution: the float32 emulation is the reference when nothing is rounded, each
rounding does what it names, and the attribution table is built from the measured rows."""
from __future__ import annotations

import torch

from benchmarks import bf16_rounding_attribution as bra
from benchmarks.cpu_inference import _make
from medquant.kernels import force_backend
from medquant.quant import QuantLinear


def test_rounded_linear_against_the_reference_layer():
    model, _ = _make("llama_small", "W4g128", True)
    q = next(m for m in model.modules() if isinstance(m, QuantLinear))
    r = bra.RoundedLinear(q)
    x = torch.randn(5, q.in_features, generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), force_backend("torch"):
        ref = q(x)
    with torch.no_grad():
        r.mode = ""
        torch.testing.assert_close(r(x), ref, rtol=1e-5, atol=1e-6)
        r.mode = "x"
        torch.testing.assert_close(r(x), x.bfloat16().float() @ r.weight.t(), rtol=1e-5, atol=1e-6)
        r.mode = "w"
        torch.testing.assert_close(r(x), x @ r.weight.bfloat16().float().t(), rtol=1e-5, atol=1e-6)
        r.mode = "y"
        y = r(x)
        assert torch.equal(y, y.bfloat16().float()) and not torch.equal(y, ref)


def test_attribution_control_is_exact_and_rounding_moves_the_logits():
    model, _ = _make("llama_small", "W4g128", True)
    g = torch.Generator().manual_seed(1)
    seqs = [torch.randint(0, model.config.vocab_size, (1, 17), generator=g) for _ in range(2)]
    res = bra.attribute(model, seqs, decode_path=True)
    assert res["tokens"] == 32
    assert res["exact"]["agreement"] == 1.0 and res["exact"]["ppl_rel_diff"] < 1e-5
    assert res["x+W+y"]["ppl_rel_diff"] > res["exact"]["ppl_rel_diff"]
    for label in ("fast prefill path", "fast decode path"):
        assert 0.0 <= res[label]["agreement"] <= 1.0 and res[label]["ppl"] > 0
    table = bra.markdown({"date": "d", "prompts": 2, "tokens": 16, "rows": [{"variant": "W4g128", "modes": res}]})
    assert "| W4g128 | 100.0% / 0.00% |" in table
