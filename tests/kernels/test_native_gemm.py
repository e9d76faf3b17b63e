"""medquant's native blocked matmul for many rows (the CPU backend's ``gemm`` path, prefill) against independent
references.

What it computes (``NativeGemv4.gemm``): ``x`` as 16-bit integers per block of columns ``c``,
``x~ = t * round_half_even(x / t)`` with ``t = max_{j in c} |x_j| / 32767``, times the exact dequantized weight,
integer sums within a block and float32 across blocks, a float32 output. The references: a float64 matmul of the
float32 input and the layer's dequantized weight (``(u - z) * s`` in float64), with the error bound that
quantization of ``x`` implies, ``|y - ref| <= sum_c t_c / 2 * sum_{j in c} |w_j|`` (checked with the row's largest
``t``) plus float32 summation; inputs that are integers with a block maximum of 32767 (then ``x~ = x`` and ``y``
must match to float32 rounding); the dense path and the torch reference path of the same layer.

On a CPU whose library lacks the kernel (``native_status()["gemm"]`` false: no AVX512-VNNI) the same layers take
the dense path, which these tests then assert instead.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

from medquant.kernels import (
    cpu_path,
    force_backend,
    get_cpu_prefill_kernel,
    set_cpu_compute_dtype,
    set_cpu_dense_min_m,
    set_cpu_native4_activations,
    set_cpu_prefill_kernel,
)
from medquant.kernels.cpu import cpu_plan, dense_min_m
from medquant.kernels.native import native_status
from medquant.quant import QuantConfig, QuantLinear
from tests.kernels.kernel_helpers import run_with_native_flags


@pytest.fixture(autouse=True)
def _restore(cpu_settings):
    set_cpu_compute_dtype(torch.bfloat16)


def _available() -> bool:
    return bool(native_status()["gemm"])


def _large_path() -> str:
    return "gemm" if _available() else "dense"


def _layer(n: int, k: int, cfg: QuantConfig, seed: int = 0) -> QuantLinear:
    g = torch.Generator().manual_seed(seed)
    lin = nn.Linear(k, n, bias=True)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(n, k, generator=g) * torch.exp(torch.randn(n, 1, generator=g)))
        lin.bias.copy_(torch.randn(n, generator=g))
    return QuantLinear.from_float(lin, cfg)


def _check_bound(y: torch.Tensor, x: torch.Tensor, layer: QuantLinear, bits: int) -> None:
    """``y`` within the error that 16-bit quantization of ``x`` per block (largest block maximum of the row) and
    float32 sums allow, around the float64 reference of the float32 input."""
    w = layer.dequantized_weight(torch.float64)
    ref = x.double() @ w.t() + layer.bias.double()
    t = x.double().abs().amax(1, keepdim=True) / 32767
    # float32 sums: the code sums and the zero-point term are summed apart (sum u x~ s - z s sum x~), so their
    # rounding scales with |u s| <= |w| + |z s|, not |w| alone (they cancel where u is near z)
    pw = layer.packed_weight(bits)
    n, k = w.shape
    ng = pw.scales.shape[1]
    sc = pw.scales.double().expand(n, ng)
    zc = pw.zeros.double().expand(n, ng) if pw.zeros is not None else torch.full((n, ng), 2.0 ** (pw.bits - 1))
    per = pw.k_pad // ng
    zs = (zc * sc).abs().repeat_interleave(per, 1)[:, :k]
    bound = t / 2 * w.abs().sum(1) + 2e-6 * (x.double().abs() @ (w.abs() + zs).t()) + 1e-30
    excess = ((y.double() - ref).abs() / bound).max()
    assert excess <= 1.0, float(excess)


CONFIGS = {
    "4sym-g128": QuantConfig(4, group_size=128),
    "4asym-g32": QuantConfig(4, symmetric=False, group_size=32),
    "4sym-g96": QuantConfig(4, group_size=96),  # blocks of 32 columns (96 is no multiple of 64)
    "4asym-tensor": QuantConfig(4, symmetric=False, scope="tensor"),
    "3sym-g128": QuantConfig(3, group_size=128),  # the dense 3-bit stream
    "3asym-g64-v1": QuantConfig(3, symmetric=False, group_size=64),  # 3-bit codes in 4-bit containers (layout 1)
    "5sym-channel": QuantConfig(5, scope="channel"),
    "6asym-g64": QuantConfig(6, symmetric=False, group_size=64),
    "7sym-g96": QuantConfig(7, group_size=96),
    "8sym-channel": QuantConfig(8, scope="channel"),
    "8asym-g32": QuantConfig(8, symmetric=False, group_size=32),
    "8sym-g512": QuantConfig(8, group_size=512),  # groups wider than a block: 128-column blocks inside
    "2asym-g64": QuantConfig(2, symmetric=False, group_size=64),
    "1sym-g32": QuantConfig(1, group_size=32),  # z = 1/2: the zero-point term is not an integer
}


@pytest.mark.parametrize("n,k", [(48, 576), (97, 200), (1, 40), (33, 1088)])  # padded K; N not a multiple of 32
@pytest.mark.parametrize("cfg_id", list(CONFIGS))
def test_gemm_matches_the_float64_reference_within_its_bound(cfg_id, n, k):
    cfg = CONFIGS[cfg_id]
    if cfg.scope == "group" and k < cfg.group_size:
        cfg = QuantConfig(cfg.bits, symmetric=cfg.symmetric, group_size=32)
    layer = _layer(n, k, cfg)
    if cfg_id.endswith("-v1"):
        layer = layer.to_layout(1)
    w = layer.packed_weight(cfg.bits)
    g = torch.Generator().manual_seed(1)
    for m in (32, 40, 45, 300):  # a last tile of 8 / 4 / 9 / 0 rows of 12 (the 8-, 4-, 12-row bodies)
        x = torch.randn(m, k, generator=g) * torch.exp(2 * torch.randn(1, k, generator=g))  # outlier columns
        path = cpu_path(x, w)
        plan = cpu_plan(w)
        if plan.gemv is not None:  # the native kernel's row group: the gemm, or the dense path without it
            expected = _large_path()
        elif plan.kind in (None, "dense"):  # no kernel takes the layer (no native library; the int4 op needs
            expected = plan.kind or "reference"  # N % 16 == 0), or only the dense path (widths 5..7)
        else:  # the torch int4 / int8 ops below their switch, the dense path above
            expected = plan.kind if not plan.f32_only and m < dense_min_m(plan.kind) else "dense"
        assert path == expected, (m, path)
        with torch.no_grad():
            y = layer(x)
        assert y.dtype == torch.float32
        if path == "gemm":
            _check_bound(y, x, layer, cfg.bits)
        else:  # the dense, int4 / int8 or reference path: bfloat16 weights and output (or bfloat16 activations)
            ref = x.double() @ layer.dequantized_weight(torch.float64).t() + layer.bias.double()
            assert float((y.double() - ref).abs().max() / ref.abs().max()) < 2e-2


@pytest.mark.parametrize("cfg", [QuantConfig(4, group_size=128), QuantConfig(8, scope="channel"),
                                 QuantConfig(3, symmetric=False, group_size=32)], ids=["4-g128", "8-ch", "3a-g32"])
def test_integer_inputs_at_full_scale_are_exact(cfg):
    """Inputs that are integers with a block maximum of 32767 are their own 16-bit form (t = 1): the integer
    products and sums are then exact and ``y`` is the float64 reference to float32 rounding, the largest
    product sums included (32767 x 255 x 128 for 8-bit codes stays within int32)."""
    if not _available():
        pytest.skip("needs the native blocked matmul (AVX512-VNNI); the dense path is tested above")
    n, k, m = 40, 512, 36
    layer = _layer(n, k, cfg)
    with torch.no_grad():  # a row of the weight at the largest code, so the block sums reach their bound
        layer.bias.zero_()
    g = torch.Generator().manual_seed(2)
    x = torch.randint(-32767, 32768, (m, k), generator=g).float()
    block = 128 if cfg.scope == "channel" or cfg.group_size % 128 == 0 else 32
    x.view(m, k // block, block)[:, :, 0] = 32767.0  # every block's maximum is 32767
    x[0] = 32767.0  # a row at full scale everywhere
    w = layer.dequantized_weight(torch.float64)
    assert cpu_path(x, layer.packed_weight(cfg.bits)) == "gemm"
    with torch.no_grad():
        y = layer(x)
    ref = x.double() @ w.t()
    err = ((y.double() - ref).abs() / (x.double().abs() @ w.abs().t())).max()
    assert err < 1e-6, float(err)


def test_gemm_is_closer_to_the_reference_than_the_dense_bf16_path():
    """The point of the kernel: the dense path rounds the weights and the output to bfloat16 (~2^-9 relative),
    the gemm path neither: on the same layer and input it is much closer to the float64 reference."""
    if not _available():
        pytest.skip("needs the native blocked matmul (AVX512-VNNI)")
    layer = _layer(256, 576, QuantConfig(4, group_size=128))
    x = torch.randn(64, 576)
    ref = x.double() @ layer.dequantized_weight(torch.float64).t() + layer.bias.double()
    with torch.no_grad():
        y_gemm = layer(x)
        set_cpu_prefill_kernel("dense")
        assert cpu_path(x, layer.packed_weight(4)) == "dense"
        y_dense = layer(x)

    def err(y):
        return float((y.double() - ref).abs().max() / ref.abs().max())
    assert err(y_gemm) < 1e-4 and err(y_dense) < 2e-2
    assert err(y_gemm) < err(y_dense) / 20


def test_bfloat16_inputs_return_bfloat16_and_float16_inputs_work():
    layer = _layer(64, 256, QuantConfig(4, group_size=64))
    x = torch.randn(40, 256)
    ref = x.double() @ layer.dequantized_weight(torch.float64).t() + layer.bias.double()
    with torch.no_grad():
        for dt in (torch.bfloat16, torch.float16):
            y = layer(x.to(dt))
            assert y.dtype == dt
            assert float((y.double() - ref).abs().max() / ref.abs().max()) < 1e-2


def test_inputs_that_are_not_finite_or_tiny_take_the_dense_path():
    """A NaN / infinity in x, or a block whose largest magnitude is below 2^-100 (its 16-bit scale would
    overflow): the kernel declines and the dense path computes the call, so the result is what torch gives."""
    layer = _layer(48, 256, QuantConfig(4, group_size=128))
    x = torch.randn(40, 256)
    x[3, 5] = float("nan")
    x[7, 200] = float("inf")
    x[9] = torch.randn(256) * 1e-35
    with torch.no_grad():
        y = layer(x)
        set_cpu_prefill_kernel("dense")
        y_dense = layer(x)
    torch.testing.assert_close(y, y_dense, equal_nan=True)
    assert torch.isnan(y[3]).all() and torch.isfinite(y[0]).all()
    ref9 = x[9].double() @ layer.dequantized_weight(torch.float64).t() + layer.bias.double()
    assert float((y[9].double() - ref9).abs().max() / ref9.abs().max()) < 2e-2


def test_gemm_agrees_with_the_decode_kernel_and_the_torch_reference():
    """The same rows through the gemm path (M = 40), the native decode kernel (M = 4: below the gemm's switch for
    float32 x; activations as 16-bit integers per 32 columns, the default, or split) and the torch reference path
    agree to the 16-bit input precision (split: to float32's)."""
    layer = _layer(96, 384, QuantConfig(3, group_size=128))
    x = torch.randn(40, 384)
    with torch.no_grad():
        y = layer(x)
        y_small = torch.cat([layer(x[i:i + 4]) for i in range(0, 40, 4)])
        set_cpu_native4_activations("split")
        y_split = torch.cat([layer(x[i:i + 4]) for i in range(0, 40, 4)])
        set_cpu_native4_activations(None)
        with force_backend("torch"):
            y_ref = layer(x)
    scale = y_ref.abs().max()
    tol = 1e-4 if _available() else 2e-2
    assert float((y - y_ref).abs().max() / scale) < tol
    # without the native decode kernel (no AVX512F + BW) M = 4 runs the torch int4 op on bfloat16 activations
    native = cpu_plan(layer.packed_weight(3)).gemv is not None
    assert float((y_small - y_ref).abs().max() / scale) < (1e-4 if native else 2e-2)
    assert float((y_split - y_ref).abs().max() / scale) < (1e-5 if native else 2e-2)


def test_the_setting_and_the_threshold():
    layer = _layer(64, 256, QuantConfig(4, group_size=128))
    w = layer.packed_weight(4)
    small = cpu_plan(w).kind  # native4, or the torch int4 op on a CPU without the native library
    assert get_cpu_prefill_kernel() == "gemm"
    assert cpu_path(torch.randn(32, 256), w) == _large_path()
    set_cpu_dense_min_m(64)
    assert cpu_path(torch.randn(48, 256), w) == small
    assert cpu_path(torch.randn(64, 256), w) == _large_path()
    set_cpu_prefill_kernel("dense")
    assert cpu_path(torch.randn(64, 256), w) == "dense"
    set_cpu_compute_dtype(torch.float32)  # float32 compute: the dense float32 GEMM at large M, whatever the setting
    set_cpu_prefill_kernel("gemm")
    assert cpu_path(torch.randn(64, 256), w) == "dense"
    with pytest.raises(ValueError, match="prefill kernel"):
        set_cpu_prefill_kernel("fast")


def test_float32_batches_switch_to_the_gemm_at_8_or_12_rows():
    """float32 x runs the gemm from fewer rows than bfloat16 x: native4 takes it as 16-bit integers (activations
    "int16", the default, where the library has vpdpwssd: one integer product per weight), from
    ``dense_min_m("gemm_int16")`` = 12 rows, or splits it into two bfloat16 halves (two products per weight:
    "split"), from ``dense_min_m("gemm_split")`` = 8 (a batch of 8 decoding sequences); bfloat16 x (one half), and float32 x with rounded activations, keep the native kernel up to
    16 rows. ``set_cpu_dense_min_m`` moves them all."""
    layer = _layer(64, 256, QuantConfig(4, group_size=128))
    w = layer.packed_weight(4)
    assert (dense_min_m("gemm_split"), dense_min_m("gemm_int16"), dense_min_m("gemm")) == (8, 12, 16)
    if cpu_plan(w).gemv is None:
        pytest.skip("the native decode kernel's switches (AVX512F + BW); without it the torch int4 op's rows "
                    "switch as test_native_gemv and test_cpu_backend check")
    big = "gemm" if _available() else "native4"  # without the gemm, native row groups keep their kernel to 32 rows
    for m, f32, b16 in ((7, "native4", "native4"), (11, "native4", "native4"), (12, big, "native4"),
                        (15, big, "native4"), (16, big, big)):
        assert cpu_path(torch.randn(m, 256), w) == f32, m
        assert cpu_path(torch.randn(m, 256, dtype=torch.bfloat16), w) == b16, m
    # rows the quad form does not end on take the int16 form too, from 12 rows where it runs (else split, from 8):
    # 224 columns (groups of 32: a unit, then blocks of 64 and 32 columns), 192 (a unit and a block of 64), groups
    # of 96 (a unit's quarters in two groups)
    f32_top = 12 if _available() else 8
    for k, cfg in ((224, QuantConfig(4, group_size=32)), (192, QuantConfig(4, group_size=64)),
                   (288, QuantConfig(4, group_size=96))):
        wk = _layer(64, k, cfg).packed_weight(4)
        assert cpu_path(torch.randn(f32_top - 1, k), wk) == "native4" and cpu_path(torch.randn(f32_top, k), wk) == big
    if _available():  # 8-bit containers take float32 x as 16-bit integers per 32 columns: the switch of split x
        w8 = _layer(64, 256, QuantConfig(8, scope="channel")).packed_weight(8)
        assert cpu_path(torch.randn(7, 256), w8) == "native8" and cpu_path(torch.randn(8, 256), w8) == "gemm"
    set_cpu_native4_activations("split")
    x = torch.randn(8, 256)
    assert cpu_path(x, w) == big
    with torch.no_grad():
        with force_backend("torch"):
            y_ref = layer(x)
        y = layer(x)
        assert y.dtype == torch.float32
        assert float((y - y_ref).abs().max() / y_ref.abs().max()) < (1e-4 if _available() else 2e-2)
        if _available():  # the gemm ran: its 16-bit inputs, not the split kernel's 2^-17 (this row is not exact)
            set_cpu_dense_min_m(9)
            y_native = layer(x)
            assert cpu_path(x, w) == "native4" and not torch.equal(y, y_native)
            set_cpu_dense_min_m(None)
    set_cpu_native4_activations("round")  # one bfloat16 half: no second product to save
    assert cpu_path(torch.randn(8, 256), w) == "native4" and cpu_path(torch.randn(15, 256), w) == "native4"
    set_cpu_native4_activations(None)
    set_cpu_dense_min_m(12)
    assert cpu_path(torch.randn(11, 256), w) == "native4" and cpu_path(torch.randn(12, 256), w) == _large_path()
    w224 = _layer(64, 224, QuantConfig(4, group_size=32)).packed_weight(4)
    assert cpu_path(torch.randn(11, 224), w224) == "native4"


def test_compiled_model_traces_the_dense_path_and_matches():
    """Under ``torch.compile`` the large-M call is traced on the dense path (no graph break), and matches the
    eager gemm call to bfloat16 accuracy."""
    layer = _layer(64, 256, QuantConfig(4, group_size=128))
    x = torch.randn(40, 256)
    with torch.no_grad():
        y_eager = layer(x)
        y_comp = torch.compile(layer, fullgraph=True, backend="aot_eager")(x)
    assert float((y_comp - y_eager).abs().max() / y_eager.abs().max()) < 2e-2


def test_the_environment_variable_is_read_at_import():
    """``$MEDQUANT_CPU_PREFILL_KERNEL`` sets the initial choice (case-insensitive); another value is ignored with
    a warning naming it."""
    import os
    import subprocess
    import sys

    code = "import medquant.kernels as k; print(k.get_cpu_prefill_kernel())"
    for env, want in (("dense", "dense"), ("DENSE", "dense"), ("gemm", "gemm"), ("fast", "gemm")):
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                             env={**os.environ, "MEDQUANT_CPU_PREFILL_KERNEL": env})
        assert out.stdout.strip() == want, (env, out.stdout, out.stderr)
        assert ("MEDQUANT_CPU_PREFILL_KERNEL" in out.stderr) == (env == "fast"), out.stderr


def test_rows_with_a_longer_stride_read_in_place():
    """``x`` whose rows are longer than ``k`` in memory (a column slice: unit column stride, row stride > k) is
    read in place and gives the contiguous copy's result bit for bit."""
    layer = _layer(40, 192, QuantConfig(4, group_size=64))
    big = torch.randn(33, 256)
    x = big[:, 16:208]
    assert x.stride() == (256, 1)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), layer(x.contiguous()), rtol=0, atol=0)


def test_a_quantized_model_prefills_on_the_gemm_path_like_the_reference_and_after_save_load(tmp_path):
    """A tiny LLaMA with mixed layouts (W4 g32 attention, dense 3-bit MLP, 8-bit head) in bfloat16 compute: one
    forward over 48 positions runs the gemm path, matches the torch reference path's logits to the gemm's input
    precision with the same next tokens, and does so again after ``save`` -> ``load``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    import medquant as mq
    from medquant.testing.zoo import text_kwargs

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**text_kwargs())).eval()
    mq.quantize_(model, mq.QuantConfig(bits=4, group_size=32), skip=["re:.*mlp.*", "lm_head"])
    mq.quantize_(model, mq.QuantConfig(bits=3, group_size=64), skip=["re:.*self_attn.*", "lm_head"])
    mq.quantize_(model, mq.QuantConfig(bits=8, scope="channel"), skip=["model"])
    ids = torch.randint(0, 256, (1, 48), generator=torch.Generator().manual_seed(1))
    q = model.model.layers[0].self_attn.q_proj
    assert cpu_path(torch.randn(48, q.in_features), q.packed_weight(4)) == _large_path()

    def check(m):
        with torch.no_grad():
            fast = m(input_ids=ids).logits.float()
            with force_backend("torch"):
                ref = m(input_ids=ids).logits.float()
        err = float((fast - ref).abs().max() / ref.abs().max())
        assert err < (1e-4 if _available() else 2e-2), err
        if _available():
            assert torch.equal(fast.argmax(-1), ref.argmax(-1))
        return fast

    before = check(model)
    mq.save(model, tmp_path / "ckpt")
    loaded = mq.load(tmp_path / "ckpt")
    after = check(loaded)
    torch.testing.assert_close(after, before, rtol=0, atol=0)


@pytest.mark.parametrize(("dtype", "tokens"), [(torch.float32, 40), (torch.float32, 12), (torch.bfloat16, 40)])
def test_a_compiled_prefill_of_bound_layers_gives_the_eager_logits(dtype, tokens):
    """A compiled forward over many tokens (a prefill) of a model whose layers are bound to their CPU kernels
    (bfloat16 compute) runs what an eager forward runs: the blocked matmul by handle (``medquant::gemv4_bound`` in
    its gemm mode) where eager calls take it (float32 ``x`` from 8 or 12 rows, bfloat16 ``x`` from 16), not a traced
    bfloat16 dequantize + GEMM; the logits are bit-equal to eager's."""
    from transformers import LlamaConfig, LlamaForCausalLM

    import medquant as mq
    from medquant.kernels.native import GEMM_XMODE
    from medquant.testing.zoo import text_kwargs

    if not _available():
        pytest.skip("needs the native blocked matmul (AVX512-VNNI)")
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**text_kwargs())).eval().to(dtype)
    mq.quantize_(model, QuantConfig(4, group_size=32))
    ids = torch.randint(1, 100, (1, tokens))
    graphs: list[torch.fx.GraphModule] = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    with torch.no_grad():
        eager = model(input_ids=ids).logits
        assert all(m.bind_cpu_kernels() for m in model.modules() if isinstance(m, QuantLinear))
        compiled = torch.compile(model, backend=backend, fullgraph=True)(input_ids=ids).logits
    assert torch.equal(compiled, eager)
    calls = [n for g in graphs for n in g.graph.nodes if n.op == "call_function"]
    bound = [n for n in calls if "gemv4_bound" in str(n.target)]
    assert len(bound) == sum(isinstance(m, QuantLinear) for m in model.modules()), {str(n.target) for n in calls}
    assert all(n.args[3] == GEMM_XMODE for n in bound)
    torch._dynamo.reset()


_NO_BF16_CHILD = r'''
import warnings
import torch
from torch import nn
import medquant.kernels.cpu as cpu
from medquant.kernels import cpu_path, set_cpu_compute_dtype
from medquant.kernels.native import native_status
from medquant.quant import QuantConfig, QuantLinear

st = native_status()
assert st["active"] and st["gemm"] and not st["gemv4_bf16"], st  # VNNI compiled in, bfloat16 products not
real = cpu.cpu_features()
cpu.cpu_features = lambda: {**real, "avx512_bf16": False, "amx_bf16": False, "native_bf16": False}
set_cpu_compute_dtype(torch.bfloat16)
g = torch.Generator().manual_seed(0)


def layer(n, k, cfg):
    lin = nn.Linear(k, n, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(n, k, generator=g))
    return QuantLinear.from_float(lin, cfg)


def x16(x, block):  # x as 16-bit integers per block: t * round_half_even(x / t), t = max |x| / 32767
    m, k = x.shape
    xp = torch.nn.functional.pad(x, (0, -k % block)).view(m, -1, block)
    amax = xp.abs().amax(-1, keepdim=True)
    v = torch.round(xp * torch.where(amax > 0, 32767.0 / amax, torch.zeros(())))
    return (v * (amax / 32767.0)).view(m, -1)[:, :k]


def rel(y, ref):
    return float((y.double() - ref).abs().max() / ref.abs().max())


w4 = layer(64, 576, QuantConfig(4, group_size=128))
w2 = layer(64, 576, QuantConfig(2, group_size=64))
d4, d2 = w4.dequantized_weight(torch.float64), w2.dequantized_weight(torch.float64)
with warnings.catch_warnings(record=True) as caught, torch.no_grad():
    warnings.simplefilter("always")
    x1, x40 = torch.randn(1, 576, generator=g), torch.randn(40, 576, generator=g)
    assert cpu_path(x1, w4.packed_weight(4)) == "native4" and cpu_path(x40, w4.packed_weight(4)) == "gemm"
    # decode: x as 16-bit integers per 32 columns (vpdpwssd); prefill: the gemm, per 128 columns (the group)
    assert rel(w4(x1), x16(x1, 32).double() @ d4.t()) < 1e-5
    assert rel(w4(x40), x16(x40, 128).double() @ d4.t()) < 1e-5
    # a 2-bit layer splits x: without bfloat16 products, the float32 FMA form on x itself
    assert rel(w2(x1), x1.double() @ d2.t()) < 1e-5
    # a bfloat16 x: the FMA form on its (exact) values, the float32 sum rounded to bfloat16 once
    xb = x1.bfloat16()
    yb = w4(xb)
    assert yb.dtype == torch.bfloat16 and rel(yb.float(), xb.double() @ d4.t()) < 8e-3
msgs = [str(w.message) for w in caught if "compute dtype bfloat16" in str(w.message)]
assert len(msgs) == 1 and "16-bit integers" in msgs[0] and "AVX512-VNNI" in msgs[0], msgs
print(st["library"])
print("ok")
'''


def test_a_cpu_with_vnni_but_no_bfloat16_runs_the_integer_forms(tmp_path):
    """A CPU with AVX512-VNNI but without AVX512-BF16 (Cascade Lake, Ice Lake), simulated in a child process: the
    library built with ``-mno-avx512bf16`` (in its own cache folder) and ``cpu_features`` reporting no bfloat16.
    With a bfloat16 compute dtype a float32 input still takes the integer forms, which need no bfloat16
    arithmetic: 16-bit integers per 32 columns at ``M = 1``, the gemm at ``M = 40``, each equal to the float64
    emulation of its ``x~``; a 2-bit layer's split ``x`` and a bfloat16 ``x`` run the float32 FMA form (exact
    products); the one warning says so instead of calling bfloat16 slow."""
    if not _available():
        pytest.skip("needs a library with AVX512-VNNI (the integer forms)")
    # gcc and clang both take -mno-avx512bf16
    run_with_native_flags(_NO_BF16_CHILD, "-mno-avx512bf16", tmp_path, MEDQUANT_CPU_COMPUTE_DTYPE="bfloat16")
