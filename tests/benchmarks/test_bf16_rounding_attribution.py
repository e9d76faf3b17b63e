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
        # x as b-bit integers per block of columns, computed here one block at a time in float64
        for bits in (16, 18, 20):
            r.mode = f"q{bits}"
            xq = torch.empty_like(x, dtype=torch.float64)
            for c0 in range(0, x.shape[1], r.block):
                blk = x[:, c0:c0 + r.block].double()
                t = blk.abs().amax(1, keepdim=True) / (2 ** (bits - 1) - 1)
                xq[:, c0:c0 + r.block] = torch.round(blk / t) * t
                assert (blk / t).abs().max() <= 2 ** (bits - 1) - 1 + 1e-9
            torch.testing.assert_close(r(x), xq.float() @ r.weight.t(), rtol=1e-5, atol=1e-6)
        # smaller blocks (--where): the same arithmetic per 16 columns
        r.mode = "q16b16"
        torch.testing.assert_close(r(x), bra._int_blocks(x, 16, 16) @ r.weight.t(), rtol=1e-5, atol=1e-6)
        assert r.block != 16 and not torch.equal(bra._int_blocks(x, 16, 16), bra._int_blocks(x, r.block, 16))
        # x exact in the named layers only, the gemm's 16-bit blocks in the others
        r.name = "down_proj"
        r.mode = "e:down_proj"
        torch.testing.assert_close(r(x), x @ r.weight.t(), rtol=1e-5, atol=1e-6)
        r.mode = "e:q_proj,k_proj"
        torch.testing.assert_close(r(x), bra._int_blocks(x, r.block, 16) @ r.weight.t(), rtol=1e-5, atol=1e-6)
        err = {b: float((bra._int_blocks(x, r.block, b) - x).abs().max()) for b in (16, 18, 20)}
        assert err[20] < err[18] / 3 < err[16] / 9 and err[16] > 0
        # two bfloat16 halves: 16 significant bits of each element
        r.mode = "s"
        hi = x.bfloat16().float()
        xs = hi + (x - hi).bfloat16().float()
        assert (xs - x).abs().le(x.abs() * 2.0 ** -16).all() and not torch.equal(xs, hi)
        torch.testing.assert_close(r(x), xs @ r.weight.t(), rtol=1e-5, atol=1e-6)


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
    assert f"| W4g128 | {res['reference_ppl']:.4g} | 100.0% / 0.00% |" in table
    assert "head quantized" in table
    table = bra.markdown({"date": "d", "prompts": 2, "tokens": 16, "head": "float",
                          "rows": [{"variant": "W4g128", "modes": res}]})
    assert "SmolLM2-135M, head float," in table
