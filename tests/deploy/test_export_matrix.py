"""The calibrating quantizers' layers through every exporter that claims to take them, checked with the runtime's
own reader.

Cells: GPTQ (``act_order=True`` with ``clip_search``: a column order and shrunk ranges RTN never makes), AWQ (scales
folded into the norms), AdaRound (learned rounding, and ``act_bits`` input quantizers), a config map of per-layer
schemes with a skip list, per-row bit-widths (``channel_bits``), a GPTQ-quantized head of a tied model - each
exported as compressed-tensors, GGUF and ONNX where the format claims to carry it.

References, independent of the exporters: transformers' own ``from_pretrained`` of the compressed-tensors folder and
of the GGUF file (its GGUF loader dequantises every tensor with the ``gguf`` package and undoes llama.cpp's q/k
permutation), the compressed-tensors package's own decompressor, ONNX Runtime; against the medquant model's logits
(``force_backend("torch")``: its float32 reference path) and its dequantised weights. A cell that a format cannot
carry must be refused with an :class:`ExportError` naming the layers and what is accepted.
"""
from __future__ import annotations

import copy
import json
import warnings

import numpy as np
import pytest
import torch

import medquant as mq
from medquant.calibrate import adaround_quantize_, awq_quantize_, gptq_quantize_
from medquant.deploy import ExportError, export
from medquant.kernels import force_backend
from medquant.quant.api import quantized_modules
from medquant.testing.zoo import ZOO_BY_NAME

pytest.importorskip("compressed_tensors")
pytest.importorskip("gguf")

pytestmark = pytest.mark.usefixtures("one_torch_thread")

W4 = mq.QuantConfig(4, symmetric=True, group_size=32)


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def _llama(tie: bool = False):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tie)
    return LlamaForCausalLM(cfg).eval()


_G = torch.Generator().manual_seed(0)
CALIB = [{"input_ids": torch.randint(3, 256, (2, 16), generator=_G)} for _ in range(2)]
IDS = torch.randint(3, 256, (2, 9), generator=torch.Generator().manual_seed(1))


def _logits(model) -> torch.Tensor:
    with torch.no_grad(), force_backend("torch"):  # medquant's float32 reference path
        return model(input_ids=IDS).logits


def _ct_logits(model, folder, dequantize: bool) -> torch.Tensor:
    """Export as compressed-tensors and run transformers' own load of the folder."""
    import transformers
    from transformers import CompressedTensorsConfig

    export(model, folder, format="compressed-tensors")
    kw = {"quantization_config": CompressedTensorsConfig(dequantize=True)} if dequantize else {}
    loaded = getattr(transformers, type(model).__name__).from_pretrained(str(folder), **kw).eval()
    with torch.no_grad():
        return loaded(input_ids=IDS).logits


def _gguf_reload(model, file, tok_dir):
    """Export as GGUF and load the file with transformers' GGUF loader (the ``gguf`` package's dequantiser)."""
    from transformers import AutoModelForCausalLM

    report = export(model, file, format="gguf", source=tok_dir)
    loaded = AutoModelForCausalLM.from_pretrained(str(file.parent), gguf_file=file.name, dtype=torch.float32)
    return report, loaded.eval()


def _gguf_types(file) -> dict[str, str]:
    from gguf import GGUFReader

    return {t.name: t.tensor_type.name for t in GGUFReader(str(file)).tensors}


# ---------------------------------------------------------------------------------------------- calibrated cells
def _gptq(cfg, **kw):
    model = _llama()
    gptq_quantize_(model, cfg, CALIB, skip=["lm_head"], act_order=True, clip_search=True, progress=False, **kw)
    return model


CELLS = {
    # method/scheme: (build, symmetric everywhere: transformers' compressed load, else dequantize=True)
    "gptq-int4-sym-g32": (lambda: _gptq(W4), True),
    "gptq-int3-asym-g128": (lambda: _gptq(mq.QuantConfig(3, symmetric=False, group_size=128)), False),
    "gptq-int2-sym-channel": (lambda: _gptq(mq.QuantConfig(2, symmetric=True, scope="channel")), True),
    "gptq-int8-sym-channel": (lambda: _gptq(mq.QuantConfig(8, symmetric=True, scope="channel")), True),
    "awq-int4-sym-g64": (lambda: _awq(mq.QuantConfig(4, symmetric=True, group_size=64)), True),
    "awq-int2-asym-g32": (lambda: _awq(mq.QuantConfig(2, symmetric=False, group_size=32)), False),
    "adaround-int4-sym-g32": (lambda: _adaround(W4), True),
}


def _awq(cfg):
    model = _llama()
    groups = awq_quantize_(model, cfg, CALIB, progress=False)
    assert groups  # scales were folded into the norms / previous linears
    return model


def _adaround(cfg, **kw):
    model = _llama()
    adaround_quantize_(model, cfg, CALIB, skip=["lm_head"], iters=4, progress=False, **kw)
    return model


@pytest.fixture(scope="module")
def cells():
    return {name: build() for name, (build, _) in CELLS.items()}


@pytest.mark.parametrize("cell", list(CELLS))
def test_calibrated_layers_load_in_transformers_from_compressed_tensors_as_medquant_computes(cells, cell, tmp_path):
    model = cells[cell]
    got = _ct_logits(model, tmp_path / "ct", dequantize=not CELLS[cell][1])
    torch.testing.assert_close(got, _logits(model), rtol=0, atol=1e-5)


@pytest.mark.parametrize("cell", list(CELLS))
def test_calibrated_layers_read_back_from_gguf_as_medquant_computes(cells, cell, tmp_path, tok_dir):
    model = cells[cell]
    report, loaded = _gguf_reload(model, tmp_path / "m.gguf", tok_dir)
    quant = quantized_modules(model)
    rows = {r.name: r for r in report.layers}
    sd = loaded.state_dict()
    for name, layer in quant.items():  # every such scheme is a GGUF block type exactly (Q4_0 / Q8_0)
        assert rows[name].how in ("exact repack", "exact re-expression"), (name, rows[name])
        assert torch.equal(sd[f"{name}.weight"], layer.dequantized_weight(torch.float32)), name
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=IDS).logits, _logits(model), rtol=0, atol=1e-5)


# ------------------------------------------------------------------------------------- activation quantizers
@pytest.fixture(scope="module")
def w4a8():
    return _adaround(W4, act_bits=8)


@pytest.mark.parametrize("fmt", ["compressed-tensors", "gguf"])
def test_adaround_activation_quantizers_are_refused_not_dropped(w4a8, fmt, tmp_path, tok_dir):
    """A W4A8 AdaRound model computes with its inputs fake-quantized (forward pre-hooks): a weight-only file of it
    is another model (logits off by ~1e-2 here), so the export refuses it, naming the layers and what is accepted."""
    assert hasattr(w4a8.model.layers[0].self_attn.q_proj, "input_quantizer")
    out = tmp_path / ("m.gguf" if fmt == "gguf" else "ct")
    with pytest.raises(ExportError, match=r"(?s)input.*model\.layers\.0\.self_attn\.q_proj.*8-bit.*input_quantizer_handle"):
        export(w4a8, out, format=fmt, **({"source": tok_dir} if fmt == "gguf" else {}))
    assert not out.exists()


def test_onnx_refuses_activation_quantizers_it_would_drop(tmp_path):
    import medquant.deploy as D

    entry = ZOO_BY_NAME["vit"]
    model = entry.build()
    g = torch.Generator().manual_seed(0)
    calib = [{"pixel_values": entry.inputs_fn(model, g)["pixel_values"]} for _ in range(2)]
    adaround_quantize_(model, W4, calib, iters=2, act_bits=8, progress=False)
    x = entry.inputs_fn(model, g)["pixel_values"]
    with pytest.raises(ExportError, match=r"(?s)input.*vit\.layers\.0\.attention\.q_proj.*input_quantizer_handle"):
        D.export(model, tmp_path / "m.onnx", format="onnx", example_inputs=x)
    assert not (tmp_path / "m.onnx").exists()
    # with the quantizers removed the weights alone are exported, as medquant then computes them
    for m in model.modules():
        if getattr(m, "input_quantizer_handle", None) is not None:
            m.input_quantizer_handle.remove()
    D.export(model, tmp_path / "m.onnx", format="onnx", example_inputs=x)
    from medquant.deploy.onnx import OnnxClassifier

    with torch.no_grad(), force_backend("torch"):
        want = model(x).logits.numpy()
    np.testing.assert_allclose(OnnxClassifier(tmp_path / "m.onnx")(x), want, rtol=1e-4, atol=1e-4)


def test_removed_activation_quantizers_export_the_weights(tmp_path):
    model = _adaround(W4, act_bits=8)
    for m in model.modules():
        if getattr(m, "input_quantizer_handle", None) is not None:
            m.input_quantizer_handle.remove()
    torch.testing.assert_close(_ct_logits(model, tmp_path / "ct", dequantize=False), _logits(model), rtol=0,
                               atol=1e-5)


# -------------------------------------------------------------------------- config maps, row bits, tied heads
def test_gptq_config_map_with_skips_is_exact_in_gguf_and_per_group_in_compressed_tensors(tmp_path, tok_dir):
    from compressed_tensors.compressors.pack_quantized import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationConfig
    from safetensors.torch import load_file

    cmap = {"model.layers.0.self_attn.q_proj": mq.QuantConfig(8, symmetric=True, scope="channel"),
            r"re:model\.layers\.\d+\.mlp\.down_proj": mq.QuantConfig(3, symmetric=False, group_size=64),
            r"re:model\.layers\.1\.self_attn\..*": mq.QuantConfig(2, symmetric=True, group_size=32),
            "_default": mq.QuantConfig(4, symmetric=True, group_size=128)}  # K = 64: groups of the whole row
    model = _llama()
    gptq_quantize_(model, cmap, CALIB, skip=["lm_head", "model.layers.0.mlp.up_proj"], act_order=True,
                   clip_search=True, progress=False)
    quant = quantized_modules(model)
    assert "model.layers.0.mlp.up_proj" not in quant and len(quant) == 13
    _, loaded = _gguf_reload(model, tmp_path / "m.gguf", tok_dir)
    assert _gguf_types(tmp_path / "m.gguf")["blk.0.ffn_up.weight"] == "F32"
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=IDS).logits, _logits(model), rtol=0, atol=1e-5)
    # compressed-tensors: four config groups (asymmetric among them: no transformers load path, as the report
    # notes); the package's own decompressor reads every layer with its own group's scheme
    report = export(model, tmp_path / "ct", format="compressed-tensors")
    assert any("group_0's scheme" in n for n in report.notes)
    qc = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]
    cfg = QuantizationConfig.model_validate(qc)
    assert {"lm_head", "model.layers.0.mlp.up_proj"} <= set(cfg.ignore)
    tensors = load_file(str(tmp_path / "ct" / "model.safetensors"))
    for name, layer in quant.items():
        (scheme,) = [s for s in cfg.config_groups.values() if name in s.targets]
        local = {k[len(name) + 1:]: v for k, v in tensors.items() if k.startswith(name + ".weight_")}
        got = PackedQuantizationCompressor.decompress(local, scheme)["weight"]
        assert torch.equal(got.float(), layer.dequantized_weight(torch.float32)), name


def test_gptq_row_bits_are_one_gguf_block_type_and_refused_by_the_others(tmp_path, tok_dir):
    rows = mq.QuantConfig(4, group_size=32, channel_bits=(0,) * 8 + (3,) * 8 + (8,) * 8 + (4,) * 40)
    model = _llama()
    gptq_quantize_(model, {"model.layers.0.self_attn.q_proj": rows, "_default": W4}, CALIB, skip=["lm_head"],
                   act_order=True, progress=False)
    report, loaded = _gguf_reload(model, tmp_path / "m.gguf", tok_dir)
    assert _gguf_types(tmp_path / "m.gguf")["blk.0.attn_q.weight"] == "Q8_0"
    row = next(r for r in report.layers if r.name == "model.layers.0.self_attn.q_proj")
    assert row.how == "exact re-expression" and row.max_abs_error == 0.0
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=IDS).logits, _logits(model), rtol=0, atol=1e-5)
    with pytest.raises(ExportError, match=r"q_proj: mixed \{0: 8 rows, 3: 8 rows, 4: 40 rows, 8: 8 rows\}.*promote"):
        export(model, tmp_path / "ct", format="compressed-tensors")
    assert not (tmp_path / "ct").exists()


def test_gptq_head_of_a_tied_model_is_written_once_as_its_own_layer(tmp_path, tok_dir):
    model = _llama(tie=True)
    gptq_quantize_(model, W4, CALIB, act_order=True, progress=False)  # lm_head quantized, embeddings stay float
    assert "lm_head" in quantized_modules(model)
    _, loaded = _gguf_reload(model, tmp_path / "m.gguf", tok_dir)
    types = _gguf_types(tmp_path / "m.gguf")
    assert types["output.weight"] == "Q4_0" and types["token_embd.weight"] == "F32"
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=IDS).logits, _logits(model), rtol=0, atol=1e-5)
    got = _ct_logits(copy.deepcopy(model), tmp_path / "ct", dequantize=False)
    assert json.loads((tmp_path / "ct" / "config.json").read_text())["tie_word_embeddings"] is False
    torch.testing.assert_close(got, _logits(model), rtol=0, atol=1e-5)


def test_gptq_act_order_vit_runs_in_onnx_runtime_as_medquant_computes(tmp_path):
    import medquant.deploy as D
    from medquant.deploy.onnx import OnnxClassifier

    entry = ZOO_BY_NAME["vit"]
    model = entry.build()
    g = torch.Generator().manual_seed(0)
    calib = [{"pixel_values": entry.inputs_fn(model, g)["pixel_values"]} for _ in range(2)]
    gptq_quantize_(model, mq.QuantConfig(4, symmetric=False, group_size=16), calib, act_order=True, clip_search=True,
                   progress=False)
    x = entry.inputs_fn(model, g)["pixel_values"]
    report = D.export(model, tmp_path / "m.onnx", format="onnx", example_inputs=x)  # weight-only: no calib
    assert {r.how for r in report.layers} == {"exact repack"}
    with torch.no_grad(), force_backend("torch"):
        want = model(x).logits.numpy()
    np.testing.assert_allclose(OnnxClassifier(tmp_path / "m.onnx")(x), want, rtol=1e-4, atol=1e-4)
