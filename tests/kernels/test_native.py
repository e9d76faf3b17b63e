"""The native dequantization kernel of the CPU dense path (``medquant.kernels.native``).

References: the eager torch evaluation of the same formula (``dequantize_eager``: ``u.to(T)``, ``sub_(z)``,
``mul_(s)``), compared bit for bit; the float32 dequantization of the packed layout
(``PackedWeight.dequantize``); hand-computed values. The fallbacks (``$MEDQUANT_NATIVE=0``, no compiler, a
corrupted or foreign cached library) must give the same outputs and say why.
"""
from __future__ import annotations

import hashlib
import shutil
import subprocess
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

from medquant.kernels import (
    PackedWeight,
    clear_cpu_cache,
    cpu_path,
    set_cpu_compute_dtype,
    set_cpu_prefill_kernel,
)
from medquant.kernels import cpu as cpu_mod
from medquant.kernels import native as native_mod
from medquant.kernels.cpu import dequantize_eager, dequantize_fast
from medquant.kernels.layout import pack, padded_k
from medquant.kernels.native import dequantize_native, native_status, reset_native
from medquant.quant import QuantConfig, QuantLinear

DTYPES = (torch.bfloat16, torch.float32, torch.float16)
HAS_CC = any(shutil.which(c) for c in ("cc", "gcc", "clang"))


@pytest.fixture(autouse=True)
def _fresh(monkeypatch):
    monkeypatch.delenv("MEDQUANT_NATIVE", raising=False)
    reset_native()
    clear_cpu_cache()
    yield
    reset_native()  # the next test finds the default library again (its cache folder is unchanged)
    set_cpu_compute_dtype("float32")  # the suite's setting (tests/conftest.py)
    set_cpu_prefill_kernel(None)
    clear_cpu_cache()


@pytest.fixture
def native():
    """The native kernel built (or found) in the default cache; skipped only where no C compiler exists."""
    if not HAS_CC:
        pytest.skip("no C compiler (cc / gcc / clang) on PATH: the native kernel cannot be built here; "
                    "the fallback tests still run")
    status = native_status()
    assert status["active"], f"a C compiler exists but the native kernel is not active: {status['reason']}"
    return status


def _bits_view(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int32) if t.dtype == torch.float32 else t.view(torch.int16)


def _assert_bit_equal(got: torch.Tensor, ref: torch.Tensor, what: str) -> None:
    assert got.shape == ref.shape and got.dtype == ref.dtype, what
    diff = (_bits_view(got.contiguous()) != _bits_view(ref.contiguous())).sum()
    assert int(diff) == 0, f"{what}: {int(diff)} of {ref.numel()} values differ from the eager evaluation"


def _native(w: PackedWeight, dtype: torch.dtype) -> torch.Tensor:
    """The native dequantization twice: from float32 copies of the scales / zero points (``_scale_zero``) and
    from the layer's own tensors read in place (float16 widened inside the kernel; symmetric: one zero point);
    the two must be bit-identical."""
    s, z = cpu_mod._scale_zero(w)
    out = dequantize_native(w, dtype, s, z)
    assert out is not None, f"the native kernel declined {w.bits}-bit {w.scope} dense={w.dense} {dtype}"
    in_place = dequantize_native(w, dtype)
    assert in_place is not None
    _assert_bit_equal(in_place, out, f"{w.bits}-bit {w.scope} {dtype}: in-place params vs float32 copies")
    return out


def _weights(n: int, k: int, cfg: QuantConfig, seed: int = 0) -> PackedWeight:
    g = torch.Generator().manual_seed(seed)
    lin = nn.Linear(k, n, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(n, k, generator=g) * torch.rand(n, 1, generator=g) * 3)
    layer = QuantLinear.from_float(lin, cfg)
    return layer.packed_weight(layer.bit_groups[0])


def _as_containers(w: PackedWeight) -> PackedWeight:
    """The same codes in the version-1 container layout (3-bit codes in 4-bit containers)."""
    kp = padded_k(w.k, w.bits, w.group_elems if w.scope == "group" else None, dense=False)
    codes = w.codes()[:, :kp]
    ge = w.group_elems if w.scope == "group" else kp
    return PackedWeight(qweight=pack(codes, w.bits, dense=False), scales=w.scales, zeros=w.zeros, bits=w.bits,
                        symmetric=w.symmetric, scope=w.scope, group_elems=ge, k=w.k, dense=False)


CASES = [  # (bits, symmetric, scope, group size)
    (4, True, "group", 128), (4, False, "group", 64), (4, True, "group", 32), (4, False, "channel", None),
    (4, True, "tensor", None), (2, True, "group", 128), (2, False, "group", 32), (3, True, "group", 128),
    (3, False, "channel", None), (8, True, "channel", None), (8, False, "group", 32), (5, False, "group", 64),
    (6, True, "channel", None), (7, False, "group", 32), (1, True, "group", 64), (4, False, "group", 16),
]


@pytest.mark.parametrize("bits,symmetric,scope,group", CASES)
def test_bit_identical_to_eager(native, bits, symmetric, scope, group):
    """Every layout, scope and dtype, K not a multiple of the group (padding dropped), odd row counts."""
    cfg = QuantConfig(bits=bits, symmetric=symmetric, scope=scope, group_size=group or 128)
    for n, k in ((37, 100), (16, 129), (5, 300)):
        w = _weights(n, k, cfg, seed=n + k)
        forms = [w] + ([_as_containers(w)] if w.is_dense else [])
        for form in forms:
            ref32 = form.dequantize(torch.float32)  # the layout's own float32 reader
            for dtype in DTYPES:
                got = _native(form, dtype)
                what = f"{bits}-bit sym={symmetric} {scope}({group}) dense={form.is_dense} ({n}, {k}) {dtype}"
                _assert_bit_equal(got, dequantize_eager(form, dtype), what)
                # one rounding: the reference's float32 weight cast to dtype, bit for bit
                _assert_bit_equal(got, ref32.to(dtype), what + " vs the reference cast once")


def test_hand_computed_values(native):
    """4-bit, codes 0..15 in one row (low nibble first, 8 per int32 word), K = 12 of K_pad = 16 (the last 4
    codes are padding, dropped). Symmetric s = 0.5: w = (u - 8) / 2; asymmetric z = 3, s = 0.25: w = (u - 3) / 4."""
    codes = torch.arange(16, dtype=torch.uint8).repeat(2, 1)
    qw = pack(codes, 4)
    assert int(qw.view(torch.uint8)[0, 0]) == 0x10  # codes (0, 1) in one byte, low nibble first
    sym = PackedWeight(qweight=qw, scales=torch.full((2, 1), 0.5), zeros=None, bits=4, symmetric=True,
                       scope="group", group_elems=16, k=12)
    asym = PackedWeight(qweight=qw, scales=torch.full((2, 1), 0.25), zeros=torch.full((2, 1), 3.0), bits=4,
                        symmetric=False, scope="group", group_elems=16, k=12)
    want_sym = torch.tensor([-4.0, -3.5, -3.0, -2.5, -2.0, -1.5, -1.0, -0.5, 0.0, 0.5, 1.0, 1.5])
    want_asym = torch.tensor([-0.75, -0.5, -0.25, 0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0])
    for dtype in DTYPES:
        assert torch.equal(_native(sym, dtype), want_sym.to(dtype).expand(2, 12))
        assert torch.equal(_native(asym, dtype), want_asym.to(dtype).expand(2, 12))


def test_rounding_of_a_non_integer_zero_point(native):
    """Zero points stored as arbitrary floats: ``(u - z) * s`` in float32, rounded once, as eager and the
    reference's float32 dequantization (cast to the dtype) do."""
    w = _weights(32, 256, QuantConfig(bits=4, symmetric=False, group_size=64), seed=3)
    g = torch.Generator().manual_seed(1)
    w = PackedWeight(qweight=w.qweight, scales=w.scales, zeros=(torch.rand(w.zeros.shape, generator=g) * 15.3)
                     .to(w.zeros.dtype), bits=4, symmetric=False, scope="group", group_elems=64, k=256)
    for dtype in DTYPES:
        _assert_bit_equal(_native(w, dtype), dequantize_eager(w, dtype), f"fractional zero points {dtype}")
        _assert_bit_equal(_native(w, dtype), w.dequantize(torch.float32).to(dtype), f"vs reference {dtype}")


def test_portable_build_is_bit_identical_too(native, monkeypatch, tmp_path):
    """Built without -march=native (plain x86-64 / the compiler's default target: no AVX512 paths), as on a
    compiler that refuses the flag: the portable loops give the same bits."""
    monkeypatch.setattr(native_mod, "FLAG_SETS", (native_mod.FLAG_SETS[1],))
    monkeypatch.setenv("MEDQUANT_CACHE_DIR", str(tmp_path / "cache"))
    reset_native()
    status = native_status()
    assert status["active"] and "-march=native" not in status["flags"], status
    for bits, sym, scope in ((3, False, "group"), (5, True, "channel"), (6, False, "group"), (7, True, "group"),
                             (4, False, "group"), (2, True, "tensor"), (8, False, "channel")):
        w = _weights(19, 200, QuantConfig(bits=bits, symmetric=sym, scope=scope, group_size=64), seed=bits)
        for form in [w] + ([_as_containers(w)] if w.is_dense else []):
            for dtype in DTYPES:
                _assert_bit_equal(_native(form, dtype), dequantize_eager(form, dtype),
                                  f"portable {bits}-bit {scope} dense={form.is_dense} {dtype}")


def test_threads_do_not_change_the_result(native):
    w = _weights(300, 1000, QuantConfig(bits=4, group_size=128), seed=5)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _native(w, torch.bfloat16)
        torch.set_num_threads(max(2, before))
        many = _native(w, torch.bfloat16)
    finally:
        torch.set_num_threads(before)
    _assert_bit_equal(many, one, "threads")
    _assert_bit_equal(one, dequantize_eager(w, torch.bfloat16), "300 x 1000")


def test_quantlinear_prefill_equals_eager_path(native, monkeypatch):
    """A QuantLinear forward at M = 300 (dense path, bfloat16 compute) through the native kernel equals the
    same forward with the native kernel disabled, and the float64 reference to bfloat16 accuracy."""
    set_cpu_compute_dtype("bfloat16")
    set_cpu_prefill_kernel("dense")  # the dense path (the native blocked matmul: test_native_gemm.py)
    g = torch.Generator().manual_seed(0)
    lin = nn.Linear(200, 48)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(48, 200, generator=g))
    layer = QuantLinear.from_float(lin, QuantConfig(bits=4, group_size=64))
    x = torch.randn(300, 200, generator=g)
    assert cpu_path(x, layer.packed_weight(4)) == "dense"
    calls = []

    def spy(*args, **kwargs):
        fn = native_mod.native_dequantizer(*args, **kwargs)
        if fn is None:  # declined (disabled below)
            calls.append(False)
            return None

        def run():
            out = fn()
            calls.append(out is not None)
            return out
        return run

    monkeypatch.setattr(cpu_mod, "native_dequantizer", spy)
    with torch.no_grad():
        y_native = layer(x)
        assert calls and all(calls), "the dense path did not run the native kernel"
        monkeypatch.setenv("MEDQUANT_NATIVE", "0")
        y_eager = layer(x)  # the prepared call sees the switch at its next call
        assert calls[-1] is False  # disabled: declined, the eager code ran
        clear_cpu_cache()
        y_rebuilt = layer(x)
        assert calls[-1] is False
    assert torch.equal(y_native, y_eager) and torch.equal(y_native, y_rebuilt)
    ref = x.double() @ layer.dequantized_weight(torch.float64).t() + layer.bias.double()
    assert float((y_native.double() - ref).abs().max() / ref.abs().max()) < 2e-2


def test_disabled_by_environment(monkeypatch):
    monkeypatch.setenv("MEDQUANT_NATIVE", "0")
    w = _weights(16, 100, QuantConfig(bits=4, group_size=32))
    s, z = cpu_mod._scale_zero(w)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an explicit opt-out is not warned about
        assert dequantize_native(w, torch.bfloat16, s, z) is None
        status = native_status()
    assert status["active"] is False and "MEDQUANT_NATIVE" in status["reason"]
    _assert_bit_equal(dequantize_fast(w, torch.bfloat16), dequantize_eager(w, torch.bfloat16), "disabled")


def test_missing_compiler_falls_back_once(monkeypatch, tmp_path):
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("MEDQUANT_CACHE_DIR", str(tmp_path / "cache"))
    reset_native()
    w = _weights(16, 100, QuantConfig(bits=3, group_size=32))
    with pytest.warns(RuntimeWarning, match="unavailable.*eager torch code.*no-such-compiler"):
        got = dequantize_fast(w, torch.bfloat16)
    _assert_bit_equal(got, dequantize_eager(w, torch.bfloat16), "no compiler")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # reported once
        dequantize_fast(w, torch.bfloat16)
    status = native_status()
    assert not status["active"] and "no-such-compiler" in status["reason"]
    assert not any((tmp_path / "cache").rglob("*.so"))


def _copy_default_build(tmp_path: Path) -> Path:
    """The default cache's build folder copied under a fresh cache root (same key: found there, not rebuilt)."""
    src = Path(str(native_status()["library"])).parent
    dst = tmp_path / "cache" / "native" / src.name
    shutil.copytree(src, dst)
    return dst


def test_corrupted_cached_library_is_rebuilt(native, monkeypatch, tmp_path):
    build = _copy_default_build(tmp_path)
    lib = build / "libmqdequant.so"
    lib.write_bytes(b"\x7fELF not a library" + bytes(200))  # its recorded SHA-256 no longer matches
    monkeypatch.setenv("MEDQUANT_CACHE_DIR", str(tmp_path / "cache"))
    reset_native()
    status = native_status()
    assert status["active"], status["reason"]
    assert status["library"] == str(lib) and lib.stat().st_size > 1000  # rebuilt in place
    w = _weights(24, 130, QuantConfig(bits=4, symmetric=False, group_size=32))
    _assert_bit_equal(_native(w, torch.bfloat16), dequantize_eager(w, torch.bfloat16), "rebuilt")


def test_foreign_cached_library_is_declined(native, monkeypatch, tmp_path):
    """A loadable library with a matching recorded hash but another build key: declined, removed, and the
    eager code runs (never called)."""
    build = _copy_default_build(tmp_path)
    src = tmp_path / "foreign.c"
    src.write_text('const char *mq_build_key(void) { return "someone-else"; }\n'
                   "int mq_abi(void) { return 1; }\nint mq_has_f16(void) { return 0; }\n"
                   "int mq_openmp(void) { return 0; }\nint mq_dequant(void) { return 0; }\n"
                   "int mq_gemv4_caps(void) { return 0; }\nint mq_call(void) { return 0; }\n")
    lib = build / "libmqdequant.so"
    subprocess.run([shutil.which("cc") or shutil.which("gcc") or "clang", "-shared", "-fPIC", "-o", str(lib),
                    str(src)], check=True, capture_output=True)
    (build / "libmqdequant.so.sha256").write_text(hashlib.sha256(lib.read_bytes()).hexdigest())
    monkeypatch.setenv("MEDQUANT_CACHE_DIR", str(tmp_path / "cache"))
    reset_native()
    w = _weights(16, 64, QuantConfig(bits=4, group_size=32))
    with pytest.warns(RuntimeWarning, match="foreign"):
        got = dequantize_fast(w, torch.bfloat16)
    _assert_bit_equal(got, dequantize_eager(w, torch.bfloat16), "foreign library declined")
    status = native_status()
    assert not status["active"] and "someone-else" in status["reason"]
    assert not build.exists()  # removed: the next process builds its own


def test_declines_what_it_does_not_take(native):
    w = _weights(16, 64, QuantConfig(bits=4, group_size=32))
    s, z = cpu_mod._scale_zero(w)
    assert dequantize_native(w, torch.float64, s, z) is None
    _assert_bit_equal(dequantize_fast(w, torch.float64).float(), dequantize_eager(w, torch.float64).float(),
                      "float64 runs eager")


@pytest.mark.parametrize("cfg,bits", [(QuantConfig(bits=4, group_size=32), 4), (QuantConfig(bits=3, group_size=32), 3),
                                      (QuantConfig(bits=8, scope="channel"), 8)])
def test_into_writes_row_ranges(native, cfg, bits):
    w = _weights(40, 100, cfg)
    s, z = cpu_mod._scale_zero(w)
    nd = native_mod.native_dequantizer(w, torch.bfloat16, s, z)
    whole = nd()
    _assert_bit_equal(whole, dequantize_eager(w, torch.bfloat16), "whole")
    buf = torch.full((48, 100), float("nan"), dtype=torch.bfloat16)
    for r0, r1 in ((0, 16), (16, 37), (37, 40), (5, 5)):
        assert nd.into(r0, r1, buf[: r1 - r0]) is True
        _assert_bit_equal(buf[: r1 - r0], whole[r0:r1], f"rows {r0}..{r1}")
    wide = torch.zeros(3, 128, dtype=torch.bfloat16)  # a row stride other than k
    assert nd.into(10, 13, wide[:, :100]) and torch.equal(wide[:, :100], whole[10:13])
    assert not wide[:, 100:].any()  # nothing written past k
    with pytest.raises(ValueError, match="row range"):
        nd.into(30, 41, buf[:11])
    with pytest.raises(ValueError, match="shape"):
        nd.into(0, 4, buf[:5])
    with pytest.raises(ValueError, match="bfloat16"):
        nd.into(0, 4, torch.empty(4, 100))


@pytest.mark.parametrize("cfg,bits", [(QuantConfig(bits=4, group_size=64), 4), (QuantConfig(bits=8, scope="channel"), 8),
                                      (QuantConfig(bits=3, group_size=64), 3)])
def test_dense_path_in_row_slices(native, monkeypatch, cfg, bits):
    """A weight above the slice threshold is dequantized a slice of rows at a time (the last slice shorter):
    the same output as the whole-weight dense path (bf16 GEMMs of other shapes: within bf16 rounding) and the
    float64 reference; with the native kernel disabled, the eager code gives the same result."""
    g = torch.Generator().manual_seed(1)
    lin = nn.Linear(192, 80)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(80, 192, generator=g))
    layer = QuantLinear.from_float(lin, cfg)
    set_cpu_compute_dtype(torch.bfloat16)
    set_cpu_prefill_kernel("dense")
    x = torch.randn(300, 192, generator=g)
    assert cpu_path(x, layer.packed_weight(bits)) == "dense"
    with torch.no_grad():
        y_whole = layer(x)
    slices = []
    real_into = native_mod.NativeDequantizer.into

    def spy(self, r0, r1, out):
        slices.append((r0, r1))
        return real_into(self, r0, r1, out)

    monkeypatch.setattr(native_mod.NativeDequantizer, "into", spy)
    monkeypatch.setattr(cpu_mod, "DENSE_CHUNK_MIN_BYTES", 0)
    # 32 rows of the dense path's dtype: bfloat16, or float32 on a CPU without bfloat16 arithmetic
    monkeypatch.setattr(cpu_mod, "DENSE_CHUNK_BYTES", 32 * 192 * (2 if cpu_mod.cpu_features()["native_bf16"] else 4))
    clear_cpu_cache()
    with torch.no_grad():
        y_sliced = layer(x)
    assert slices == [(0, 32), (32, 64), (64, 80)]
    ref = x.double() @ layer.dequantized_weight(torch.float64).t() + layer.bias.double()
    scale = ref.abs().max()
    assert float((y_sliced.double() - y_whole.double()).abs().max() / scale) < 1e-2
    assert float((y_sliced.double() - ref).abs().max() / scale) < 2e-2
    monkeypatch.setenv("MEDQUANT_NATIVE", "0")
    with torch.no_grad():
        y_eager = layer(x)  # into() declines: the eager code runs the whole weight
    assert float((y_eager.double() - y_sliced.double()).abs().max() / scale) < 1e-2
