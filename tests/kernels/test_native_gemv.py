"""medquant's native 4-bit weight-only matmul (the CPU backend's ``native4`` path) against independent references.

Reference: ``x~ @ W^T`` in float64, ``W`` the layer's dequantized weight (``(u - z) * s``) and ``x~`` the input
as the kernel takes it: rounded to the compute dtype, except a float32 input with a bfloat16 compute dtype, which
enters with ``set_cpu_native4_activations("int16")`` (the default) where the library has AVX512-VNNI as
16-bit integers per 32 columns (reference: ``t * round_half_even(x / t)``, ``t`` the 32 columns' largest
magnitude / 32767, computed here in float32 with torch), and elsewhere or with ``"split"`` as ``hi + lo``, two
bfloat16 halves, i.e. to a relative 2^-17 (reference: ``x`` itself). The kernel multiplies the integer codes
exactly and sums in float32, and its output is float32, so it matches that reference to ~1e-6 (at most 1e-5)
relative in every compute dtype; where the caller's dtype is bfloat16 the output is rounded to it (bf16 tolerance). The other oracles: aten's int4 kernel and the torch
reference path on the same layer, transformers' own model (logits), a float64 matmul.

On a CPU whose library has no AVX512 kernel (``native_status()["gemv4"]`` false) the same tests assert the
fallback instead: the rows run aten's int4 kernel (or the reference) and give the same results.
"""
from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import medquant as mq
from medquant.kernels import (
    clear_cpu_cache,
    cpu_cache_bytes,
    cpu_path,
    force_backend,
    set_cpu_compute_dtype,
    set_cpu_dense_min_m,
    set_cpu_int4_kernel,
    set_cpu_native4_activations,
    set_cpu_prefill_kernel,
)
from medquant.kernels.cpu import NATIVE_INT16_MIN_BITS, cpu_plan
from medquant.kernels.layout import storage_bits
from medquant.kernels.native import gemv4_bound_op, gemv4_decline, native_gemv4, native_status
from medquant.quant import QuantConfig, QuantLinear
from tests.kernels.kernel_helpers import native_int16, run_with_native_flags


@pytest.fixture(autouse=True)
def _restore(cpu_settings):
    set_cpu_int4_kernel("auto")


def _available() -> bool:
    return bool(native_status()["gemv4"])


def _small_path() -> str:
    """The path 4-bit rows take below the dense threshold here."""
    return "native4" if _available() else "int4"


def _rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y.double() - ref).abs().max() / ref.abs().max().clamp_min(1e-12))


def _layer(n: int, k: int, cfg: QuantConfig, seed: int = 0, bias: bool = False) -> QuantLinear:
    g = torch.Generator().manual_seed(seed)
    lin = nn.Linear(k, n, bias=bias)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(n, k, generator=g) * torch.exp(torch.randn(n, 1, generator=g)))
        if bias:
            lin.bias.copy_(torch.randn(n, generator=g))
    return QuantLinear.from_float(lin, cfg)


def _x_int16(x: torch.Tensor) -> torch.Tensor:
    """``x`` as the int16 activations take it: per row and 32 columns (zeros past ``k`` to whole 32),
    ``t = max |x| / 32767`` and ``t * round_half_even(x * (32767 / max |x|))``, in float32 as the kernel rounds."""
    m, k = x.shape
    xp = torch.nn.functional.pad(x.float(), (0, -k % 32)).view(m, -1, 32)
    amax = xp.abs().amax(-1, keepdim=True)
    inv = torch.where(amax > 0, torch.tensor(32767.0) / amax, torch.zeros(()))
    v = torch.round(xp * inv)  # half to even, of the float32 product
    return (v * (amax / 32767.0)).view(m, -1)[:, :k]


def _x_int8(x: torch.Tensor, block: int) -> torch.Tensor:
    """``x`` as the int8 activations take it: per row and ``block`` columns from column 0 (zeros past ``k``),
    ``t = max |x| / 127`` and ``t * round_half_even(x * (127 / max |x|))``, in float32 as the kernel rounds."""
    m, k = x.shape
    xp = torch.nn.functional.pad(x.float(), (0, -k % block)).view(m, -1, block)
    amax = xp.abs().amax(-1, keepdim=True)
    inv = torch.where(amax > 0, torch.tensor(127.0) / amax, torch.zeros(()))
    return (torch.round(xp * inv) * (amax / 127.0)).view(m, -1)[:, :k]


def _int8_block(gemv) -> int:
    """The int8 form's activation block: 128 columns for one group per row, else the largest of 128 / 64 / 32
    dividing the kernel's group."""
    blocks = gemv.ge // 32
    return 128 if gemv.ge >= gemv.kp or blocks % 4 == 0 else 64 if blocks % 2 == 0 else 32


def _ref(layer: QuantLinear, x: torch.Tensor, cd: torch.dtype | str) -> torch.Tensor:
    """``x~ @ W^T + b`` in float64, ``x~`` as the kernel takes ``x``: rounded to ``cd``, or ``"int16"``
    (:func:`_x_int16`)."""
    xt = _x_int16(x) if cd == "int16" else x.to(cd)
    y = xt.double() @ layer.dequantized_weight(torch.float64).t()
    return y + layer.bias.double() if layer.bias is not None else y


CONFIGS = {  # id -> (config, layout version)
    "4sym-g128": (QuantConfig(4, group_size=128), 2),
    "4asym-g32": (QuantConfig(4, symmetric=False, group_size=32), 2),
    "4sym-g96": (QuantConfig(4, group_size=96), 2),  # a block of 64 columns straddles two groups
    "3asym-g64-v1": (QuantConfig(3, symmetric=False, group_size=64), 1),  # 3-bit codes in 4-bit containers
    "4sym-channel": (QuantConfig(4, scope="channel"), 2),
    "4asym-tensor": (QuantConfig(4, symmetric=False, scope="tensor"), 2),
    "8sym-channel": (QuantConfig(8, scope="channel"), 2),  # 8-bit containers: native8
    "8asym-g32": (QuantConfig(8, symmetric=False, group_size=32), 2),  # llama.cpp's Q8_0 layout, asymmetric
    "6asym-g64-v1": (QuantConfig(6, symmetric=False, group_size=64), 1),  # 6-bit codes in 8-bit containers
    # streams (native<b>): the dense version-2 layout and 1- / 2-bit containers, read in place at their width
    "3sym-g128": (QuantConfig(3, group_size=128), 2),  # dense 3-bit: 32 codes in 3 words
    "3asym-g32": (QuantConfig(3, symmetric=False, group_size=32), 2),
    "5sym-channel": (QuantConfig(5, scope="channel"), 2),  # dense 5-bit
    "6asym-g64": (QuantConfig(6, symmetric=False, group_size=64), 2),  # dense 6-bit (codes >= 32: widened form)
    "7sym-g96": (QuantConfig(7, group_size=96), 2),  # dense 7-bit, groups of three blocks
    "2asym-g64": (QuantConfig(2, symmetric=False, group_size=64), 2),  # 2-bit containers (K_pad % 32 may be 16)
    "2sym-tensor": (QuantConfig(2, scope="tensor"), 2),
    "1sym-g32": (QuantConfig(1, group_size=32), 2),  # 1-bit symmetric: (2u - 1) s
}


@pytest.mark.filterwarnings("ignore:medquant CPU kernels:RuntimeWarning")
@pytest.mark.parametrize("cd", [torch.bfloat16, torch.float32, torch.float16], ids=["bf16", "fp32", "fp16"])
@pytest.mark.parametrize("n,k", [(48, 576), (97, 200), (1, 40)])  # K padded (200, 40); N odd; one row
@pytest.mark.parametrize("cfg_id", list(CONFIGS))
def test_native4_matches_the_float64_reference(cfg_id, n, k, cd):
    cfg, version = CONFIGS[cfg_id]
    if cfg.scope == "group" and k % cfg.group_size and k < cfg.group_size:
        cfg = QuantConfig(cfg.bits, symmetric=cfg.symmetric, group_size=32)
    set_cpu_compute_dtype(cd)
    layer = _layer(n, k, cfg, bias=True)
    if version == 1:
        layer = layer.to_layout(1)
    w = layer.packed_weight(cfg.bits)
    native = _available() and gemv4_decline(w) is None
    kind = f"native{storage_bits(cfg.bits, w.dense)}"
    assert native or not _available() or (kind not in ("native4", "native8") and not native_status()["gemv_stream"])
    gemv = cpu_plan(w).gemv if native else None
    # 1- and 2-bit layers split float32 x (their models lose next tokens to 16-bit integer x)
    int16 = gemv is not None and gemv.int16_form and cfg.bits >= NATIVE_INT16_MIN_BITS
    for act in ("int16", "split", "round") if cd == torch.bfloat16 else ("int16",):
        set_cpu_native4_activations(act)
        # what x enters as (bf16 compute): 16-bit integers where int16 and the kernel has the form (every layout
        # where the library has vpdpwssd), float32 itself where split; else rounded to the compute dtype
        form = "" if cd != torch.bfloat16 or act == "round" else "int16" if act == "int16" and int16 else "split"
        x_cd = {"int16": "int16", "split": torch.float32}.get(form, cd)
        g = torch.Generator().manual_seed(1)
        # just below the switch: the blocked matmul takes bf16-compute rows from 16 on, float32 rows taken as int16
        # from 12 on by 4-bit containers (8 by the others: per-block scaling), split ones from 8 on
        # (test_native_gemm.py)
        top = ({"int16": 11 if kind == "native4" else 7, "split": 7}.get(form, 15)
               if cd == torch.bfloat16 and native_status()["gemm"] else 31)
        for m in [m for m in (1, 5, 8, 13) if m < top] + [top]:
            x = torch.randn(m, k, generator=g)
            path = cpu_path(x, w)
            if native:
                assert path == kind, (m, path)
            with torch.no_grad():
                y = layer(x)
                yb = layer(x.bfloat16())
            assert y.dtype == torch.float32 and yb.dtype == torch.bfloat16
            if native:  # exact products, float32 sums and a float32 output
                err = _rel_err(y, _ref(layer, x, x_cd))
                assert err < 1e-5, (act, m, err)
                if x_cd != cd:  # and measurably closer than with x rounded to bfloat16 (it is not rounded)
                    assert _rel_err(y, _ref(layer, x, cd)) > 1e-4, (act, m)
            else:
                assert _rel_err(y, _ref(layer, x, cd)) < (1e-5 if cd == torch.float32 else 2e-2)
            assert _rel_err(yb, _ref(layer, x.bfloat16().float(), cd)) < 1e-2


def test_native4_is_closer_to_the_reference_than_aten_int4_and_agrees_with_it():
    """Same layer, bfloat16 compute: aten's kernel rounds the activations, its scales and its output to
    bfloat16, the native one none of them (split activations, the default); both stay within the bf16 tolerance of
    the float64 reference of the float32 input."""
    if not _available():
        pytest.skip("needs the native 4-bit kernel (AVX512F + BW); the fallback is tested elsewhere")
    set_cpu_compute_dtype(torch.bfloat16)
    layer = _layer(64, 576, QuantConfig(4, group_size=128))
    x = torch.randn(4, 576, generator=torch.Generator().manual_seed(3))  # not the global RNG: order-independent
    ref = _ref(layer, x, torch.float32)
    with torch.no_grad():
        y_native = layer(x)
        set_cpu_int4_kernel("aten")
        assert cpu_path(x, layer.packed_weight(4)) == "int4"
        y_aten = layer(x)
    e_native, e_aten = _rel_err(y_native, ref), _rel_err(y_aten, ref)
    assert e_native < 2e-5 and e_aten < 2e-2  # split x: a relative 2^-17 per element, float32 sums
    assert e_native < e_aten / 10
    assert _rel_err(y_native, y_aten.double()) < 2e-2


def test_native4_holds_no_repacked_copy_of_the_weight():
    """The memory point of the native kernel: aten's int4 kernel keeps its own packed copy (4 bits per weight
    beside medquant's codes); the native one reads the layer's codes and its float16 scales in place, and holds
    only the symmetric zero point 2^(b-1), one float32 value."""
    set_cpu_compute_dtype(torch.bfloat16)
    n, k = 256, 1024
    layer = _layer(n, k, QuantConfig(4, group_size=128))  # float16 scales: read in place
    x = torch.randn(1, k)
    with torch.no_grad():
        layer(x)
    native_bytes = cpu_cache_bytes()
    gemv = cpu_plan(layer.packed_weight(4)).gemv
    set_cpu_int4_kernel("aten")
    with torch.no_grad():
        layer(x)
    aten_bytes = cpu_cache_bytes()
    assert aten_bytes >= n * k // 2  # the repacked 4-bit codes
    if _available():
        assert native_bytes == 4  # the one float32 zero point
        assert gemv is not None and gemv.s.data_ptr() == layer.packed_weight(4).scales.data_ptr()
        assert gemv.z.numel() == 1
    else:
        assert native_bytes == aten_bytes


def test_dense_threshold_applies_to_the_native_kernel():
    set_cpu_compute_dtype(torch.bfloat16)
    layer = _layer(64, 256, QuantConfig(4, group_size=128))
    w = layer.packed_weight(4)
    small = _small_path()
    if native_status()["gemm"]:  # the native blocked matmul takes over from 16 rows (set_cpu_prefill_kernel),
        # from 12 for float32 rows the kernel takes as 16-bit integers (from 8 for ones it would split)
        assert [cpu_path(torch.randn(m, 256, dtype=torch.bfloat16), w) for m in (1, 15, 16, 31)] == \
            [small, small, "gemm", "gemm"]
        assert [cpu_path(torch.randn(m, 256), w) for m in (1, 11, 12, 31)] == [small, small, "gemm", "gemm"]
    set_cpu_prefill_kernel("dense")
    assert [cpu_path(torch.randn(m, 256), w) for m in (1, 31, 32)] == [small, small, "dense"]
    set_cpu_dense_min_m(100)
    assert cpu_path(torch.randn(80, 256), w) == small
    x = torch.randn(80, 256)
    with torch.no_grad():
        assert _rel_err(layer(x), _ref(layer, x, torch.bfloat16)) < 2e-2


def test_float32_compute_runs_the_native_kernel_at_small_m_and_is_exact():
    """A CPU without bf16 (simulated: float32 compute dtype) keeps the native kernel below the dense threshold
    (aten's int4 kernel is used with float32 activations at M = 1 only)."""
    set_cpu_compute_dtype(torch.float32)
    layer = _layer(64, 256, QuantConfig(4, group_size=64))
    for m in (1, 7, 300):
        x = torch.randn(m, 256)
        expect = ("native4" if m < 32 else "dense") if _available() else ("int4" if m == 1 else "dense")
        assert cpu_path(x, layer.packed_weight(4)) == expect
        with torch.no_grad():
            assert _rel_err(layer(x), _ref(layer, x, torch.float32)) < 1e-5


def test_native_disabled_falls_back_correctly(monkeypatch):
    """``$MEDQUANT_NATIVE=0`` is read when a row group is planned: after ``clear_cpu_cache()`` the rows run aten's
    int4 kernel, and the dense path dequantizes with eager torch; the results stay correct."""
    set_cpu_compute_dtype(torch.bfloat16)
    layer = _layer(64, 256, QuantConfig(4, group_size=128))
    ref_small = _ref(layer, torch.ones(1, 256), torch.bfloat16)
    x = torch.randn(2, 256)
    ref = _ref(layer, x, torch.bfloat16)
    with torch.no_grad():
        y0 = layer(x)
        monkeypatch.setenv("MEDQUANT_NATIVE", "0")
        clear_cpu_cache()
        assert cpu_path(x, layer.packed_weight(4)) == "int4"
        y1 = layer(x)
        y2 = layer(torch.ones(1, 256))
        y3 = layer(torch.randn(40, 256))  # dense path, eager dequantization
    assert y3.shape == (40, 64)
    for y, r in ((y0, ref), (y1, ref), (y2, ref_small)):
        assert _rel_err(y, r) < 2e-2


def test_row_strided_input_runs_without_a_copy_and_a_transposed_one_is_copied_with_a_warning():
    set_cpu_compute_dtype(torch.bfloat16)
    layer = _layer(64, 200, QuantConfig(4, group_size=64))
    big = torch.randn(6, 400)
    x = big[:, :200]  # rows 400 apart, unit column stride: the kernel reads it in place
    with warnings.catch_warnings():
        # no copy (the one-time "bfloat16 runs slowly" warning of a CPU without bfloat16 support may come)
        warnings.filterwarnings("error", message=".*non-contiguous")
        with torch.no_grad():
            y = layer(x)
    assert _rel_err(y, _ref(layer, x, torch.bfloat16)) < 1e-2
    xt = torch.randn(200, 6).t()
    with pytest.warns(RuntimeWarning, match="non-contiguous"), torch.no_grad():
        yt = layer(xt)
    assert _rel_err(yt, _ref(layer, xt, torch.bfloat16)) < 1e-2


def test_bad_input_to_the_bound_kernel_is_refused():
    if not _available():
        pytest.skip("needs the native 4-bit kernel")
    layer = _layer(32, 64, QuantConfig(4, group_size=32))
    from medquant.kernels.cpu import _scale_zero

    w = layer.packed_weight(4)
    gemv = native_gemv4(w, *_scale_zero(w))
    assert gemv is not None
    for bad in (torch.randn(2, 63), torch.randn(2, 64, dtype=torch.float64), torch.randn(64, 2).t(),
                torch.randn(64)):
        with pytest.raises(ValueError, match="unit column stride"):
            gemv(bad, 1)
    with pytest.raises(ValueError, match="xmode"):
        gemv(torch.randn(2, 64), 5)
    assert gemv4_decline(_layer(32, 64, QuantConfig(4, group_size=16)).packed_weight(4)) is not None
    # 2-bit containers and the dense 3-bit layout: taken where the library has the stream kernel (AVX512-VBMI)
    stream = bool(native_status()["gemv_stream"])
    for b in (2, 3):
        reason = gemv4_decline(_layer(32, 64, QuantConfig(b, group_size=32)).packed_weight(b))
        assert (reason is None) == stream, reason
        if not stream:
            assert "AVX512-VBMI" in reason


@pytest.mark.filterwarnings("ignore:medquant CPU kernels:RuntimeWarning")
def test_mixed_bit_layer_4bit_rows_native_others_on_their_kernels():
    set_cpu_compute_dtype(torch.bfloat16)
    bits = (4,) * 32 + (2,) * 16 + (8,) * 16 + (3,) * 8 + (0,) * 4 + (16,) * 4
    perm = torch.randperm(len(bits), generator=torch.Generator().manual_seed(0)).tolist()
    cfg = QuantConfig(4, scope="channel", channel_bits=tuple(bits[i] for i in perm))
    layer = _layer(len(bits), 320, cfg, bias=True)
    x = torch.randn(1, 320)
    kinds = {b: cpu_path(x, layer.packed_weight(b)) for b in (2, 3, 4, 8)}
    # the 8 dense 3-bit rows: no aten kernel takes 8 rows (a multiple of 16), the native stream kernel takes any
    stream = _available() and bool(native_status()["gemv_stream"])
    assert kinds == {2: "native2" if stream else "int4", 3: "native3" if stream else "reference", 4: _small_path(),
                     8: "native8" if _available() else "int8"}
    for m in (1, 5, 300):
        x = torch.randn(m, 320)
        with torch.no_grad():
            assert _rel_err(layer(x), _ref(layer, x, torch.bfloat16)) < 2e-2


def _llama(tied: bool = False):
    from transformers import LlamaConfig, LlamaForCausalLM

    from medquant.testing.zoo import text_kwargs

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**text_kwargs(tie_word_embeddings=tied))).eval()


@pytest.mark.filterwarnings("ignore:medquant CPU kernels:RuntimeWarning")
def test_quantized_llama_runs_native4_everywhere_and_survives_save_load(tmp_path):
    """Every 4-bit layer (the head included) on the native kernel; save -> load gives the same codes, the same
    path and bit-identical logits; the file holds medquant's codes (no kernel copy); logits agree with the
    torch reference path of the same model."""
    from safetensors import safe_open

    from medquant.io import WEIGHTS_NAME

    set_cpu_compute_dtype(torch.bfloat16)
    model = _llama()
    mq.quantize_(model, QuantConfig(4, group_size=64))
    qlayers = {name: m for name, m in model.named_modules() if isinstance(m, QuantLinear)}
    assert "lm_head" in qlayers
    assert {cpu_path(torch.randn(1, q.in_features), q.packed_weight(4)) for q in qlayers.values()} == \
        {_small_path()}
    ids = torch.randint(0, 200, (1, 9))
    with torch.no_grad():
        model(ids)  # prefill (M = 9: the small-M kernel)
        before = model(ids[:, :1]).logits
        with force_backend("torch"):
            ref = model(ids[:, :1]).logits
    assert _rel_err(before, ref.double()) < 5e-2
    path = mq.save(model, tmp_path / "m")
    with safe_open(str(path / WEIGHTS_NAME), "pt") as f:
        sizes = {k: f.get_slice(k).get_shape() for k in f.keys() if k.endswith("qweight_4")}  # noqa: SIM118
    for name, q in qlayers.items():
        assert sizes[f"{name}.qweight_4"] == list(q.qweight_4.shape)  # medquant's packed words, 8 codes each
        assert q.qweight_4.shape[1] * 8 == -(-q.in_features // 8) * 8
    loaded = mq.load(path).eval()
    for name, q in loaded.named_modules():
        if isinstance(q, QuantLinear):
            assert torch.equal(q.qweight_4, qlayers[name].qweight_4)
            assert cpu_path(torch.randn(1, q.in_features), q.packed_weight(4)) == _small_path()
    with torch.no_grad():
        after = loaded(ids[:, :1]).logits
    assert torch.equal(after, before)


@pytest.mark.filterwarnings("ignore:medquant CPU kernels:RuntimeWarning")
def test_tied_quantized_head_runs_native4_on_the_shared_codes():
    from medquant.quant.embeddings import quantize_embeddings_
    from medquant.quant.modules import tied_to

    set_cpu_compute_dtype(torch.bfloat16)
    model = _llama(tied=True)
    cfg = QuantConfig(4, group_size=32)
    mq.quantize_(model, cfg)
    assert quantize_embeddings_(model, cfg)["tied_heads"] == ["lm_head"]
    head, emb = model.lm_head, model.model.embed_tokens
    assert tied_to(head, emb)
    w = head.packed_weight(4)
    assert cpu_path(torch.randn(1, head.in_features), w) == _small_path()
    if _available():
        assert cpu_plan(w).gemv.qweight.data_ptr() == emb.get_buffer("qweight_4").data_ptr()  # read in place
    h = torch.randn(3, head.in_features)
    with torch.no_grad():
        y = head(h)
    if _available():  # int16 activations (the head's 128 columns: the quad form), else split: float32 x itself
        assert _rel_err(y, _ref(head, h, "int16" if cpu_plan(w).gemv.int16_form else torch.float32)) < 1e-5
    else:
        assert _rel_err(y, _ref(head, h, torch.bfloat16)) < 2e-2


def test_torch_compile_traces_the_native_kernel():
    """Under ``torch.compile`` the kernel runs as the ``medquant::gemv4`` operator (its fake implementation
    gives the shapes): full graph, same output as eager."""
    set_cpu_compute_dtype(torch.bfloat16)
    model = nn.Sequential(nn.Linear(256, 128), nn.ReLU(), nn.Linear(128, 64)).eval()
    for i in (0, 2):
        model[i] = QuantLinear.from_float(model[i], QuantConfig(4, group_size=64))
    x = torch.randn(3, 256)
    assert cpu_path(x, model[0].packed_weight(4)) == _small_path()
    with torch.no_grad():
        eager = model(x)
        torch._dynamo.reset()
        out = torch.compile(model, fullgraph=True, backend="aot_eager")(x)
    torch.testing.assert_close(out, eager)
    if _available():
        gemv = cpu_plan(model[0].packed_weight(4)).gemv
        for xmode in (0, 1, 2):
            y_op = torch.ops.medquant.gemv4(x, gemv.qweight, gemv.s, gemv.z, gemv.k, gemv.kp, gemv.ge, xmode, 4)
            torch.testing.assert_close(y_op, gemv(x, xmode), rtol=0, atol=0)


@pytest.mark.parametrize("cfg,k", [(QuantConfig(4, symmetric=False, group_size=128), 640),
                                   (QuantConfig(4, group_size=256), 300),
                                   (QuantConfig(4, symmetric=False, scope="channel"), 200),
                                   (QuantConfig(4, group_size=64), 320),
                                   (QuantConfig(4, symmetric=False, group_size=32), 416),
                                   (QuantConfig(4, group_size=96), 384)],
                         ids=["asym-g128", "sym-g256-padded", "asym-channel-tail", "g64", "asym-g32-tail",
                              "g96-no-quad"])
def test_quad_form_of_the_4bit_kernel_against_float64(cfg, k):
    """4-bit rows with bfloat16 products read whole 128-column blocks four codes per 16-bit lane (the quad form:
    groups of a multiple of 128, of 64 or of 32 columns, or one per row; a row's last partial block, and other
    group sizes, take the 64-column form): every row count the kernel blocks by (1, 2, 3, 5, 9), split and
    rounded activations, float32 and bfloat16 ``x``, against ``x~ @ W^T`` in float64."""
    if not _available() or not native_status()["gemv4_bf16"]:
        pytest.skip("needs the native kernel with bfloat16 products")
    from medquant.kernels.cpu import _scale_zero

    layer = _layer(40, k, cfg, seed=7)
    w = layer.packed_weight(4)
    gemv = native_gemv4(w, *_scale_zero(w))
    wd = layer.dequantized_weight(torch.float64)
    for m in (1, 2, 3, 5, 9):
        x = torch.randn(m, k, generator=torch.Generator().manual_seed(m)) * 2
        xb = x.bfloat16()
        assert _rel_err(gemv(x, 2), x.double() @ wd.t()) < 1e-5  # split: x to 2^-17
        assert _rel_err(gemv(x, 1), xb.double() @ wd.t()) < 1e-5  # rounded to bfloat16 first
        ref_b = xb.double() @ wd.t()
        assert _rel_err(gemv(xb, 1).double(), ref_b) < 8e-3  # bfloat16 x: the output rounded once to bfloat16
        assert _rel_err(gemv(xb, 1).double(), ref_b.float().bfloat16().double()) < 8e-3


def _bound_layer(rows: int):
    """The bound-operator tests' layer (48 x 192, W4 asymmetric g64), its row group, its bound matmul and ``rows``
    rows of ``x``."""
    from medquant.kernels.cpu import _scale_zero

    layer = _layer(48, 192, QuantConfig(4, symmetric=False, group_size=64), seed=3)
    w = layer.packed_weight(4)
    return layer, w, native_gemv4(w, *_scale_zero(w)), torch.randn(rows, 192, generator=torch.Generator().manual_seed(1))


def test_bound_operator_calls_the_bound_matmul_by_handle_and_refuses_a_stale_or_wrong_one():
    """``medquant::gemv4_bound`` (what a compiled decode step calls): bit-equal to the bound matmul it names, in
    every activation mode, and for a bfloat16 ``x`` once its float32 output is rounded; an unknown handle, a wrong row count, a wrong ``k``, a
    non-unit column stride and a matmul that no longer exists raise instead of computing."""
    if not _available():
        pytest.skip("needs the native 4-bit kernel")
    import gc

    from medquant.kernels.cpu import _scale_zero

    _, w, gemv, x = _bound_layer(2)
    op = torch.ops.medquant.gemv4_bound
    for xmode in (0, 1, 2):
        torch.testing.assert_close(op(x, gemv.handle, 48, xmode), gemv(x, xmode), rtol=0, atol=0)
    xb = x.bfloat16()
    # float32 sums; rounded once to bfloat16 they are what the bound matmul returns for a bfloat16 x
    torch.testing.assert_close(op(xb, gemv.handle, 48, 1).bfloat16(), gemv(xb, 1), rtol=0, atol=0)
    other = native_gemv4(w, *_scale_zero(w))
    assert other.handle != gemv.handle
    with pytest.raises(RuntimeError, match="no bound matmul"):
        op(x, gemv.handle, 47, 2)
    with pytest.raises(RuntimeError, match="no bound matmul"):
        op(x[:, :96].contiguous(), gemv.handle, 48, 2)
    with pytest.raises(RuntimeError, match="no bound matmul"):
        op(torch.randn(192, 2).t(), gemv.handle, 48, 2)
    with pytest.raises(RuntimeError, match="no bound matmul"):
        op(x, max(gemv.handle, other.handle) + 10**6, 48, 2)
    handle = gemv.handle
    del gemv
    gc.collect()
    with pytest.raises(RuntimeError, match="no bound matmul"):
        op(x, handle, 48, 2)


def test_bound_operator_runs_the_blocked_matmul_in_its_gemm_mode():
    """``medquant::gemv4_bound`` with ``GEMM_XMODE`` (what a compiled prefill calls): bit-equal to the bound
    matmul's blocked form for float32 ``x`` and, once rounded, for bfloat16 ``x``; an ``x`` with a value that is
    not finite gets the float32 reference product (the blocked form declines it); a bound matmul without the
    blocked form raises."""
    from medquant.kernels.native import GEMM_XMODE, native_status

    if not _available() or not native_status()["gemm"]:
        pytest.skip("needs the native blocked matmul (AVX512-VNNI)")
    from medquant.kernels.reference import packed_linear_reference

    layer, w, gemv, x = _bound_layer(40)
    op = torch.ops.medquant.gemv4_bound
    y = op(x, gemv.handle, 48, GEMM_XMODE)
    torch.testing.assert_close(y, gemv.gemm(x), rtol=0, atol=0)
    assert _rel_err(y, x.double() @ layer.dequantized_weight(torch.float64).t()) < 1e-4  # x to 2^-16 per block
    assert not torch.equal(y, gemv(x, 2))  # another arithmetic than the weight-only kernel's
    xb = x.bfloat16()
    torch.testing.assert_close(op(xb, gemv.handle, 48, GEMM_XMODE).bfloat16(), gemv.gemm(xb), rtol=0, atol=0)
    xn = x.clone()
    xn[3, 7], xn[5, 0] = float("nan"), float("inf")
    assert gemv.gemm(xn) is None
    torch.testing.assert_close(op(xn, gemv.handle, 48, GEMM_XMODE), packed_linear_reference(xn, w),
                               rtol=0, atol=0, equal_nan=True)
    for bad in (5, 6, -1):
        with pytest.raises(RuntimeError, match="xmode must be"):
            op(x, gemv.handle, 48, bad)
    gemv._gemm = False
    with pytest.raises(RuntimeError, match="no blocked matmul"):
        op(x, gemv.handle, 48, GEMM_XMODE)


def test_split_activations_against_float64_and_rounded_ones_at_the_kernel():
    """The three activation modes of the bound kernel, on one layer, against float64 references: 0 (x as it is)
    and 2 (split into two bfloat16 halves) within 1e-5 of ``x @ W^T``; 1 (rounded) within 1e-5 of
    ``bf16(x) @ W^T`` and about 2^-9 off ``x @ W^T``; a bfloat16 x gives the same result in modes 1 and 2 (its lo
    half is zero)."""
    if not _available():
        pytest.skip("needs the native 4-bit kernel")
    from medquant.kernels.cpu import _scale_zero

    layer = _layer(80, 640, QuantConfig(4, symmetric=False, group_size=64), seed=5)
    w = layer.packed_weight(4)
    gemv = native_gemv4(w, *_scale_zero(w))
    x = torch.randn(3, 640, generator=torch.Generator().manual_seed(2)) * 4
    wd = layer.dequantized_weight(torch.float64)
    exact, rounded = x.double() @ wd.t(), x.bfloat16().double() @ wd.t()
    assert _rel_err(gemv(x, 0), exact) < 1e-5
    assert _rel_err(gemv(x, 2), exact) < 1e-5
    assert _rel_err(gemv(x, 1), rounded) < 1e-5
    assert _rel_err(gemv(x, 1), exact) > 1e-4
    xb = x.bfloat16()
    torch.testing.assert_close(gemv(xb, 2), gemv(xb, 1), rtol=0, atol=0)


@pytest.mark.parametrize(("k", "cfg", "form"), [
    (512, QuantConfig(4, group_size=128), True),
    (500, QuantConfig(4, symmetric=False, group_size=128), True),  # k padded to 512: zeros in the last unit
    (512, QuantConfig(4, symmetric=False, group_size=32), True),  # each unit's four quarters in their own groups
    (256, QuantConfig(4, group_size=64), True),
    (512, QuantConfig(4, group_size=256), True),  # a group over two units: each unit its own t
    (512, QuantConfig(4, scope="channel"), True),
    (384, QuantConfig(4, symmetric=False, scope="tensor"), True),
    (576, QuantConfig(4, group_size=32), True),  # k_pad 576: 4 units and a last block of 64 columns
    (320, QuantConfig(4, symmetric=False, group_size=64), True),  # the last 64 columns one group of their own
    (576, QuantConfig(4, scope="channel"), True),  # one group over the units and the last block
    (600, QuantConfig(4, group_size=32), True),  # k_pad 608: a block of 64 columns after the units, then 32
    (672, QuantConfig(4, symmetric=False, group_size=96), True),  # groups of 96: quarters of a unit in two groups
    (480, QuantConfig(4, group_size=160), True),  # groups of 160: a unit's quarters and the last block straddle
    (200, QuantConfig(4, scope="channel"), True),  # k_pad 200: a last block of 8 columns
    (40, QuantConfig(4, symmetric=False, scope="tensor"), True),  # no unit, one short block
    # 8-bit containers and the stream widths: blocks of 32 columns in column order, one t each
    (512, QuantConfig(8, scope="channel"), True),
    (600, QuantConfig(8, symmetric=False, group_size=32), True),  # k_pad 608: a last block of 32
    (576, QuantConfig(3, group_size=64), True),  # dense 3-bit (the word form: codes by table)
    (500, QuantConfig(5, symmetric=False, scope="channel"), True),  # dense 5-bit, k padded
    (256, QuantConfig(6, symmetric=False, group_size=64), True),  # dense 6-bit (the widened form)
    (288, QuantConfig(7, group_size=96), True),  # dense 7-bit, groups of three blocks
    (200, QuantConfig(2, symmetric=False, group_size=32), True),  # 2-bit containers
    (320, QuantConfig(1, group_size=32), True),  # 1-bit symmetric: (2u - 1) s
])
def test_int16_activations_match_their_float64_reference(k, cfg, form):
    """xmode 3 against an independent emulation (:func:`_x_int16`, torch): per 32 columns ``t = max |x| / 32767``
    and ``x~ = t * round_half_even(x / t)``; rows of every count the kernel blocks (1, 2, 4, 8 and their sums),
    a large value in one 32-column block, a zero row; every 4-bit group layout (units of the quad form, blocks of
    64 columns after them, a last block of fewer columns, groups that are no divisor or multiple of 128) has the
    form where the library has ``vpdpwssd``, else (``int16_form`` false) it is the split result bit for bit. An ``x`` with a value that is not finite, or 32 columns below
    ``2^-100``, is split instead (the reference: ``x`` itself); the bound operator (``medquant::gemv4_bound``) in
    xmode 3 gives the same bits."""
    if not _available():
        pytest.skip("needs the native kernel (AVX512F + BW)")
    layer = _layer(48, k, cfg)
    gemv = native_gemv4(layer.packed_weight(cfg.bits))
    if gemv is None and cfg.bits not in (4, 8):
        pytest.skip("the stream widths need AVX512-VBMI")
    assert gemv is not None and gemv.int16_form == (form and native_int16())
    g = torch.Generator().manual_seed(3)
    for m in (1, 2, 3, 4, 7, 8, 11, 15):
        x = torch.randn(m, k, generator=g) * torch.exp(torch.randn(m, 1, generator=g))
        x[0, min(5, k - 1)] = 60.0
        if m > 2:
            x[2] = 0.0
        y3, y2 = gemv(x, 3), gemv(x, 2)
        if gemv.int16_form:
            assert _rel_err(y3, _ref(layer, x, "int16")) < 1e-5, m
            assert not torch.equal(y3, y2)
            torch.testing.assert_close(gemv4_bound_op(x, gemv.handle, 48, 3), y3, rtol=0, atol=0)
        else:
            torch.testing.assert_close(y3, y2, rtol=0, atol=0)
        assert _rel_err(y2, _ref(layer, x, torch.float32)) < 1e-5, m
    x = torch.randn(3, k, generator=g)
    for bad in (float("nan"), float("inf"), 2.0 ** -110):
        xb = x.clone()
        xb[1, :32] = 0.0
        xb[1, 7] = bad  # a NaN / infinity, or 32 columns whose largest magnitude is below 2^-100: split
        torch.testing.assert_close(gemv(xb, 3), gemv(xb, 2), rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("bits", [3, 2])
def test_two_bit_layers_split_float32_activations_under_the_default(bits):
    """The default activations ("int16") take float32 x as 16-bit integers from ``NATIVE_INT16_MIN_BITS`` = 3 bits
    on and split it below (a 2-bit model loses next tokens to 16-bit x): a layer's output is then the kernel's
    xmode 3 or xmode 2 result bit for bit, and the two differ."""
    if not (native_status()["gemv_stream"] and native_int16()):
        pytest.skip("needs the native stream kernel and int16 x (vpdpwssd with AVX512-VNNI, or the AVX2 form)")
    set_cpu_compute_dtype(torch.bfloat16)
    layer = _layer(64, 256, QuantConfig(bits, symmetric=False, group_size=64))
    gemv = cpu_plan(layer.packed_weight(bits)).gemv
    assert gemv is not None and gemv.int16_form and gemv.code_bits == bits
    x = torch.randn(2, 256, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        y = layer(x)
    y3, y2 = gemv(x, 3), gemv(x, 2)
    assert not torch.equal(y3, y2)
    torch.testing.assert_close(y, y3 if bits >= NATIVE_INT16_MIN_BITS else y2, rtol=0, atol=0)


def test_native4_activations_setting():
    """``set_cpu_native4_activations`` switches prepared layers (a settings change rebuilds them), refuses other
    values, and ``$MEDQUANT_CPU_NATIVE4_ACTIVATIONS`` is read at import."""
    import subprocess
    import sys

    from medquant.kernels import get_cpu_native4_activations

    set_cpu_compute_dtype(torch.bfloat16)
    layer = _layer(64, 256, QuantConfig(4, group_size=64))
    x = torch.randn(2, 256)
    x[0, 3] = 40.0  # one large value: int16 then holds its 32 columns to 40 / 32767, split each to 2^-17
    with torch.no_grad():
        assert get_cpu_native4_activations() == "int16"
        y_int16 = layer(x)
        set_cpu_native4_activations("split")
        y_split = layer(x)
        set_cpu_native4_activations("round")
        assert get_cpu_native4_activations() == "round"
        y_round = layer(x)
        set_cpu_native4_activations("int8")
        y_int8 = layer(x)
        set_cpu_native4_activations(None)
        y_again = layer(x)
    if _available():
        # the int16 form where the library has vpdpwssd (AVX512-VNNI) or is the AVX2 form (vpmaddwd); else (AVX512
        # without VNNI) the setting runs as split, which is x itself without bfloat16 products
        int16 = cpu_plan(layer.packed_weight(4)).gemv.int16_form
        assert int16 == native_int16()
        assert _rel_err(y_int16, _ref(layer, x, "int16" if int16 else torch.float32)) < 1e-5
        assert _rel_err(y_split, _ref(layer, x, torch.float32)) < 1e-5
        assert _rel_err(y_round, _ref(layer, x, torch.bfloat16)) < 1e-5
        if int16:
            assert _rel_err(y_int16, _ref(layer, x, torch.float32)) > 1e-7  # not the split result: another x~
        else:
            torch.testing.assert_close(y_int16, y_split, rtol=0, atol=0)
        torch.testing.assert_close(y_again, y_int16, rtol=0, atol=0)
        # "int8": 8-bit x per 64 columns (the group) in the AVX2 form, elsewhere the "int16" result bit for bit
        if cpu_plan(layer.packed_weight(4)).gemv.int8_form:
            assert _rel_err(y_int8, _ref(layer, _x_int8(x, 64), torch.float32)) < 1e-5
            assert _rel_err(y_int8, _ref(layer, x, torch.float32)) > 1e-4
        else:
            torch.testing.assert_close(y_int8, y_int16, rtol=0, atol=0)
    # "int8" on a library that is not the AVX2 form: one warning, and the "int16" result
    if _available():
        from medquant.kernels import cpu

        real = cpu.native_status
        cpu.native_status = lambda: {**real(), "gemv_avx2": False}
        cpu._warned.discard("int8")
        try:
            set_cpu_native4_activations("int8")
            with warnings.catch_warnings(record=True) as caught, torch.no_grad():
                warnings.simplefilter("always")
                y_other, y_other2 = layer(x), layer(x)
        finally:
            cpu.native_status = real
            set_cpu_native4_activations(None)
        msgs = [str(w.message) for w in caught if "'int8'" in str(w.message)]
        assert len(msgs) == 1 and "AVX2" in msgs[0], msgs
        torch.testing.assert_close(y_other, y_int16, rtol=0, atol=0)
        torch.testing.assert_close(y_other2, y_int16, rtol=0, atol=0)
    for bad in ("exact", "", 2):
        with pytest.raises(ValueError, match="native4 activations"):
            set_cpu_native4_activations(bad)  # type: ignore[arg-type]
    code = "import medquant.kernels as k; print(k.get_cpu_native4_activations())"
    for env, want in (("round", "round"), ("SPLIT", "split"), ("int8", "int8"), ("bogus", "int16")):
        out = subprocess.run([sys.executable, "-W", "ignore", "-c", code], capture_output=True, text=True, check=True,
                             env={**__import__("os").environ, "MEDQUANT_CPU_NATIVE4_ACTIVATIONS": env})
        assert out.stdout.strip() == want, (env, out.stdout, out.stderr)


def test_native8_holds_no_repacked_copy_and_matches_the_int8_kernel():
    """8-bit rows: aten's int8 kernel keeps an int8 copy of the weight (1 byte per weight beside medquant's
    codes); native8 reads the codes in place. Both agree within the bf16 tolerance, native8 within 1e-5 of the
    float64 reference of the input as it takes it (16-bit integers per 32 columns, the default activations)."""
    set_cpu_compute_dtype(torch.bfloat16)
    n, k = 128, 512
    layer = _layer(n, k, QuantConfig(8, scope="channel"))
    x = torch.randn(2, k)
    with torch.no_grad():
        y_native = layer(x)
    native_bytes = cpu_cache_bytes()
    set_cpu_int4_kernel("aten")
    assert cpu_path(x, layer.packed_weight(8)) == "int8"
    with torch.no_grad():
        y_aten = layer(x)
    assert cpu_cache_bytes() >= n * k  # the int8 copy
    assert _rel_err(y_aten, _ref(layer, x, torch.float32)) < 2e-2
    if _available():
        assert native_bytes == 4  # the scales are read in place (float16), the zero point is one float32 value
        # the int16 form needs vpdpwssd or the AVX2 form; else x itself (split, no bf16 products)
        int16 = native_int16()
        assert _rel_err(y_native, _ref(layer, x, "int16" if int16 else torch.float32)) < 1e-5
        set_cpu_int4_kernel("auto")
        gemv = cpu_plan(layer.packed_weight(8)).gemv
        assert gemv is not None and gemv.bits == 8
        for xmode in (2, 3):
            y_op = torch.ops.medquant.gemv4(x, gemv.qweight, gemv.s, gemv.z, gemv.k, gemv.kp, gemv.ge, xmode, 8)
            torch.testing.assert_close(y_op, gemv(x, xmode), rtol=0, atol=0)


@pytest.mark.filterwarnings("ignore:medquant CPU kernels:RuntimeWarning")
@pytest.mark.parametrize("bits", [3, 2])
def test_stream_layouts_run_in_place_and_match_the_int4_kernel(bits):
    """Dense 3-bit rows (version 2: 32 codes in 3 words) and 2-bit containers: with the stream kernel (AVX512-VBMI)
    native<b> reads the stored codes, scales and zero points in place (nothing held), where aten's int4 kernel
    keeps a 4-bit copy of every weight beside them (7 or 6 bits per weight at run time instead of 3 or 2). Both
    agree within the bf16 tolerance, the native one within 1e-5 of the float64 reference of the input as it takes
    it (3-bit: 16-bit integers per 32 columns, the default activations; 2-bit: split); the operator form gives the
    same bits as the bound kernel."""
    if not (_available() and native_status()["gemv_stream"]):
        pytest.skip("needs the native stream kernel (AVX512F + BW + VBMI); the int4 fallback is tested elsewhere")
    set_cpu_compute_dtype(torch.bfloat16)
    n, k = 96, 576
    layer = _layer(n, k, QuantConfig(bits, symmetric=False, group_size=64))
    w = layer.packed_weight(bits)
    assert w.is_dense == (bits == 3)
    x = torch.randn(3, k)
    assert cpu_path(x, w) == f"native{bits}"
    with torch.no_grad():
        y_native = layer(x)
    native_bytes = cpu_cache_bytes()
    assert native_bytes == 0  # float16 scales and zero points read in place
    gemv = cpu_plan(w).gemv
    assert gemv is not None and gemv.bits == bits and gemv.qweight.data_ptr() == w.qweight.data_ptr()
    for xmode in (0, 1, 2, 3):
        y_op = torch.ops.medquant.gemv4(x, gemv.qweight, gemv.s, gemv.z, gemv.k, gemv.kp, gemv.ge, xmode, bits)
        torch.testing.assert_close(y_op, gemv(x, xmode), rtol=0, atol=0)
    set_cpu_int4_kernel("aten")
    assert cpu_path(x, w) == "int4"
    with torch.no_grad():
        y_aten = layer(x)
    assert cpu_cache_bytes() >= n * k // 2  # the kernel's 4-bit copy
    ref = _ref(layer, x, torch.float32)
    # 16-bit integer x from NATIVE_INT16_MIN_BITS (3) bits on, split x (float32's precision) below
    assert _rel_err(y_native, _ref(layer, x, "int16" if gemv.int16_form and bits >= NATIVE_INT16_MIN_BITS
                                                 else torch.float32)) < 1e-5
    assert _rel_err(y_aten, ref) < 2e-2
    assert _rel_err(y_native, y_aten.double()) < 2e-2


@pytest.mark.filterwarnings("ignore:medquant CPU kernels:RuntimeWarning")
def test_dense_3bit_llama_runs_native3_and_survives_save_load(tmp_path):
    """A 3-bit model in the dense layout: every layer on native3 (where the library has the stream kernel), the
    file keeps the dense words (3 per 32 codes), and the loaded model takes the same path with bit-identical
    logits; the decode step agrees with the torch reference path of the same model."""
    set_cpu_compute_dtype(torch.bfloat16)
    model = _llama()
    mq.quantize_(model, QuantConfig(3, group_size=64))
    stream = _available() and bool(native_status()["gemv_stream"])
    want = "native3" if stream else "int4"
    qlayers = {name: m for name, m in model.named_modules() if isinstance(m, QuantLinear)}
    for q in qlayers.values():
        w = q.packed_weight(3)
        assert w.dense and w.qweight.shape[1] * 32 == w.k_pad * 3
        assert cpu_path(torch.randn(1, q.in_features), w) == want
    ids = torch.randint(0, 200, (1, 5))
    with torch.no_grad():
        before = model(ids[:, :1]).logits
        with force_backend("torch"):
            ref = model(ids[:, :1]).logits
    assert _rel_err(before, ref.double()) < (1e-4 if stream else 5e-2)
    loaded = mq.load(mq.save(model, tmp_path / "m")).eval()
    for name, q in loaded.named_modules():
        if isinstance(q, QuantLinear):
            assert torch.equal(q.qweight_3, qlayers[name].qweight_3)
            assert cpu_path(torch.randn(1, q.in_features), q.packed_weight(3)) == want
    with torch.no_grad():
        assert torch.equal(loaded(ids[:, :1]).logits, before)


@pytest.mark.parametrize("cfg,in_place", [
    (QuantConfig(4, group_size=64), (True, "one")),  # float16 scales read in place; z = 8, one value
    (QuantConfig(4, symmetric=False, group_size=64), (True, True)),  # float16 scales and zero points in place
    (QuantConfig(8, scope="channel", scale_dtype="float32"), (True, "one")),  # float32 (n, 1) scales
    (QuantConfig(4, group_size=64, scale_dtype="bfloat16"), (False, "one")),  # bfloat16: widened to a float32 copy
    (QuantConfig(4, scope="tensor"), (False, "one")),  # one scale for the tensor: expanded to (n, 1)
    (QuantConfig(1, symmetric=True, group_size=32), (False, "one")),  # 1-bit symmetric: (2u - 1) s, a doubled float32 copy
], ids=["sym-f16", "asym-f16", "chan-f32", "bf16", "tensor", "1bit"])
def test_kernel_params_read_the_layer_in_place_where_they_can(cfg, in_place):
    """What the native kernels read for ``w = (u - z) * s``: the layer's own scales / zero points where they are
    float16 or float32 ``(n, ng)``, a float32 copy otherwise, one value for a symmetric zero point; the results
    are bit-identical to running from float32 copies of everything."""
    from medquant.kernels.cpu import _scale_zero
    from medquant.kernels.native import kernel_params, param_flags

    layer = _layer(48, 256, cfg)
    w = layer.packed_weight(cfg.bits)
    ng = w.k_pad // (w.group_elems if w.scope == "group" else w.k_pad)
    s, z = kernel_params(w, ng)
    s_ref, z_ref = _scale_zero(w)
    assert (s.data_ptr() == w.scales.data_ptr()) == in_place[0]
    if in_place[1] == "one":
        assert z.numel() == 1 and param_flags(s, z) & 4
    else:
        assert z.data_ptr() == w.zeros.data_ptr() and z.dtype == torch.float16 and param_flags(s, z) & 2
    assert torch.equal(s.float().expand(48, ng), s_ref.float().expand(48, ng))
    assert torch.equal(z.float().expand(48, ng), z_ref.float().expand(48, ng))
    if not _available():
        return
    x = torch.randn(3, 256)
    a, b = native_gemv4(w), native_gemv4(w, s_ref, z_ref)
    for xmode in (0, 1, 2):
        torch.testing.assert_close(a(x, xmode), b(x, xmode), rtol=0, atol=0)


def avx2_form_check() -> None:
    """The library's AVX2 + FMA form (a CPU without AVX512) against the float64 reference: every layout of
    :data:`CONFIGS` (4- and 8-bit containers, the dense 3/5/6/7-bit stream, 1- and 2-bit containers, version-1
    containers), K padded and not a multiple of 32, N odd, M = 1..13, each ``xmode`` (0, 2 and 3 take ``x``
    itself, 1 ``x`` rounded to bfloat16, 3 ``x`` as 16-bit integers per 32 columns: :func:`_x_int16`, and ``x`` itself
    where a value is not finite or a block's largest magnitude is below ``2^-100``), bfloat16 inputs and outputs;
    the path a quantized layer takes at small M and its output through the layer, with a float32 and a bfloat16
    compute dtype (xmode 0 and 3). Run in this process where the library is that form, else in a child
    process that builds it (:func:`test_the_avx2_form_matches_the_reference`)."""
    st = native_status()
    assert st["gemv_avx2"] and st["gemv4"] and st["gemv_stream"], st
    assert not st["gemm"] and not st["gemv4_bf16"], st  # float32 products only
    g = torch.Generator().manual_seed(3)
    for cfg_id, (cfg, version) in CONFIGS.items():
        for n, k in ((48, 576), (97, 200), (17, 333), (1, 40)):
            if cfg.scope == "group" and k % cfg.group_size and k < cfg.group_size:
                cfg = QuantConfig(cfg.bits, symmetric=cfg.symmetric, group_size=32)
            layer = _layer(n, k, cfg, bias=True)
            if version == 1:
                layer = layer.to_layout(1)
            w = layer.packed_weight(cfg.bits)
            gemv = native_gemv4(w)
            assert gemv is not None and gemv.int16_form and not gemv.has_gemm, (cfg_id, n, k)
            d = layer.dequantized_weight(torch.float64)
            for m in (1, 3, 8, 13):
                x = torch.randn(m, k, generator=g) * 3
                if n > 1:  # one large value: its block's other columns keep fewer bits as integers (one output
                    x[0, k // 2] = 40.0  # row would let the float32 sums' cancellation decide the relative error)
                exact = (x.double() @ d.t()).float()
                refs = {0: exact.double(), 1: x.bfloat16().double() @ d.t(), 2: exact.double(),
                        3: _x_int16(x).double() @ d.t()}
                # int8 x (xmode 8) on 4-bit containers; elsewhere the int16 form's bits
                assert gemv.int8_form == (gemv.bits == 4), (cfg_id, gemv.bits)
                if gemv.int8_form:
                    refs[8] = _x_int8(x, _int8_block(gemv)).double() @ d.t()
                ys = {xmode: gemv(x, xmode) for xmode in (*refs, 8)}
                for xmode, ref in refs.items():
                    err = _rel_err(ys[xmode], ref)
                    assert err < 1e-5, (cfg_id, n, k, m, xmode, err)
                assert not torch.equal(ys[3], ys[0]), (cfg_id, n, k, m)  # the int16 form ran
                torch.testing.assert_close(ys[2], ys[0], rtol=0, atol=0)
                if gemv.int8_form:  # the int8 form ran: 8-bit x is far coarser than 16-bit
                    assert _rel_err(ys[8], refs[3]) > 1e-4, (cfg_id, n, k, m)
                    torch.testing.assert_close(gemv4_bound_op(x, gemv.handle, n, 8), ys[8], rtol=0, atol=0)
                else:
                    torch.testing.assert_close(ys[8], ys[3], rtol=0, atol=0)
                for bad in (float("nan"), float("inf"), 2.0 ** -110):  # x itself: the float32 form
                    xb = x.clone()
                    xb[m - 1, :32] = 0.0
                    xb[m - 1, min(7, k - 1)] = bad
                    torch.testing.assert_close(gemv(xb, 3), gemv(xb, 2), rtol=0, atol=0, equal_nan=True)
                    if not gemv.int8_form:
                        continue
                    if bad == 2.0 ** -110 and k > 32 and _int8_block(gemv) > 32:  # a tiny value among normal ones
                        assert _rel_err(gemv(xb, 8), _x_int8(xb, _int8_block(gemv)).double() @ d.t()) < 1e-5
                    else:
                        torch.testing.assert_close(gemv(xb, 8), gemv(xb, 2), rtol=0, atol=0, equal_nan=True)
                xb = x.bfloat16()
                yb = gemv(xb, 0)
                assert yb.dtype == torch.bfloat16, (cfg_id, yb.dtype)
                assert _rel_err(yb, xb.double() @ d.t()) < 1e-2, (cfg_id, n, k, m)
                for cd in (torch.float32, torch.bfloat16):  # float32 x: xmode 0, and 3 from 3 bits on
                    set_cpu_compute_dtype(cd)
                    assert cpu_path(x, w) == f"native{storage_bits(cfg.bits, w.dense)}", (cfg_id, m)
                    with torch.no_grad():
                        y = layer(x)
                    int16 = cd == torch.bfloat16 and cfg.bits >= NATIVE_INT16_MIN_BITS
                    assert _rel_err(y, _ref(layer, x, "int16" if int16 else torch.float32)) < 1e-5, (cfg_id, m, cd)
                # activations "int8": int8 x where the form is (4-bit containers of >= 3-bit codes), else as before
                set_cpu_native4_activations("int8")
                with torch.no_grad():
                    y = layer(x)
                int8 = gemv.int8_form and cfg.bits >= NATIVE_INT16_MIN_BITS
                want = (_x_int8(x, _int8_block(gemv)) if int8 else _x_int16(x) if cfg.bits >= NATIVE_INT16_MIN_BITS
                        else x).double() @ d.t() + layer.bias.double()
                assert _rel_err(y, want) < 1e-5, (cfg_id, m, "int8")
                set_cpu_native4_activations(None)
                set_cpu_compute_dtype(torch.float32)
    # the one warning of a bfloat16 compute dtype without bfloat16 arithmetic says what runs fast and what does not
    from medquant.kernels import cpu

    real = cpu.cpu_features
    cpu.cpu_features = lambda: {**real(), "avx512_bf16": False, "amx_bf16": False, "native_bf16": False}
    cpu._warned.discard("bf16")
    try:
        set_cpu_compute_dtype(torch.bfloat16)
        layer = _layer(16, 64, QuantConfig(4, group_size=32))
        with warnings.catch_warnings(record=True) as caught, torch.no_grad():
            warnings.simplefilter("always")
            layer(torch.randn(1, 64))
    finally:
        cpu.cpu_features = real
        set_cpu_compute_dtype(torch.float32)
    msgs = [str(w.message) for w in caught if "compute dtype bfloat16" in str(w.message)]
    assert len(msgs) == 1 and "16-bit integers" in msgs[0] and "AVX2" in msgs[0] and "prefill" in msgs[0], msgs


_AVX2_CHILD = r'''
import torch
from tests.kernels.test_native_gemv import avx2_form_check
from medquant.kernels.native import native_status
avx2_form_check()
print(native_status()["library"])
print("ok")
'''


@pytest.mark.filterwarnings("ignore:medquant CPU kernels:RuntimeWarning")
def test_the_avx2_form_matches_the_reference(tmp_path):
    """The native matmul of a CPU with AVX2 + FMA and no AVX512 (:func:`avx2_form_check`): checked here where the
    library is that form; on an AVX512 CPU, in a child process whose library is built with ``-mno-avx512f`` (in
    its own cache folder: options given in ``$CC`` are part of the build key)."""
    from medquant.kernels.cpu import cpu_features

    st = native_status()
    if st["gemv_avx2"]:
        avx2_form_check()
        return
    if not st["active"] or not cpu_features()["avx2"]:
        pytest.skip("needs the native library and a CPU with AVX2")
    run_with_native_flags(_AVX2_CHILD, "-mno-avx512f", tmp_path)


@pytest.mark.parametrize("native_bf16", [False, True])
def test_a_bfloat16_compute_dtype_prefills_in_float32_without_bfloat16_arithmetic(monkeypatch, native_bf16):
    """The dense path (40 rows, ``set_cpu_prefill_kernel("dense")``) of a native row group with a bfloat16
    compute dtype: on a CPU without bfloat16 arithmetic (``native_bf16`` false: the AVX2 form's CPUs, simulated
    elsewhere) float32, the float32 compute dtype's output bit for bit; with it, bfloat16 (weights and output
    rounded: a larger error against the float64 reference, and another output)."""
    from medquant.kernels import cpu

    if not _available():
        pytest.skip("needs the native kernel")
    real = cpu.cpu_features
    monkeypatch.setattr(cpu, "cpu_features", lambda: {**real(), "native_bf16": native_bf16})
    set_cpu_prefill_kernel("dense")
    layer = _layer(48, 576, QuantConfig(4, group_size=128))
    x = torch.randn(40, 576, generator=torch.Generator().manual_seed(5))
    ys = {}
    for cd in (torch.float32, torch.bfloat16):
        set_cpu_compute_dtype(cd)
        clear_cpu_cache()
        assert cpu_path(x, layer.packed_weight(4)) == "dense"
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore", RuntimeWarning)
            ys[cd] = layer(x)
    ref = _ref(layer, x, torch.float32)
    assert _rel_err(ys[torch.float32], ref) < 1e-5
    if native_bf16:
        assert not torch.equal(ys[torch.bfloat16], ys[torch.float32])
        assert 1e-4 < _rel_err(ys[torch.bfloat16], ref) < 2e-2
    else:
        torch.testing.assert_close(ys[torch.bfloat16], ys[torch.float32], rtol=0, atol=0)
