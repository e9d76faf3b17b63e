"""benchmarks.bf16_rounding_attribution: the float32 emulation is the reference when nothing is rounded, each
rounding does what it names, and the attribution table is built from the measured rows."""
from __future__ import annotations

import math

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


def _blocks16(x: torch.Tensor, block: int) -> torch.Tensor:
    """16-bit integers per row and block, one block at a time in float64 (the test's own reference)."""
    out = torch.empty_like(x, dtype=torch.float64)
    for c0 in range(0, x.shape[1], block):
        blk = x[:, c0:c0 + block].double()
        t = blk.abs().amax(1, keepdim=True) / 32767
        out[:, c0:c0 + block] = torch.where(t > 0, torch.round(blk / torch.where(t > 0, t, 1.0)) * t, 0.0)
    return out


def test_outlier_modes_scale_large_columns_by_powers_of_two_or_keep_them_exact():
    """--outliers: a column 1000x its block's others is divided by 2^3 (cap 3) or 2^7 (cap 7) before the 16-bit
    blocks, so the block's other columns come out finer by that factor; "o<K>" keeps the K largest columns exact
    and the others' blocks are scaled without them."""
    model, _ = _make("llama_small", "W4g128", True)
    q = next(m for m in model.modules() if isinstance(m, QuantLinear))
    r = bra.RoundedLinear(q)
    b = r.block
    x = torch.randn(6, q.in_features, generator=torch.Generator().manual_seed(2))
    x[:, 3] *= 1000.0  # one large column in the first block: its max over rows / the block median ~ 1000 > 2^7
    plain = (_blocks16(x, b) - x.double()).abs()
    for cap in (3, 7):
        r.mode = f"c{cap}"
        scale = torch.ones(x.shape[1], dtype=torch.float64)
        for c0 in range(0, x.shape[1], b):  # per block: the lower median of the column maxima over the rows
            cm = x[:, c0:c0 + b].abs().amax(0).double().tolist()
            med = sorted(cm)[(len(cm) - 1) // 2]
            for j, v in enumerate(cm):
                scale[c0 + j] = 2.0 ** min(cap, max(0, math.floor(math.log2(v / med))))
        assert scale[3] == 2.0 ** cap
        want = _blocks16((x.double() / scale).float(), b) * scale
        got = bra._scaled_columns(x, b, cap)
        torch.testing.assert_close(got.double(), want, rtol=1e-7, atol=1e-6)  # float32 t * v
        with torch.no_grad():
            torch.testing.assert_close(r(x), got @ r.weight.t(), rtol=1e-5, atol=1e-6)
        err = (got.double() - x.double()).abs()
        others = [j for j in range(b) if j != 3]
        assert err[:, others].max() < plain[:, others].max() / (2 ** cap / 2)  # finer by about 2^cap
    r.mode = "o8"
    got = bra._outlier_columns(x, b, 8)
    top = x.abs().amax(0).topk(8).indices
    assert 3 in top.tolist() and torch.equal(got[:, top], x[:, top])
    xz = x.clone()
    xz[:, top] = 0.0
    rest = [j for j in range(x.shape[1]) if j not in top.tolist()]
    torch.testing.assert_close(got[:, rest].double(), _blocks16(xz, b)[:, rest], rtol=0, atol=1e-6)
    assert (got[:, rest].double() - x[:, rest].double()).abs().max() < plain[:, rest].max() / 100
    with torch.no_grad():
        torch.testing.assert_close(r(x), got @ r.weight.t(), rtol=1e-5, atol=1e-6)
    res = bra.attribute(model, [torch.randint(0, model.config.vocab_size, (1, 9))], decode_path=False, outliers=True)
    assert set(bra.OUTLIER_MODES) <= set(res)


def test_float_noise_modes_and_controls():
    """--float-noise: "f64" is the layer's product in float64 rounded once, "h2" the float32 sum of K's two
    halves (a different order, not a different product); the whole-model float64 and one-thread controls are
    rows of the result, and the thread count is restored after the one-thread control."""
    model, _ = _make("llama_small", "W4g128", True)
    q = next(m for m in model.modules() if isinstance(m, QuantLinear))
    r = bra.RoundedLinear(q)
    x = torch.randn(5, q.in_features, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        r.mode = "f64"
        assert torch.equal(r(x), (x.double() @ r.weight.double().t()).float())
        assert r(x.double()).dtype == torch.float64
        r.mode = "h2"
        h = q.in_features // 2
        assert torch.equal(r(x), x[:, :h] @ r.weight[:, :h].t() + x[:, h:] @ r.weight[:, h:].t())
        torch.testing.assert_close(r(x), x @ r.weight.t(), rtol=1e-5, atol=1e-5)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        seqs = [torch.randint(0, model.config.vocab_size, (1, 9), generator=torch.Generator().manual_seed(4))]
        res = bra.attribute(model, seqs, decode_path=False, float_noise=True)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)
    for label in (*bra.FLOAT_MODES, bra.WHOLE_FLOAT64, bra.ONE_THREAD):
        # float32 against float64 or another summation order: no next token of a tiny model moves
        assert res[label]["agreement"] == 1.0 and res[label]["ppl_rel_diff"] < 1e-4, label


def test_int8_modes_take_x_as_8_bit_integers_per_block():
    """``--int8``: ``x`` as 8-bit integers per 32 / 128 / 256 columns, the 128-column mode the CPU kernel's int8
    activations (its float32 emulation in the kernel tests); coarser than 16 bits, finer per smaller block."""
    from tests.kernels.test_native_gemv import _x_int8

    model, _ = _make("llama_small", "W4g128", True)
    q = next(m for m in model.modules() if isinstance(m, QuantLinear))
    r = bra.RoundedLinear(q)
    x = torch.randn(5, q.in_features, generator=torch.Generator().manual_seed(1))
    x[1, 3] = 30.0
    with torch.no_grad():
        for label, mode in bra.INT8_MODES.items():
            block = int(label.split()[2])
            r.mode = mode
            torch.testing.assert_close(r(x), _x_int8(x, block) @ r.weight.t(), rtol=1e-5, atol=1e-5)
    err = {b: float((bra._int_blocks(x, b, 8) - x).abs().max()) for b in (32, 128)}
    assert float((bra._int_blocks(x, 128, 16) - x).abs().max()) < err[128] / 100
    assert err[32] <= err[128] and err[128] > 0
    res = bra.attribute(model, [torch.randint(0, model.config.vocab_size, (1, 9))], decode_path=False, int8=True)
    assert set(bra.INT8_MODES) <= set(res)
