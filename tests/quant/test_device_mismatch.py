"""An input on another device than a quantized layer's tensors is refused, before any kernel runs.

Reference: plain torch with the dequantized float layer (``to_float()``). Observed with torch 2.x on CPU:

* ``nn.Linear`` (with bias) on CPU and a meta input, or on meta and a CPU input: ``RuntimeError`` ("Tensor on
  device cpu is not on the expected device meta!");
* ``nn.Linear`` without bias, ``nn.Conv2d`` (CPU weight, meta input) and ``nn.Embedding`` (meta table, CPU ids)
  return a meta tensor, ``nn.Embedding`` (CPU table, meta ids) and ``nn.Conv2d`` (meta weight, CPU input) a CPU
  tensor computed from no data: no error is given. The quantized layers refuse these as well (a stricter rule, on purpose: a meta result from real
  weights hides a model that was never moved), with the exception class torch uses where it does raise
  (``RuntimeError``);
* meta input with meta weights: a meta result of the right shape (shape inference), which the quantized layers
  give as well.

Every backend the dispatcher can be forced to on CPU tensors (:func:`medquant.kernels.backend_names`, those that
run a CPU call here: ``torch``, ``cpu``, ``triton`` in the interpreter) and every CPU path the layers' configs
reach (native / aten int4 / int8 / dense at large ``M`` / the reference for a group size off 32 / mixed
bit-widths with float and pruned rows / the float64 path) is tried.
"""
from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from medquant.kernels import (
    backend_names,
    force_backend,
    get_cpu_int4_kernel,
    packed_linear,
    set_cpu_int4_kernel,
)
from medquant.quant.config import QuantConfig
from medquant.quant.modules import QuantConv2d, QuantEmbedding, QuantLinear

CONFIGS = {
    "w4g32": QuantConfig(bits=4, scope="group", group_size=32),  # native4 / aten int4
    "w8ch": QuantConfig(bits=8, scope="channel"),  # native8 / aten int8
    "w3g32": QuantConfig(bits=3, scope="group", group_size=32),  # dense 3-bit stream (native3) / int4
    "w4g16": QuantConfig(bits=4, scope="group", group_size=16),  # off the fast kernels: the torch reference
    "mixed": QuantConfig(bits=4, channel_bits=[4] * 16 + [8] * 8 + [16] * 4 + [0] * 4, scope="channel"),
    "f16": QuantConfig(bits=16, scope="channel"),  # float rows only
}
EMBED_CONFIGS = ("w4g32", "w8ch", "w3g32")


def _cpu_backends() -> list[str]:
    """``"auto"`` and every backend a forced CPU call of a quantized layer runs on here."""
    out = []
    q = QuantLinear.from_float(nn.Linear(64, 32), CONFIGS["w4g32"])
    for be in backend_names():
        try:
            with warnings.catch_warnings(), force_backend(be):
                warnings.simplefilter("ignore")
                q(torch.randn(2, 64))
        except RuntimeError:  # e.g. Triton without its interpreter
            continue
        out.append(be)
    return out


BACKENDS = _cpu_backends()


@pytest.fixture
def aten_kernels():
    """The CPU backend's aten weight-only kernels (int4 / int8) in place of medquant's native ones."""
    before = get_cpu_int4_kernel()
    set_cpu_int4_kernel("aten")
    yield
    set_cpu_int4_kernel(before)


def _outcome(fn):
    """``("raise", exception)`` or ``("ok", result)``."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return "ok", fn()
    except Exception as e:  # noqa: BLE001  (the reference's behaviour, whatever it is)
        return "raise", e


def _check_refusal(q, x, backend, float_layer):
    """``q(x)`` raises a clear device error under ``backend``; compared with torch's float layer on ``x``."""
    kind, err = _outcome(lambda: _call(q, x, backend))
    assert kind == "raise", f"{type(q).__name__} on {backend} returned a {err.device} tensor for a {x.device} input"
    assert isinstance(err, RuntimeError), f"{type(err).__name__}: {err}"
    msg = str(err)
    layer_dev = next(iter(q.buffers())).device
    assert type(q).__name__ in msg and str(x.device) in msg and str(layer_dev) in msg and ".to(" in msg, msg
    ref_kind, ref = _outcome(lambda: float_layer(x))
    if ref_kind == "raise":  # torch refuses too: same exception class family
        assert isinstance(err, type(ref)) or isinstance(ref, RuntimeError), (type(err), type(ref))
    else:  # torch lets one meta side through (a meta result, or one computed from meta weights): we are stricter
        assert "meta" in (x.device.type, layer_dev.type), (x.device, layer_dev, ref.device)


def _call(q, x, backend):
    with force_backend(backend):
        return q(x)


# ------------------------------------------------------------------------------------------------ QuantLinear
def _linear_case(cfg, bias, m, backend, dtype=torch.float32):
    torch.manual_seed(0)
    q = QuantLinear.from_float(nn.Linear(64, 32, bias=bias), CONFIGS[cfg])
    ref = q.to_float()
    x = torch.randn(m, 64, dtype=dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        y = _call(q, x, backend)  # the same layer still runs a CPU input (and warms its prepared kernel)
    torch.testing.assert_close(y, ref.to(dtype)(x), rtol=1e-2, atol=1e-2)
    _check_refusal(q, x.to("meta"), backend, ref)
    _check_refusal(q, x.to("meta").reshape(m, 1, 64), backend, ref)  # a 3-D input too


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cfg", list(CONFIGS))
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("m", [1, 64])  # decode (weight-only kernels) and prefill (dense / gemm) sizes
def test_linear_meta_input_cpu_weights(backend, cfg, bias, m):
    _linear_case(cfg, bias, m, backend)


@pytest.mark.parametrize("cfg", ["w4g32", "w8ch", "w3g32"])
@pytest.mark.parametrize("m", [1, 64])
def test_linear_meta_input_cpu_weights_aten_kernels(cfg, m, aten_kernels):
    _linear_case(cfg, False, m, "cpu")


@pytest.mark.parametrize("cfg", list(CONFIGS))
@pytest.mark.parametrize("bias", [True, False])
def test_linear_meta_input_cpu_weights_float64(cfg, bias):
    """float64 inputs take the dequantized-weight path, not the packed kernels."""
    _linear_case(cfg, bias, 2, "auto", torch.float64)


def test_linear_decode_lane_after_warm_up_refuses_meta_input():
    """The eager decode lane (prepared at the first CPU call) is never taken for a tensor of another device."""
    q = QuantLinear.from_float(nn.Linear(64, 32, bias=False), CONFIGS["w4g32"])
    x = torch.randn(1, 64)
    with torch.inference_mode():
        for _ in range(3):
            q(x)
        with pytest.raises(RuntimeError, match=r"QuantLinear.*meta.*cpu"):
            q(x.to("meta"))


@pytest.mark.parametrize("cfg", ["w4g32", "mixed", "f16"])
def test_linear_meta_weights_cpu_input(cfg):
    q = QuantLinear.from_float(nn.Linear(64, 32), CONFIGS[cfg])
    ref = q.to_float().to("meta")
    q = q.to("meta")
    _check_refusal(q, torch.randn(2, 64), "auto", ref)


@pytest.mark.parametrize("cfg", ["w4g32", "mixed", "f16"])
@pytest.mark.parametrize("bias", [True, False])
def test_linear_meta_input_meta_weights_gives_shapes(cfg, bias):
    """Shape inference on a meta model: the shape and dtype of the float layer's meta result."""
    q = QuantLinear.from_float(nn.Linear(64, 32, bias=bias), CONFIGS[cfg])
    ref = q.to_float().to("meta")
    q = q.to("meta")
    x = torch.randn(3, 5, 64, device="meta")
    y, want = q(x), ref(x)
    assert y.device.type == "meta" and y.shape == want.shape == (3, 5, 32) and y.dtype == want.dtype


@pytest.mark.parametrize("backend", BACKENDS)
def test_packed_linear_meta_input_cpu_weight(backend):
    """The kernel entry point itself: its custom op's meta kernel would answer a meta ``x`` with a meta result."""
    q = QuantLinear.from_float(nn.Linear(64, 32, bias=False), CONFIGS["w4g32"])
    with pytest.raises(RuntimeError, match=r"packed_linear got an input on device meta.*device cpu"):
        packed_linear(torch.randn(2, 64, device="meta"), q.packed_weight(4), backend=backend)
    with pytest.raises(ValueError, match="device meta"):  # the class this check raised before, still caught
        packed_linear(torch.randn(2, 64, device="meta"), q.packed_weight(4), backend=backend)


@pytest.mark.parametrize("copy_with", ["deepcopy", "pickle"])
def test_copied_layer_still_checks(copy_with):
    import copy
    import pickle

    q = QuantLinear.from_float(nn.Linear(64, 32, bias=False), CONFIGS["mixed"])
    c = copy.deepcopy(q) if copy_with == "deepcopy" else pickle.loads(pickle.dumps(q))
    x = torch.randn(2, 64)
    torch.testing.assert_close(c(x), q.to_float()(x), rtol=1e-4, atol=1e-4)
    with pytest.raises(RuntimeError, match=r"QuantLinear got an input on device meta.*device cpu"):
        c(x.to("meta"))


# ------------------------------------------------------------------------------------------------ QuantConv2d
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cfg", ["w4g32", "w8ch", "mixed"])
@pytest.mark.parametrize("bias", [True, False])
def test_conv_meta_input_cpu_weights(backend, cfg, bias):
    torch.manual_seed(0)
    q = QuantConv2d.from_float(nn.Conv2d(4, 32, 4, bias=bias), CONFIGS[cfg])
    ref = q.to_float()
    x = torch.randn(1, 4, 6, 6)
    torch.testing.assert_close(_call(q, x, backend), ref(x), rtol=1e-4, atol=1e-4)
    _check_refusal(q, x.to("meta"), backend, ref)


def test_conv_meta_weights():
    q = QuantConv2d.from_float(nn.Conv2d(4, 32, 4), CONFIGS["w4g32"])
    ref = q.to_float().to("meta")
    q = q.to("meta")
    _check_refusal(q, torch.randn(1, 4, 6, 6), "auto", ref)
    x = torch.randn(2, 4, 6, 6, device="meta")
    y = q(x)
    assert y.device.type == "meta" and y.shape == ref(x).shape == (2, 32, 3, 3)


# ------------------------------------------------------------------------------------------------ QuantEmbedding
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cfg", EMBED_CONFIGS)
def test_embedding_meta_ids_cpu_table(backend, cfg):
    torch.manual_seed(0)
    q = QuantEmbedding.from_float(nn.Embedding(32, 64), CONFIGS[cfg])
    ref = q.to_float()
    ids = torch.tensor([[1, 2, 31]])
    torch.testing.assert_close(_call(q, ids, backend), ref(ids), rtol=0, atol=0)
    _check_refusal(q, ids.to("meta"), backend, ref)


def test_embedding_meta_table():
    q = QuantEmbedding.from_float(nn.Embedding(32, 64), CONFIGS["w4g32"])
    ref = q.to_float().to("meta")
    q = q.to("meta")
    _check_refusal(q, torch.tensor([1, 2]), "auto", ref)
    ids = torch.tensor([[1, 2, 31]], device="meta")
    y = q(ids)  # shape inference: no index can be range-checked, as for nn.Embedding
    assert y.device.type == "meta" and y.shape == ref(ids).shape == (1, 3, 64) and y.dtype == ref(ids).dtype


def test_embedding_dtype_checked_with_device():
    """The index dtype rule is unchanged (``TypeError`` naming the dtype) for ids on the table's device."""
    q = QuantEmbedding.from_float(nn.Embedding(32, 64), CONFIGS["w4g32"])
    with pytest.raises(TypeError, match="torch.float32"):
        q(torch.zeros(2))


# ------------------------------------------------------------------------------------------------ CUDA
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@cuda
@pytest.mark.parametrize("layer_on", ["cpu", "cuda"])
def test_cuda_cpu_mismatch(layer_on):
    x_on = "cuda" if layer_on == "cpu" else "cpu"
    torch.manual_seed(0)
    lin = QuantLinear.from_float(nn.Linear(64, 32), CONFIGS["w4g32"]).to(layer_on)
    conv = QuantConv2d.from_float(nn.Conv2d(4, 32, 4), CONFIGS["w4g32"]).to(layer_on)
    emb = QuantEmbedding.from_float(nn.Embedding(32, 64), CONFIGS["w4g32"]).to(layer_on)
    for q, x in ((lin, torch.randn(2, 64)), (conv, torch.randn(1, 4, 6, 6)), (emb, torch.tensor([1, 2]))):
        _check_refusal(q, x.to(x_on), "auto", q.to_float())
