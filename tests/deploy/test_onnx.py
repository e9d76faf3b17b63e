"""format="onnx": weights bit-exact in the file, ONNX Runtime's integer kernels vs medquant's simulation within the
derived tolerance, integer kernels present in ORT's optimized graph, dynamic batch, errors.

References: onnx.numpy_helper (the initializers as stored), onnxruntime (the deployed outputs and the fused graph),
plain torch BatchNorm statistics for the folded scales, a hand-built ONNX QuantizeLinear/DequantizeLinear graph
for the activation rounding.
"""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from onnx import helper, numpy_helper
from torch import nn

import medquant.deploy as D
from medquant.data import DataDirNotSet, default_data_dir, load_npz_split
from medquant.deploy.onnx import (
    CalibrationError,
    OnnxClassifier,
    calibrate_activations,
    logits_tolerance,
    optimized_op_counts,
    session_options,
)
from medquant.deploy.onnx_sim import fake_quantize_activation
from medquant.quant.api import quantize_
from medquant.quant.config import QuantConfig
from medquant.testing.zoo import ZOO_BY_NAME, tiny_cnn

INT8 = QuantConfig(bits=8, scope="channel")


def _bn_stats(model: nn.Module, seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.rand(n, generator=g) - 0.5)
            m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(n, generator=g) + 0.5)
            m.bias.data.copy_(torch.rand(n, generator=g) * 0.4 - 0.2)
    return model.eval()


def _inits(path) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer}


def _init_types(path) -> dict[str, int]:
    return {t.name: t.data_type for t in onnx.load(str(path)).graph.initializer}


class _Block(nn.Module):
    """A ResNet basic block (BN, in-place ReLU used twice, residual add, 1x1 downsample)."""

    def __init__(self, cin: int, c: int, stride: int) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(cin, c, 3, stride, 1, bias=False), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, 1, 1, bias=False), nn.BatchNorm2d(c)
        self.relu = nn.ReLU(inplace=True)
        self.down = nn.Sequential(nn.Conv2d(cin, c, 1, stride, bias=False), nn.BatchNorm2d(c)) if stride > 1 else None

    def forward(self, x):
        idt = x if self.down is None else self.down(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += idt
        return self.relu(out)


class TinyResNet(nn.Module):
    def __init__(self, num_classes: int = 3) -> None:
        super().__init__()
        self.stem, self.bn, self.relu = nn.Conv2d(3, 32, 3, 1, 1, bias=False), nn.BatchNorm2d(32), nn.ReLU(True)
        self.pool = nn.MaxPool2d(2)
        self.b1, self.b2 = _Block(32, 32, 1), _Block(32, 64, 2)
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x):
        x = self.b2(self.b1(self.pool(self.relu(self.bn(self.stem(x))))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def _calib(shape, n=3, batch=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, *shape, generator=g) for _ in range(n)]


# ---------------------------------------------------------------------------------------------------------------
def test_activation_rounding_matches_onnx_quantize_dequantize():
    """fake_quantize_activation == ORT QuantizeLinear(uint8) -> DequantizeLinear, ties (half to even) and saturation
    included."""
    s, z = np.float32(0.05), np.uint8(131)
    k = np.arange(-140, 140, dtype=np.float32)
    x = np.concatenate([(k + 0.5) * s, k * s, np.array([-1e3, 1e3, 0.0], np.float32)]).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"]), helper.make_node("DequantizeLinear", ["q", "s", "z"],
                                                                                       ["y"])],
        "qdq", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [len(x)])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [len(x)])],
        [numpy_helper.from_array(np.array(s), "s"), numpy_helper.from_array(np.array(z), "z")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    want = sess.run(None, {"x": x})[0]
    got = fake_quantize_activation(torch.from_numpy(x), torch.tensor(s), torch.tensor(z)).numpy()
    np.testing.assert_array_equal(got, want)


def test_cnn_bn_folded_weights_bit_exact_and_integer_kernels(tmp_path):
    model = _bn_stats(tiny_cnn())
    quantize_(model, INT8)
    sim = calibrate_activations(model, _calib((3, 16, 16)))
    report = D.export(sim, tmp_path / "cnn.onnx", format="onnx", example_inputs=torch.randn(4, 3, 16, 16))
    inits = _inits(tmp_path / "cnn.onnx")
    for conv, bn in (("features.0", "features.1"), ("features.3", "features.4")):
        pw = model.get_submodule(conv).packed_weight(8)
        codes = inits[f"{conv}.weight_codes"]
        assert codes.dtype == np.int8 and inits[f"{conv}.weight_zero_point"].dtype == np.int8
        want = (pw.codes()[:, :pw.k].to(torch.int16) - 128).numpy().reshape(codes.shape)
        np.testing.assert_array_equal(codes, want)  # medquant's codes, bit for bit
        assert not inits[f"{conv}.weight_zero_point"].any()
        b = model.get_submodule(bn)
        f = b.weight.detach() / torch.sqrt(b.running_var + b.eps)
        np.testing.assert_array_equal(inits[f"{conv}.weight_scale"], (pw.scales.float()[:, 0] * f).numpy())
        shift = b.bias.detach() - b.running_mean * f
        np.testing.assert_allclose(inits[f"{conv}.bias"], shift.numpy(), rtol=0, atol=0)
    pw = model.classifier.packed_weight(8)  # no BatchNorm: scales copied exactly
    np.testing.assert_array_equal(inits["classifier.weight_scale"], pw.scales.float()[:, 0].numpy())
    rows = {r.name: r for r in report.layers}
    assert rows["classifier"].how == "exact repack" and rows["features.0"].how == "near-exact"
    ops = optimized_op_counts(tmp_path / "cnn.onnx")
    assert ops["QLinearConv"] == 2 and ops["Conv"] == 0 and ops["Relu"] == 0, ops


def test_ort_matches_simulation_on_real_images(tmp_path):
    """PneumoniaMNIST test set (624 real chest X-rays): ORT logits within the derived tolerance of the simulation,
    the same prediction on >= 99% of the images."""
    try:
        root = default_data_dir()
    except DataDirNotSet:
        pytest.skip("MEDQUANT_DATA_DIR not set")
    npz = root / "pneumoniamnist" / "pneumoniamnist.npz"
    if not npz.exists():
        pytest.skip(f"{npz} absent")
    images = load_npz_split(npz, "test")
    x = torch.from_numpy(images).float().div(255.0).sub(0.5).div(0.25).unsqueeze(1)
    tr_images, tr_labels = load_npz_split(npz, "train", with_labels=True)
    lab = tr_labels.reshape(-1)
    pick = np.concatenate([np.flatnonzero(lab == 0)[:256], np.flatnonzero(lab == 1)[:256]])  # balanced
    train = torch.from_numpy(tr_images[pick]).float().div(255.0).sub(0.5).div(0.25).unsqueeze(1)
    labels = torch.from_numpy(lab[pick]).long()
    model = tiny_cnn(num_classes=2, in_channels=1, seed=3).eval()  # eval: BatchNorm as a fixed affine map
    opt = torch.optim.Adam(model.parameters(), 3e-3)
    gen = torch.Generator().manual_seed(0)
    for _ in range(4):  # a briefly trained classifier, so that predictions vary between images
        for idx in torch.randperm(512, generator=gen).split(64):
            opt.zero_grad()
            F.cross_entropy(model(train[idx]), labels[idx]).backward()
            opt.step()
    model.eval()
    quantize_(model, INT8)
    sim = calibrate_activations(model, train.split(64))
    D.export(sim, tmp_path / "m.onnx", format="onnx", example_inputs=x[:2])
    got = OnnxClassifier(tmp_path / "m.onnx")(x)
    with torch.no_grad():
        want = sim(x).numpy()
        unquantized = model(x).numpy()
    tol = logits_tolerance(sim)
    spread = float(want.max() - want.min())
    assert tol is not None and tol < 0.2 * spread  # the bound is informative
    assert np.abs(got - want).max() <= tol
    assert (got.argmax(1) == want.argmax(1)).mean() >= 0.99
    assert 0.1 < want.argmax(1).mean() < 0.9  # both classes predicted: the agreement is not trivial
    assert np.abs(unquantized - want).mean() > 10 * np.abs(got - want).mean()  # ORT is nearer the sim than float


def test_residual_block_qlinearadd_and_dynamic_batch(tmp_path):
    model = _bn_stats(TinyResNet())
    quantize_(model, INT8)
    sim = calibrate_activations(model, _calib((3, 16, 16)), method="percentile", percentile=99.9)
    D.export(sim, tmp_path / "r.onnx", format="onnx", example_inputs=torch.randn(2, 3, 16, 16))
    ops = optimized_op_counts(tmp_path / "r.onnx")
    assert ops["QLinearConv"] == 6 and ops["QLinearAdd"] == 2 and ops["Conv"] == 0, ops
    clf = OnnxClassifier(tmp_path / "r.onnx")
    for batch in (1, 7):
        x = torch.randn(batch, 3, 16, 16)
        with torch.no_grad():
            want = sim(x).numpy()
        got = clf(x)
        assert got.shape == (batch, 3)
        assert np.abs(got - want).max() <= logits_tolerance(sim)


def test_hf_vit_int8_qgemm(tmp_path):
    entry = ZOO_BY_NAME["vit"]
    model = entry.build()
    n_linear = sum(isinstance(m, nn.Linear) for m in model.modules())
    quantize_(model, INT8)
    g = torch.Generator().manual_seed(0)
    calib = [entry.inputs_fn(model, g)["pixel_values"] for _ in range(3)]
    sim = calibrate_activations(model, calib)
    x = entry.inputs_fn(model, g)["pixel_values"]
    D.export(sim, tmp_path / "vit", format="onnx", example_inputs=x)
    ops = optimized_op_counts(tmp_path / "vit" / "model.onnx")
    assert ops["QGemm"] == n_linear - 1 and ops["QLinearConv"] == 1, ops  # the classifier keeps float logits
    got = OnnxClassifier(tmp_path / "vit")(torch.cat([x, x, x]))
    with torch.no_grad():
        want = sim(torch.cat([x, x, x])).logits.numpy()
    assert np.abs(got - want).max() <= logits_tolerance(sim)


def test_w4_linear_matmulnbits_bytes_are_medquant_words(tmp_path):
    entry = ZOO_BY_NAME["vit"]
    model = entry.build()
    quantize_(model, QuantConfig(bits=4, scope="group", group_size=32))
    x = entry.inputs_fn(model, torch.Generator().manual_seed(0))["pixel_values"]
    report = D.export(model, tmp_path / "w4.onnx", format="onnx", example_inputs=x)  # weight-only: no calib
    inits = _inits(tmp_path / "w4.onnx")
    name = "vit.layers.0.mlp.fc1" if "vit.layers.0.mlp.fc1.weight_packed" in inits else None
    name = name or next(k[: -len(".weight_packed")] for k in inits if k.endswith(".weight_packed"))
    pw = model.get_submodule(name).packed_weight(4)
    words_as_bytes = pw.qweight.contiguous().view(torch.uint8).numpy()  # little-endian int32 words
    np.testing.assert_array_equal(inits[f"{name}.weight_packed"].reshape(pw.n, -1), words_as_bytes)
    np.testing.assert_array_equal(inits[f"{name}.weight_scale"], pw.scales.float().reshape(-1).numpy())
    assert f"{name}.weight_zero_point" not in inits  # symmetric: MatMulNBits' default zero point 8
    assert all(r.how == "exact repack" for r in report.layers if r.target.startswith("MatMulNBits"))
    ops = optimized_op_counts(tmp_path / "w4.onnx")
    assert ops["MatMulNBits"] >= 8, ops
    with torch.no_grad():
        want = model(x).logits.numpy()  # the medquant model itself (weight-only: no activation quantization)
    got = OnnxClassifier(tmp_path / "w4.onnx")(x)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_w4_conv_is_blockwise_int4_and_runs_float_conv(tmp_path):
    model = _bn_stats(tiny_cnn())
    quantize_(model, QuantConfig(bits=4, scope="group", group_size=16, symmetric=False))
    x = torch.randn(3, 3, 16, 16)
    D.export(model, tmp_path / "c4.onnx", format="onnx", example_inputs=x)
    types = _init_types(tmp_path / "c4.onnx")
    assert types["features.3.weight_codes"] == onnx.TensorProto.UINT4
    assert types["features.3.weight_zero_point"] == onnx.TensorProto.UINT4
    codes = _inits(tmp_path / "c4.onnx")["features.3.weight_codes"]
    pw = model.get_submodule("features.3").packed_weight(4)
    np.testing.assert_array_equal(codes.astype(np.int32), pw.codes().numpy().astype(np.int32))
    ops = optimized_op_counts(tmp_path / "c4.onnx")
    assert ops["QLinearConv"] == 0 and ops["Conv"] + ops["FusedConv"] == 2, ops
    with torch.no_grad():
        want = model(x).numpy()
    # weight-only file: the int4 weights are dequantized once at session creation by default, or at every call
    assert session_options(tmp_path / "c4.onnx").get_session_config_entry("session.disable_quant_qdq") == "1"
    for dq in (None, False):
        got = OnnxClassifier(tmp_path / "c4.onnx", dequantize_weights=dq)(x)
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_low_bits_refused_unless_promoted(tmp_path):
    model = tiny_cnn()
    quantize_(model, QuantConfig(bits=3, scope="channel"))
    with pytest.raises(D.ExportError, match=r"features\.0: int3.*promote=True"):
        calibrate_activations(model, _calib((3, 16, 16)))
    sim = calibrate_activations(model, _calib((3, 16, 16)), promote=True)
    report = D.export(sim, tmp_path / "p.onnx", format="onnx", example_inputs=torch.randn(2, 3, 16, 16))
    assert all("3-bit codes stored in a 4-bit" in r.note for r in report.layers)
    w = _inits(tmp_path / "p.onnx")["classifier.weight_codes"]
    assert w.min() >= 0 and w.max() <= 7  # asymmetric 3-bit codes, unchanged


# ------------------------------------------------------------------------------------------------------ errors
def test_calibration_errors_name_the_batch_input_or_layer():
    model = tiny_cnn()
    quantize_(model, INT8)
    with pytest.raises(CalibrationError, match="calibration set is empty"):
        calibrate_activations(model, [])
    bad = _calib((3, 16, 16))
    bad[1][0, 0, 0, 0] = float("nan")
    with pytest.raises(CalibrationError, match="calibration batch 1: input 0 contains 1 NaN"):
        calibrate_activations(model, bad)
    with pytest.raises(CalibrationError, match="expected a tensor"):
        calibrate_activations(model, ["not an image"])

    class LogNet(nn.Module):  # NaN produced inside the network, at the classifier's input
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 2)

        def forward(self, x):
            return self.fc(torch.log(x))

    net = LogNet()
    quantize_(net, INT8)
    with pytest.raises(CalibrationError, match="batch 0: the activation at the input of fc contains"):
        calibrate_activations(net, [torch.randn(8, 4)], check=False)


def test_bad_example_inputs_are_named_example_inputs_not_a_calibration_batch(tmp_path):
    """A NaN in ``example_inputs`` was refused as "calibration batch 0" although no calibration batch had it; the
    message names ``example_inputs`` on every path (calibrated model, calibration in the call, no calibration
    needed), while a bad batch of ``calib`` (also the first, used as the example) keeps its batch number."""
    model = tiny_cnn()
    quantize_(model, INT8)
    sim = calibrate_activations(model, _calib((3, 16, 16)))
    x = torch.randn(2, 3, 16, 16)
    x[1, 2, 3, 4] = float("nan")
    msg = r"^example_inputs: input 0 contains 1 NaN/inf"
    with pytest.raises(CalibrationError, match=msg):
        D.export(sim, tmp_path / "a.onnx", format="onnx", example_inputs=x)
    with pytest.raises(CalibrationError, match=msg):
        D.export(model, tmp_path / "b.onnx", format="onnx", example_inputs=x, calib=_calib((3, 16, 16)))
    with pytest.raises(CalibrationError, match=msg):  # float model: traced without calibration
        D.export(tiny_cnn(), tmp_path / "c.onnx", format="onnx", example_inputs=(x,))
    with pytest.raises(CalibrationError, match=r"^example_inputs: expected a tensor or a tuple of tensors"):
        D.export(sim, tmp_path / "d.onnx", format="onnx", example_inputs="not an image")
    for i in (0, 1):
        bad = _calib((3, 16, 16))
        bad[i][0, 0, 0, 0] = float("nan")
        with pytest.raises(CalibrationError, match=rf"^calibration batch {i}: input 0 contains 1 NaN/inf"):
            D.export(model, tmp_path / "e.onnx", format="onnx", calib=bad)
    assert not list(tmp_path.iterdir())


def test_export_errors(tmp_path):
    model = tiny_cnn()
    quantize_(model, INT8)
    with pytest.raises(D.ExportError, match="pass calib="):
        D.export(model, tmp_path / "a.onnx", format="onnx", example_inputs=torch.randn(2, 3, 16, 16))

    class Branchy(nn.Module):  # data-dependent control flow: the trace keeps one branch
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(8, 2)

        def forward(self, x):
            return self.fc(x) if float(x.mean()) > 0 else -self.fc(x) * 3.0

    with pytest.raises(D.ExportError, match="does not represent the model"):
        D.export(Branchy(), tmp_path / "b.onnx", format="onnx", example_inputs=torch.rand(4, 8) + 0.1)

    class Unsupported(nn.Module):
        def forward(self, x):
            return torch.cummax(x, 1)[0]

    with pytest.raises(D.ExportError, match="cummax"):
        D.export(Unsupported(), tmp_path / "c.onnx", format="onnx", example_inputs=torch.randn(2, 5))


def test_wrong_input_at_run_time_names_the_input(tmp_path):
    model = tiny_cnn()
    quantize_(model, INT8)
    D.export(model, tmp_path / "m.onnx", format="onnx", calib=_calib((3, 16, 16)))
    clf = OnnxClassifier(tmp_path / "m.onnx")
    with pytest.raises(ValueError, match=r"input 'pixel_values' has shape \(2, 1, 16, 16\), the model expects "
                                         r"\(batch, 3, 16, 16\)"):
        clf(torch.randn(2, 1, 16, 16))
    with pytest.raises(ValueError, match="input 'pixel_values' has dtype int64"):
        clf(np.zeros((2, 3, 16, 16), dtype=np.int64))
    with pytest.raises(ValueError, match="takes 1 input"):
        clf(torch.randn(2, 3, 16, 16), torch.randn(2, 3, 16, 16))


def test_per_layer_mixed_precision_and_skipped_layer_kept(tmp_path):
    """8-bit, 4-bit and a skipped float layer in one network: each layer exported with its own scheme."""
    model = _bn_stats(TinyResNet())
    quantize_(model, {"_default": INT8, "b2.conv1": QuantConfig(bits=4, scope="group", group_size=32),
                      "b1.conv2": None})
    sim = calibrate_activations(model, _calib((3, 16, 16)))
    report = D.export(sim, tmp_path / "mix.onnx", format="onnx", example_inputs=torch.randn(2, 3, 16, 16))
    rows = {r.name: r for r in report.layers}
    assert rows["b2.conv1"].target.startswith("int4 block 32") and rows["b1.conv2"].how == "float"
    assert rows["b1.conv1"].target == "int8 per-channel QDQ"
    types = _init_types(tmp_path / "mix.onnx")
    assert types["b2.conv1.weight_codes"] == onnx.TensorProto.INT4 and "b1.conv2.weight_codes" not in types
    ops = optimized_op_counts(tmp_path / "mix.onnx")
    assert ops["QLinearConv"] == 4, ops  # stem, b1.conv1, b2.conv2, b2.down.0
    x = torch.randn(5, 3, 16, 16)
    with torch.no_grad():
        want = sim(x).numpy()
    assert np.abs(OnnxClassifier(tmp_path / "mix.onnx")(x) - want).max() <= logits_tolerance(sim)


def test_asymmetric_int8_is_uint8_with_medquant_zero_points(tmp_path):
    model = _bn_stats(tiny_cnn())
    quantize_(model, QuantConfig(bits=8, scope="channel", symmetric=False))
    D.export(model, tmp_path / "a.onnx", format="onnx", calib=_calib((3, 16, 16)), example_inputs=torch.randn(2, 3,
                                                                                                             16, 16))
    inits = _inits(tmp_path / "a.onnx")
    pw = model.classifier.packed_weight(8)
    assert inits["classifier.weight_codes"].dtype == np.uint8
    np.testing.assert_array_equal(inits["classifier.weight_codes"], pw.codes()[:, :pw.k].numpy())
    np.testing.assert_array_equal(inits["classifier.weight_zero_point"], pw.zeros.float()[:, 0].numpy())
    assert optimized_op_counts(tmp_path / "a.onnx")["QLinearConv"] == 2


# ------------------------------------------------------------------------------------------ fuzzer regressions
def _file_weight(path, name: str) -> torch.Tensor:
    """Layer ``name``'s weight as its DequantizeLinear computes it from the file's initializers (block-wise along K,
    or per output row), sliced to K: onnx.numpy_helper only, no medquant code."""
    model = onnx.load(str(path))
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    node = next(n for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[0] == f"{name}.weight_codes")
    codes, scale, zp = (inits[v].astype(np.float64) for v in node.input[:3])
    block = next((a.i for a in node.attribute if a.name == "block_size"), None)
    if block is None:
        codes = codes.reshape(codes.shape[0], -1)
        w = (codes - zp[:, None]) * scale[:, None]
    else:
        w = (codes - zp.repeat(block, 1)) * scale.repeat(block, 1)
    return torch.from_numpy(w).float()


@pytest.mark.parametrize("cfg,calib", [
    # dense 3-bit rows pad K = 200 to lcm(48, 32) = 288, quantize() alone to 240: int4 block-wise container
    (QuantConfig(3, group_size=48, channel_bits=(2, 3) * 32), False),
    # dense 6-bit rows pad K = 200 to 224: int8 per-channel QDQ (calibrated)
    (QuantConfig(6, scope="channel", channel_bits=(3, 6) * 32), True),
], ids=["g48-int4-blocked", "channel-int8-qdq"])
def test_promoted_mixed_layer_written_and_reported(tmp_path, cfg, calib):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(200, 64), nn.GELU(), nn.Linear(64, 4)).eval()
    quantize_(model, {"0": cfg, "2": QuantConfig(4, group_size=32)})
    x = _calib((200,), n=1)[0]
    kwargs = {"calib": _calib((200,))} if calib else {}
    with pytest.raises(D.ExportError, match=r"these layers: 0: layer mixes bit-widths .*promote=True"):  # names it
        D.export(model, tmp_path / "p.onnx", format="onnx", example_inputs=x, **kwargs)
    report = D.export(model, tmp_path / "p.onnx", format="onnx", example_inputs=x, promote=True, **kwargs)
    row = report.layers[0]
    assert row.how == "lossy requantization" and f"to {cfg.bits} bits" in row.note
    ref = model[0].dequantized_weight(torch.float32)
    got = _file_weight(tmp_path / "p.onnx", "0")[:, :200]
    assert row.max_abs_error == pytest.approx(float((got - ref).abs().max()), rel=1e-5) and row.max_abs_error > 0
    kept = model[0].row_bits() == cfg.bits  # rows already at the top width keep their values
    torch.testing.assert_close(got[kept], ref[kept], rtol=0, atol=1e-6)


def test_relu_after_matmulnbits_layer_is_in_the_graph(tmp_path):
    """A ReLU after a weight-only 4-bit Linear (MatMulNBits) stays a Relu node; ORT matches the medquant model."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 4)).eval()
    quantize_(model, {"0": QuantConfig(4, group_size=32), "2": INT8})
    calib = _calib((64,), n=4)
    x = torch.cat(calib)  # inside the calibrated activation ranges
    with torch.no_grad():
        want = model(x).numpy()
    for i, sim in enumerate((calibrate_activations(model, calib), calibrate_activations(model, calib, check=False))):
        report = D.export(sim, tmp_path / f"r{i}.onnx", format="onnx", example_inputs=calib[0])
        assert report.layers[0].target.startswith("MatMulNBits")
        assert [n.op_type for n in onnx.load(str(tmp_path / f"r{i}.onnx")).graph.node].count("Relu") == 1
        got = OnnxClassifier(tmp_path / f"r{i}.onnx")(x)
        assert np.abs(got - want).max() <= 0.05 * np.abs(want).max()  # int8 activations; without the ReLU ~90%


def test_shared_zero_point_of_int4_and_int8_layers_loads(tmp_path):
    """An all-zero zero point shared (de-duplicated) by an int4 and an int8 block-wise layer: each DequantizeLinear
    gets its own type, and ONNX Runtime loads and runs the file."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 128)).eval()
    quantize_(model, {"0": QuantConfig(4, symmetric=True, group_size=96),
                      "2": QuantConfig(8, symmetric=True, group_size=64)})
    x = torch.randn(4, 128)
    D.export(model, tmp_path / "s.onnx", format="onnx", example_inputs=x, verify=False)
    types = _init_types(tmp_path / "s.onnx")
    assert types["0.weight_codes"] == types["0.weight_zero_point"] == onnx.TensorProto.INT4
    assert types["2.weight_codes"] == types["2.weight_zero_point"] == onnx.TensorProto.INT8
    with torch.no_grad():
        want = model(x).numpy()
    np.testing.assert_allclose(OnnxClassifier(tmp_path / "s.onnx")(x), want, rtol=1e-4, atol=1e-4)


def test_failed_verification_leaves_no_file_and_existing_file_needs_overwrite(tmp_path, monkeypatch):
    model = tiny_cnn()
    quantize_(model, QuantConfig(bits=4, scope="group", group_size=16))
    x = torch.randn(2, 3, 16, 16)
    target = tmp_path / "m.onnx"
    D.export(model, target, format="onnx", example_inputs=x)
    before = target.read_bytes()
    with pytest.raises(D.ExportError, match=r"m\.onnx exists; pass overwrite=True"):
        D.export(model, target, format="onnx", example_inputs=x)
    D.export(model, target, format="onnx", example_inputs=x, overwrite=True)

    def refuse(*args, **kwargs):
        raise RuntimeError("[ONNXRuntimeError] : 1 : FAIL : Type Error")

    monkeypatch.setattr(ort, "InferenceSession", refuse)
    for path in (tmp_path / "new.onnx", target):
        with pytest.raises(D.ExportError, match="onnxruntime cannot load the exported graph, not written: .*FAIL"):
            D.export(model, path, format="onnx", example_inputs=x, overwrite=True)
    assert not (tmp_path / "new.onnx").exists() and target.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]  # no temporary file left


def test_bad_overwrite_or_a_file_in_place_of_the_folder_is_refused_and_keeps_the_file(tmp_path):
    model = nn.Sequential(nn.Linear(32, 16)).eval()
    quantize_(model, QuantConfig(bits=4, scope="group", group_size=32))
    x = torch.randn(2, 32)
    target = tmp_path / "m.onnx"
    target.write_bytes(b"keep")
    for bad in ("no", 1, None):  # not a bool: refused, not taken as "replace it"
        with pytest.raises(D.ExportError, match=r"overwrite must be True or False"):
            D.export(model, target, format="onnx", example_inputs=x, overwrite=bad)
    with pytest.raises(D.ExportError, match=r"verify must be True or False"):
        D.export(model, tmp_path / "v.onnx", format="onnx", example_inputs=x, verify="no")
    assert target.read_bytes() == b"keep"
    not_a_folder = tmp_path / "out.bin"  # a path without .onnx names a folder to hold model.onnx
    not_a_folder.write_bytes(b"keep")
    with pytest.raises(D.ExportError, match=r"out\.bin exists and is not a folder"):
        D.export(model, not_a_folder, format="onnx", example_inputs=x)
    assert not_a_folder.read_bytes() == b"keep"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "out.bin"]


def test_the_exported_file_has_the_mode_the_umask_gives(tmp_path):
    """Written through mkstemp (0600), moved into place with the mode a plain open() gives: 0o666 & ~umask."""
    import os
    import stat

    model = nn.Sequential(nn.Linear(32, 16)).eval()
    quantize_(model, QuantConfig(bits=4, scope="group", group_size=32))
    old = os.umask(0o022)
    try:
        D.export(model, tmp_path / "m.onnx", format="onnx", example_inputs=torch.randn(2, 32))
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "m.onnx").stat().st_mode) == 0o644


def test_promote_with_calibration_checks_against_the_promoted_weights(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 4)).eval()
    quantize_(model, {"0": QuantConfig(4, group_size=32, channel_bits=(16, 4) * 32), "2": INT8})  # float + 4-bit rows
    calib = _calib((64,), n=2)
    report = D.export(model, tmp_path / "p.onnx", format="onnx", calib=calib, promote=True)
    assert report.layers[0].how == "lossy requantization" and report.layers[0].max_abs_error > 0
    x = torch.cat(calib)  # inside the calibrated activation ranges
    with torch.no_grad():
        want = model(x).numpy()
    got = OnnxClassifier(tmp_path / "p.onnx")(x)
    assert np.abs(got - want).max() <= 0.05 * np.abs(want).max()  # the promotion and int8 activations


def test_a_relu_is_not_fused_into_a_layer_whose_output_has_other_readers():
    class TwoUses(nn.Module):  # the ReLU reads fc1's output, which is also used un-rectified
        def __init__(self):
            super().__init__()
            self.fc1, self.relu, self.fc2 = nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2)

        def forward(self, x):
            h = self.fc1(x)
            return self.fc2(self.relu(h) + h)

    torch.manual_seed(0)
    model = TwoUses().eval()
    quantize_(model, INT8)
    sim = calibrate_activations(model, _calib((8,)))  # its float-path check (check=True) compares with the model
    assert not sim.get_submodule("fc1").fuse_relu  # fusing would rectify h for the addition too
    x = torch.randn(16, 8)
    with torch.no_grad():
        want, got = model(x), sim(x)
    assert (got - want).abs().max() <= 0.2 * want.abs().max()  # int8 activations (a wrong fusion: ~1x)


def test_bn_folded_low_bit_convs_are_near_exact_with_their_error(tmp_path):
    """3-bit codes in the int8 container (exact re-expression) lose their exactness when a BatchNorm is folded into
    the scales: such rows are near-exact with the measured change; the report's exact rows have 0.0."""
    model = _bn_stats(tiny_cnn())
    quantize_(model, QuantConfig(bits=3, scope="channel"))
    sim = calibrate_activations(model, _calib((3, 16, 16)), promote=True)
    report = D.export(sim, tmp_path / "c.onnx", format="onnx", example_inputs=torch.randn(2, 3, 16, 16))
    rows = {r.name: r for r in report.layers}
    for conv, bn in (("features.0", "features.1"), ("features.3", "features.4")):
        b = model.get_submodule(bn)
        f = (b.weight.detach() / torch.sqrt(b.running_var + b.eps)).double()
        ref = model.get_submodule(conv).dequantized_weight(torch.float32).double() * f[:, None]
        err = float((_file_weight(tmp_path / "c.onnx", conv).double() - ref).abs().max())
        assert rows[conv].how == "near-exact" and 0 < rows[conv].max_abs_error < 1e-5 and err < 1e-5
    assert rows["classifier"].how == "exact re-expression"
    assert all(r.max_abs_error == 0.0 for r in report.layers if r.how.startswith("exact"))


def test_pruned_channels_keep_their_folded_bias_in_the_integer_conv(tmp_path):
    """Pruned rows (0 bits) of a conv followed by a BatchNorm output the folded bias ``beta - mean * f``; in the int8
    QDQ conv ONNX Runtime stores that bias in int32 at scale ``s_x * s_w``, so their weight scale is set to the
    layer's median (their weight stays 0): with the smallest positive float there the bias was lost (ORT 0.05 off
    the model on every input)."""
    model = _bn_stats(tiny_cnn())
    rows = model.features[3].out_channels
    quantize_(model, {"features.3": QuantConfig(8, scope="channel", symmetric=False,
                                                channel_bits=tuple((0, 8)[i % 2] for i in range(rows)))})
    sim = calibrate_activations(model, _calib((3, 16, 16)), promote=True)
    report = D.export(sim, tmp_path / "p.onnx", format="onnx", example_inputs=torch.randn(2, 3, 16, 16))
    assert report.layers[1].target == "uint8 per-channel QDQ"
    scales = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(tmp_path / "p.onnx")).graph.initializer}
    s = scales["features.3.weight_scale"]
    assert (s[0::2] == torch.from_numpy(s[1::2]).median().item()).all()  # torch's median: the lower middle
    assert (_file_weight(tmp_path / "p.onnx", "features.3")[0::2] == 0).all()
    x = torch.cat(_calib((3, 16, 16), seed=1))
    sess = ort.InferenceSession(str(tmp_path / "p.onnx"), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        want = sim(x).numpy()
    got = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    bound = logits_tolerance(sim)
    assert float(np.abs(got - want).max()) <= (1e-3 if bound is None else bound)  # the lost bias: 0.05


def test_activation_quantized_graphs_run_unfused_where_the_int8_kernels_saturate(tmp_path, monkeypatch):
    """Without VNNI, onnxruntime's fused u8 x s8 kernels add product pairs in saturating 16-bit integers (logit
    errors of the logits' size on a trained CNN, seen on an AVX2 CPU): there the session runs the quantize /
    dequantize steps unfused (ORT_ENABLE_BASIC), elsewhere fused; the flag decides when given. Reference: the
    simulation's logits (unfused ORT matches them to float rounding)."""
    import medquant.deploy.onnx as onnx_mod

    torch.manual_seed(0)
    model = tiny_cnn(num_classes=3).eval()
    quantize_(model, INT8)
    x = torch.randn(16, 3, 32, 32)
    sim = calibrate_activations(model, x.split(8))
    D.export(sim, tmp_path / "m.onnx", format="onnx", example_inputs=x[:2])
    basic, default = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC, ort.SessionOptions().graph_optimization_level
    onnx_mod._warned_unfused.clear()
    monkeypatch.setattr(onnx_mod, "int8_kernels_saturate", lambda: True)
    with pytest.warns(RuntimeWarning, match="saturate on this CPU"):
        assert session_options(tmp_path / "m.onnx").graph_optimization_level == basic
    assert session_options(tmp_path / "m.onnx", fuse_int8=True).graph_optimization_level == default
    with torch.no_grad():
        want = sim(x).numpy()
    got = OnnxClassifier(tmp_path / "m.onnx")(x)
    assert np.abs(got - want).max() <= logits_tolerance(sim)
    monkeypatch.setattr(onnx_mod, "int8_kernels_saturate", lambda: False)
    assert session_options(tmp_path / "m.onnx").graph_optimization_level == default
    assert session_options(tmp_path / "m.onnx", fuse_int8=False).graph_optimization_level == basic


def test_a_failed_export_removes_the_folders_it_created_and_keeps_existing_ones(tmp_path):
    class Unsupported(nn.Module):  # refused while writing: after the target's folders had to be created
        def forward(self, x):
            return torch.cummax(x, 1)[0]

    existing = tmp_path / "existing"
    existing.mkdir()
    x = torch.randn(2, 5)
    for target in (existing / "new" / "deeper" / "m.onnx", existing / "out"):  # a file; a folder for model.onnx
        with pytest.raises(D.ExportError, match="cummax"):
            D.export(Unsupported(), target, format="onnx", example_inputs=x)
        assert sorted(p.name for p in tmp_path.iterdir()) == ["existing"] and not any(existing.iterdir())
    with pytest.raises(D.ExportError, match="cummax"):  # an existing empty folder to hold model.onnx stays
        D.export(Unsupported(), existing, format="onnx", example_inputs=x)
    assert existing.is_dir() and not any(existing.iterdir())


def test_a_folder_in_place_of_the_file_is_named_and_no_overwrite_is_suggested(tmp_path):
    """A folder named like the file (``x.onnx``), or a folder ``model.onnx`` inside the target folder: overwrite
    would not replace it, so the error says it is a folder and asks for a file path instead."""
    model = nn.Sequential(nn.Linear(32, 16)).eval()
    quantize_(model, QuantConfig(bits=4, scope="group", group_size=32))
    x = torch.randn(2, 32)
    (tmp_path / "x.onnx").mkdir()
    (tmp_path / "x.onnx" / "keep.txt").write_text("k")
    (tmp_path / "out" / "model.onnx").mkdir(parents=True)
    for target, folder in ((tmp_path / "x.onnx", "x.onnx"), (tmp_path / "out", "model.onnx")):
        for overwrite in (False, True):
            with pytest.raises(D.ExportError, match=rf"{folder} is a folder.*give a file path") as e:
                D.export(model, target, format="onnx", example_inputs=x, overwrite=overwrite)
            assert "overwrite" not in str(e.value)
    assert (tmp_path / "x.onnx" / "keep.txt").read_text() == "k" and (tmp_path / "out" / "model.onnx").is_dir()
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["keep.txt", "model.onnx", "out", "x.onnx"]


# ------------------------------------------------------------------------------------------------ review fixes
def test_tolerance_is_derived_when_the_output_layer_reads_a_fused_relu_output(tmp_path):
    """Linear -> ReLU -> Linear (an MLP head): the last layer reads the first one's quantized output after its fused
    ReLU. The bound ``s_in * max_j ||W_j||_1 + 1e-4`` is derived from that point (it was None, and the export checked
    ORT against 5% of the largest logit instead). Reference: numpy, from the dequantized weights and the calibration
    inputs (``s_in = max(relu(x W1^T + b1)) / 255``, minmax with lo = 0)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4)).eval()
    quantize_(model, INT8)
    calib = _calib((16,), n=3)
    sim = calibrate_activations(model, calib)
    x = torch.cat(calib).double().numpy()
    w1 = model[0].dequantized_weight(torch.float32).double().numpy()
    w2 = model[2].dequantized_weight(torch.float32).double().numpy()
    h = np.maximum(x @ w1.T + model[0].bias.detach().double().numpy(), 0.0)
    s_in = np.float32(h.max() / 255.0)
    want = float(s_in) * float(np.abs(w2).sum(1).max()) + 1e-4
    tol = logits_tolerance(sim)
    assert tol is not None and tol == pytest.approx(want, rel=1e-5)
    report = D.export(sim, tmp_path / "mlp.onnx", format="onnx", example_inputs=calib[0])
    assert any(f"<= tolerance {tol:.3g}" in n for n in report.notes)  # ORT checked against the derived bound
    with torch.no_grad():
        ref = sim(torch.cat(calib)).numpy()
    assert np.abs(OnnxClassifier(tmp_path / "mlp.onnx")(torch.cat(calib)) - ref).max() <= tol


def test_calib_generator_without_example_inputs(tmp_path):
    """``calib`` may be any iterable, a one-shot generator included: without ``example_inputs`` the first batch is
    the example and every batch is calibrated on (it raised StopIteration, the generator being spent). Reference:
    the scales that calibrate_activations computes from the same batches as a list."""
    torch.manual_seed(0)
    model = tiny_cnn().eval()
    quantize_(model, INT8)
    calib = _calib((3, 16, 16))
    report = D.export(model, tmp_path / "g.onnx", format="onnx", calib=(b for b in calib))
    assert "minmax calibration on 3 batch(es)" in " ".join(report.notes)
    sim = calibrate_activations(model, calib)
    inits = _inits(tmp_path / "g.onnx")
    scales = {k: v for k, v in inits.items() if k.endswith("_quant.scale")}
    assert scales and all(float(v) == float(sim.get_submodule(k[: -len(".scale")]).scale) for k, v in scales.items())
    with pytest.raises(CalibrationError, match="calibration set is empty"):
        D.export(model, tmp_path / "e.onnx", format="onnx", calib=iter([]))


def test_non_finite_input_is_refused_at_run_time(tmp_path):
    """A NaN or inf pixel is an error naming the input and the sample: ONNX Runtime's QuantizeLinear maps NaN to a
    code, so the int8 file returned finite, plausible logits for a corrupted image (the simulation gives NaN)."""
    torch.manual_seed(0)
    model = tiny_cnn().eval()
    quantize_(model, INT8)
    D.export(model, tmp_path / "m.onnx", format="onnx", calib=_calib((3, 16, 16)))
    clf = OnnxClassifier(tmp_path / "m.onnx")
    x = torch.randn(3, 3, 16, 16)
    assert np.isfinite(clf(x)).all()
    for bad in (float("nan"), float("inf")):
        y = x.clone()
        y[2, 1, 4, 5] = bad
        with pytest.raises(ValueError, match=r"input 'pixel_values' contains 1 NaN/inf value\(s\) \(sample 2\)"):
            clf(y)
        with pytest.raises(ValueError, match="NaN/inf"):
            clf(y.double().numpy())  # also before the cast to the model's float type


def test_bfloat16_and_other_float_inputs_are_cast_like_float16(tmp_path):
    """A bfloat16 tensor (or a numpy bfloat16 array, ml_dtypes) is cast to the model's float type as float16 and
    float64 are (it raised numpy's TypeError 'unsupported ScalarType BFloat16'). Reference: the float32 run on the
    same values (bfloat16 -> float32 is exact)."""
    import ml_dtypes

    torch.manual_seed(0)
    D.export(tiny_cnn().eval(), tmp_path / "f.onnx", format="onnx", example_inputs=torch.randn(2, 3, 16, 16))
    clf = OnnxClassifier(tmp_path / "f.onnx")
    x = torch.randn(3, 3, 16, 16).to(torch.bfloat16)
    want = clf(x.float())
    np.testing.assert_array_equal(clf(x), want)
    np.testing.assert_array_equal(clf(x.float().numpy().astype(ml_dtypes.bfloat16)), want)
    np.testing.assert_array_equal(clf(x.half()), clf(x.half().float()))  # float16: unchanged behaviour
    y = x.clone()
    y[1, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"contains 1 NaN/inf value\(s\) \(sample 1\)"):
        clf(y)
    with pytest.raises(ValueError, match=r"has dtype bool, the model expects tensor\(float\)"):
        clf(torch.zeros(3, 3, 16, 16, dtype=torch.bool))


def test_calibration_options_for_a_calibrated_model_are_refused(tmp_path):
    """A model returned by calibrate_activations has its activation scales already: calib batches (or another
    method / percentile) given to export had no effect and were silently ignored. They are refused, naming what was
    given, and no file is written; the same options as the model's calibration, or none, export as before."""
    torch.manual_seed(0)
    model = tiny_cnn().eval()
    quantize_(model, INT8)
    calib = _calib((3, 16, 16))
    sim = calibrate_activations(model, calib)
    x = torch.randn(2, 3, 16, 16)
    for kwargs, message in (({"calib": _calib((3, 16, 16), seed=1)}, r"calib="),
                            ({"calib": _calib((3, 16, 16), seed=1), "example_inputs": None}, r"calib="),
                            ({"method": "percentile"}, r"method='minmax'.*\); method='percentile' would have no effect"),
                            ({"percentile": 99.0}, r"percentile=99\.0")):
        options = {"example_inputs": x, **kwargs}
        with pytest.raises(D.ExportError, match=message) as e:
            D.export(sim, tmp_path / "s.onnx", format="onnx", **options)
        assert "already calibrated" in str(e.value) and "calibrate_activations" in str(e.value)
        assert not (tmp_path / "s.onnx").exists()
    D.export(sim, tmp_path / "s.onnx", format="onnx", example_inputs=x, method="minmax")  # as calibrated: accepted
    pct = calibrate_activations(model, calib, method="percentile", percentile=99.0)
    D.export(pct, tmp_path / "p.onnx", format="onnx", example_inputs=x, method="percentile", percentile=99.0)
    ref = _inits(tmp_path / "s.onnx")
    D.export(model, tmp_path / "m.onnx", format="onnx", example_inputs=x, calib=calib)  # the one-call path
    got = _inits(tmp_path / "m.onnx")
    assert all(np.array_equal(got[k], v) for k, v in ref.items() if k.endswith("_quant.scale"))


def test_verification_is_not_blinded_by_nan_outputs(tmp_path):
    """NaN logits in some samples (sqrt of a negative input) made the check's max |diff| (and its tolerance) NaN,
    and ``NaN > tol`` is False: a trace that kept one branch of data-dependent control flow was written although
    ONNX Runtime computes another function on the finite samples. Samples that are NaN in both agree; the others
    are compared. Reference: the model itself, run on the negated example."""

    class SqrtBranchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(8, 2)

        def forward(self, x):
            y = self.fc(torch.sqrt(x))
            return y if float(x.mean()) > 0 else -y * 3.0

    torch.manual_seed(0)
    model = SqrtBranchy().eval()
    x = torch.rand(4, 8) + 0.1
    x[0] = -x[0]  # sample 0: NaN logits on the example, finite (and on the other branch) when negated
    with torch.no_grad():
        assert torch.isnan(model(x)[0]).all() and torch.isfinite(model(-x)[0]).all()
    with pytest.raises(D.ExportError, match="does not represent the model"):
        D.export(model, tmp_path / "b.onnx", format="onnx", example_inputs=x)
    assert not (tmp_path / "b.onnx").exists()

    class Sqrt(nn.Module):  # no branch: NaN where the model gives NaN, equal elsewhere: written
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(8, 2)

        def forward(self, x):
            return self.fc(torch.sqrt(x))

    D.export(Sqrt().eval(), tmp_path / "s.onnx", format="onnx", example_inputs=x)
    assert (tmp_path / "s.onnx").exists()


def test_percentile_without_the_percentile_method_and_a_string_of_input_names_are_refused(tmp_path):
    """``percentile=`` with the default ``method="minmax"`` calibrated min-max and dropped the percentile silently
    (the command line refuses ``--percentile`` without ``--calib-method percentile``); ``input_names="image"`` was
    split into letters ('5 names for 1 inputs'). Both are refused naming the fix, and no file is written; with
    ``method="percentile"`` the scales are those of calibrate_activations (the reference)."""
    torch.manual_seed(0)
    model = tiny_cnn().eval()
    quantize_(model, INT8)
    calib = _calib((3, 16, 16))
    with pytest.raises(D.ExportError, match=r"percentile=99\.0 applies to method='percentile'.*method='minmax'"):
        D.export(model, tmp_path / "a.onnx", format="onnx", calib=calib, percentile=99.0)
    with pytest.raises(D.ExportError, match=r"input_names must be a list of names.*got str 'image'.*\['image'\]"):
        D.export(model, tmp_path / "a.onnx", format="onnx", calib=calib, input_names="image")
    assert not (tmp_path / "a.onnx").exists()
    D.export(model, tmp_path / "p.onnx", format="onnx", calib=calib, method="percentile", percentile=99.0,
             input_names=["image"])
    sim = calibrate_activations(model, calib, method="percentile", percentile=99.0)
    scales = {k: v for k, v in _inits(tmp_path / "p.onnx").items() if k.endswith("_quant.scale")}
    assert scales and all(float(v) == float(sim.get_submodule(k[: -len(".scale")]).scale) for k, v in scales.items())
    assert [i.name for i in ort.InferenceSession(str(tmp_path / "p.onnx")).get_inputs()] == ["image"]
